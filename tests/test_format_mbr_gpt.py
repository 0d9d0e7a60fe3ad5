"""MBR and GPT disks made by sfdisk, sgdisk and fdisk, read as qemu reads them: raw."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import qemu_convert, qemu_create, qemu_info
from imgguard.errors import ImageError, MalformedImage
from imgguard.formats import gpt, iso9660, mbr
from imgguard.model import ImageInfo, ProblemKind
from imgguard.reader import ImageReader, open_image

MIB = 1 << 20


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def run(*args: str | Path, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(arg) for arg in args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"{args[0]} failed: {result.stderr}"
    return result.stdout


def blank(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with path.open("wb") as file:
        file.truncate(size)
    return path


def sfdisk(path: Path, size: int, script: str) -> Path:
    need("sfdisk")
    blank(path, size)
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, stdin=script)
    return path


def sfdisk_dump(path: Path) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(run("sfdisk", "-J", path))["partitiontable"]
    return table


def inspect(module: Any, path: Path) -> ImageInfo:
    with open_image(path) as (reader, _):
        info: ImageInfo = module.inspect(reader)
        return info


def reader_of(path: Path) -> ImageReader:
    return ImageReader.from_bytes(path.read_bytes())


def check_raw(path: Path, info: ImageInfo, variant: str) -> None:
    qemu = qemu_info(path)
    assert qemu["format"] == "raw"
    assert (info.format, info.variant) == ("raw", variant)
    assert info.virtual_size == qemu["virtual-size"] == path.stat().st_size


# --- MBR -----------------------------------------------------------------------------------

MBR_SCRIPTS = {
    "one": "label: dos\nsize=4M, type=83\n",
    "two-bootable": "label: dos\nsize=2M, type=7, bootable\ntype=c\n",
    "four-primaries": "label: dos\nsize=2M,type=83\nsize=2M,type=82\nsize=2M,type=c\ntype=8e\n",
    "extended-logicals": (
        "label: dos\nsize=2M, type=83, bootable\ntype=5\nsize=2M, type=83\nsize=3M, type=7\n"
        "size=1M, type=82\n"
    ),
}


@pytest.mark.parametrize("name", sorted(MBR_SCRIPTS))
def test_mbr_disk_matches_sfdisk(name: str, tmp_path: Path) -> None:
    path = sfdisk(tmp_path / f"{name}.img", 16 * MIB, MBR_SCRIPTS[name])
    reader = reader_of(path)
    assert mbr.recognise(reader)
    assert not gpt.recognise(reader) and not iso9660.recognise(reader)
    assert mbr.probe(reader) == 0
    info = inspect(mbr, path)
    check_raw(path, info, "mbr")
    table = sfdisk_dump(path)
    expected = tuple(
        (
            int(part["node"].removeprefix(str(path))),
            int(part["type"], 16),
            part["start"],
            part["size"],
            part.get("bootable", False),
        )
        for part in table["partitions"]
    )
    assert info.header["partitions"] == expected
    assert info.header["unique_mbr_disk_signature"] == int(table["id"], 16)
    assert info.header["extended"] is (name == "extended-logicals")
    assert info.header["protective"] is False
    assert info.problems == ()


def test_mbr_partitions_past_the_end_of_the_file(tmp_path: Path) -> None:
    path = sfdisk(tmp_path / "cut.img", 16 * MIB, MBR_SCRIPTS["four-primaries"])
    with path.open("r+b") as file:
        file.truncate(5 * MIB)  # partition 3 ends at 7 MiB, partition 4 at 16 MiB
    info = inspect(mbr, path)
    check_raw(path, info, "mbr")
    truncated = [p for p in info.problems if p.kind is ProblemKind.TRUNCATED]
    assert [(p.field, p.offset) for p in truncated] == [
        ("partition_record[2]", 446 + 32),
        ("partition_record[3]", 446 + 48),
    ]


def test_ebr_chain_loop_is_reported(tmp_path: Path) -> None:
    path = sfdisk(tmp_path / "loop.img", 16 * MIB, MBR_SCRIPTS["extended-logicals"])
    data = bytearray(path.read_bytes())
    extended_start = int.from_bytes(data[446 + 16 + 8 : 446 + 16 + 12], "little")
    # Make the second EBR link back to the first one.
    first_ebr = extended_start * 512
    link = int.from_bytes(data[first_ebr + 446 + 16 + 8 : first_ebr + 446 + 16 + 12], "little")
    second_ebr = (extended_start + link) * 512
    data[second_ebr + 446 + 16 + 8 : second_ebr + 446 + 16 + 12] = bytes(4)
    info = mbr.inspect(ImageReader.from_bytes(bytes(data)))
    assert any("loops back" in p.message for p in info.problems)
    assert len(info.header["partitions"]) == 4  # 1, 2 (extended), 5, 6 once each


def fat_boot_sector() -> bytes:
    """A FAT12 volume boot record (as mkfs.fat writes for a floppy): it ends in 0x55AA too."""
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x3c\x90"
    sector[3:11] = b"mkfs.fat"
    sector[11:13] = (512).to_bytes(2, "little")  # bytes per sector
    sector[13] = 1  # sectors per cluster
    sector[14:16] = (1).to_bytes(2, "little")  # reserved sectors
    sector[16] = 2  # FATs
    sector[21] = 0xF0  # media descriptor
    sector[54:62] = b"FAT12   "
    # Boot code that happens to put plausible bytes where partition records would be.
    sector[446:462] = bytes([0x80, 1, 1, 0, 0x06, 1, 1, 0, 1, 0, 0, 0, 0x10, 0, 0, 0])
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


@pytest.mark.parametrize(
    ("sector", "expected"),
    [
        (fat_boot_sector(), False),
        (fat_boot_sector()[:3] + b"NTFS    " + fat_boot_sector()[11:], False),
        (bytes(446) + bytes([0x80]) + bytes(15) + bytes(48) + b"\x55\xaa", False),  # no sectors
        (bytes(446) + bytes([0x12, 0, 0, 0, 0x83]) + bytes(59) + b"\x55\xaa", False),  # status
        (bytes(446) + bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + b"\xff" * 8 + bytes(48) + b"\x55\xaa",
         False),  # start + size past 2^32 sectors
        (bytes(446) + bytes([0, 0, 0, 0, 0x83, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0]) + bytes(48)
         + b"\x55\xaa", True),
        (bytes(446) + bytes([0, 0, 0, 0, 0x83, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0]) + bytes(48)
         + b"\xaa\x55", False),
    ],
)  # fmt: skip
def test_mbr_needs_more_than_0x55aa(sector: bytes, expected: bool) -> None:
    reader = ImageReader.from_bytes(sector + bytes(1024))
    assert mbr.recognise(reader) is expected


# --- GPT -----------------------------------------------------------------------------------

GPT_SFDISK = (
    'label: gpt\nsize=2M, type=uefi, name="EFI system"\nsize=2M, type=linux, name="root fs"\n'
    'size=1M, type=swap\ntype=linux, name="données"\n'
)


def sgdisk_disk(path: Path, *extra: str) -> Path:
    need("sgdisk")
    blank(path, 16 * MIB)
    run(
        "sgdisk", "-o",
        "-n", "1:2048:+1M", "-t", "1:ef02", "-c", "1:bios",
        "-n", "2:0:+2M", "-t", "2:ef00", "-c", "2:ESP",
        "-n", "5:0:+2M", "-t", "5:8200",
        "-n", "3:0:0", "-t", "3:8300", "-c", "3:Linux root", "-A", "3:set:2",
        *extra, path,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sfdisk(tmp_path_factory.mktemp("gpt") / "gpt.img", 8 * MIB, GPT_SFDISK)


def expected_gpt(path: Path) -> tuple[tuple[Any, ...], ...]:
    table = sfdisk_dump(path)
    return tuple(
        (
            int(part["node"].removeprefix(str(path))),
            part["type"].lower(),
            part["uuid"].lower(),
            part["start"],
            part["start"] + part["size"] - 1,
            part.get("name", ""),
        )
        for part in table["partitions"]
    )


def summary(info: ImageInfo) -> tuple[tuple[Any, ...], ...]:
    """(number, type, uuid, first, last, name): the partitions without their attributes."""
    return tuple((*p[:5], p[6]) for p in info.header["partitions"])


@pytest.mark.parametrize("tool", ["sfdisk", "sgdisk"])
def test_gpt_disk_matches_sfdisk(tool: str, gpt_disk: Path, tmp_path: Path) -> None:
    path = gpt_disk if tool == "sfdisk" else sgdisk_disk(tmp_path / "sgdisk.img")
    reader = reader_of(path)
    assert gpt.recognise(reader) and mbr.recognise(reader)
    assert not iso9660.recognise(reader)
    assert gpt.probe(reader) == 0
    info = inspect(gpt, path)
    check_raw(path, info, "gpt")
    assert summary(info) == expected_gpt(path)
    table = sfdisk_dump(path)
    header = info.header
    assert header["disk_guid"] == table["id"].lower()
    assert (header["first_usable_lba"], header["last_usable_lba"]) == (
        table["firstlba"],
        table["lastlba"],
    )
    assert header["sector_size"] == 512 and header["protective_mbr"] == "protective"
    assert header["my_lba"] == 1 and header["alternate_lba"] == path.stat().st_size // 512 - 1
    assert header["number_of_partition_entries"] == 128
    assert header["primary_valid"] and header["backup_valid"]
    assert header["header_used"] == "gpt_header"
    assert info.problems == ()
    # The protective MBR is an MBR too: one 0xEE partition over the whole disk.
    protective = mbr.inspect(reader)
    assert protective.header["protective"] is True
    assert protective.header["partitions"] == ((1, 0xEE, 1, path.stat().st_size // 512 - 1, False),)
    if tool == "sgdisk":
        assert [p[0] for p in header["partitions"]] == [1, 2, 3, 5]  # entry 4 left empty
        assert header["partition_types"][:2] == ("BIOS boot", "EFI System")
        root = next(p for p in header["partitions"] if p[6] == "Linux root")
        assert root[5] == 1 << 2  # legacy BIOS bootable
    else:
        assert header["partitions"][3][6] == "données"  # UTF-16LE names


def test_gpt_with_hybrid_mbr(tmp_path: Path) -> None:
    path = sgdisk_disk(tmp_path / "hybrid.img", "-h", "2")
    info = inspect(gpt, path)
    check_raw(path, info, "gpt")
    assert info.header["protective_mbr"] == "hybrid"
    assert info.problems == ()
    types = [p[1] for p in mbr.inspect(reader_of(path)).header["partitions"]]
    assert 0xEE in types and len(types) == 2


def test_gpt_4096_byte_sectors(tmp_path: Path) -> None:
    need("fdisk")
    path = blank(tmp_path / "4k.img", 8 * MIB)
    run("fdisk", "-b", "4096", path, stdin="g\nn\n\n\n+1M\nn\n\n\n\nw\n")
    reader = reader_of(path)
    assert reader.head[512:520] != gpt.SIGNATURE and gpt.recognise(reader)
    info = inspect(gpt, path)
    check_raw(path, info, "gpt")
    assert info.header["sector_size"] == 4096
    assert info.header["alternate_lba"] == 8 * MIB // 4096 - 1
    listing = run("fdisk", "-b", "4096", "-l", "-o", "Device,Start,End", path)
    expected = [
        (int(line.split()[1]), int(line.split()[2]))
        for line in listing.splitlines()
        if line.startswith(str(path))
    ]
    assert [(p[3], p[4]) for p in info.header["partitions"]] == expected
    assert expected[0] == (256, 511)  # 1 MiB in, 1 MiB long: 4096-byte LBAs
    assert info.problems == ()


def test_gpt_backup_lost_to_truncation(gpt_disk: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.img"
    path.write_bytes(gpt_disk.read_bytes()[: 6 * MIB])
    info = inspect(gpt, path)
    check_raw(path, info, "gpt")
    assert summary(info) == expected_gpt(gpt_disk)  # from the intact primary
    assert info.header["primary_valid"] and not info.header["backup_valid"]
    assert info.truncated
    fields = {p.field for p in info.problems if p.kind is ProblemKind.TRUNCATED}
    assert {"gpt_header.alternate_lba", "gpt_header.last_usable_lba"} <= fields
    assert "partition_entry[3]" in fields  # the last partition ran to the old end


def test_gpt_disk_grown_without_moving_the_backup(gpt_disk: Path, tmp_path: Path) -> None:
    path = tmp_path / "grown.img"
    path.write_bytes(gpt_disk.read_bytes() + bytes(MIB))
    info = inspect(gpt, path)
    check_raw(path, info, "gpt")
    assert info.header["backup_valid"]
    # An ordinary grown disk (qemu-img resize): the intact backup inside the file is no problem.
    assert info.header["grown"] and info.problems == ()


def test_gpt_header_crc_mismatch_falls_back_to_backup(gpt_disk: Path) -> None:
    data = bytearray(gpt_disk.read_bytes())
    data[512 + 56] ^= 0x01  # a bit of the disk GUID; the CRC no longer matches
    info = gpt.inspect(ImageReader.from_bytes(bytes(data)))
    crc = [p for p in info.problems if p.field == "gpt_header.header_crc32"]
    assert [p.kind for p in crc] == [ProblemKind.MALFORMED] and crc[0].offset == 512 + 16
    assert not info.header["primary_valid"] and info.header["backup_valid"]
    assert info.header["header_used"] == "backup_gpt_header"
    assert info.header["my_lba"] == len(data) // 512 - 1
    assert summary(info) == expected_gpt(gpt_disk)


def test_gpt_partition_array_crc_mismatch(gpt_disk: Path) -> None:
    data = bytearray(gpt_disk.read_bytes())
    data[1024 + 56] ^= 0x20  # first letter of partition 1's name in the primary array
    info = gpt.inspect(ImageReader.from_bytes(bytes(data)))
    assert [p.field for p in info.problems] == ["gpt_header.partition_entry_array_crc32"]
    assert info.header["header_used"] == "backup_gpt_header"
    assert info.header["partitions"][0][6] == "EFI system"


def test_gpt_primary_wiped_is_found_through_the_backup(gpt_disk: Path) -> None:
    data = bytearray(gpt_disk.read_bytes())
    data[512:1024] = bytes(512)
    reader = ImageReader.from_bytes(bytes(data))
    assert gpt.recognise(reader)
    info = gpt.inspect(reader)
    assert info.header["header_used"] == "backup_gpt_header"
    assert summary(info) == expected_gpt(gpt_disk)
    assert [p.field for p in info.problems] == ["gpt_header.signature"]
    # With the backup gone too, only the protective MBR is left.
    data[-512:] = bytes(512)
    reader = ImageReader.from_bytes(bytes(data))
    assert not gpt.recognise(reader) and mbr.recognise(reader)
    with pytest.raises(MalformedImage):
        gpt.inspect(reader)


def test_gpt_entry_count_over_the_cap(gpt_disk: Path) -> None:
    import zlib

    data = bytearray(gpt_disk.read_bytes())
    header = bytearray(data[512 : 512 + 92])
    header[80:84] = (100_000).to_bytes(4, "little")
    header[16:20] = bytes(4)
    header[16:20] = zlib.crc32(header).to_bytes(4, "little")
    data[512 : 512 + 92] = header
    info = gpt.inspect(ImageReader.from_bytes(bytes(data)))
    assert (ProblemKind.LIMIT, "gpt_header.number_of_partition_entries") in {
        (p.kind, p.field) for p in info.problems
    }
    assert summary(info) == expected_gpt(gpt_disk)  # from the backup


# --- other formats are not partition tables --------------------------------------------------

CONTAINERS = [
    ("qcow2", ()),
    ("qcow2", ("compat=0.10",)),
    ("qcow", ()),
    ("vmdk", ()),
    ("vmdk", ("subformat=streamOptimized",)),
    ("vdi", ()),
    ("vpc", ()),
    ("vhdx", ()),
    ("qed", ()),
    ("parallels", ()),
]


@pytest.mark.parametrize(("fmt", "options"), CONTAINERS)
def test_qemu_images_are_not_raw_layouts(
    fmt: str, options: tuple[str, ...], gpt_disk: Path, tmp_path: Path
) -> None:
    empty = qemu_create(tmp_path / f"empty.{fmt}", fmt, "64M", options)
    # A container whose guest disk is partitioned is still not a partition table itself.
    full = qemu_convert(gpt_disk, tmp_path / f"gpt.{fmt}", fmt, options)
    for path in (empty, full):
        assert qemu_info(path)["format"] == fmt
        reader = reader_of(path)
        assert not mbr.recognise(reader)
        assert not gpt.recognise(reader)
        assert not iso9660.recognise(reader)


# --- mutations -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[tuple[int, int]]]:
    """An MBR disk with logical partitions, and the byte ranges of its MBR and EBR tables."""
    path = tmp_path_factory.mktemp("mbr") / "ext.img"
    script = "label: dos\nsize=1M, type=83\ntype=5\nsize=1M, type=83\nsize=1M\n"
    data = sfdisk(path, 8 * MIB, script).read_bytes()
    extended = int.from_bytes(data[446 + 16 + 8 : 446 + 16 + 12], "little")
    tables = [(440, 512)]
    ebr = extended
    while ebr and len(tables) < 8:
        tables.append((ebr * 512 + 446, ebr * 512 + 512))
        link = int.from_bytes(data[ebr * 512 + 446 + 24 : ebr * 512 + 446 + 28], "little")
        ebr = extended + link if link else 0
    assert len(tables) == 3  # the MBR and two EBRs
    return data, tables


def mutation_strategy(regions: list[tuple[int, int]]) -> Any:
    offsets = st.one_of(*(st.integers(start, end - 1) for start, end in regions))
    return st.lists(st.tuples(offsets, st.integers(0, 255)), min_size=1, max_size=16)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mutation_strategy([(440, 512), (512, 604), (1024, 1536), (8 * MIB - 512, 8 * MIB - 420)]),
    st.sampled_from([None, 600, 4096, 20000, 4 * MIB, 8 * MIB - 256]),
)
def test_gpt_mutations_only_give_info_or_image_error(
    gpt_disk: Path, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(gpt_disk.read_bytes())
    for offset, value in edits:
        data[offset] = value
    reader = ImageReader.from_bytes(bytes(data[:cut]))
    for module in (gpt, mbr):
        if not module.recognise(reader):
            continue
        try:
            info = module.inspect(reader)
        except ImageError:
            continue
        assert info.virtual_size == -(-reader.size // 512) * 512


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data(), st.sampled_from([None, 512, 2 * MIB, 4 * MIB]))
def test_mbr_mutations_only_give_info_or_image_error(
    mbr_disk: tuple[bytes, list[tuple[int, int]]], draw: st.DataObject, cut: int | None
) -> None:
    original, tables = mbr_disk
    data = bytearray(original)
    for offset, value in draw.draw(mutation_strategy(tables)):
        data[offset] = value
    reader = ImageReader.from_bytes(bytes(data[:cut]))
    mbr.recognise(reader)
    try:
        info = mbr.inspect(reader)
    except ImageError:
        return
    assert info.format == "raw" and info.virtual_size == -(-reader.size // 512) * 512
