"""vdi: real images from qemu-img 7.2, crafted headers, and qemu's own verdict on mutations."""

from __future__ import annotations

import json
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import QEMU_IMG, qemu_convert, qemu_create, qemu_info, raw_with_data
from imgguard.errors import ImageError
from imgguard.formats import vdi
from imgguard.model import ImageInfo, ProblemKind, ReferenceKind
from imgguard.reader import ImageReader, open_image


def inspect_path(path: Path) -> ImageInfo:
    with open_image(path) as (reader, _):
        assert vdi.probe(reader) == 100
        return vdi.inspect(reader)


@pytest.fixture(scope="module")
def small_vdi(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("vdi") / "small.vdi"
    return qemu_create(path, "vdi", "3M").read_bytes()


@pytest.mark.parametrize(
    ("size", "options", "variant"),
    [
        ("1M", ["static=off"], "dynamic"),
        ("1M", ["static=on"], "static"),
        ("3M", [], "dynamic"),
        ("1000000", [], "dynamic"),  # qemu-img rounds odd sizes up to whole sectors
        ("1048577", [], "dynamic"),
        ("5M", ["static=on"], "static"),
        ("1G", [], "dynamic"),
        ("2T", [], "dynamic"),
    ],
)
def test_qemu_created_images_match_qemu_img_info(
    tmp_path: Path, size: str, options: list[str], variant: str
) -> None:
    path = qemu_create(tmp_path / "disk.vdi", "vdi", size, options)
    info = inspect_path(path)
    expected = qemu_info(path)
    assert expected["format"] == info.format == "vdi"
    assert info.variant == variant
    assert info.virtual_size == expected["virtual-size"]
    assert info.cluster_size == expected["cluster-size"] == 1 << 20
    assert info.problems == ()
    assert info.references == ()
    # One 4-byte entry per 1 MiB block, allocated in whole sectors.
    blocks = -(-expected["virtual-size"] // (1 << 20))
    (bmap,) = info.tables
    assert (bmap.name, bmap.offset) == ("block_map", 512)
    assert bmap.length == -(-blocks * 4 // 512) * 512
    assert info.header["blocks_in_image"] == blocks


def test_image_with_data_counts_allocated_blocks(tmp_path: Path) -> None:
    source = raw_with_data(tmp_path / "data.raw", 8 << 20)
    path = qemu_convert(source, tmp_path / "data.vdi", "vdi")
    info = inspect_path(path)
    assert info.virtual_size == qemu_info(path, "vdi")["virtual-size"] == 8 << 20
    # raw_with_data writes into blocks 0, 2, 4 and 7.
    assert info.header["blocks_allocated"] == 4
    # qemu puts the data right after the one-sector block map.
    assert (info.header["offset_bmap"], info.header["offset_data"]) == (512, 1024)
    assert info.file_size == 0  # the detector fills it, not the module
    assert info.problems == ()


def test_probe_needs_only_the_signature_at_offset_64(small_vdi: bytes) -> None:
    # qemu 7.2 probes a zero-padded 2048-byte buffer: 68 bytes are enough to be called vdi.
    assert vdi.probe(ImageReader.from_bytes(small_vdi[:68])) == 100
    assert vdi.probe(ImageReader.from_bytes(small_vdi[:67])) == 0
    assert vdi.probe(ImageReader.from_bytes(b"\0" * 64 + b"\x7f\x10\xda\xbf" + bytes(448))) == 0


def _set(data: bytes, offset: int, fmt: str, value: object) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _qemu_opens(path: Path) -> bool:
    result = subprocess.run(
        [QEMU_IMG, "info", "--output=json", "-f", "vdi", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


QEMU_REFUSALS = {
    "version 1.0": (68, "<I", 0x00010000, "version"),
    "unaligned bmap": (340, "<I", 513, "offset_bmap"),
    "unaligned data": (344, "<I", 4097, "offset_data"),
    "4k sectors": (360, "<I", 4096, "sector_size"),
    "2 MiB blocks": (376, "<I", 2 << 20, "block_size"),
    "disk over bmap": (368, "<Q", (3 << 20) + 1, "disk_size"),
    "disk over max": (368, "<Q", vdi.VDI_DISK_SIZE_MAX + 1, "disk_size"),
    "too many blocks": (384, "<I", vdi.VDI_BLOCKS_IN_IMAGE_MAX + 1, "blocks_in_image"),
    "link uuid": (424, "<I", 1, "uuid_link"),
    "parent uuid": (440, "<I", 1, "uuid_parent"),
}
QEMU_ACCEPTS = {
    "diff type": (76, "<I", 4, "image_type"),
    "unknown type": (76, "<I", 9, "image_type"),
    "odd disk size": (368, "<Q", (3 << 20) - 100, None),
    "bmap past eof": (340, "<I", 1 << 20, "offset_bmap"),
    "header size 0": (72, "<I", 0, "header_size"),
    "flags": (80, "<I", 0x101, None),
}


@pytest.mark.parametrize("case", sorted(QEMU_REFUSALS))
def test_every_check_of_vdi_open_is_a_problem(tmp_path: Path, small_vdi: bytes, case: str) -> None:
    offset, fmt, value, field = QEMU_REFUSALS[case]
    path = tmp_path / "m.vdi"
    path.write_bytes(_set(small_vdi, offset, fmt, value))
    assert not _qemu_opens(path)
    info = inspect_path(path)
    assert field in {p.field for p in info.problems if p.kind is not ProblemKind.MALFORMED}


@pytest.mark.parametrize("case", sorted(QEMU_ACCEPTS))
def test_what_qemu_accepts_keeps_its_virtual_size(
    tmp_path: Path, small_vdi: bytes, case: str
) -> None:
    offset, fmt, value, field = QEMU_ACCEPTS[case]
    path = tmp_path / "m.vdi"
    path.write_bytes(_set(small_vdi, offset, fmt, value))
    assert _qemu_opens(path)
    info = inspect_path(path)
    assert info.virtual_size == qemu_info(path, "vdi")["virtual-size"]
    assert not [p for p in info.problems if p.kind is ProblemKind.UNSUPPORTED]
    if field is not None:
        assert field in {p.field for p in info.problems}


def test_crafted_diff_image_reports_its_parent_uuid() -> None:
    parent = uuid.UUID("0b899014-3456-a044-9ada-4a4a41aa203e")
    header = vdi.VDI_HEADER.build(
        {
            "text": b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0"),
            "version": vdi.VDI_VERSION_1_1,
            "header_size": 0x190,
            "image_type": "diff",
            "image_flags": 0,
            "description": bytes(256),
            "offset_bmap": 512,
            "offset_data": 1024,
            "cylinders": 0,
            "heads": 0,
            "sectors": 0,
            "sector_size": 512,
            "unused1": 0,
            "disk_size": 4 << 20,
            "block_size": 1 << 20,
            "block_extra": 0,
            "blocks_in_image": 4,
            "blocks_allocated": 0,
            "uuid_image": uuid.uuid4().bytes_le,
            "uuid_last_snap": uuid.uuid4().bytes_le,
            "uuid_link": parent.bytes_le,
            "uuid_parent": bytes(16),
            "unused2": bytes(56),
        }
    )
    data = header + b"\xff" * 16 + bytes(496)
    info = vdi.inspect(ImageReader.from_bytes(data))
    assert (info.variant, info.virtual_size) == ("diff", 4 << 20)
    (reference,) = info.references
    assert reference.kind is ReferenceKind.PARENT_UUID
    assert (reference.target, reference.field, reference.offset) == (str(parent), "uuid_link", 424)
    assert [p.field for p in info.problems] == ["uuid_link"]


def test_short_header_is_read_zero_padded_as_qemu_does(small_vdi: bytes) -> None:
    # qemu reads the 512-byte header through the block layer: zeros past the end of the file.
    info = vdi.inspect(ImageReader.from_bytes(small_vdi[:400]))
    assert info.virtual_size == 3 << 20
    assert info.truncated
    with pytest.raises(ImageError):
        vdi.inspect(ImageReader.from_bytes(small_vdi[:60]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(min_value=0, max_value=1024),
    edits=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=8),
)
def test_mutations_give_info_or_image_error(
    small_vdi: bytes, cut: int, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(small_vdi[:cut])
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    try:
        info = vdi.inspect(ImageReader.from_bytes(bytes(data)))
    except ImageError:
        return
    assert info.format == "vdi"
    json.dumps(dict(info.header))
