"""`convert`, `resize`, `qemu_info`: qemu-img, run only on images that passed `check()`.

Every command line is built here and nowhere else, from values imgguard checked:

* the source format is always given (`-f`, or `driver=` in an `--image-opts` string imgguard
  wrote itself for an encrypted source): qemu never probes;
* every path is absolute, so that no file name can be read as a protocol (`nbd:`, `json:`) or
  an option (`-o...`); paths inside option strings have their commas doubled;
* secrets reach qemu-img only as `--object secret,...,file=PATH`: never on the command line;
* an image that names a file qemu-img would open (backing file, external data file, extent,
  parent) is refused even where the policy waived that finding: the backend follows nothing;
* a source of a format that can have a backing file (qcow2, qcow, qed, vmdk) is opened as a
  `json:` filename imgguard writes, with the driver pinned and `"backing": null`;
* qemu-img runs in a sandbox (sandbox.py) that sees only its own files, the source, the target
  and the passphrase files, with no network, unless the caller passes `sandbox=False`.

docs/backend.md gives the exact command lines and why each flag is there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, BinaryIO

import attrs
from attrs import field, frozen

from imgguard import formats
from imgguard.backend.atomic import AtomicOutput, filesystem_of
from imgguard.backend.errors import (
    ConversionFailed,
    ConversionTimeout,
    ImageRejected,
    NoSpaceLeft,
    QemuImgFailed,
    QemuImgNotFound,
)
from imgguard.backend.limits import DEFAULT_LIMITS, INFO_LIMITS, Limits
from imgguard.backend.process import Completed, ProgressCallback, run
from imgguard.backend.sandbox import (
    SECRETS_DIR,
    SOURCE_PATH,
    TARGET_PATH,
    Sandbox,
    SandboxMode,
    prepare,
)
from imgguard.errors import ConfigError, ImageError
from imgguard.inspection import inspect
from imgguard.model import Finding, ImageInfo, Policy, Status, Verdict
from imgguard.policy import DEFAULT_POLICY, check
from imgguard.rules import qemu_format_name

log = logging.getLogger("imgguard.backend")

MiB = 1 << 20

# --force-share (2.10) is the newest flag imgguard passes.
MINIMUM_QEMU_IMG_VERSION = (2, 10, 0)

# What convert writes: qemu's maintained drivers, each producing one self-contained file.
OUTPUT_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "luks"})
# `-o subformat=` values per output format. VMDK's monolithicFlat and twoGb* subformats write
# more than one file, which a single atomic rename cannot publish, so they are not offered.
SUBFORMATS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "vmdk": frozenset({"monolithicSparse", "streamOptimized"}),
        "vpc": frozenset({"dynamic", "fixed"}),
        "vhdx": frozenset({"dynamic", "fixed"}),
    }
)
# What a freshly written image of each subformat inspects as, where imgguard names it so.
DEFAULT_SUBFORMAT: Mapping[str, str] = MappingProxyType(
    {"vmdk": "monolithicSparse", "vpc": "dynamic"}
)
CACHE_MODES = frozenset({"none", "writeback", "unsafe", "directsync", "writethrough"})
# Formats qemu-img convert -c can compress into.
COMPRESSIBLE = frozenset({"qcow2", "vmdk"})
# Output formats that can carry LUKS encryption: a LUKS volume, or qcow2 with encrypt.format=luks.
ENCRYPTABLE = frozenset({"luks", "qcow2"})

SOURCE_SECRET_ID = "imgguard-src-key"
TARGET_SECRET_ID = "imgguard-dst-key"

_LUKS_TIMING_ERROR = "Unable to get accurate CPU usage"
_LUKS_TIMING_RUNS = 8
_OPTION_VALUE = re.compile(r"^[A-Za-z0-9_.-]+$")
_VERSION = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")
# Formats whose driver can open a backing file: the source is opened with "backing": null.
BACKING_FORMATS = frozenset({"qcow2", "qcow", "qed", "vmdk"})
SOURCE_SECRET_PATH = f"{SECRETS_DIR}/source-key"
TARGET_SECRET_PATH = f"{SECRETS_DIR}/target-key"

# The reference kinds qemu opens itself (VHD/VHDX parent locators and VDI parent UUIDs it never
# follows); the backend refuses these whatever the policy says.
_FOLLOWED_REFERENCES = frozenset({"backing-file", "data-file", "extent", "parent-hint"})


# --- finding qemu-img ------------------------------------------------------------------------


def find_qemu_img() -> str:
    """The absolute path of qemu-img on PATH, looked up on every call."""
    found = shutil.which("qemu-img")
    if found is None:
        raise QemuImgNotFound()
    return os.path.abspath(found)


def qemu_img_version(
    *, command_prefix: Sequence[str] = (), sandbox: SandboxMode = True
) -> tuple[int, int, int]:
    """qemu-img's version, e.g. (7, 2, 0), from `qemu-img --version` (in the sandbox)."""
    qemu_img = find_qemu_img()
    completed = run(
        [qemu_img, "--version"],
        limits=INFO_LIMITS,
        operation="--version",
        command_prefix=command_prefix,
        sandbox=prepare(sandbox, qemu_img),
    )
    text = completed.stdout.decode("utf-8", "replace")
    match = _VERSION.search(text)
    if match is None:
        raise QemuImgNotFound(f"cannot read a version in qemu-img --version output: {text!r}")
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


