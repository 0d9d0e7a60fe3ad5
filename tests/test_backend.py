"""The qemu backend with the real qemu-img: every benign format to every common output format,
LUKS in and out, qemu_info, resize, the version, and the command lines themselves."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import imgguard
from conftest import LUKS_SECRET, qemu_convert, raw_with_data, run_qemu_img
from imgguard import backend
from imgguard.backend import (
    CipherSpec,
    ConversionFailed,
    ConversionResult,
    ImageRejected,
    QemuImgNotFound,
)
from imgguard.backend.qemu import BACKING_FORMATS
from imgguard.backend.sandbox import SOURCE_PATH, TARGET_PATH
from imgguard.errors import ConfigError
from imgguard.model import DEFAULT_ALLOWED_FORMATS, Policy

MiB = 1 << 20
SIZE = 4 * MiB
QED_POLICY = Policy(allowed_formats=DEFAULT_ALLOWED_FORMATS | {"qed"})
ENCRYPTED_POLICY = Policy(allow_encrypted=True)
NEW_SECRET = "imgguard-new-passphrase"
FAST_LUKS = CipherSpec(iter_time_ms=10)

# name -> (qemu format, options for qemu-img convert -o, the policy that admits it)
SOURCES: dict[str, tuple[str, tuple[str, ...], Policy]] = {
    "raw": ("raw", (), imgguard.DEFAULT_POLICY),
    "qcow2": ("qcow2", (), imgguard.DEFAULT_POLICY),
    "vmdk-stream": ("vmdk", ("subformat=streamOptimized",), imgguard.DEFAULT_POLICY),
    "vmdk-sparse": ("vmdk", ("subformat=monolithicSparse",), imgguard.DEFAULT_POLICY),
    "vpc-fixed": ("vpc", ("subformat=fixed",), imgguard.DEFAULT_POLICY),
    "vpc-dynamic": ("vpc", ("subformat=dynamic",), imgguard.DEFAULT_POLICY),
    "vhdx": ("vhdx", (), imgguard.DEFAULT_POLICY),
    "vdi": ("vdi", (), imgguard.DEFAULT_POLICY),
    "qed": ("qed", (), QED_POLICY),
}
# out format -> (subformat, the format to name to qemu-img compare)
TARGETS: dict[str, tuple[str | None, str]] = {
    "raw": (None, "raw"),
    "qcow2": (None, "qcow2"),
    "vmdk": ("streamOptimized", "vmdk"),
    "vpc": (None, "vpc"),
    "vhdx": (None, "vhdx"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("sources")
    data = raw_with_data(directory / "data.raw", SIZE)
    made = {}
    for name, (fmt, options, _) in SOURCES.items():
        if fmt == "raw":
            made[name] = data
        else:
            made[name] = qemu_convert(data, directory / f"{name}.{fmt}", fmt, options)
    return made


def compare(first: Path, first_format: str, second: Path, second_format: str) -> None:
    """`qemu-img compare` exits 0 only when the guest data is the same."""
    run_qemu_img("compare", "-q", "-f", first_format, "-F", second_format, str(first), str(second))


def pinned_source(command: Sequence[str]) -> tuple[str, str]:
    """(driver, file name) of the source: `-f DRIVER PATH`, or imgguard's `json:` filename."""
    name = command[-2]
    if name.startswith("json:"):
        assert "-f" not in command
        document = json.loads(name.removeprefix("json:"))
        assert document["backing"] is None and document["file"]["driver"] == "file"
        return document["driver"], document["file"]["filename"]
    return command[command.index("-f") + 1], name


