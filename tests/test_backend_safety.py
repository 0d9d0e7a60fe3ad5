"""What the backend must never do: start qemu-img on a rejected image, let a referenced file's
bytes into an output, or leave anything at the destination when qemu-img fails, is killed,
times out or hits a resource limit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import imgguard
from conftest import QEMU_IMG, qemu_convert, qemu_create, raw_with_data, run_qemu_img
from imgguard import backend
from imgguard.backend import ConversionFailed, ConversionTimeout, ImageRejected, Limits
from imgguard.backend import limits as limits_module
from imgguard.backend.limits import find_prlimit
from imgguard.backend.process import run
from imgguard.backend.qemu import source_spec
from imgguard.errors import ConfigError
from imgguard.model import Policy

MiB = 1 << 20
CANARY = b"CANARY-BYTES-MUST-NEVER-LEAVE-THIS-FILE:"


# --- a qemu-img on PATH that records every time it is started -----------------------------------
# These wrappers and the fake qemu-img below are shell scripts that write into tmp_path: the
# tests that use them run with sandbox=False (tests/test_sandbox.py covers the sandbox).


@pytest.fixture
def qemu_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a `qemu-img` first on PATH that appends its arguments to a log, then runs the real one.

    The log is written by the process qemu-img would be, so an empty log means no qemu-img
    process was started at all.
    """
    assert QEMU_IMG is not None
    bindir = tmp_path.parent / f"{tmp_path.name}-bin"
    bindir.mkdir()
    log = bindir / "invocations.log"
    wrapper = bindir / "qemu-img"
    wrapper.write_text(
        f'#!/bin/sh\necho "$$ $*" >> {log}\nexec {QEMU_IMG} "$@"\n', encoding="utf-8"
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def invocations(log: Path) -> list[str]:
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def fake_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """A `qemu-img` first on PATH that runs the shell `body` instead (with $last = the target)."""
    bindir = tmp_path.parent / f"{tmp_path.name}-fake"
    bindir.mkdir()
    script = bindir / "qemu-img"
    script.write_text("#!/bin/sh\nfor last; do :; done\n" + textwrap.dedent(body), encoding="utf-8")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return bindir


def files_in(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


def canary_reached(directory: Path, canary: Path) -> list[Path]:
    """Every file below `directory` but the canary itself that holds the canary's bytes."""
    found = []
    for path in directory.rglob("*"):
        if path.is_symlink() or not path.is_file() or path == canary:
            continue
        if CANARY in path.read_bytes():
            found.append(path)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def qemu_children() -> list[int]:
    """The live qemu-img processes descended from this test process (in a sandbox qemu-img is
    a grandchild: bwrap or unshare, then the namespace's first process, then qemu-img)."""
    names: dict[int, str] = {}
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as file:
                text = file.read()
        except OSError:
            continue
        names[int(entry)] = text[text.index("(") + 1 : text.rindex(")")]
        parents[int(entry)] = int(text.rsplit(")", 1)[1].split()[1])

    def descends(pid: int) -> bool:
        for _ in range(16):
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
        return False

    return [
        pid for pid, name in names.items() if name == "qemu-img" and descends(pid) and alive(pid)
    ]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "canary.raw"
    path.write_bytes(CANARY * (1 * MiB // len(CANARY) + 1))
    return path


@pytest.fixture
def big_random(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB of random data: compressing it to streamOptimized VMDK takes qemu-img ~0.5 s."""
    path = tmp_path_factory.getbasetemp() / "random.raw"
    if not path.exists():
        with path.open("wb") as file:
            for _ in range(32):
                file.write(os.urandom(MiB))
    return path


# --- hostile images ---------------------------------------------------------------------------


def backing_file_image(tmp_path: Path, canary: Path) -> Path:
    return qemu_create(
        tmp_path / "overlay.qcow2", "qcow2", "1M", [f"backing_file={canary}", "backing_fmt=raw"]
    )


def relative_backing_image(tmp_path: Path, canary: Path) -> Path:
    return qemu_create(
        tmp_path / "rel.qcow2", "qcow2", "1M", [f"backing_file={canary.name}", "backing_fmt=raw"]
    )


def data_file_image(tmp_path: Path, canary: Path) -> Path:
    data = tmp_path / "data-file.raw"
    image = qemu_create(
        tmp_path / "external.qcow2",
        "qcow2",
        "1M",
        [f"data_file={data}", "data_file_raw=on"],
    )
    data.unlink()
    data.symlink_to(canary)
    return image


def vmdk_extent_image(tmp_path: Path, canary: Path) -> Path:
    descriptor = tmp_path / "flat.vmdk"
    descriptor.write_text(
        textwrap.dedent(
            f"""\
            # Disk DescriptorFile
            version=1
            CID=fffffffe
            parentCID=ffffffff
            createType="monolithicFlat"
            RW 2048 FLAT "{canary}" 0
            ddb.virtualHWVersion = "4"
            """
        ),
        encoding="utf-8",
    )
    return descriptor


def qcow2_in_raw_clothing(tmp_path: Path, canary: Path) -> Path:
    """A qcow2 with a backing file, uploaded as 'raw' (the classic CVE-2015-5162-era attack)."""
    image = backing_file_image(tmp_path, canary)
    disguised = tmp_path / "disk.raw"
    image.rename(disguised)
    return disguised


HOSTILE = {
    "backing-file": (backing_file_image, None),
    "relative-backing-file": (relative_backing_image, None),
    "data-file": (data_file_image, None),
    "vmdk-extent": (vmdk_extent_image, None),
    "claimed-raw": (qcow2_in_raw_clothing, "raw"),
}


@pytest.mark.parametrize("out_format", ["raw", "qcow2"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_rejected_image_never_starts_qemu_img(
    tmp_path: Path, canary: Path, qemu_log: Path, case: str, out_format: str
) -> None:
    make, claimed = HOSTILE[case]
    image = make(tmp_path, canary)
    before = files_in(tmp_path)
    destination = tmp_path / "out.img"
    with pytest.raises(ImageRejected) as caught:
        backend.convert(image, destination, out_format, claimed_format=claimed)
    assert not caught.value.verdict.ok
    assert caught.value.reasons
    assert invocations(qemu_log) == []
    assert files_in(tmp_path) == before
    assert canary_reached(tmp_path, canary) == []


@pytest.mark.parametrize(
    ("case", "waive"),
    [
        ("backing-file", ["IG101"]),
        ("data-file", ["IG102"]),
        ("vmdk-extent", ["IG103", "IG204"]),
    ],
)
def test_backend_refuses_references_even_when_the_policy_waives_them(
    tmp_path: Path, canary: Path, qemu_log: Path, case: str, waive: list[str]
) -> None:
    image = HOSTILE[case][0](tmp_path, canary)
    policy = Policy(
        waivers=frozenset(waive),
        allowed_vmdk_create_types=frozenset(
            {"monolithicSparse", "streamOptimized", "monolithicFlat"}
        ),
    )
    with pytest.raises(ImageRejected, match="never lets qemu-img follow"):
        backend.convert(image, tmp_path / "out.raw", "raw", policy=policy)
    with pytest.raises(ImageRejected):
        backend.qemu_info(image, policy=None)
    with pytest.raises(ImageRejected):
        backend.resize(image, 1, policy=None)
    assert invocations(qemu_log) == []
    assert canary_reached(tmp_path, canary) == []


def test_qemu_info_as_raw_never_follows(tmp_path: Path, canary: Path, qemu_log: Path) -> None:
    image = backing_file_image(tmp_path, canary)
    info = backend.qemu_info(image, "raw", policy=None, sandbox=False)  # the logging wrapper
    assert info.format == "raw" and info.backing_filename is None
    (line,) = invocations(qemu_log)
    assert " -f raw " in f" {line} "


def test_rejected_by_policy_never_starts_qemu_img_for_info_or_resize(
    tmp_path: Path, canary: Path, qemu_log: Path
) -> None:
    image = backing_file_image(tmp_path, canary)
    with pytest.raises(ImageRejected, match="IG101"):
        backend.qemu_info(image)
    with pytest.raises(ImageRejected, match="IG101"):
        backend.resize(image, 1)
    assert invocations(qemu_log) == []


def test_benign_conversion_is_one_qemu_img_process_with_a_named_format(
    tmp_path: Path, qemu_log: Path
) -> None:
    source = qemu_convert(raw_with_data(tmp_path / "d.raw", 2 * MiB), tmp_path / "d.vhdx", "vhdx")
    backend.convert(source, tmp_path / "out.qcow2", "qcow2", sandbox=False)  # the logging wrapper
    (line,) = invocations(qemu_log)
    assert " convert -p -f vhdx -O qcow2 " in line
    assert "json:" not in line and "--image-opts" not in line


# --- failures leave nothing behind ------------------------------------------------------------


@pytest.fixture(params=["absent", "previous"])
def destination(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The destination, absent or holding previous content; checked untouched afterwards."""
    path = tmp_path / "out" / "volume.img"
    path.parent.mkdir()
    if request.param == "previous":
        path.write_bytes(b"previous volume content\n")
    yield path
    if request.param == "previous":
        assert path.read_bytes() == b"previous volume content\n"
        assert files_in(path.parent) == {"volume.img"}
    else:
        assert files_in(path.parent) == set()


def test_sigkill_from_the_progress_callback(big_random: Path, destination: Path) -> None:
    killed: list[int] = []

    def kill_qemu(percent: float) -> None:
        if not killed:
            (pid,) = qemu_children()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with pytest.raises(ConversionFailed) as caught:
        backend.convert(
            big_random, destination, "vmdk", out_subformat="streamOptimized", progress=kill_qemu
        )
    assert caught.value.signal is signal.SIGKILL
    assert "SIGKILL" in str(caught.value)
    assert killed and not alive(killed[0])


def test_sigkill_from_another_thread(big_random: Path, destination: Path) -> None:
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = qemu_children()
            if pids:
                time.sleep(0.05)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.002)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        with pytest.raises(ConversionFailed, match="SIGKILL"):
            backend.convert(big_random, destination, "vmdk", out_subformat="streamOptimized")
    finally:
        thread.join()
    assert killed


def test_keyboard_interrupt_kills_qemu_img_and_cleans_up(
    big_random: Path, destination: Path
) -> None:
    seen: list[int] = []

    def interrupt(percent: float) -> None:
        seen.extend(qemu_children())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backend.convert(
            big_random, destination, "vmdk", out_subformat="streamOptimized", progress=interrupt
        )
    assert seen and not any(alive(pid) for pid in seen)
    assert qemu_children() == []


def test_timeout_with_the_real_qemu_img(big_random: Path, destination: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConversionTimeout) as caught:
        backend.convert(
            big_random,
            destination,
            "vmdk",
            out_subformat="streamOptimized",
            limits=Limits(timeout=0.2),
        )
    assert time.monotonic() - started < 5
    assert caught.value.timeout == 0.2
    assert caught.value.signal is signal.SIGKILL
    assert qemu_children() == []


def test_timeout_kills_the_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, destination: Path
) -> None:
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    pids = tmp_path / "pids"
    fake_qemu_img(
        tmp_path,
        monkeypatch,
        f"""\
        echo $$ > {pids}
        printf 'partial output' > "$last"
        sleep 60 &
        echo $! >> {pids}
        wait
        """,
    )
    with pytest.raises(ConversionTimeout):
        backend.convert(source, destination, "qcow2", limits=Limits(timeout=0.5), sandbox=False)
    shell, sleeper = (int(line) for line in pids.read_text().split())
    deadline = time.monotonic() + 5
    while alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(shell) and not alive(sleeper)


def test_cpu_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, destination: Path) -> None:
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    fake_qemu_img(tmp_path, monkeypatch, 'printf partial > "$last"\nwhile :; do :; done\n')
    with pytest.raises(ConversionFailed) as caught:
        backend.convert(
            source, destination, "qcow2", limits=Limits(cpu_seconds=1, timeout=20), sandbox=False
        )
    assert caught.value.limit == "cpu"
    assert caught.value.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert "CPU time limit" in str(caught.value)


@pytest.mark.parametrize("megabytes", [16, 48])
def test_address_space_limit(tmp_path: Path, destination: Path, megabytes: int) -> None:
    source = qemu_convert(raw_with_data(tmp_path / "d.raw", 4 * MiB), tmp_path / "d.qcow2", "qcow2")
    with pytest.raises(ConversionFailed) as caught:
        backend.convert(source, destination, "raw", limits=Limits(address_space=megabytes * MiB))
    assert caught.value.limit == "address-space"
    assert "address-space limit" in str(caught.value)


@pytest.mark.parametrize("setter", ["prlimit", "python"])
def test_limits_are_set_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setter: str
) -> None:
    if setter == "python":  # where util-linux prlimit is not installed
        monkeypatch.setattr(limits_module, "find_prlimit", lambda: None)
    elif find_prlimit() is None:
        pytest.skip("prlimit is not installed")
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    report = tmp_path / "limits.txt"
    fake_qemu_img(
        tmp_path,
        monkeypatch,
        f"""\
        {{ ulimit -t; ulimit -v; ulimit -c; echo "$MALLOC_ARENA_MAX $LC_ALL"; }} > {report}
        exit 1
        """,
    )
    with pytest.raises(ConversionFailed, match="exit status 1"):
        backend.convert(source, tmp_path / "o.raw", "raw", sandbox=False)
    cpu, memory_kib, core, environment = report.read_text().splitlines()
    assert int(cpu) == 30 + 60  # 30 s plus 60 s for the (one, rounded up) GiB
    assert int(memory_kib) == (1 << 30) // 1024
    assert int(core) == 0
    assert environment == "2 C"


def test_default_and_info_limits() -> None:
    assert backend.INFO_LIMITS.cpu_seconds == 30
    assert backend.INFO_LIMITS.address_space == 1 << 30
    sized = backend.DEFAULT_LIMITS.for_size(10 * (1 << 30) + 1)
    assert sized.cpu_seconds == 30 + 60 * 11
    assert sized.timeout == 600 + 120 * 11
    assert backend.NO_LIMITS.wrap(["/bin/true"]) == ["/bin/true"]
    wrapped = backend.INFO_LIMITS.wrap(["/usr/bin/qemu-img", "info"])
    assert wrapped[-2:] == ["/usr/bin/qemu-img", "info"]
    prlimit = find_prlimit()
    if prlimit is None:
        assert wrapped[0] == sys.executable
    else:
        # util-linux prlimit: no Python interpreter to start before qemu-img.
        assert wrapped == [
            prlimit,
            "--cpu=30:31",
            f"--as={1 << 30}:{1 << 30}",
            "--core=0:0",
            "--",
            "/usr/bin/qemu-img",
            "info",
        ]
    with pytest.raises(ConfigError):
        Limits(timeout=0)
    assert attrs.evolve(backend.DEFAULT_LIMITS, timeout=5).timeout == 5


@pytest.fixture(scope="module")
def luks_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("luks")
    source = directory / "src.luks"
    run_qemu_img(
        "convert",
        "--object",
        "secret,id=s,data=right",
        "-f",
        "raw",
        "-O",
        "luks",
        "-o",
        "key-secret=s,iter-time=10",
        str(raw_with_data(directory / "d.raw", 1 * MiB)),
        str(source),
    )
    return source


def test_qemu_error_leaves_nothing(luks_image: Path, tmp_path: Path, destination: Path) -> None:
    # The wrong passphrase: qemu-img has created the target when it fails to open the source.
    source = luks_image
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong")
    with pytest.raises(ConversionFailed, match="Invalid password"):
        backend.convert(
            source,
            destination,
            "luks",
            policy=Policy(allow_encrypted=True),
            src_passphrase_file=wrong,
            passphrase_file=wrong,
            cipher_spec=backend.CipherSpec(iter_time_ms=10),
        )


def test_source_changed_during_conversion_is_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, destination: Path
) -> None:
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    assert QEMU_IMG is not None
    fake_qemu_img(tmp_path, monkeypatch, f'printf more >> {source}\nexec {QEMU_IMG} "$@"\n')
    with pytest.raises(ConversionFailed, match="changed while it was being converted"):
        backend.convert(source, destination, "qcow2", sandbox=False)