def check_qemu_img_version(
    minimum: tuple[int, int, int] = MINIMUM_QEMU_IMG_VERSION, *, sandbox: SandboxMode = True
) -> tuple[int, int, int]:
    """The installed version, or `QemuImgNotFound` when it is older than `minimum`."""
    version = qemu_img_version(sandbox=sandbox)
    if version < minimum:
        have, need = ".".join(map(str, version)), ".".join(map(str, minimum))
        raise QemuImgNotFound(
            f"qemu-img {have} is older than {need}, the oldest imgguard runs; "
            f"{QemuImgNotFound.PACKAGE_HINT}"
        )
    return version


# --- qemu-img info ---------------------------------------------------------------------------


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@frozen
class QemuImageInfo:
    """`qemu-img info --output=json`, typed. `data` is the whole JSON document.

    `filename` is the host path imgguard was given (`data["filename"]` is the name qemu-img
    saw: the sandbox path or imgguard's `json:` filename); `sandbox` says what confined
    qemu-img: "bwrap", "unshare" or "none".
    """

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None = None
    cluster_size: int | None = None
    dirty: bool = False
    encrypted: bool = False
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None
    format_specific: Mapping[str, Any] = field(factory=dict, converter=_frozen_mapping, hash=False)
    snapshots: tuple[Mapping[str, Any], ...] = ()
    data: Mapping[str, Any] = field(factory=dict, converter=_frozen_mapping, hash=False)
    sandbox: str = "none"

    @property
    def subformat(self) -> str | None:
        """VMDK's create-type, or None."""
        value = self.format_specific.get("data", {}).get("create-type")
        return value if isinstance(value, str) else None

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> QemuImageInfo:
        def text(key: str) -> str | None:
            value = document.get(key)
            return value if isinstance(value, str) else None

        def number(key: str) -> int | None:
            value = document.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        specific = document.get("format-specific")
        snapshots = document.get("snapshots")
        return cls(
            filename=text("filename") or "",
            format=text("format") or "",
            virtual_size=number("virtual-size") or 0,
            actual_size=number("actual-size"),
            cluster_size=number("cluster-size"),
            dirty=document.get("dirty-flag") is True,
            encrypted=document.get("encrypted") is True,
            backing_filename=text("backing-filename"),
            full_backing_filename=text("full-backing-filename"),
            backing_format=text("backing-filename-format"),
            format_specific=specific if isinstance(specific, Mapping) else {},
            snapshots=tuple(
                MappingProxyType(dict(item))
                for item in (snapshots if isinstance(snapshots, list) else [])
                if isinstance(item, Mapping)
            ),
            data=document,
        )


def qemu_info(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    force_share: bool = False,
    policy: Policy | None = DEFAULT_POLICY,
    limits: Limits = INFO_LIMITS,
    command_prefix: Sequence[str] = (),
    sandbox: SandboxMode = True,
) -> QemuImageInfo:
    """`qemu-img info --output=json -f FORMAT [-U] PATH`, under Cinder's info limits.

    `format` defaults to the detected format and may only be that or `raw` (which opens nothing
    but the file). With a `policy` the image must pass `check()` first; with `policy=None` only
    the backend's own rules apply (no file references, a known format). `force_share` adds
    `--force-share` (-U), to read an image another process holds open. `sandbox`: True (bwrap,
    else unshare, else `SandboxUnavailable`), "bwrap", "unshare", or False for none.
    """
    source = _absolute(path)
    with _opened_source(source) as fd:
        info = _inspect_fd(fd, source)
        verdict = _judge(source, info, policy)
        read_as = _read_format(info, format)
        if read_as != "raw":
            _refuse_followed_references(verdict)
        qemu_img = find_qemu_img()
        box = prepare(sandbox, qemu_img)
        flags, name = source_spec(read_as, box.bind_fd(fd, SOURCE_PATH))
        command = [qemu_img, "info", "--output=json", *flags]
        if force_share:
            command.append("--force-share")
        command.append(name)
        completed = run(
            command, limits=limits, operation="info", command_prefix=command_prefix, sandbox=box
        )
    try:
        document = json.loads(completed.stdout)
    except ValueError as error:
        raise QemuImgFailed(
            f"qemu-img info printed no JSON: {error}", command=completed.command
        ) from error
    if not isinstance(document, dict):
        raise QemuImgFailed("qemu-img info printed no JSON object", command=completed.command)
    return attrs.evolve(
        QemuImageInfo.from_json(document), filename=source, sandbox=completed.sandbox
    )


