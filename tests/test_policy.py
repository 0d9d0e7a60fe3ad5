"""Every rule: an offending image that must raise exactly that rule id, and a near miss that passes.

Images come from the real qemu-img; where qemu-img cannot make the offending image, a real one is
edited at the field's documented offset (qcow2 spec, "Header").
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

import imgguard
from conftest import qemu_convert, raw_with_data, run_qemu_img
from imgguard import Policy, Severity, Status, check
from imgguard.model import ImageInfo
from imgguard.policy import ConfigError, load_policy, policy_from_mapping
from imgguard.rules import RULES

MakeImage = Callable[..., Path]

# qcow2 spec, "Header": byte offsets of the fields these tests edit.
QCOW2_CRYPT_METHOD = 32
QCOW2_L1_SIZE = 36
QCOW2_L1_TABLE_OFFSET = 40
QCOW2_NB_SNAPSHOTS = 60
QCOW2_INCOMPATIBLE_FEATURES = 72
QCOW2_VERSION = 4
QCOW2_CLUSTER_BITS = 20


def rule_ids(verdict: imgguard.Verdict) -> set[str]:
    return {finding.rule for finding in verdict.findings}


def patch(path: Path, offset: int, fmt: str, value: int) -> Path:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(struct.pack(fmt, value))
    return path


def assert_passes(verdict: imgguard.Verdict) -> None:
    assert verdict.status is Status.PASS, [(f.rule, f.message) for f in verdict.findings]


# --- references ------------------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["/etc/passwd", "../../etc/shadow", "base.qcow2"])
def test_qcow2_backing_file_is_ig101(tmp_path: Path, backing: str) -> None:
    image = tmp_path / "child.qcow2"
    # -u: qemu-img does not open the backing file, so the name need not exist here.
    run_qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing, str(image), "1G")
    verdict = check(image)
    assert verdict.status is Status.REJECT
    assert "IG101" in rule_ids(verdict)
    assert verdict.info is not None and verdict.info.backing_file == backing


def test_plain_qcow2_passes(make_image: MakeImage) -> None:
    assert_passes(check(make_image("qcow2", "1G")))


@pytest.mark.parametrize("fmt", ["qed", "qcow"])
def test_legacy_backing_files_are_ig101(make_image: MakeImage, fmt: str) -> None:
    image = make_image(fmt, "64M", "backing_file=/etc/hostname", "backing_fmt=raw")
    assert {"IG101", "IG203"} <= rule_ids(check(image))


def test_external_data_file_is_ig102(make_image: MakeImage, tmp_path: Path) -> None:
    image = make_image("qcow2", "64M", f"data_file={tmp_path / 'data.raw'}")
    verdict = check(image)
    assert "IG102" in rule_ids(verdict)
    assert verdict.status is Status.REJECT


def test_vmdk_flat_extent_is_ig103_and_ig204(make_image: MakeImage) -> None:
    descriptor = make_image("vmdk", "64M", "subformat=monolithicFlat")
    verdict = check(descriptor)
    assert {"IG103", "IG204"} <= rule_ids(verdict)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_self_contained_vmdk_passes(make_image: MakeImage, subformat: str) -> None:
    assert_passes(check(make_image("vmdk", "64M", f"subformat={subformat}")))


def test_vmdk_parent_is_ig104(make_image: MakeImage, tmp_path: Path) -> None:
    make_image("vmdk", "64M", name="base.vmdk")
    child = make_image("vmdk", "64M", f"backing_file={tmp_path / 'base.vmdk'}", "backing_fmt=vmdk")
    assert "IG104" in rule_ids(check(child))


@pytest.mark.parametrize(
    "backing",
    [
        'json:{"file.driver": "nbd", "file.host": "127.0.0.1", "file.port": "10809"}',
        "nbd:127.0.0.1:10809",
        "http://127.0.0.1/disk.img",
    ],
)
def test_protocol_backing_file_is_critical_ig105(tmp_path: Path, backing: str) -> None:
    image = tmp_path / "protocol.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing, str(image), "1G")
    verdict = check(image)
    findings = {finding.rule: finding for finding in verdict.findings}
    assert findings["IG105"].severity is Severity.CRITICAL
    assert "IG101" not in findings  # one finding per reference, at its worst severity


# --- what the image is -----------------------------------------------------------------------


def test_qcow2_with_partition_table_is_ig201(make_image: MakeImage) -> None:
    image = make_image("qcow2", "64M")
    with image.open("r+b") as file:
        # A bootable Linux partition from sector 2048, three empty entries (over the tail of
        # qcow2's feature name table, which qemu only uses for messages) and the boot signature.
        file.seek(446)
        file.write(struct.pack("<B3sB3sII", 0x80, b"\0\0\0", 0x83, b"\0\0\0", 2048, 20480))
        file.write(bytes(48))
        file.seek(510)
        file.write(b"\x55\xaa")
    verdict = check(image)
    assert "IG201" in rule_ids(verdict)
    assert verdict.info is not None and verdict.info.matches[:1] == ("qcow2",)
    assert "mbr" in verdict.info.matches


@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vmdk", "vhdx"])
def test_bare_boot_signature_in_a_header_is_ig201(make_image: MakeImage, fmt: str) -> None:
    # No partition entry at all: only the 0x55AA firmware looks for at the end of sector 0.
    image = make_image(fmt, "64M")
    assert_passes(check(image))
    with image.open("r+b") as file:
        file.seek(510)
        file.write(b"\x55\xaa")
    verdict = check(image)
    assert verdict.info is not None and verdict.info.matches == (fmt, "mbr")
    assert "IG201" in rule_ids(verdict)


def test_qcow2_vdi_polyglot_is_ig201(make_image: MakeImage) -> None:
    image = make_image("qcow2", "64M")
    # VDI's signature lives at offset 64, inside qcow2's snapshots_offset field.
    patch(image, 64, "<I", 0xBEDA107F)
    verdict = check(image)
    assert "IG201" in rule_ids(verdict)


def test_fixed_vhd_of_partitioned_disk_is_not_confusion(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as file:
        file.truncate(8 << 20)
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk (Debian package fdisk) is not installed")
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\n,,L\n", text=True, check=True)
    vhd = qemu_convert(disk, tmp_path / "disk.vhd", "vpc", ["subformat=fixed"])
    verdict = check(vhd)
    assert verdict.info is not None
    assert (verdict.info.format, verdict.info.variant) == ("vpc", "fixed")
    assert "IG201" not in rule_ids(verdict)
    assert_passes(verdict)


@pytest.mark.parametrize(
    ("claimed", "fmt", "ok"),
    [
        ("qcow2", "raw", False),
        ("raw", "qcow2", False),
        ("vhd", "vpc", True),
        ("ami", "raw", True),
        ("qcow2", "qcow2", True),
        ("vmdk", "vpc", False),
    ],
)
def test_claimed_format_is_ig202(make_image: MakeImage, claimed: str, fmt: str, ok: bool) -> None:
    image = make_image(fmt, "64M")
    verdict = check(image, claimed_format=claimed)
    assert ("IG202" not in rule_ids(verdict)) is ok


def test_fixed_vhd_may_be_declared_raw_or_vhd(make_image: MakeImage) -> None:
    image = make_image("vpc", "64M", "subformat=fixed")
    for claimed in ("raw", "vhd", "vpc"):
        assert "IG202" not in rule_ids(check(image, claimed_format=claimed)), claimed


def test_format_not_allowed_is_ig203(make_image: MakeImage) -> None:
    image = make_image("qed", "64M")
    assert "IG203" in rule_ids(check(image))
    assert_passes(check(image, Policy(allowed_formats={"qed"})))


def test_unknown_incompatible_bit_is_ig301(make_image: MakeImage) -> None:
    image = patch(make_image("qcow2", "64M"), QCOW2_INCOMPATIBLE_FEATURES, ">Q", 1 << 10)
    assert "IG301" in rule_ids(check(image))


@pytest.mark.parametrize(
    "options",
    [
        ("extended_l2=on",),
        ("compression_type=zstd",),
        ("lazy_refcounts=on",),
        ("compat=0.10",),
        ("cluster_size=2M",),
        ("cluster_size=512",),
        ("refcount_bits=64",),
    ],
)
def test_known_qcow2_features_pass(make_image: MakeImage, options: tuple[str, ...]) -> None:
    assert_passes(check(make_image("qcow2", "1G", *options)))


def test_unsupported_version_is_ig302(make_image: MakeImage) -> None:
    image = patch(make_image("qcow2", "64M"), QCOW2_VERSION, ">I", 4)
    assert "IG302" in rule_ids(check(image))


def test_corrupt_bit_is_ig303_and_dirty_bit_is_low(make_image: MakeImage) -> None:
    corrupt = patch(make_image("qcow2", "64M"), QCOW2_INCOMPATIBLE_FEATURES, ">Q", 0b10)
    assert "IG303" in rule_ids(check(corrupt))
    dirty = patch(make_image("qcow2", "64M"), QCOW2_INCOMPATIBLE_FEATURES, ">Q", 0b01)
    verdict = check(dirty)
    assert [(f.rule, f.severity) for f in verdict.findings] == [("IG304", Severity.LOW)]
    assert_passes(verdict)


def test_luks_is_ig401_unless_allowed(make_image: MakeImage) -> None:
    image = make_image("luks", "16M", "key-secret=sec0", "iter-time=10", secret=True)
    assert "IG401" in rule_ids(check(image))
    verdict = check(image, Policy(allow_encrypted=True))
    assert_passes(verdict)
    assert [(f.rule, f.severity) for f in verdict.findings] == [("IG401", Severity.INFO)]


def test_legacy_aes_is_ig402(make_image: MakeImage) -> None:
    image = patch(make_image("qcow2", "64M"), QCOW2_CRYPT_METHOD, ">I", 1)
    verdict = check(image, Policy(allow_encrypted=True))
    assert "IG402" in rule_ids(verdict)
    assert verdict.status is Status.REJECT


# --- resource abuse --------------------------------------------------------------------------


def test_virtual_size_cap_is_ig501(make_image: MakeImage) -> None:
    assert "IG501" in rule_ids(check(make_image("qcow2", "4T")))
    assert_passes(check(make_image("qcow2", "1T")))


def test_target_size_rounds_up_to_gib_as_cinder_does(make_image: MakeImage) -> None:
    image = make_image("qcow2", str(2 * 1024**3 + 512))
    assert "IG502" in rule_ids(check(image, target_size=2))
    assert_passes(check(image, target_size=3))
    assert_passes(check(make_image("qcow2", "2G"), target_size=2))


def test_huge_l1_table_is_ig503(make_image: MakeImage) -> None:
    image = patch(make_image("qcow2", "64M"), QCOW2_L1_SIZE, ">I", 16 << 20)
    assert "IG503" in rule_ids(check(image))


def test_table_past_eof_is_ig504(make_image: MakeImage) -> None:
    image = patch(make_image("qcow2", "64M"), QCOW2_L1_TABLE_OFFSET, ">Q", 1 << 40)
    assert "IG504" in rule_ids(check(image))


def test_snapshot_count_is_ig505(make_image: MakeImage) -> None:
    image = patch(make_image("qcow2", "64M"), QCOW2_NB_SNAPSHOTS, ">I", 5000)
    assert "IG505" in rule_ids(check(image))


def test_real_snapshots_pass(make_image: MakeImage) -> None:
    image = make_image("qcow2", "64M")
    for name in ("one", "two"):
        run_qemu_img("snapshot", "-c", name, str(image))
    verdict = check(image)
    assert verdict.info is not None and verdict.info.header["nb_snapshots"] == 2
    assert_passes(verdict)


def test_luks_iterations_are_ig506(make_image: MakeImage) -> None:
    image = make_image("luks", "16M", "key-secret=sec0", "iter-time=10", secret=True)
    # LUKS1 key slot 0 starts at offset 208; its iterations field follows the active marker.
    patch(image, 208 + 4, ">I", 100_000_000)
    verdict = check(image, Policy(allow_encrypted=True))
    assert "IG506" in rule_ids(verdict)


# --- malformed input -------------------------------------------------------------------------


def test_truncated_qcow2_is_qcow2_and_ig601(make_image: MakeImage, tmp_path: Path) -> None:
    image = make_image("qcow2", "64M")
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(image.read_bytes()[:100])
    verdict = check(cut)
    assert verdict.info is not None and verdict.info.format == "qcow2"
    assert "IG601" in rule_ids(verdict)


def test_absurd_cluster_bits_is_rejected(make_image: MakeImage) -> None:
    image = patch(make_image("qcow2", "64M"), QCOW2_CLUSTER_BITS, ">I", 40)
    verdict = check(image)
    assert verdict.status is Status.REJECT
    assert rule_ids(verdict) & {"IG602", "IG302", "IG604"}


# --- the file and the request ----------------------------------------------------------------


def test_symlink_and_fifo_are_ig701(make_image: MakeImage, tmp_path: Path) -> None:
    image = make_image("qcow2", "64M")
    link = tmp_path / "link.qcow2"
    link.symlink_to(image)
    fifo = tmp_path / "upload.fifo"
    os.mkfifo(fifo)
    for path in (link, fifo, tmp_path):
        verdict = check(path)
        assert verdict.status is Status.REJECT
        assert rule_ids(verdict) == {"IG701"}


def test_missing_file_is_an_error_ig702(tmp_path: Path) -> None:
    verdict = check(tmp_path / "vanished.img")
    assert verdict.status is Status.ERROR
    assert rule_ids(verdict) == {"IG702"}
    assert verdict.info is None


def test_conversion_disabled_is_ig801(make_image: MakeImage) -> None:
    image = make_image("qcow2", "64M")
    policy = Policy(allow_conversion=False)
    assert "IG801" in rule_ids(check(image, policy, convert_to="raw"))
    assert_passes(check(image, policy, convert_to="qcow2"))


# --- legitimate images and policy mechanics --------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("raw", ()),
        ("qcow2", ()),
        ("qcow2", ("compat=0.10",)),
        ("vmdk", ()),
        ("vmdk", ("subformat=streamOptimized",)),
        ("vpc", ()),
        ("vpc", ("subformat=fixed",)),
        ("vhdx", ()),
        ("vhdx", ("subformat=fixed",)),
        ("vdi", ()),
        ("vdi", ("static=on",)),
    ],
)
def test_every_single_file_image_qemu_img_makes_passes(
    make_image: MakeImage, fmt: str, options: tuple[str, ...]
) -> None:
    assert_passes(check(make_image(fmt, "64M", *options)))


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "vdi"])
def test_images_with_data_pass(tmp_path: Path, fmt: str) -> None:
    source = raw_with_data(tmp_path / "guest.raw", 8 << 20)
    assert_passes(check(qemu_convert(source, tmp_path / f"guest.{fmt}", fmt)))


def test_check_accepts_info_and_binary_file(make_image: MakeImage) -> None:
    image = make_image("qcow2", "64M")
    info = imgguard.inspect(image)
    assert isinstance(info, ImageInfo)
    assert_passes(check(info))
    with image.open("rb") as file:
        assert_passes(check(file))


def test_severity_override_and_waiver(make_image: MakeImage) -> None:
    image = make_image("qed", "64M")
    assert check(image).status is Status.REJECT
    lowered = check(image, Policy(severity_overrides={"IG203": "medium"}))
    assert_passes(lowered)
    waived = check(image, Policy(waivers={"IG203"}))
    assert_passes(waived)
    assert [finding.rule for finding in waived.waived] == ["IG203"]


def test_fail_on_threshold(make_image: MakeImage) -> None:
    dirty = patch(make_image("qcow2", "64M"), QCOW2_INCOMPATIBLE_FEATURES, ">Q", 0b01)
    assert check(dirty, Policy(fail_on="low")).status is Status.REJECT


def test_policy_from_toml(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        "[tool.imgguard]\n"
        'allowed-formats = ["raw", "qcow2"]\n'
        'max-virtual-size = "10G"\n'
        'fail-on = "medium"\n'
        "waivers = ['IG304']\n"
        "[tool.imgguard.severity]\nIG201 = 'critical'\n"
    )
    policy = load_policy(policy_file)
    assert policy.allowed_formats == {"raw", "qcow2"}
    assert policy.max_virtual_size == 10 << 30
    assert policy.fail_on is Severity.MEDIUM
    assert policy.waivers == {"IG304"}
    assert policy.severity_overrides["IG201"] is Severity.CRITICAL


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"allowed-formats": "qcow2"}, "allowed-formats"),
        ({"max-virtual-size": "huge"}, "max-virtual-size"),
        ({"fail-on": "sometimes"}, "fail-on"),
        ({"colour": True}, "colour"),
        ({"waivers": ["IG999"]}, "waivers"),
        ({"allow-encrypted": "yes"}, "allow-encrypted"),
    ],
)
def test_bad_policy_values_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        policy_from_mapping(values)


def test_every_rule_is_documented() -> None:
    text = (Path(__file__).parent.parent / "docs" / "rules.md").read_text()
    for rule_id, spec in RULES.items():
        assert f"| {rule_id} | {spec.name} |" in text, rule_id


def test_policy_is_hashable_and_frozen() -> None:
    policy = Policy()
    assert hash(policy) == hash(Policy())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.allow_encrypted = True  # type: ignore[misc]
