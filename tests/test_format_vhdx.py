"""vhdx: real qemu-img images across the option space, and hand-built ones (valid CRC-32C) for
what qemu-img cannot make: differencing disks, dirty logs, other sector sizes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import info_or_image_error, qemu_convert, qemu_create, qemu_info, raw_with_data
from imgguard.errors import ImageError
from imgguard.formats import vhdx
from imgguard.model import ImageInfo, ProblemKind, ReferenceKind
from imgguard.reader import ImageReader, open_image

MiB = 1 << 20


def inspect_path(path: Path) -> tuple[ImageInfo, ImageReader]:
    with open_image(path) as (reader, _stat):
        return vhdx.inspect(reader), reader


def inspect_bytes(data: bytes) -> ImageInfo:
    return vhdx.inspect(ImageReader.from_bytes(data))


def with_crc(block: bytes, offset: int = 4) -> bytes:
    data = bytearray(block)
    data[offset : offset + 4] = bytes(4)
    data[offset : offset + 4] = vhdx.crc32c(bytes(data)).to_bytes(4, "little")
    return bytes(data)


def build_vhdx(
    virtual_size: int = 64 * MiB,
    block_size: int = 8 * MiB,
    logical_sector: int = 512,
    data_bits: int = 0,
    locator: dict[str, str] | None = None,
    log_guid: bytes = bytes(16),
    sequence_numbers: tuple[int, int] = (1, 2),
) -> bytes:
    """A 4 MiB VHDX laid out as qemu-img lays it out: log at 1 MiB, BAT at 2, metadata at 3."""
    image = bytearray(4 * MiB)
    ident = vhdx.FILE_IDENTIFIER.build(
        dict(signature=vhdx.SIGNATURE, creator="imgguard".encode("utf-16-le").ljust(512, b"\0"))
    )
    image[: len(ident)] = ident
    for offset, sequence in zip(
        (vhdx.HEADER1_OFFSET, vhdx.HEADER2_OFFSET), sequence_numbers, strict=True
    ):
        header = vhdx.HEADER.build(
            dict(
                signature=b"head",
                checksum=0,
                sequence_number=sequence,
                file_write_guid=uuid.uuid4().bytes,
                data_write_guid=uuid.uuid4().bytes,
                log_guid=log_guid,
                log_version=0,
                version=1,
                log_length=MiB,
                log_offset=MiB,
            )
        )
        image[offset : offset + vhdx.HEADER_SIZE] = with_crc(header.ljust(vhdx.HEADER_SIZE, b"\0"))
    table = vhdx.REGION_TABLE_HEADER.build(
        dict(signature=b"regi", checksum=0, entry_count=2, reserved=0)
    )
    for guid, offset in ((vhdx.BAT_GUID, 2 * MiB), (vhdx.METADATA_GUID, 3 * MiB)):
        table += vhdx.REGION_TABLE_ENTRY.build(
            dict(guid=guid, file_offset=offset, length=MiB, data_bits=1)
        )
    table = with_crc(table.ljust(vhdx.REGION_TABLE_SIZE, b"\0"))
    for offset in (vhdx.REGION_TABLE_OFFSET, vhdx.REGION_TABLE_OFFSET + 64 * 1024):
        image[offset : offset + len(table)] = table
    items = [
        (
            vhdx.FILE_PARAMETERS_GUID,
            vhdx.FILE_PARAMETERS.build(dict(block_size=block_size, data_bits=data_bits)),
        ),
        (vhdx.VIRTUAL_DISK_SIZE_GUID, virtual_size.to_bytes(8, "little")),
        (vhdx.PAGE83_GUID, uuid.uuid4().bytes),
        (vhdx.LOGICAL_SECTOR_SIZE_GUID, logical_sector.to_bytes(4, "little")),
        (vhdx.PHYSICAL_SECTOR_SIZE_GUID, (4096).to_bytes(4, "little")),
    ]
    if locator is not None:
        items.append((vhdx.PARENT_LOCATOR_GUID, build_locator(locator)))
    metadata = vhdx.METADATA_TABLE_HEADER.build(
        dict(signature=b"metadata", reserved=0, entry_count=len(items), reserved2=bytes(20))
    )
    offset = 64 * 1024
    for guid, item in items:
        metadata += vhdx.METADATA_ENTRY.build(
            dict(item_id=guid, offset=offset, length=len(item), data_bits=6, reserved2=0)
        )
        image[3 * MiB + offset : 3 * MiB + offset + len(item)] = item
        offset += 4096
    image[3 * MiB : 3 * MiB + len(metadata)] = metadata
    return bytes(image)


def build_locator(pairs: dict[str, str]) -> bytes:
    entries = b""
    strings = b""
    base = vhdx.PARENT_LOCATOR_HEADER_SIZE + len(pairs) * vhdx.PARENT_LOCATOR_ENTRY_SIZE
    for key, value in pairs.items():
        raw_key, raw_value = key.encode("utf-16-le"), value.encode("utf-16-le")
        key_offset = base + len(strings)
        strings += raw_key
        entries += vhdx.PARENT_LOCATOR_ENTRY.build(
            dict(
                key_offset=key_offset,
                value_offset=base + len(strings),
                key_length=len(raw_key),
                value_length=len(raw_value),
            )
        )
        strings += raw_value
    header = vhdx.PARENT_LOCATOR_HEADER.build(
        dict(locator_type=vhdx.PARENT_VHDX_LOCATOR_TYPE, reserved=0, key_value_count=len(pairs))
    )
    return header + entries + strings


# --- CRC-32C -----------------------------------------------------------------------------------


def test_crc32c_known_answers() -> None:
    assert vhdx.crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value
    assert vhdx.crc32c(b"") == 0
    # The zero-run shortcut agrees with feeding every byte.
    data = b"\x01\x02" + bytes(65534)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = vhdx.CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    assert vhdx.crc32c(data) == crc ^ 0xFFFFFFFF


# --- qemu-img images --------------------------------------------------------------------------

CREATED = [
    ("dynamic", "1M", ()),
    ("dynamic", "10M", ()),
    ("dynamic", "1G", ()),
    ("dynamic", "2T", ()),
    ("dynamic", 100000512, ()),
    ("dynamic", "64M", ("block_size=1M",)),
    ("dynamic", "64M", ("block_size=8M",)),
    ("dynamic", "1G", ("block_size=32M",)),
    ("dynamic", "1G", ("block_size=256M",)),
    ("dynamic", "64M", ("log_size=4M",)),
    ("dynamic", "64M", ("block_state_zero=off",)),
    ("dynamic", "64M", ("block_state_zero=on",)),
    ("fixed", "1M", ()),
    ("fixed", "16M", ("block_size=1M",)),
    ("fixed", "8M", ("block_state_zero=off",)),
]


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("vhdx")
    return {
        index: qemu_create(root / f"c{index}.vhdx", "vhdx", size, [f"subformat={sub}", *options])
        for index, (sub, size, options) in enumerate(CREATED)
    }


@pytest.mark.parametrize(
    "index",
    range(len(CREATED)),
    ids=lambda i: "-".join([CREATED[i][0], str(CREATED[i][1]), *CREATED[i][2]]),
)
def test_qemu_img_created_images_match_qemu_info(created: dict[int, Path], index: int) -> None:
    subformat, _size, options = CREATED[index]
    path = created[index]
    info, reader = inspect_path(path)
    qemu = qemu_info(path, "vhdx")
    assert vhdx.probe(reader) == 100
    assert info.format == qemu["format"] == "vhdx"
    assert info.variant == subformat
    assert info.virtual_size == qemu["virtual-size"]
    assert info.cluster_size == qemu["cluster-size"]
    assert info.version == 1
    assert info.problems == ()
    assert info.references == ()
    assert info.header["creator"].startswith("QEMU")
    for option in options:
        if option.startswith("block_size="):
            assert info.cluster_size == int(option.split("=")[1][:-1]) * MiB
        if option.startswith("log_size="):
            assert info.header["log_length"] == int(option.split("=")[1][:-1]) * MiB
    bat = next(table for table in info.tables if table.name == "bat")
    assert bat.offset == info.header["bat_region_offset"]
    assert bat.length == info.header["bat_region_length"]
    assert info.header["bat_entries"] * 8 <= bat.length
    # Headers, region table, metadata table and items: far from oslo's 3 MiB.
    assert reader.bytes_read < 96 * 1024


@pytest.mark.parametrize("options", [(), ("block_size=1M",)])
def test_image_with_data(tmp_path: Path, options: tuple[str, ...]) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 16 * MiB)
    path = qemu_convert(raw, tmp_path / "disk.vhdx", "vhdx", options)
    info, _ = inspect_path(path)
    assert info.virtual_size == qemu_info(path, "vhdx")["virtual-size"] == 16 * MiB
    assert info.problems == ()


def test_truncated_image_is_refused_like_qemu(tmp_path: Path) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 16 * MiB)
    path = qemu_convert(raw, tmp_path / "disk.vhdx", "vhdx", ["block_size=1M"])
    cut = tmp_path / "cut.vhdx"
    cut.write_bytes(path.read_bytes()[: 6 * MiB])
    info, _ = inspect_path(cut)
    assert info.truncated
    assert [p.field for p in info.problems] == ["bat"]
    with pytest.raises(AssertionError, match="truncated"):
        qemu_info(cut, "vhdx")


# --- hand-built images -------------------------------------------------------------------------


def test_crafted_image_matches_qemu(tmp_path: Path) -> None:
    data = build_vhdx(virtual_size=100000512, data_bits=vhdx.PARAMS_LEAVE_BLOCKS_ALLOCATED)
    path = tmp_path / "c.vhdx"
    path.write_bytes(data)
    info = inspect_bytes(data)
    assert info.variant == "fixed"
    # qemu rounds a size that is not a multiple of 512 down.
    assert info.virtual_size == qemu_info(path, "vhdx")["virtual-size"] == 100000256
    assert info.problems == ()


def test_differencing_vhdx_references(tmp_path: Path) -> None:
    parent = "{" + str(uuid.uuid4()) + "}"
    data = build_vhdx(
        data_bits=vhdx.PARAMS_HAS_PARENT,
        locator={
            "parent_linkage": parent,
            "relative_path": "..\\base.vhdx",
            "volume_path": "\\\\?\\Volume{0000}\\vms\\base.vhdx",
            "absolute_win32_path": "C:\\vms\\base.vhdx",
        },
    )
    path = tmp_path / "child.vhdx"
    path.write_bytes(data)
    info = inspect_bytes(data)
    assert info.variant == "differencing"
    assert [(r.kind, r.target, r.field) for r in info.references] == [
        (ReferenceKind.PARENT_UUID, parent, "metadata.parent_locator.parent_linkage"),
        (ReferenceKind.PARENT_LOCATOR, "..\\base.vhdx", "metadata.parent_locator.relative_path"),
        (
            ReferenceKind.PARENT_LOCATOR,
            "\\\\?\\Volume{0000}\\vms\\base.vhdx",
            "metadata.parent_locator.volume_path",
        ),
        (
            ReferenceKind.PARENT_LOCATOR,
            "C:\\vms\\base.vhdx",
            "metadata.parent_locator.absolute_win32_path",
        ),
    ]
    relative = info.references[1]
    assert data[relative.offset : relative.offset + 4] == "..".encode("utf-16-le")
    assert info.header["has_parent"] is True
    # qemu 7.2 does not support differencing VHDX at all.
    assert any(p.kind is ProblemKind.UNSUPPORTED for p in info.problems)
    with pytest.raises(AssertionError, match="Operation not supported"):
        qemu_info(path, "vhdx")


def test_has_parent_without_locator_is_refused(tmp_path: Path) -> None:
    data = build_vhdx(data_bits=vhdx.PARAMS_HAS_PARENT)
    path = tmp_path / "p.vhdx"
    path.write_bytes(data)
    info = inspect_bytes(data)
    assert info.variant == "differencing"
    assert [p.field for p in info.problems] == ["metadata.file_parameters.data_bits"]
    with pytest.raises(AssertionError, match="Invalid argument"):
        qemu_info(path, "vhdx")


@pytest.mark.parametrize(
    ("kwargs", "field", "qemu_error"),
    [
        (dict(logical_sector=4096), "metadata.logical_sector_size", "not supported"),
        (dict(block_size=3 * MiB), "metadata.file_parameters.block_size", "Invalid argument"),
        (dict(block_size=512 * MiB), "metadata.file_parameters.block_size", "Invalid argument"),
        (dict(virtual_size=0), "region_table.bat.length", "Invalid argument"),
        (dict(sequence_numbers=(5, 5)), "header2.sequence_number", "No valid VHDX header"),
    ],
)
def test_what_qemu_refuses(
    tmp_path: Path, kwargs: dict[str, int], field: str, qemu_error: str
) -> None:
    data = build_vhdx(**kwargs)  # type: ignore[arg-type]
    path = tmp_path / "r.vhdx"
    path.write_bytes(data)
    info = inspect_bytes(data)
    assert field in [p.field for p in info.problems]
    with pytest.raises(AssertionError, match=qemu_error):
        qemu_info(path, "vhdx")


def test_current_header_is_the_valid_one_with_higher_sequence(tmp_path: Path) -> None:
    data = bytearray(build_vhdx(sequence_numbers=(7, 3)))
    assert inspect_bytes(bytes(data)).header["current_header"] == 1
    data[vhdx.HEADER1_OFFSET + 100] ^= 0xFF  # breaks header 1's CRC
    path = tmp_path / "h.vhdx"
    path.write_bytes(data)
    info = inspect_bytes(bytes(data))
    assert info.header["current_header"] == 2
    assert info.header["sequence_number"] == 3
    assert [p.field for p in info.problems] == ["header1"]
    assert info.virtual_size == qemu_info(path, "vhdx")["virtual-size"]


def test_log_guid_is_reported(tmp_path: Path) -> None:
    data = build_vhdx(log_guid=uuid.uuid4().bytes)
    path = tmp_path / "log.vhdx"
    path.write_bytes(data)
    info = inspect_bytes(data)
    assert [p.field for p in info.problems] == ["header.log_guid"]
    assert info.header["log_entry_at_log_offset"] is False
    # No valid log entry in the (empty) log, so qemu opens it.
    assert info.virtual_size == qemu_info(path, "vhdx")["virtual-size"]


def test_bad_region_table_crc_is_refused(tmp_path: Path) -> None:
    data = bytearray(build_vhdx())
    data[vhdx.REGION_TABLE_OFFSET + 60000] = 1  # inside the CRC-covered 64 KiB
    path = tmp_path / "rt.vhdx"
    path.write_bytes(data)
    info = inspect_bytes(bytes(data))
    assert "region_table.checksum" in [p.field for p in info.problems]
    with pytest.raises(AssertionError):
        qemu_info(path, "vhdx")


def test_not_a_vhdx() -> None:
    with pytest.raises(ImageError):
        inspect_bytes(bytes(4096))
    assert vhdx.probe(ImageReader.from_bytes(b"vhdxfile")) == 100
    assert vhdx.probe(ImageReader.from_bytes(b"vhdxfil")) == 0


# --- robustness --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_images() -> list[bytes]:
    return [
        build_vhdx(),
        build_vhdx(data_bits=2, locator={"relative_path": "a.vhdx", "parent_linkage": "{x}"}),
    ]


def test_truncation_yields_info_or_image_error(small_images: list[bytes]) -> None:
    for data in small_images:
        for cut in (
            0,
            8,
            4096,
            65536,
            65600,
            131072,
            196608,
            200000,
            2 * MiB,
            3 * MiB,
            3 * MiB + 40,
            3 * MiB + 65536 + 4,
            len(data) - 1,
        ):
            info_or_image_error(inspect_bytes, data[:cut])


# Offsets of what is read: the file identifier, both headers, the region table, the metadata
# table and the items (the parent locator is the sixth item).
REGIONS = [
    (0, 600),
    (vhdx.HEADER1_OFFSET, 80),
    (vhdx.HEADER2_OFFSET, 80),
    (vhdx.REGION_TABLE_OFFSET, 80),
    (3 * MiB, 224),
    (3 * MiB + 64 * 1024, 6 * 4096),
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 1),
    edits=st.lists(
        st.tuples(st.integers(0, len(REGIONS) - 1), st.integers(0, 1 << 16), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    fix_crcs=st.booleans(),
)
def test_mutated_headers_yield_info_or_image_error(
    small_images: list[bytes], which: int, edits: list[tuple[int, int, int]], fix_crcs: bool
) -> None:
    data = bytearray(small_images[which])
    for region, position, value in edits:
        start, length = REGIONS[region]
        data[start + position % length] = value
    if fix_crcs:  # get past the CRCs so the fields behind them are exercised too
        for offset, size in (
            (vhdx.HEADER1_OFFSET, 4096),
            (vhdx.HEADER2_OFFSET, 4096),
            (vhdx.REGION_TABLE_OFFSET, 65536),
        ):
            data[offset : offset + size] = with_crc(bytes(data[offset : offset + size]))
    info_or_image_error(inspect_bytes, bytes(data))