# --- qemu-img resize -------------------------------------------------------------------------


def resize(
    path: str | os.PathLike[str],
    size_gib: int,
    format: str | None = None,
    *,
    policy: Policy | None = DEFAULT_POLICY,
    shrink: bool = False,
    limits: Limits = INFO_LIMITS,
    command_prefix: Sequence[str] = (),
    sandbox: SandboxMode = True,
) -> ImageInfo:
    """`qemu-img resize -f FORMAT PATH SIZEG` (Cinder's resize_image); returns the new inspection.

    `format` defaults to the detected format and must be it. The image is judged by `policy`
    first (None: only the backend's own rules). Shrinking needs `shrink=True` (`--shrink`).
    In the sandbox (`sandbox`, as for `qemu_info`) the image is the one writable file.
    """
    if isinstance(size_gib, bool) or not isinstance(size_gib, int) or size_gib <= 0:
        raise ConfigError(f"must be a whole number of GiB > 0, not {size_gib!r}", key="size_gib")
    source = _absolute(path)
    with _opened_source(source, writable=True) as fd:
        info = _inspect_fd(fd, source)
        verdict = _judge(source, info, policy)
        _refuse_followed_references(verdict)
        if format is not None and qemu_format_name(format) != info.format:
            raise ConfigError(f"{source} is {info.format}, not {format}", key="format")
        if info.encrypted:
            raise ConfigError("resizing an encrypted image is not supported", key=source)
        qemu_img = find_qemu_img()
        box = prepare(sandbox, qemu_img)
        flags, name = source_spec(_driver_of(info), box.bind_fd(fd, SOURCE_PATH, writable=True))
        command = [qemu_img, "resize", "-q", *flags]
        if shrink:
            command.append("--shrink")
        command += [name, f"{size_gib}G"]
        completed = run(
            command, limits=limits, operation="resize", command_prefix=command_prefix, sandbox=box
        )
        log.info("resized %s to %d GiB (sandbox: %s)", source, size_gib, completed.sandbox)
        return _inspect_fd(fd, source)


# --- qemu-img convert ------------------------------------------------------------------------


@frozen
class CipherSpec:
    """LUKS parameters for an encrypted output; None leaves qemu's default (aes-256-xts-plain64,
    sha256, 2 s of PBKDF2). Cinder's cipher_spec dict (cipher_alg, cipher_mode, ivgen_alg)
    converts with `CipherSpec.from_mapping`."""

    cipher_alg: str | None = None
    cipher_mode: str | None = None
    ivgen_alg: str | None = None
    ivgen_hash_alg: str | None = None
    hash_alg: str | None = None
    iter_time_ms: int | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CipherSpec:
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)}", key="cipher_spec")
        return cls(**dict(values))

    def options(self, prefix: str) -> list[str]:
        """`-o` options, each name after `prefix` (`` for luks, `encrypt.` for qcow2)."""
        result = []
        for name, option in (
            ("cipher_alg", "cipher-alg"),
            ("cipher_mode", "cipher-mode"),
            ("ivgen_alg", "ivgen-alg"),
            ("ivgen_hash_alg", "ivgen-hash-alg"),
            ("hash_alg", "hash-alg"),
        ):
            value = getattr(self, name)
            if value is not None:
                result.append(f"{prefix}{option}={_option_value(value, f'cipher_spec.{name}')}")
        if self.iter_time_ms is not None:
            iter_time = self.iter_time_ms
            if isinstance(iter_time, bool) or not isinstance(iter_time, int) or iter_time <= 0:
                raise ConfigError("must be a whole number of ms > 0", key="cipher_spec.iter_time")
            result.append(f"{prefix}iter-time={iter_time}")
        return result


@frozen
class ConversionResult:
    """A finished conversion: the source's verdict, the output's inspection, and how it went.

    `source_bytes` is the source file's length and `mb_per_s` the MiB of it converted per second
    of wall clock (as Cinder logs it); `command` is the qemu-img command line that ran (in a
    sandbox, with the paths qemu-img saw there: `SOURCE_PATH`, `TARGET_PATH`, /secrets/...);
    `sandbox` is what confined qemu-img: "bwrap", "unshare" or "none" (`sandbox=False`).
    """

    verdict: Verdict
    output: ImageInfo
    path: str
    command: tuple[str, ...]
    source_bytes: int
    output_bytes: int
    seconds: float
    cpu_seconds: float
    sandbox: str = "none"

    @property
    def ok(self) -> bool:
        return True

    @property
    def status(self) -> Status:
        return self.verdict.status

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.verdict.findings

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / MiB / self.seconds if self.seconds > 0 else 0.0


