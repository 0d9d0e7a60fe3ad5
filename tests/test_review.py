"""Review of the fourth performance pass: inputs where a shortcut gave another answer than the
plain code it replaced."""

from __future__ import annotations

from pathlib import Path

import imgguard
from conftest import qemu_create, qemu_info
from imgguard.model import Status


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