# --- a source swapped between the check and qemu-img ------------------------------------------

CHECKED = b"IMGGUARD-THE-CHECKED-IMAGE:"
SWAPPED = b"IMGGUARD-THE-SWAPPED-IN-IMAGE:"


def swap_images(tmp_path: Path, canary: Path) -> tuple[bytes, Path, Path]:
    """(the checked image's guest data, the checked qcow2, the qcow2 to swap in for it).

    The swapped-in image is one the check would refuse: 2 MiB, its first 64 KiB its own data,
    the rest from a backing file (the canary)."""
    data = (CHECKED * (MiB // len(CHECKED) + 1))[:MiB]
    (tmp_path / "checked.raw").write_bytes(data)
    checked = qemu_convert(tmp_path / "checked.raw", tmp_path / "upload.qcow2", "qcow2")
    with (tmp_path / "swapped.raw").open("wb") as file:
        file.write((SWAPPED * (64 * 1024 // len(SWAPPED) + 1))[: 64 * 1024])
        file.truncate(2 * MiB)
    swapped = qemu_convert(tmp_path / "swapped.raw", tmp_path / "swapped.qcow2", "qcow2")
    run_qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(canary), "-F", "raw", str(swapped))
    (tmp_path / "checked.raw").unlink()
    (tmp_path / "swapped.raw").unlink()
    return data, checked, swapped


def swap_prefix(swapped: Path, checked: Path) -> list[str]:
    """A command prefix (where Cinder puts `cgexec`) that renames `swapped` over `checked`, then
    runs the command: the swap lands after imgguard's check, before qemu-img opens anything."""
    return ["/bin/sh", "-c", 'mv -f -- "$0" "$1" && shift && exec "$@"', str(swapped), str(checked)]


def sandbox_mode(mode: bool | str) -> bool | str:
    if mode is not False:
        try:
            backend.sandbox.prepare(mode, backend.find_qemu_img())
        except backend.SandboxUnavailable as error:
            pytest.skip(f"{mode} cannot build a sandbox here: {error}")
    return mode


@pytest.mark.parametrize("mode", [False, "bwrap", "unshare"])
def test_source_swapped_after_the_check_is_never_converted(
    tmp_path: Path, canary: Path, mode: bool | str
) -> None:
    sandbox_mode(mode)
    data, checked, swapped = swap_images(tmp_path, canary)
    assert not imgguard.check(swapped).ok  # what an attacker would like converted
    output = tmp_path / "volume.raw"
    prefix = swap_prefix(swapped, checked)
    if mode is False:
        # qemu-img opens /dev/fd/N, the descriptor imgguard opened, inspected and checked.
        result = backend.convert(checked, output, "raw", command_prefix=prefix, sandbox=mode)
        assert result.sandbox == "none"
        assert output.read_bytes() == data
    else:
        # The sandbox binds the checked file only if the path still names it: it refuses.
        with pytest.raises(ConversionFailed, match="moved or replaced after it was checked"):
            backend.convert(checked, output, "raw", command_prefix=prefix, sandbox=mode)
        assert not output.exists()
    assert not swapped.exists() and SWAPPED in checked.read_bytes()  # the swap did happen
    assert files_in(tmp_path) - {"volume.raw"} == {"canary.raw", "upload.qcow2"}
    assert canary_reached(tmp_path, canary) == []


@pytest.mark.parametrize("mode", [False, "bwrap", "unshare"])
def test_source_swapped_before_qemu_img_info(
    tmp_path: Path, canary: Path, mode: bool | str
) -> None:
    sandbox_mode(mode)
    _, checked, swapped = swap_images(tmp_path, canary)
    prefix = swap_prefix(swapped, checked)
    if mode is False:
        info = backend.qemu_info(checked, command_prefix=prefix, sandbox=mode)
        assert info.virtual_size == MiB and info.backing_filename is None
    else:
        with pytest.raises(backend.QemuImgFailed):
            backend.qemu_info(checked, command_prefix=prefix, sandbox=mode)
    assert SWAPPED in checked.read_bytes()


def test_a_path_named_after_the_check_converts_the_swapped_image(
    tmp_path: Path, canary: Path
) -> None:
    # What the backend did before it kept the checked file open: name the path on qemu-img's
    # command line. The same swap then gets the other image converted (so the tests above can
    # fail).
    _, checked, swapped = swap_images(tmp_path, canary)
    assert imgguard.check(checked).ok
    output = tmp_path / "volume.raw"
    assert QEMU_IMG is not None
    flags, name = source_spec("qcow2", str(checked))
    run(
        [backend.find_qemu_img(), "convert", *flags, "-O", "raw", name, str(output)],
        limits=backend.INFO_LIMITS,
        operation="convert",
        command_prefix=swap_prefix(swapped, checked),
    )
    assert SWAPPED in output.read_bytes()


# --- a full filesystem ------------------------------------------------------------------------

_ENOSPC_SCRIPT = """
import json, os, sys
from imgguard import backend
source, directory = sys.argv[1], sys.argv[2]
os.makedirs(directory, exist_ok=True)
os.system(f"mount -t tmpfs -o size=2m imgguard-test {directory}")
open(os.path.join(directory, "volume.raw"), "wb").write(b"previous")
try:
    backend.convert(source, os.path.join(directory, "volume.raw"), "raw")
except backend.NoSpaceLeft as error:
    report = {
        "message": str(error), "mount_point": error.mount_point, "filesystem": error.filesystem,
        "directory": error.directory, "free": error.free_bytes,
        "files": sorted(os.listdir(directory)),
        "content": open(os.path.join(directory, "volume.raw"), "rb").read().decode(),
    }
    print(json.dumps(report))
else:
    print("converted without running out of space")
"""


def test_no_space_left_names_the_filesystem(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, check=False, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    data = tmp_path / "d.raw"
    data.write_bytes(os.urandom(8 * MiB))
    source = qemu_convert(data, tmp_path / "d.qcow2", "qcow2")
    source_dir = Path(backend.__file__).resolve().parents[2]
    mount = tmp_path / "small"
    result = subprocess.run(
        [unshare, "-rm", sys.executable, "-c", _ENOSPC_SCRIPT, str(source), str(mount)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(source_dir)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mount_point"] == str(mount)
    assert report["filesystem"] == "tmpfs"
    assert report["directory"] == str(mount)
    assert str(mount) in report["message"] and "tmpfs" in report["message"]
    assert report["files"] == ["volume.raw"]
    assert report["content"] == "previous"
    assert stat.S_ISDIR(os.stat(mount).st_mode)


TIMING_ERROR = "Unable to get accurate CPU usage"


def test_luks_timing_failure_is_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    runs = tmp_path / "runs"
    assert QEMU_IMG is not None
    fake_qemu_img(
        tmp_path,
        monkeypatch,
        f"""\
        echo run >> {runs}
        if [ "$(wc -l < {runs})" -lt 3 ]; then
            printf partial > "$last"
            echo "qemu-img: $last: error while converting qcow2: {TIMING_ERROR}" >&2
            exit 1
        fi
        exec {QEMU_IMG} "$@"
        """,
    )
    destination = tmp_path / "out.qcow2"
    backend.convert(source, destination, "qcow2", sandbox=False)
    assert runs.read_text().count("run") == 3
    run_qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(source), str(destination))
    assert "running it again" in caplog.text
    assert files_in(tmp_path) == {"d.raw", "runs", "out.qcow2"}


def test_other_failures_are_not_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    runs = tmp_path / "runs"
    fake_qemu_img(tmp_path, monkeypatch, f"echo run >> {runs}\necho 'qemu-img: boom' >&2\nexit 1\n")
    with pytest.raises(ConversionFailed, match="boom"):
        backend.convert(source, tmp_path / "out.qcow2", "qcow2", sandbox=False)
    assert runs.read_text().count("run") == 1
    assert files_in(tmp_path) == {"d.raw", "runs"}