@frozen
class _Plan:
    out_format: str
    out_subformat: str | None
    compress: bool
    cache_mode: str | None
    src_passphrase_file: str | None
    passphrase_file: str | None
    cipher: CipherSpec | None


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    out_format: str,
    *,
    policy: Policy = DEFAULT_POLICY,
    claimed_format: str | None = None,
    target_size: int | None = None,
    out_subformat: str | None = None,
    compress: bool = False,
    cache_mode: str | None = None,
    src_passphrase_file: str | os.PathLike[str] | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
    cipher_spec: CipherSpec | Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    limits: Limits = DEFAULT_LIMITS,
    command_prefix: Sequence[str] = (),
    sandbox: SandboxMode = True,
) -> ConversionResult:
    """Convert `src` to `out_format` at `dst`, only if `src` passes `check()` under `policy`.

    Raises `ImageRejected` (no qemu-img started), `ConfigError` for bad arguments,
    `QemuImgNotFound`, and `ConversionFailed` (`ConversionTimeout`, `NoSpaceLeft`) when qemu-img
    fails, is killed, hits a limit, or writes something that does not inspect as `out_format`.
    On any failure, `KeyboardInterrupt` included, `dst` is as it was and no temporary file is
    left. `progress` is called with qemu-img's percentage (0.0 to 100.0) as it goes;
    `command_prefix` goes before the command (Cinder's cgroup throttling: `cgexec -g ...`).
    `sandbox` is True (bubblewrap, else util-linux unshare, else `SandboxUnavailable` before
    anything is written), "bwrap" or "unshare" (that one only), or False: no sandbox.
    """
    source = _absolute(src)
    destination = _absolute(dst)
    plan = _plan(
        out_format,
        out_subformat,
        compress,
        cache_mode,
        src_passphrase_file,
        passphrase_file,
        cipher_spec,
    )
    if os.path.lexists(destination) and _same_file(source, destination):
        raise ConfigError("the source and the destination are the same file", key=destination)

    def verdict_by_path() -> Verdict:
        return check(source, policy, claimed_format, target_size, convert_to=plan.out_format)

    # One open file from here on: it is what is checked and what qemu-img converts (bound into
    # the sandbox, or /dev/fd/N without it), so that renaming another image over `src` after
    # the check changes nothing.
    with _opened_source(source, verdict_by_path=verdict_by_path) as fd:
        before = _identity(fd)
        verdict = _check_fd(fd, source, policy, claimed_format, target_size, plan.out_format)
        if not verdict.ok or verdict.info is None:
            reasons = () if verdict.info is not None else ("the image could not be inspected",)
            raise ImageRejected(verdict, reasons)
        info = verdict.info
        if info.header.get("container") == "gzip":
            # Glance's compressed container: qemu-img would copy the gzip bytes as a raw disk.
            # Decompress (from the checked descriptor) next to the destination, then convert
            # that file (checked again).
            return _convert_decompressed(
                source,
                f"/proc/self/fd/{fd}",
                destination,
                verdict,
                lambda plain: convert(
                    plain,
                    dst,
                    out_format,
                    policy=policy,
                    claimed_format=claimed_format,
                    target_size=target_size,
                    out_subformat=out_subformat,
                    compress=compress,
                    cache_mode=cache_mode,
                    src_passphrase_file=src_passphrase_file,
                    passphrase_file=passphrase_file,
                    cipher_spec=cipher_spec,
                    progress=progress,
                    limits=limits,
                    command_prefix=command_prefix,
                    sandbox=sandbox,
                ),
            )
        _refuse_followed_references(verdict)
        _check_source_encryption(verdict, plan)
        qemu_img = find_qemu_img()
        box = prepare(sandbox, qemu_img)
        run_limits = limits.for_size(info.virtual_size)
        started = time.monotonic()
        with AtomicOutput(destination) as output:
            command = _convert_command(qemu_img, box, fd, info, output.temp_path, plan)
            try:
                completed = _run_convert(command, run_limits, progress, command_prefix, output, box)
            except ConversionFailed as failure:
                if type(failure) is not ConversionFailed or _names(source, fd):
                    raise
                # The sandbox binds the checked file only while `src` still names it.
                raise ConversionFailed(
                    f"{source} was moved or replaced after it was checked; qemu-img was not "
                    f"given the replacement and nothing was written ({failure})",
                    command=failure.command,
                    returncode=failure.returncode,
                    stderr=failure.stderr,
                ) from failure
            try:
                output.sync()
            except OSError as error:
                if error.errno == 28:  # ENOSPC
                    raise _no_space(output.directory, None) from error
                raise
            if _identity(fd) != before:
                raise ConversionFailed(
                    f"{source} changed while it was being converted; the output was discarded",
                    command=completed.command,
                )
            result_info = _verify_output(output.temp_path, info, plan, completed.command)
            output_bytes = os.stat(output.temp_path).st_size
            output.commit()
    seconds = time.monotonic() - started
    result = ConversionResult(
        verdict=verdict,
        output=attrs.evolve(result_info, path=destination),
        path=destination,
        command=completed.command,
        source_bytes=before[2],
        output_bytes=output_bytes,
        seconds=seconds,
        cpu_seconds=completed.cpu_seconds,
        sandbox=completed.sandbox,
    )
    log.info(
        "converted %s (%s, %.2f MiB) to %s (%s, %.2f MiB) in %.2f s: %.2f MiB/s, "
        "%.2f CPU s, max RSS %d KiB, sandbox %s",
        source,
        info.format,
        result.source_bytes / MiB,
        destination,
        plan.out_format,
        output_bytes / MiB,
        seconds,
        result.mb_per_s,
        completed.cpu_seconds,
        completed.max_rss_kib,
        completed.sandbox,
    )
    return result


