"""Review of the fourth performance pass: inputs where a shortcut gave another answer than the
plain code it replaced."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

import imgguard
from conftest import qemu_create, qemu_info
from imgguard.model import Policy, Status


def _footer_at_qemus_end(path: Path, target: Path, footer: bytes) -> Path:
    """`path`'s bytes padded to whole sectors, then a fixed VHD footer cut after its last
    non-zero byte: the file ends mid-sector, and qemu (which rounds the length up to whole
    sectors and reads zeros past the end) finds the whole footer at the rounded length - 512."""
    kept = len(footer.rstrip(b"\0"))
    assert 64 < kept < 512
    data = path.read_bytes()
    target.write_bytes(data + bytes(-len(data) % 512) + footer[:kept])
    return target


def test_fixed_vhd_footer_at_qemus_rounded_end_is_recognised(tmp_path: Path) -> None:
    # The signature dispatch looked for the cookie 512 bytes before the file's end only, so it
    # never called vpc.recognise() for a footer where vpc_open() reads it in a file whose size
    # is not a multiple of 512: a VHD that `qemu-img info -f vpc` opens was called plain raw.
    source = qemu_create(tmp_path / "fixed.vhd", "vpc", "1M", ["subformat=fixed"])
    data = source.read_bytes()
    guest = tmp_path / "guest.raw"
    guest.write_bytes(data[:-512])
    path = _footer_at_qemus_end(guest, tmp_path / "ragged.vhd", data[-512:])
    assert path.stat().st_size % 512 != 0
    as_vpc = qemu_info(path, "vpc")
    assert qemu_info(path)["format"] == "raw"

    info = imgguard.inspect(path)
    assert (info.format, info.qemu_format, info.matches) == ("vpc", "raw", ("vpc", "raw"))
    assert info.virtual_size == as_vpc["virtual-size"]
    assert info.header["footer_offset"] == len(data) - 512
    # A fixed VHD whose footer qemu finds: the same verdict as the untouched one.
    assert imgguard.check(path).status is Status.PASS
    assert imgguard.check(source).status is Status.PASS


def test_qcow2_with_a_vhd_footer_at_qemus_rounded_end_is_a_polyglot(tmp_path: Path) -> None:
    qcow2 = qemu_create(tmp_path / "disk.qcow2", "qcow2", "1M")
    footer = qemu_create(tmp_path / "fixed.vhd", "vpc", "1M", ["subformat=fixed"]).read_bytes()
    path = _footer_at_qemus_end(qcow2, tmp_path / "both.qcow2", footer[-512:])
    assert qemu_info(path, "vpc")["format"] == "vpc"
    assert qemu_info(path)["format"] == "qcow2"

    info = imgguard.inspect(path)
    assert (info.format, info.matches) == ("qcow2", ("qcow2", "vpc"))
    verdict = imgguard.check(path)
    assert verdict.status is Status.REJECT
    assert "IG201" in {finding.rule for finding in verdict.findings}
    # Near miss: the qcow2 alone (one reading) still passes.
    assert imgguard.check(qcow2).status is Status.PASS


def test_metadata_budget_below_zero_does_not_crash_without_loaded_tables(tmp_path: Path) -> None:
    # IG503 took max() of the loaded tables whenever their total (0 for none) was over the
    # budget: a negative max_metadata_bytes (the Python API does not refuse one) made check()
    # raise ValueError on a LUKS image (key material areas are not loaded at open).
    luks = qemu_create(
        tmp_path / "disk.luks", "luks", "1M", ["key-secret=sec0", "iter-time=10"], secret=True
    )
    assert imgguard.inspect(luks).tables
    policy = Policy(max_metadata_bytes=-1)
    verdict = imgguard.check(luks, policy=policy)
    assert "IG503" not in {finding.rule for finding in verdict.findings}
    # Loaded tables are still over a negative budget, and the largest is named.
    qcow2 = qemu_create(tmp_path / "disk.qcow2", "qcow2", "1M")
    findings = [f for f in imgguard.check(qcow2, policy=policy).findings if f.rule == "IG503"]
    assert [finding.field for finding in findings] == ["refcount_table"]


@pytest.mark.parametrize("opener", ["descriptor", "bytes path"])
def test_file_object_named_by_descriptor_or_bytes(tmp_path: Path, opener: str) -> None:
    # open(fd).name is an int and open(b"path").name bytes: the dmg prober (which reads every
    # image's name) raised TypeError/AttributeError on them.
    path = qemu_create(tmp_path / "disk.qcow2", "qcow2", "1M")
    if opener == "descriptor":
        file = open(os.open(path, os.O_RDONLY), "rb")  # noqa: SIM115
        expected_path = None
    else:
        file = open(os.fsencode(path), "rb")  # noqa: SIM115
        expected_path = str(path)
    with file:
        info = imgguard.inspect(file)
    assert (info.format, info.matches, info.path) == ("qcow2", ("qcow2",), expected_path)


def test_signature_outside_head_and_tail_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The dispatch key slices the head and the tail only: a driver declaring a signature
    # beyond them (an ISO 9660 descriptor at 32769) would silently never be called.
    from imgguard import formats, inspection

    iso = attrs.evolve(formats.iso9660.DRIVER, recognise_signatures=((32769, (b"CD001",)),))
    monkeypatch.setattr(formats, "LAYOUT_DRIVERS", (iso,))
    with pytest.raises(ValueError, match="outside the head and the tail"):
        inspection.inspect_bytes(bytes(40000))
    tail = attrs.evolve(formats.vpc.DRIVER, recognise_signatures=((-2, (b"cone",)),))
    monkeypatch.setattr(formats, "LAYOUT_DRIVERS", (tail,))
    with pytest.raises(ValueError, match="outside the head and the tail"):
        inspection.inspect_bytes(bytes(40000))