def only_files(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_benign_format_converts_with_its_guest_data(
    sources: dict[str, Path], tmp_path: Path, source: str, target: str
) -> None:
    fmt, _, policy = SOURCES[source]
    subformat, compare_as = TARGETS[target]
    destination = tmp_path / f"out.{target}"
    result = backend.convert(
        sources[source], destination, target, policy=policy, out_subformat=subformat
    )
    assert isinstance(result, ConversionResult)
    assert result.ok and result.verdict.ok
    assert result.verdict.info is not None and result.verdict.info.format == fmt
    assert result.output.format == target
    assert result.path == str(destination)
    if subformat is not None:
        assert result.output.variant == subformat
    compare(sources[source], fmt, destination, compare_as)
    # The format is named, never probed: -f (or json:'s driver) is the detected format (vpc for a
    # fixed VHD too); formats that can have a backing file are opened with "backing": null.
    command = list(result.command)
    assert pinned_source(command) == (fmt, SOURCE_PATH)
    assert (fmt in BACKING_FORMATS) == command[-2].startswith("json:")
    assert command[-1] == TARGET_PATH
    assert result.sandbox in ("bwrap", "unshare")
    assert only_files(tmp_path) == {destination.name}
    assert result.source_bytes == sources[source].stat().st_size
    assert result.output_bytes == destination.stat().st_size
    assert result.seconds > 0 and result.mb_per_s > 0


def test_fixed_vhd_is_read_as_vpc_not_raw(sources: dict[str, Path], tmp_path: Path) -> None:
    info = imgguard.inspect(sources["vpc-fixed"])
    assert (info.format, info.variant, info.qemu_format) == ("vpc", "fixed", "raw")
    result = backend.convert(sources["vpc-fixed"], tmp_path / "out.raw", "raw")
    assert result.command[result.command.index("-f") + 1] == "vpc"
    # Read as raw the output would carry the 512-byte footer; read as vpc it is the guest data.
    assert (tmp_path / "out.raw").stat().st_size == info.virtual_size


@pytest.mark.parametrize(
    ("out_format", "subformat", "variant"),
    [
        ("vpc", "fixed", "fixed"),
        ("vhdx", "fixed", None),
        ("vmdk", "monolithicSparse", "monolithicSparse"),
        ("vdi", None, None),
        ("vhd", None, "dynamic"),
    ],
)
def test_subformats_and_glance_names(
    sources: dict[str, Path], tmp_path: Path, out_format: str, subformat: str, variant: str | None
) -> None:
    destination = tmp_path / "out.img"
    result = backend.convert(sources["qcow2"], destination, out_format, out_subformat=subformat)
    expected_format = "vpc" if out_format == "vhd" else out_format
    assert result.output.format == expected_format
    if variant is not None:
        assert result.output.variant == variant
    compare(sources["qcow2"], "qcow2", destination, expected_format)


def test_vpc_output_keeps_the_exact_virtual_size(sources: dict[str, Path], tmp_path: Path) -> None:
    result = backend.convert(sources["raw"], tmp_path / "out.vhd", "vpc", out_subformat="fixed")
    assert "force_size=on" in result.command[result.command.index("-o") + 1]
    assert result.output.virtual_size == SIZE


@pytest.mark.parametrize(
    ("out_format", "subformat"), [("qcow2", None), ("vmdk", "streamOptimized")]
)
def test_compressed_output(
    sources: dict[str, Path], tmp_path: Path, out_format: str, subformat: str | None
) -> None:
    destination = tmp_path / "out.img"
    result = backend.convert(
        sources["raw"], destination, out_format, out_subformat=subformat, compress=True
    )
    assert "-c" in result.command
    compare(sources["raw"], "raw", destination, out_format)


def test_cache_mode_is_passed(sources: dict[str, Path], tmp_path: Path) -> None:
    result = backend.convert(sources["qcow2"], tmp_path / "o.raw", "raw", cache_mode="writeback")
    assert result.command[result.command.index("-t") + 1] == "writeback"


def test_progress_is_reported_up_to_100(sources: dict[str, Path], tmp_path: Path) -> None:
    seen: list[float] = []
    backend.convert(sources["vmdk-sparse"], tmp_path / "out.qcow2", "qcow2", progress=seen.append)
    assert seen and seen == sorted(seen)
    assert all(0.0 <= percent <= 100.0 for percent in seen)
    assert seen[-1] == 100.0


def test_throughput_is_logged(
    sources: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="imgguard.backend")
    backend.convert(sources["qcow2"], tmp_path / "out.raw", "raw")
    messages = [record.getMessage() for record in caplog.records]
    assert any("MiB/s" in message and "converted" in message for message in messages)


def test_previous_destination_is_replaced_whole(sources: dict[str, Path], tmp_path: Path) -> None:
    destination = tmp_path / "volume.raw"
    destination.write_bytes(b"previous content" * 100_000)
    backend.convert(sources["qcow2"], destination, "raw")
    compare(sources["qcow2"], "qcow2", destination, "raw")
    assert only_files(tmp_path) == {"volume.raw"}
    assert destination.stat().st_mode & 0o777 == 0o600


def test_paths_that_look_like_protocols_or_options(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = Path("nbd:localhost,port=1.qcow2")
    source.write_bytes(sources["qcow2"].read_bytes())
    result = backend.convert(str(source), "-o,json:{}.raw", "raw")
    assert pinned_source(result.command) == ("qcow2", SOURCE_PATH)
    unconfined = backend.convert(str(source), "-o,json:{}.raw", "raw", sandbox=False)
    assert unconfined.sandbox == "none"
    # Without the sandbox qemu-img gets the checked file as an inherited descriptor: the name
    # that looks like a protocol never reaches its command line.
    driver, name = pinned_source(unconfined.command)
    assert driver == "qcow2" and re.fullmatch(r"/dev/fd/\d+", name)
    assert (tmp_path / "-o,json:{}.raw").exists()
    compare(tmp_path / source, "qcow2", tmp_path / "-o,json:{}.raw", "raw")


def test_output_that_is_not_the_format_asked_for_is_discarded(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    # A guest disk whose content is itself a qcow2 image: converted to raw, the output's bytes
    # are a qcow2 image, which Cinder's upload_volume check (and imgguard) refuses to publish.
    nested = tmp_path / "nested.qcow2"
    qemu_convert(sources["qcow2"], nested, "qcow2", in_fmt="raw")
    destination = tmp_path / "out.raw"
    destination.write_bytes(b"keep me")
    with pytest.raises(ConversionFailed, match="it is qcow2, not raw"):
        backend.convert(nested, destination, "raw")
    assert destination.read_bytes() == b"keep me"
    assert only_files(tmp_path) == {"nested.qcow2", "out.raw"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_format": "qed"}, "cannot write 'qed'"),
        ({"out_format": "vmdk", "out_subformat": "monolithicFlat"}, "no subformat"),
        ({"out_format": "raw", "compress": True}, "compression"),
        ({"out_format": "vmdk", "compress": True}, "compression"),
        ({"out_format": "raw", "cache_mode": "bogus"}, "unknown cache mode"),
        ({"out_format": "luks"}, "needs a passphrase_file"),
        ({"out_format": "qcow2", "cipher_spec": {"cipher_alg": "aes-256"}}, "needs a passphrase"),
    ],
)
def test_bad_arguments_are_config_errors(
    sources: dict[str, Path], tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    out_format = kwargs.pop("out_format")
    with pytest.raises(ConfigError, match=message):
        backend.convert(sources["qcow2"], tmp_path / "out", out_format, **kwargs)
    assert only_files(tmp_path) == set()


def test_destination_that_is_not_a_regular_file_is_refused(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "real.raw"
    target.write_bytes(b"x")
    link = tmp_path / "link.raw"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="not a regular file"):
        backend.convert(sources["qcow2"], link, "raw")
    with pytest.raises(ConfigError, match="not a regular file"):
        backend.convert(sources["qcow2"], tmp_path, "raw")
    assert target.read_bytes() == b"x"
    assert only_files(tmp_path) == {"real.raw", "link.raw"}


def test_source_and_destination_the_same_file_is_refused(tmp_path: Path) -> None:
    image = raw_with_data(tmp_path / "disk.raw", SIZE)
    before = image.read_bytes()
    with pytest.raises(ConfigError, match="same file"):
        backend.convert(image, image, "raw")
    assert image.read_bytes() == before


# --- LUKS --------------------------------------------------------------------------------------


def secret_file(directory: Path, secret: str, name: str) -> Path:
    path = directory / name
    path.write_text(secret, encoding="utf-8")
    return path


def convert_retrying(*args: Any, **kwargs: Any) -> ConversionResult:
    """qemu's LUKS key-slot timing fails now and then with a short iter-time; retry that one."""
    for attempt in range(5):
        try:
            return backend.convert(*args, **kwargs)
        except ConversionFailed as failure:
            if "Unable to get accurate CPU usage" not in failure.stderr or attempt == 4:
                raise
    raise AssertionError("unreachable")


def compare_opts(first: str, second: str, *secrets: str) -> None:
    objects = []
    for index, secret in enumerate(secrets):
        objects += ["--object", f"secret,id=s{index},data={secret}"]
    run_qemu_img("compare", "-q", *objects, "--image-opts", first, second)


@pytest.fixture(scope="module")
def luks_source(sources: dict[str, Path]) -> Path:
    path = sources["raw"].parent / "src.luks"
    run_qemu_img(
        "convert",
        "--object",
        f"secret,id=sec0,data={LUKS_SECRET}",
        "-f",
        "raw",
        "-O",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        str(sources["raw"]),
        str(path),
    )
    return path


def test_raw_to_luks_with_a_passphrase_file(sources: dict[str, Path], tmp_path: Path) -> None:
    passphrase = secret_file(tmp_path, NEW_SECRET, "new,key.txt")
    destination = tmp_path / "out.luks"
    result = convert_retrying(
        sources["raw"], destination, "luks", passphrase_file=passphrase, cipher_spec=FAST_LUKS
    )
    assert result.output.format == "luks" and result.output.encrypted
    command = " ".join(result.command)
    assert NEW_SECRET not in command and "data=" not in command
    assert "secret,id=imgguard-dst-key,format=raw,file=/secrets/target-key" in command
    unconfined = convert_retrying(
        sources["raw"],
        destination,
        "luks",
        passphrase_file=passphrase,
        cipher_spec=FAST_LUKS,
        sandbox=False,
    )
    assert f"secret,id=imgguard-dst-key,format=raw,file={tmp_path}/new,,key.txt" in " ".join(
        unconfined.command
    )
    compare_opts(
        f"driver=raw,file.filename={sources['raw']}",
        f"driver=luks,key-secret=s0,file.filename={destination}",
        NEW_SECRET,
    )


def test_luks_to_luks_with_a_new_passphrase(luks_source: Path, tmp_path: Path) -> None:
    old = secret_file(tmp_path, LUKS_SECRET, "old.txt")
    new = secret_file(tmp_path, NEW_SECRET, "new.txt")
    destination = tmp_path / "out.luks"
    result = convert_retrying(
        luks_source,
        destination,
        "luks",
        policy=ENCRYPTED_POLICY,
        src_passphrase_file=old,
        passphrase_file=new,
        cipher_spec={
            "cipher_alg": "aes-256",
            "cipher_mode": "xts",
            "ivgen_alg": "plain64",
            "iter_time_ms": 10,
        },
    )
    command = list(result.command)
    assert "-f" not in command  # an encrypted source is named by driver= in --image-opts
    assert "--image-opts" in command
    opts = command[-2]  # the source's option string, before the target
    assert (
        opts
        == f"driver=luks,key-secret=imgguard-src-key,file.driver=file,file.filename={SOURCE_PATH}"
    )
    assert LUKS_SECRET not in " ".join(command) and NEW_SECRET not in " ".join(command)
    compare_opts(
        f"driver=luks,key-secret=s0,file.filename={luks_source}",
        f"driver=luks,key-secret=s1,file.filename={destination}",
        LUKS_SECRET,
        NEW_SECRET,
    )


def test_luks_to_encrypted_qcow2(luks_source: Path, tmp_path: Path) -> None:
    old = secret_file(tmp_path, LUKS_SECRET, "old.txt")
    new = secret_file(tmp_path, NEW_SECRET, "new.txt")
    destination = tmp_path / "out.qcow2"
    result = convert_retrying(
        luks_source,
        destination,
        "qcow2",
        policy=ENCRYPTED_POLICY,
        src_passphrase_file=old,
        passphrase_file=new,
        cipher_spec=FAST_LUKS,
    )
    assert result.output.format == "qcow2" and result.output.encrypted
    compare_opts(
        f"driver=luks,key-secret=s0,file.filename={luks_source}",
        f"driver=qcow2,encrypt.key-secret=s1,file.filename={destination}",
        LUKS_SECRET,
        NEW_SECRET,
    )


def test_encrypted_source_needs_the_policy_and_both_passphrases(
    luks_source: Path, tmp_path: Path
) -> None:
    old = secret_file(tmp_path, LUKS_SECRET, "old.txt")
    with pytest.raises(ImageRejected, match="IG401"):
        backend.convert(luks_source, tmp_path / "o.luks", "luks", passphrase_file=old)
    with pytest.raises(ConfigError, match="give src_passphrase_file"):
        backend.convert(
            luks_source, tmp_path / "o.luks", "luks", policy=ENCRYPTED_POLICY, passphrase_file=old
        )
    with pytest.raises(ConfigError, match="does not decrypt"):
        backend.convert(
            luks_source, tmp_path / "o.raw", "raw", policy=ENCRYPTED_POLICY, src_passphrase_file=old
        )
    assert only_files(tmp_path) == {"old.txt"}


def test_wrong_source_passphrase_fails_cleanly(luks_source: Path, tmp_path: Path) -> None:
    wrong = secret_file(tmp_path, "not-the-passphrase", "wrong.txt")
    new = secret_file(tmp_path, NEW_SECRET, "new.txt")
    with pytest.raises(ConversionFailed, match="Invalid password"):
        backend.convert(
            luks_source,
            tmp_path / "out.luks",
            "luks",
            policy=ENCRYPTED_POLICY,
            src_passphrase_file=wrong,
            passphrase_file=new,
            cipher_spec=FAST_LUKS,
        )
    assert only_files(tmp_path) == {"wrong.txt", "new.txt"}


# --- qemu_info, resize, version ----------------------------------------------------------------


def test_qemu_info_is_typed(sources: dict[str, Path]) -> None:
    info = backend.qemu_info(sources["vmdk-stream"])
    assert info.format == "vmdk" and info.virtual_size == SIZE
    assert info.subformat == "streamOptimized"
    assert info.data["format"] == "vmdk"
    qcow2 = backend.qemu_info(sources["qcow2"], "qcow2", force_share=True)
    assert qcow2.cluster_size == 65536 and not qcow2.dirty and not qcow2.encrypted
    assert qcow2.format_specific["type"] == "qcow2"


def test_qemu_info_reads_as_detected_or_raw_only(sources: dict[str, Path]) -> None:
    as_raw = backend.qemu_info(sources["qcow2"], "raw")
    assert as_raw.format == "raw" and as_raw.virtual_size == sources["qcow2"].stat().st_size
    with pytest.raises(ConfigError, match="not vmdk"):
        backend.qemu_info(sources["qcow2"], "vmdk")
    fixed = backend.qemu_info(sources["vpc-fixed"])
    assert fixed.format == "vpc"


def test_resize_with_explicit_format(tmp_path: Path) -> None:
    image = qemu_convert(raw_with_data(tmp_path / "d.raw", SIZE), tmp_path / "d.qcow2", "qcow2")
    info = backend.resize(image, 2)
    assert info.virtual_size == 2 << 30
    assert backend.qemu_info(image).virtual_size == 2 << 30
    with pytest.raises(ConfigError, match="not raw"):
        backend.resize(image, 3, format="raw")
    with pytest.raises(backend.QemuImgFailed, match="--shrink"):
        backend.resize(image, 1, format="qcow2")
    assert backend.resize(image, 1, shrink=True).virtual_size == 1 << 30
    with pytest.raises(ConfigError, match="size_gib"):
        backend.resize(image, 0)


def test_qemu_img_version() -> None:
    version = backend.qemu_img_version()
    assert version >= backend.MINIMUM_QEMU_IMG_VERSION
    assert backend.check_qemu_img_version() == version
    with pytest.raises(QemuImgNotFound, match="older than"):
        backend.check_qemu_img_version((99, 0, 0))


def test_missing_qemu_img_names_the_package(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    destination = tmp_path / "out.raw"
    with pytest.raises(QemuImgNotFound, match="qemu-utils"):
        backend.convert(sources["qcow2"], destination, "raw")
    assert only_files(tmp_path) == set()
    with pytest.raises(QemuImgNotFound, match="qemu-utils"):
        backend.qemu_img_version()


def test_public_names() -> None:
    for name in backend.__all__:
        assert hasattr(backend, name)


def test_encrypted_qcow2_source(luks_source: Path, tmp_path: Path) -> None:
    old = secret_file(tmp_path, LUKS_SECRET, "old.txt")
    new = secret_file(tmp_path, NEW_SECRET, "new.txt")
    middle = tmp_path / "enc.qcow2"
    convert_retrying(
        luks_source,
        middle,
        "qcow2",
        policy=ENCRYPTED_POLICY,
        src_passphrase_file=old,
        passphrase_file=new,
        cipher_spec=FAST_LUKS,
    )
    info = imgguard.inspect(middle)
    assert info.encrypted and info.encryption is not None and info.encryption.method == "luks"
    destination = tmp_path / "out.luks"
    result = convert_retrying(
        middle,
        destination,
        "luks",
        policy=ENCRYPTED_POLICY,
        src_passphrase_file=new,
        passphrase_file=old,
        cipher_spec=FAST_LUKS,
    )
    document = json.loads(result.command[-2].removeprefix("json:"))
    assert document == {
        "driver": "qcow2",
        "backing": None,
        "encrypt": {"format": "luks", "key-secret": "imgguard-src-key"},
        "file": {"driver": "file", "filename": SOURCE_PATH},
    }
    compare_opts(
        f"driver=luks,key-secret=s0,file.filename={luks_source}",
        f"driver=luks,key-secret=s0,file.filename={destination}",
        LUKS_SECRET,
    )
    qemu = backend.qemu_info(middle, policy=ENCRYPTED_POLICY)
    assert qemu.encrypted and qemu.format == "qcow2"
    assert backend.qemu_info(luks_source, policy=ENCRYPTED_POLICY).format == "luks"