def _run_convert(
    command: list[str],
    limits: Limits,
    progress: ProgressCallback | None,
    command_prefix: Sequence[str],
    output: AtomicOutput,
    box: Sandbox,
) -> Completed:
    """Run qemu-img convert, once more for each of qemu's LUKS timing failures (up to 8 runs).

    When qemu-img writes a LUKS key slot it times PBKDF2 with the thread's CPU clock, and
    qemu 7.2 fails now and then with "Unable to get accurate CPU usage" (writing an encrypted
    qcow2, about one run in three on a loaded 2-CPU machine). Nothing was converted then; qemu-img
    recreates the temporary file on the next run.
    """
    log.debug("running %s", " ".join(command))
    for attempt in range(_LUKS_TIMING_RUNS):
        try:
            return run(
                command,
                limits=limits,
                operation="convert",
                progress=_progress_logger(progress),
                command_prefix=command_prefix,
                error=ConversionFailed,
                timeout_error=ConversionTimeout,
                sandbox=box,
            )
        except ConversionTimeout:
            raise
        except ConversionFailed as failure:
            if "No space left on device" in failure.stderr:
                raise _no_space(output.directory, failure) from failure
            if _LUKS_TIMING_ERROR not in failure.stderr or attempt == _LUKS_TIMING_RUNS - 1:
                raise
            log.warning("qemu-img could not time the LUKS key derivation; running it again")
    raise AssertionError("unreachable")


def _plan(
    out_format: str,
    out_subformat: str | None,
    compress: bool,
    cache_mode: str | None,
    src_passphrase_file: str | os.PathLike[str] | None,
    passphrase_file: str | os.PathLike[str] | None,
    cipher_spec: CipherSpec | Mapping[str, Any] | None,
) -> _Plan:
    fmt = qemu_format_name(out_format)
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(
            f"cannot write {out_format!r} (one of {', '.join(sorted(OUTPUT_FORMATS))})",
            key="out_format",
        )
    if out_subformat is not None and out_subformat not in SUBFORMATS.get(fmt, frozenset()):
        offered = ", ".join(sorted(SUBFORMATS.get(fmt, ()))) or "none"
        raise ConfigError(
            f"{fmt} has no subformat {out_subformat!r} (offered: {offered})", key="out_subformat"
        )
    if compress and (
        fmt not in COMPRESSIBLE or (fmt == "vmdk" and out_subformat != "streamOptimized")
    ):
        raise ConfigError(
            "compression needs qcow2 or vmdk with subformat streamOptimized", key="compress"
        )
    if cache_mode is not None and cache_mode not in CACHE_MODES:
        raise ConfigError(
            f"unknown cache mode {cache_mode!r} (one of {', '.join(sorted(CACHE_MODES))})",
            key="cache_mode",
        )
    cipher: CipherSpec | None
    if cipher_spec is None or isinstance(cipher_spec, CipherSpec):
        cipher = cipher_spec
    else:
        cipher = CipherSpec.from_mapping(cipher_spec)
    secret = _secret_file(passphrase_file, "passphrase_file")
    if fmt == "luks" and secret is None:
        raise ConfigError("a luks output needs a passphrase_file", key="passphrase_file")
    if secret is not None and fmt not in ENCRYPTABLE:
        raise ConfigError(f"{fmt} cannot be encrypted (luks or qcow2 can)", key="passphrase_file")
    if cipher is not None and secret is None:
        raise ConfigError("a cipher_spec needs a passphrase_file", key="cipher_spec")
    if cipher is not None:
        cipher.options("")  # validates the values before anything runs
    return _Plan(
        out_format=fmt,
        out_subformat=out_subformat,
        compress=compress,
        cache_mode=cache_mode,
        src_passphrase_file=_secret_file(src_passphrase_file, "src_passphrase_file"),
        passphrase_file=secret,
        cipher=cipher,
    )


def _convert_command(
    qemu_img: str, box: Sandbox, source: int, info: ImageInfo, target: str, plan: _Plan
) -> list[str]:
    """The convert command line; `source` is the descriptor of the checked source file."""
    command = [qemu_img, "convert", "-p"]
    if plan.cache_mode is not None:
        command += ["-t", plan.cache_mode]
    driver = _driver_of(info)
    if plan.src_passphrase_file is not None:
        secret = box.bind(plan.src_passphrase_file, SOURCE_SECRET_PATH)
        command += ["--object", f"secret,id={SOURCE_SECRET_ID},format=raw,file={_escape(secret)}"]
    if plan.passphrase_file is not None:
        secret = box.bind(plan.passphrase_file, TARGET_SECRET_PATH)
        command += ["--object", f"secret,id={TARGET_SECRET_ID},format=raw,file={_escape(secret)}"]
    # An encrypted source needs its key secret, which only --image-opts or json: can give.
    key = SOURCE_SECRET_ID if info.encrypted else None
    flags, name = source_spec(driver, box.bind_fd(source, SOURCE_PATH), key_secret=key)
    command += flags
    command += ["-O", plan.out_format]
    if plan.compress:
        command.append("-c")
    options = _output_options(plan)
    if options:
        command += ["-o", ",".join(options)]
    command += [name, box.bind(target, TARGET_PATH, writable=True)]
    return command


def source_spec(driver: str, path: str, *, key_secret: str | None = None) -> tuple[list[str], str]:
    """How qemu-img opens the source: (flags, the filename argument).

    * a format that can have a backing file (`BACKING_FORMATS`): no flag and a `json:` filename
      that pins the driver, sets `"backing": null` (qemu opens no backing file, whatever the
      image names) and pins the protocol (`"file": {"driver": "file", ...}`); an encrypted qcow2
      adds `"encrypt": {"format": "luks", "key-secret": ...}`;
    * an encrypted LUKS volume: `--image-opts driver=luks,key-secret=...,file.driver=file,...`;
    * anything else: `-f DRIVER PATH`.

    qemu 7.2 has no such switch for an external data file: `"data-file": null` is accepted and
    ignored, and any `data-file` value makes an image without one fail to open. That one is
    covered by the backend's refusal and by the sandbox, in which the host file does not exist.
    """
    if driver in BACKING_FORMATS:
        document: dict[str, Any] = {"driver": driver, "backing": None}
        if key_secret is not None:
            document["encrypt"] = {"format": "luks", "key-secret": key_secret}
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                "a path that is not UTF-8 cannot be named in json:", key=path
            ) from None
        document["file"] = {"driver": "file", "filename": path}
        return [], "json:" + json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    if key_secret is not None:
        options = [f"driver={driver}", f"key-secret={key_secret}", "file.driver=file"]
        options.append(f"file.filename={_escape(path)}")
        return ["--image-opts"], ",".join(options)
    return ["-f", driver], path


def _output_options(plan: _Plan) -> list[str]:
    options = []
    if plan.out_subformat is not None:
        options.append(f"subformat={plan.out_subformat}")
    if plan.out_format == "vpc":
        # Keep the exact virtual size instead of rounding it to a CHS geometry.
        options.append("force_size=on")
    if plan.passphrase_file is not None:
        prefix = "" if plan.out_format == "luks" else "encrypt."
        if plan.out_format == "qcow2":
            options.append("encrypt.format=luks")
        options.append(f"{prefix}key-secret={TARGET_SECRET_ID}")
        if plan.cipher is not None:
            options += plan.cipher.options(prefix)
    return options


def _verify_output(
    path: str, source: ImageInfo, plan: _Plan, command: tuple[str, ...]
) -> ImageInfo:
    """The output must be what was asked for, as Cinder's upload_volume checks."""
    try:
        output = inspect(path)
    except ImageError as error:
        raise ConversionFailed(
            f"the output cannot be inspected: {error}", command=command
        ) from error
    problems = []
    if output.format != plan.out_format:
        problems.append(f"it is {output.format}, not {plan.out_format}")
    expected_variant = plan.out_subformat or DEFAULT_SUBFORMAT.get(plan.out_format)
    if (
        plan.out_format in ("vmdk", "vpc")
        and output.format == plan.out_format
        and expected_variant is not None
        and output.variant != expected_variant
    ):
        problems.append(f"its subformat is {output.variant}, not {expected_variant}")
    if output.references:
        names = ", ".join(repr(reference.target) for reference in output.references)
        problems.append(f"it names other files ({names})")
    if output.truncated:
        problems.append("it is truncated")
    if output.encrypted != (plan.passphrase_file is not None):
        problems.append("it is encrypted" if output.encrypted else "it is not encrypted")
    if (
        source.virtual_size is not None
        and output.virtual_size is not None
        and output.virtual_size < source.virtual_size
    ):
        problems.append(
            f"its virtual size {output.virtual_size} is less than the source's "
            f"{source.virtual_size}"
        )
    if problems:
        raise ConversionFailed(
            f"qemu-img wrote an output that fails its check: {'; '.join(problems)}",
            command=command,
        )
    for problem in output.problems:
        log.warning("output %s: %s", path, problem.message)
    return output


def _progress_logger(progress: ProgressCallback | None) -> ProgressCallback:
    def report(percent: float) -> None:
        log.debug("convert progress %.2f%%", percent)
        if progress is not None:
            progress(percent)

    return report


def _no_space(directory: str, failure: ConversionFailed | None) -> NoSpaceLeft:
    filesystem = filesystem_of(directory)
    kind = f" ({filesystem.type})" if filesystem.type else ""
    free = "" if filesystem.free_bytes is None else f", {filesystem.free_bytes} bytes free"
    return NoSpaceLeft(
        f"no space left on the filesystem mounted at {filesystem.mount_point}{kind}{free}, "
        f"which holds {directory}; the partial output was removed",
        directory=directory,
        mount_point=filesystem.mount_point,
        filesystem=filesystem.type,
        free_bytes=filesystem.free_bytes,
        command=failure.command if failure else (),
        returncode=failure.returncode if failure else None,
        stderr=failure.stderr if failure else "",
    )


# --- shared checks ---------------------------------------------------------------------------


def _convert_decompressed(
    source: str,
    read_from: str,
    destination: str,
    verdict: Verdict,
    convert_plain: Callable[[str], ConversionResult],
) -> ConversionResult:
    """Decompress the gzip `source` (read as `read_from`: the checked descriptor's
    /proc/self/fd path) to a temporary file beside `destination`, convert that with
    `convert_plain`, and remove it whatever happens; the result carries the container's
    verdict."""
    from imgguard.compressed import DecompressionFailed, decompress_file

    directory = os.path.dirname(destination)
    fd, plain = tempfile.mkstemp(prefix=".imgguard-gunzip-", suffix=".img", dir=directory)
    os.close(fd)
    os.unlink(plain)
    try:
        started = time.monotonic()
        try:
            size = decompress_file(read_from, plain)
        except OSError as error:
            if error.errno == 28:  # ENOSPC
                raise _no_space(directory, None) from error
            raise ConversionFailed(f"cannot decompress {source}: {error}") from error
        except DecompressionFailed as error:
            raise ConversionFailed(f"cannot decompress {source}: {error}") from error
        log.info(
            "decompressed %s to %s (%.2f MiB) in %.2f s",
            source,
            plain,
            size / MiB,
            time.monotonic() - started,
        )
        result = convert_plain(plain)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(plain)
    return attrs.evolve(result, verdict=verdict)


def _absolute(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise ConfigError(f"not a path: {path!r}", key="path")
    if "\0" in text:
        raise ConfigError("a path cannot contain NUL", key="path")
    return os.path.abspath(text)


def _escape(value: str) -> str:
    """A value inside a QemuOpts string (`key=value,key=value`): commas are doubled."""
    return value.replace(",", ",,")


def _option_value(value: str, key: str) -> str:
    if not isinstance(value, str) or not _OPTION_VALUE.match(value):
        raise ConfigError(f"not a valid option value: {value!r}", key=key)
    return value


def _secret_file(path: str | os.PathLike[str] | None, key: str) -> str | None:
    if path is None:
        return None
    absolute = _absolute(path)
    if not os.path.isfile(absolute):
        raise ConfigError("no such file", key=f"{key} {absolute}")
    return absolute


@contextlib.contextmanager
def _opened_source(
    path: str,
    *,
    writable: bool = False,
    verdict_by_path: Callable[[], Verdict] | None = None,
) -> Iterator[int]:
    """The source, opened once (O_NOFOLLOW, O_NONBLOCK so that a FIFO cannot block, CLOEXEC)
    as a regular file; closed on exit.

    When it cannot be opened so, the error is the one a check by path gives: `ImageRejected`
    with `verdict_by_path()`'s verdict (a symlink, a device, a missing file), else the
    `ImageError` of inspecting the path, else a `ConfigError`.
    """
    flags = os.O_RDWR if writable else os.O_RDONLY
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    problem: str
    try:
        fd = os.open(path, flags)
    except OSError as error:
        problem = error.strerror or str(error)
    else:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            try:
                yield fd
            finally:
                os.close(fd)
            return
        os.close(fd)
        problem = "not a regular file"
    if verdict_by_path is not None:
        verdict = verdict_by_path()
        if not verdict.ok or verdict.info is None:
            reasons = () if verdict.info is not None else ("the image could not be inspected",)
            raise ImageRejected(verdict, reasons)
    else:
        inspect(path)  # raises the ImageError a path check gives (unreadable, not regular)
    mode = "for reading and writing" if writable else "for reading"
    raise ConfigError(f"cannot open it {mode}: {problem}", key=path)


def _source_file(fd: int, path: str) -> BinaryIO:
    """A binary file object over `fd` (left open) that inspection reports as `path`."""
    file = os.fdopen(fd, "rb", closefd=False)
    file.raw.name = path  # type: ignore[attr-defined]
    return file


def _with_actual_size(info: ImageInfo, fd: int) -> ImageInfo:
    """qemu-img's "actual-size" (allocated bytes), which inspecting a path reports."""
    return attrs.evolve(info, actual_size=os.fstat(fd).st_blocks * 512)


def _inspect_fd(fd: int, path: str) -> ImageInfo:
    with _source_file(fd, path) as file:
        return _with_actual_size(inspect(file), fd)


def _check_fd(
    fd: int,
    path: str,
    policy: Policy,
    claimed_format: str | None,
    target_size: int | None,
    convert_to: str,
) -> Verdict:
    """`check()` of the open source file, as `check(path, ...)` would judge it."""
    with _source_file(fd, path) as file:
        verdict = check(file, policy, claimed_format, target_size, convert_to=convert_to)
    if verdict.info is None or verdict.info.header.get("container") == "gzip":
        return verdict
    return attrs.evolve(verdict, info=_with_actual_size(verdict.info, fd))


def _judge(path: str, info: ImageInfo, policy: Policy | None) -> Verdict:
    if policy is None:
        return Verdict(status=Status.PASS, info=info, path=path)
    verdict = check(info, policy)
    if not verdict.ok:
        raise ImageRejected(verdict)
    return verdict


def _read_format(info: ImageInfo, requested: str | None) -> str:
    if requested is None:
        return _driver_of(info)
    name = qemu_format_name(requested)
    if name not in (info.format, "raw"):
        raise ConfigError(
            f"the image is {info.format}; it may be read as that or as raw, not {name}",
            key="format",
        )
    return name


def _driver_of(info: ImageInfo) -> str:
    """The qemu driver for -f: the detected format (a fixed VHD is `vpc`, never `raw`)."""
    if info.format not in formats.QEMU_FORMATS:
        raise ConfigError(f"{info.format} is not a qemu format", key="format")
    return info.format


def _refuse_followed_references(verdict: Verdict) -> None:
    info = verdict.info
    if info is None:
        raise ImageRejected(verdict, ("the image could not be inspected",))
    reasons = [
        f"it names a {reference.kind} {reference.target!r} that qemu-img would open; "
        "imgguard never lets qemu-img follow a reference, whatever the policy waives"
        for reference in info.references
        if str(reference.kind) in _FOLLOWED_REFERENCES
    ]
    data_file = info.data_file is not None or "external_data_file" in info.feature_names
    if data_file and not any("data-file" in reason for reason in reasons):
        reasons.append("it keeps its data in an external data file")
    if info.backing_file is not None and not any("backing-file" in r for r in reasons):
        reasons.append(f"it names a backing file {info.backing_file!r}")
    if reasons:
        raise ImageRejected(verdict, reasons)


def _check_source_encryption(verdict: Verdict, plan: _Plan) -> None:
    info = verdict.info
    assert info is not None
    if not info.encrypted:
        if plan.src_passphrase_file is not None:
            raise ConfigError("the source is not encrypted", key="src_passphrase_file")
        return
    method = info.encryption.method if info.encryption else None
    if method != "luks":
        raise ImageRejected(verdict, (f"encryption {method or 'unknown'} is not supported",))
    if plan.src_passphrase_file is None:
        raise ConfigError("the source is encrypted: give src_passphrase_file", key="src")
    if plan.passphrase_file is None:
        # As Cinder: an encrypted source is never written out decrypted by accident.
        raise ConfigError(
            "the source is encrypted: give a passphrase_file for the output (imgguard does "
            "not decrypt an image into a plain one)",
            key="passphrase_file",
        )


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _names(path: str, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except OSError:
        return False


def _identity(fd: int) -> tuple[int, int, int, int]:
    """What must not change between the check and the end of qemu-img's run: the open file's
    size and mtime (a write into the very file that was checked; its path no longer matters)."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


__all__ = [
    "CACHE_MODES",
    "MINIMUM_QEMU_IMG_VERSION",
    "OUTPUT_FORMATS",
    "SUBFORMATS",
    "CipherSpec",
    "ConversionResult",
    "QemuImageInfo",
    "check_qemu_img_version",
    "convert",
    "find_qemu_img",
    "qemu_img_version",
    "qemu_info",
    "resize",
    "source_spec",
]
