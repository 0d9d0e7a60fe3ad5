"""Images as third-party tools write them (VMware, VirtualBox, Hyper-V, Azure, XenServer, FreeBSD's
mkimg, disk partitioners), built from qemu-img-made images or from the tools' own on-disk layouts,
and judged side by side with the real qemu-img: imgguard's format and virtual size must be
qemu's, and the default policy must pass the legitimate ones."""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest

import imgguard
from conftest import qemu_create, qemu_info, run_qemu_img
from imgguard import testing
from imgguard.formats import vhdx as vhdx_module
from imgguard.model import ProblemKind

KIB = 1024
MIB = 1 << 20
GIB = 1 << 30


def assert_passes_like_qemu(path: Path, fmt: str, variant: str | None = None) -> imgguard.Verdict:
    """The default policy passes the image, and imgguard's facts are qemu-img's."""
    verdict = imgguard.check(path)
    info = verdict.info
    assert info is not None
    assert verdict.status == "pass", [(f.rule, f.message) for f in verdict.findings]
    assert info.format == fmt and info.problems == ()
    if variant is not None:
        assert info.variant == variant
    assert info.virtual_size == qemu_info(path, fmt)["virtual-size"]
    return verdict


# --- GPT disks grown after partitioning ----------------------------------------------------------


def sgdisk_disk(path: Path, size: int) -> Path:
    if shutil.which("sgdisk") is None:  # pragma: no cover - CI installs gdisk
        pytest.skip("sgdisk is not installed")
    path.unlink(missing_ok=True)
    with path.open("wb") as file:
        file.truncate(size)
    subprocess.run(
        ["sgdisk", "-n1:2048:+4M", "-t1:ef00", "-n2:0:0", "-t2:8300", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def test_gpt_disk_grown_with_qemu_img_resize_passes(tmp_path: Path) -> None:
    # `qemu-img resize` (or truncate, or Azure's 1 MiB rounding) grows a partitioned disk and
    # leaves the backup GPT where it was: an ordinary image every OS reads.
    path = sgdisk_disk(tmp_path / "cloud.raw", 16 * MIB)
    run_qemu_img("resize", "-q", "-f", "raw", str(path), "64M")
    verdict = assert_passes_like_qemu(path, "raw", "gpt")
    assert verdict.info is not None
    header = verdict.info.header
    assert header["grown"] and header["primary_valid"] and header["backup_valid"]
    assert header["alternate_lba"] == 16 * MIB // 512 - 1
    assert qemu_info(path)["format"] == "raw"


def test_gpt_disk_not_grown_is_not_marked(tmp_path: Path) -> None:
    path = sgdisk_disk(tmp_path / "disk.raw", 16 * MIB)
    verdict = assert_passes_like_qemu(path, "raw", "gpt")
    assert verdict.info is not None and not verdict.info.header["grown"]


def test_gpt_disk_grown_with_a_damaged_backup_is_still_inconsistent(tmp_path: Path) -> None:
    # Near miss: a backup header that no longer mirrors the primary keeps the finding.
    path = sgdisk_disk(tmp_path / "disk.raw", 16 * MIB)
    run_qemu_img("resize", "-q", "-f", "raw", str(path), "64M")
    data = bytearray(path.read_bytes())
    backup = 16 * MIB - 512
    data[backup + 56] ^= 0xFF  # the backup's disk GUID; its CRC no longer matches either
    path.write_bytes(bytes(data))
    info = imgguard.inspect(path)
    assert not info.header["grown"]
    assert (ProblemKind.INCONSISTENT, "gpt_header.alternate_lba") in {
        (p.kind, p.field) for p in info.problems
    }
    assert imgguard.check(path).status == "reject"


def test_gpt_disk_shrunk_is_still_truncated(tmp_path: Path) -> None:
    path = sgdisk_disk(tmp_path / "disk.raw", 16 * MIB)
    run_qemu_img("resize", "-q", "-f", "raw", "--shrink", str(path), "8M")
    info = imgguard.inspect(path)
    assert info.truncated and not info.header["grown"]
    assert imgguard.check(path).status == "reject"


# --- qcow2 written by a program without bitmap support ----------------------------------------


def test_qcow2_bitmaps_cleared_by_a_bitmap_unaware_writer_pass(tmp_path: Path) -> None:
    # The qcow2 spec's autoclear mechanism: a writer that does not know persistent bitmaps
    # clears bit 0, and qemu then ignores (and later drops) the bitmaps extension.
    path = qemu_create(tmp_path / "backup.qcow2", "qcow2", "64M")
    run_qemu_img("bitmap", "--add", str(path), "incremental-0")
    data = bytearray(path.read_bytes())
    assert struct.unpack_from(">Q", data, 88)[0] == 1
    struct.pack_into(">Q", data, 88, 0)
    path.write_bytes(bytes(data))
    assert "bitmaps" not in qemu_info(path, "qcow2")["format-specific"]["data"]
    verdict = assert_passes_like_qemu(path, "qcow2")
    assert verdict.info is not None and verdict.info.header["bitmaps_ignored"]
    assert "bitmap_directory" not in {table.name for table in verdict.info.tables}


def test_qcow2_with_bitmaps_and_snapshots_from_qemu_img_pass(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "vm.qcow2", "qcow2", "64M", ["compression_type=zstd"])
    run_qemu_img("bitmap", "--add", str(path), "b0")
    run_qemu_img("bitmap", "--add", "-g", "1M", str(path), "b1")
    run_qemu_img("snapshot", "-c", "before-upgrade", str(path))
    verdict = assert_passes_like_qemu(path, "qcow2")
    assert verdict.info is not None and "bitmaps_ignored" not in verdict.info.header


# --- VMware streamOptimized as ovftool / ESXi export write it -------------------------------------

VMWARE_DESCRIPTOR = """\
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=5d4ab1e2
parentCID=ffffffff
isNativeSnapshot="no"
createType="{create_type}"

# Extent description
{access} {sectors} SPARSE "{name}"

# The Disk Data Base\x20
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "1305"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "8f15b5ff7e8b8e9d4e2f1c4a5d6b7c8d"
ddb.thinProvisioned = "1"
ddb.toolsInstallType = "4"
ddb.toolsVersion = "12352"
ddb.uuid = "60 00 C2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6"
ddb.virtualHWVersion = "14"
"""


def _sectors(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _kdmv_header(version: int, flags: int, capacity: int, desc_sectors: int, gd: int) -> bytes:
    header = struct.pack(
        "<4sIIQQQQIQQQB4sH",
        b"KDMV",
        version,
        flags,
        capacity,
        128,  # grain: 64 KiB
        1,  # descriptor at sector 1
        desc_sectors,
        512,  # grain table entries
        0,  # no redundant grain directory
        gd,
        128,  # grains start at 64 KiB
        0,
        b"\n \r\n",
        1,  # deflate
    )
    return _sectors(header)


def vmware_stream(
    capacity: int, grains: dict[int, bytes], descriptor: bytes, version: int
) -> bytes:
    """A streamOptimized VMDK with its grain directory at the end, as ovftool writes it: header
    with gd_offset = GD_AT_END, compressed grain markers, GT and GD markers, footer, EOS."""
    desc_sectors = max(1, -(-len(descriptor) // 512))
    flags = 0x30001  # newline test, compressed grains, markers
    out = bytearray(_kdmv_header(version, flags, capacity, desc_sectors, 0xFFFFFFFFFFFFFFFF))
    out += _sectors(descriptor)
    out += bytes(128 * 512 - len(out))
    tables = -(-capacity // (512 * 128))
    table = [[0] * 512 for _ in range(tables)]
    for grain, data in sorted(grains.items()):
        compressed = zlib.compress(data)
        table[grain // 512][grain % 512] = len(out) // 512
        out += _sectors(struct.pack("<QI", grain * 128, len(compressed)) + compressed)
    directory = [0] * tables
    for index, entries in enumerate(table):
        if any(entries):
            out += _sectors(struct.pack("<QII", 4, 0, 1))  # grain table marker
            directory[index] = len(out) // 512
            out += struct.pack("<512I", *entries)
    out += _sectors(struct.pack("<QII", -(-tables * 4 // 512), 0, 2))  # grain directory marker
    gd = len(out) // 512
    out += _sectors(struct.pack(f"<{tables}I", *directory))
    out += _sectors(struct.pack("<QII", 1, 0, 3))  # footer marker
    out += _kdmv_header(version, flags, capacity, desc_sectors, gd)
    out += bytes(512)  # end-of-stream marker
    return bytes(out)


@pytest.mark.parametrize(
    ("version", "access", "crlf"),
    [(3, "RW", False), (1, "RW", False), (3, "RDONLY", False), (3, "RW", True)],
)
def test_vmware_stream_optimized_with_footer(
    tmp_path: Path, version: int, access: str, crlf: bool
) -> None:
    capacity = 20 * GIB // 512
    descriptor = VMWARE_DESCRIPTOR.format(
        create_type="streamOptimized", access=access, sectors=capacity, name="disk1.vmdk"
    )
    if crlf:
        descriptor = descriptor.replace("\n", "\r\n")
    grains = {0: b"\xeb\x63\x90" + bytes(65533), 7: b"A" * 65536, 20000: b"B" * 65536}
    path = tmp_path / "disk1.vmdk"
    path.write_bytes(vmware_stream(capacity, grains, descriptor.encode(), version))
    verdict = assert_passes_like_qemu(path, "vmdk", "streamOptimized")
    assert verdict.info is not None and verdict.info.header["header_in_footer"]
    raw = tmp_path / "disk1.raw"
    run_qemu_img("convert", "-f", "vmdk", "-O", "raw", str(path), str(raw))
    with raw.open("rb") as file:
        file.seek(7 * 65536)
        assert file.read(4) == b"AAAA"


def test_vmware_workstation_monolithic_sparse_descriptor(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "Windows 10 x64.vmdk", "vmdk", "20G")
    descriptor = VMWARE_DESCRIPTOR.format(
        create_type="monolithicSparse",
        access="RW",
        sectors=20 * GIB // 512,
        name="Windows 10 x64.vmdk",
    ).replace("\n", "\r\n")
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<QQ", data, 28) == (1, 20)  # descriptor at sector 1, 20 sectors
    data[512 : 21 * 512] = descriptor.encode().ljust(20 * 512, b"\0")
    path.write_bytes(bytes(data))
    verdict = assert_passes_like_qemu(path, "vmdk", "monolithicSparse")
    assert verdict.info is not None and verdict.info.header["hwversion"] == "14"


# --- VHD footers from Hyper-V, Azure, Disk2VHD, Virtual PC, VirtualBox, XenServer ---------------


def _vhd_checksum(footer: bytes | bytearray) -> int:
    return ~sum(footer[:64] + bytes(4) + footer[68:512]) & 0xFFFFFFFF


def fixed_vhd(path: Path, size: int, creator: bytes) -> Path:
    """A fixed VHD of `size` bytes of guest data whose footer says what `creator` writes."""
    footer_of = qemu_create(tmp := path.with_suffix(".tmp"), "vpc", "1M", ["subformat=fixed"])
    footer = bytearray(footer_of.read_bytes()[-512:])
    tmp.unlink()
    footer[28:40] = creator + b"\x00\x0a\x00\x00" + b"Wi2k"
    struct.pack_into(">QQ", footer, 40, size, size)
    struct.pack_into(">HBB", footer, 56, *testing.vhd_geometry(size // 512))
    struct.pack_into(">I", footer, 64, _vhd_checksum(footer))
    with path.open("wb") as file:
        file.truncate(size)
        file.seek(size)
        file.write(footer)
    return path


@pytest.mark.parametrize(
    ("creator", "size", "rule"),
    [
        (b"win ", 1 * GIB, "current_size"),  # Hyper-V
        (b"d2v ", 1 * GIB + 5 * MIB, "current_size"),  # Disk2VHD
        (b"tap\0", 1 * GIB + 3584, "current_size"),  # XenServer
        (b"wa\0\0", 30 * GIB, "chs"),  # Azure: qemu 7.2 goes by CHS
        (b"vpc ", 1 * GIB, "chs"),  # Virtual PC
        (b"vbox", 1 * GIB + 3 * MIB, "chs"),  # VirtualBox
    ],
)
def test_fixed_vhd_creators_size_like_qemu(
    tmp_path: Path, creator: bytes, size: int, rule: str
) -> None:
    path = fixed_vhd(tmp_path / "disk.vhd", size, creator)
    verdict = assert_passes_like_qemu(path, "vpc", "fixed")
    assert verdict.info is not None and verdict.info.qemu_format == "raw"
    assert qemu_info(path)["format"] == "raw"
    cylinders, heads, per_track = testing.vhd_geometry(size // 512)
    expected = size if rule == "current_size" else cylinders * heads * per_track * 512
    assert verdict.info.virtual_size == expected


def test_xenserver_dynamic_vhd_with_a_bat_for_its_maximum_size(tmp_path: Path) -> None:
    # vhd-util create -S: the BAT covers the 2 TiB the disk may grow to, not its 64 MiB.
    path = qemu_create(tmp_path / "xen.vhd", "vpc", "64M", ["force_size=on"])
    data = bytearray(path.read_bytes())
    footer = bytearray(data[:512])
    footer[28:40] = b"tap\0" + b"\x00\x01\x00\x03" + bytes(4)
    struct.pack_into(">I", footer, 64, _vhd_checksum(footer))
    entries = (2 << 40) // (2 * MIB)
    header = bytearray(data[512:1536])
    struct.pack_into(">I", header, 28, entries)
    struct.pack_into(">I", header, 36, 0)
    struct.pack_into(">I", header, 36, ~sum(header) & 0xFFFFFFFF)
    image = bytes(footer) + bytes(header) + b"\xff" * (entries * 4) + bytes(footer)
    path.write_bytes(image)
    verdict = assert_passes_like_qemu(path, "vpc", "dynamic")
    assert verdict.info is not None and verdict.info.virtual_size == 64 * MIB


# --- VirtualBox VDI ------------------------------------------------------------------------------


def virtualbox_vdi(
    path: Path, disk_size: int, image_type: int, text: bytes, *, aligned: bool = True
) -> Path:
    """A VDI as VirtualBox writes it: 1.1 header, block map and data at 1 MiB boundaries
    (VirtualBox 4+) or right after the header (older releases)."""
    blocks = -(-disk_size // MIB)
    offset_bmap = MIB if aligned else 512
    align = MIB if aligned else 512
    offset_data = -(-(offset_bmap + blocks * 4) // align) * align
    allocated = list(range(blocks)) if image_type == 2 else [0]
    bmap = [0xFFFFFFFF] * blocks
    for index, block in enumerate(allocated):
        bmap[block] = index
    header = bytearray(512)
    header[:64] = text.ljust(64, b"\0")
    struct.pack_into("<IIIII", header, 64, 0xBEDA107F, 0x00010001, 0x190, image_type, 0)
    struct.pack_into(
        "<IIIIIIIQIIII",
        header,
        340,
        offset_bmap,
        offset_data,
        0,
        0,
        0,
        512,
        0,
        disk_size,
        MIB,
        0,
        blocks,
        len(allocated),
    )
    header[392:408] = uuid.uuid4().bytes_le  # image UUID
    header[408:424] = uuid.uuid4().bytes_le  # last modification UUID
    struct.pack_into("<IIII", header, 456, 1024, 255, 63, 512)  # LCHS geometry
    with path.open("wb") as file:
        file.write(header)
        file.seek(offset_bmap)
        file.write(struct.pack(f"<{blocks}I", *bmap))
        file.truncate(offset_data + len(allocated) * MIB)
        file.seek(offset_data)
        file.write(b"\xeb\x63\x90guest")
    return path


@pytest.mark.parametrize(
    ("disk_size", "image_type", "text", "aligned", "variant"),
    [
        (20 * GIB, 1, b"<<< Oracle VM VirtualBox Disk Image >>>\n", True, "dynamic"),
        (64 * MIB, 2, b"<<< Oracle VM VirtualBox Disk Image >>>\n", True, "static"),
        (10 * MIB + 12345, 1, b"<<< Oracle VM VirtualBox Disk Image >>>\n", True, "dynamic"),
        (2 * GIB, 1, b"<<< Sun xVM VirtualBox Disk Image >>>\n", False, "dynamic"),
        (2 * GIB, 1, b"<<< innotek VirtualBox Disk Image >>>\n", False, "dynamic"),
    ],
)
def test_virtualbox_vdi(
    tmp_path: Path, disk_size: int, image_type: int, text: bytes, aligned: bool, variant: str
) -> None:
    path = virtualbox_vdi(tmp_path / "disk.vdi", disk_size, image_type, text, aligned=aligned)
    verdict = assert_passes_like_qemu(path, "vdi", variant)
    assert verdict.info is not None
    # 'VBoxManage convertfromraw' sizes that are not whole sectors: qemu rounds up.
    assert verdict.info.virtual_size == -(-disk_size // 512) * 512


# --- Hyper-V VHDX --------------------------------------------------------------------------------

PAGE83_GUID = vhdx_module._guid("BECA12AB-B2E6-4523-93EF-C309E000C746")


def _with_crc(data: bytearray, at: int) -> bytes:
    struct.pack_into("<I", data, at, 0)
    struct.pack_into("<I", data, at, vhdx_module.crc32c(bytes(data)))
    return bytes(data)


def hyperv_vhdx(path: Path, size: int, block: int, *, fixed: bool, logical: int = 512) -> Path:
    """A VHDX laid out as Hyper-V lays it out: log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB,
    payload after; 4 KiB physical sectors; a stale log entry of an earlier session."""
    blocks = -(-size // block)
    chunk_ratio = (1 << 23) * logical // block
    bat_length = max(MIB, -(-(blocks + (blocks - 1) // chunk_ratio) * 8 // MIB) * MIB)
    data_start = 3 * MIB + bat_length
    image = bytearray(data_start)
    image[:8] = b"vhdxfile"
    creator = "Microsoft Windows 10.0.19041.0".encode("utf-16-le")
    image[8 : 8 + len(creator)] = creator
    guids = uuid.uuid4().bytes_le, uuid.uuid4().bytes_le
    for sequence, offset in ((10, 64 * KIB), (11, 128 * KIB)):
        header = bytearray(4 * KIB)
        struct.pack_into(
            "<4sIQ16s16s16sHHIQ", header, 0, b"head", 0, sequence, *guids, bytes(16), 0, 1, MIB, MIB
        )
        image[offset : offset + 4 * KIB] = _with_crc(header, 4)
    regions = bytearray(64 * KIB)
    struct.pack_into("<4sIII", regions, 0, b"regi", 0, 2, 0)
    struct.pack_into("<16sQII", regions, 16, vhdx_module.BAT_GUID, 3 * MIB, bat_length, 1)
    struct.pack_into("<16sQII", regions, 48, vhdx_module.METADATA_GUID, 2 * MIB, MIB, 1)
    table = _with_crc(regions, 4)
    image[192 * KIB : 256 * KIB] = table
    image[256 * KIB : 320 * KIB] = table
    items = [
        (vhdx_module.FILE_PARAMETERS_GUID, struct.pack("<II", block, int(fixed)), 4),
        (vhdx_module.VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", size), 6),
        (PAGE83_GUID, uuid.uuid4().bytes_le, 6),
        (vhdx_module.LOGICAL_SECTOR_SIZE_GUID, struct.pack("<I", logical), 6),
        (vhdx_module.PHYSICAL_SECTOR_SIZE_GUID, struct.pack("<I", 4096), 6),
    ]
    metadata = 2 * MIB
    struct.pack_into("<8sHH", image, metadata, b"metadata", 0, len(items))
    item_at = 64 * KIB
    for index, (guid, value, flags) in enumerate(items):
        at = metadata + 32 + 32 * index
        struct.pack_into("<16sIIII", image, at, guid, item_at, len(value), flags, 0)
        image[metadata + item_at : metadata + item_at + len(value)] = value
        item_at += 8 * -(-len(value) // 8)
    entry = bytearray(4 * KIB)  # a flushed entry of an earlier session's log GUID
    struct.pack_into("<4sIIIQQ16s", entry, 0, b"loge", 0, 4 * KIB, 0, 1, 0, uuid.uuid4().bytes_le)
    image[MIB : MIB + 4 * KIB] = _with_crc(entry, 4)
    present = range(blocks) if fixed else (0,)
    end = data_start
    for index in present:
        struct.pack_into("<Q", image, 3 * MIB + 8 * (index + index // chunk_ratio), end | 6)
        end += block
    with path.open("wb") as file:
        file.write(image)
        file.truncate(end)
        file.seek(data_start)
        file.write(b"\xeb\x63\x90guest")
    return path


@pytest.mark.parametrize(
    ("size", "block", "fixed", "variant"),
    [
        (127 * GIB, 32 * MIB, False, "dynamic"),
        (10 * GIB, 1 * MIB, False, "dynamic"),
        (100 * GIB, 256 * MIB, False, "dynamic"),
        (1 * GIB, 32 * MIB, True, "fixed"),
        (10 * GIB + 1536, 32 * MIB, False, "dynamic"),
    ],
)
def test_hyperv_vhdx(tmp_path: Path, size: int, block: int, fixed: bool, variant: str) -> None:
    path = hyperv_vhdx(tmp_path / "disk.vhdx", size, block, fixed=fixed)
    verdict = assert_passes_like_qemu(path, "vhdx", variant)
    assert verdict.info is not None and verdict.info.cluster_size == block


def test_hyperv_vhdx_with_4k_logical_sectors_is_refused_like_qemu(tmp_path: Path) -> None:
    # Valid VHDX that qemu 7.2 cannot open (ENOTSUP): rejected, never passed.
    path = hyperv_vhdx(tmp_path / "disk.vhdx", 10 * GIB, 32 * MIB, fixed=False, logical=4096)
    result = subprocess.run(
        ["qemu-img", "info", "-f", "vhdx", str(path)], capture_output=True, check=False
    )
    assert result.returncode != 0
    verdict = imgguard.check(path)
    assert verdict.status == "reject"
    assert "IG302" in {finding.rule for finding in verdict.findings}


# --- files whose size is not a whole number of sectors ------------------------------------------


@pytest.mark.parametrize("size", [1, 1000, 1_000_100, 4 * MIB + 511])
def test_raw_file_of_any_size_is_sized_in_whole_sectors_like_qemu(
    tmp_path: Path, size: int
) -> None:
    # A kernel or ramdisk (Glance aki/ari are raw), a dd dump cut anywhere: qemu 7.2's block
    # layer counts whole sectors, so a 1000-byte raw file is a 1024-byte disk to qemu-img.
    path = tmp_path / "vmlinuz"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"\x7f" * (size % 256))
    verdict = assert_passes_like_qemu(path, "raw")
    assert verdict.info is not None
    assert verdict.info.virtual_size == -(-size // 512) * 512 == qemu_info(path)["virtual-size"]


def test_luks_file_of_odd_size_is_sized_like_qemu(tmp_path: Path) -> None:
    path = qemu_create(
        tmp_path / "disk.luks", "luks", "4M", ["key-secret=sec0", "iter-time=10"], secret=True
    )
    with path.open("ab") as file:
        file.write(b"\0" * 100)
    info = imgguard.inspect(path)
    assert info.format == "luks"
    assert info.virtual_size == qemu_info(path, "luks")["virtual-size"] == 4 * MIB + 512


def test_fixed_vhd_footer_that_qemu_cannot_find_is_refused(tmp_path: Path) -> None:
    # 100 bytes of guest data more than a whole sector: the footer ends the file, but qemu reads
    # it at the rounded-up length - 512 and says "invalid VPC image". Never a pass.
    path = fixed_vhd(tmp_path / "disk.vhd", 1 * GIB + 100, b"win ")
    result = subprocess.run(
        ["qemu-img", "info", "-f", "vpc", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "invalid VPC image" in result.stderr
    verdict = imgguard.check(path)
    assert verdict.info is not None and verdict.info.format == "vpc"
    assert verdict.status == "reject"
    assert [(p.kind, p.field) for p in verdict.info.problems] == [(ProblemKind.MALFORMED, "footer")]
    # qemu's own reading of the file, raw and in whole sectors, is what qemu-img info shows.
    assert qemu_info(path)["virtual-size"] == -(-(1 * GIB + 612) // 512) * 512


# --- FreeBSD mkimg (the official FreeBSD .vmdk/.vhd/.qcow2 VM images) ----------------------------


def mkimg_vmdk(path: Path, sectors: int) -> Path:
    """usr.bin/mkimg/vmdk.c: monolithicSparse, 8 KiB grains, every grain allocated, CID 0, an
    empty extent name, the redundant grain directory at the same place as the primary."""
    descriptor = (
        '# Disk DescriptorFile\nversion=1\nCID=00000000\nparentCID=ffffffff\ncreateType="mono'
        f'lithicSparse"\n# Extent description\nRW {sectors} SPARSE ""\n# The Disk Data Base\n'
        '#DDB\nddb.adapterType = "ide"\nddb.geometry.cylinders = "0"\nddb.geometry.heads = "0"\n'
        'ddb.geometry.sectors = "0"\n'
    ).encode()
    descriptor = _sectors(descriptor)
    grain = 16
    grains = sectors // grain
    tables = -(-grains // 512)
    directory_size = -(-tables * 4 // 512) * 512
    gd = len(descriptor) // 512 + 1
    sector = gd + directory_size // 512
    directory = [sector + 4 * index for index in range(tables)]
    sector += 4 * tables
    sector = -(-sector // grain) * grain
    header = bytearray(
        struct.pack(
            "<4sIIQQQQIQQQB",
            *(b"KDMV", 1, 3, sectors, grain, 1, len(descriptor) // 512, 512, gd, gd, sector, 0),
        ).ljust(512, b"\0")
    )
    header[73:77] = b"\n \r\n"
    table = [sector + index * grain for index in range(grains)]
    table += [0] * (tables * 512 - grains)
    with path.open("wb") as file:
        file.write(header + descriptor)
        file.write(struct.pack(f"<{tables}I", *directory).ljust(directory_size, b"\0"))
        file.write(struct.pack(f"<{len(table)}I", *table))
        file.truncate((sector + sectors) * 512)
    return path


def test_freebsd_mkimg_vmdk(tmp_path: Path) -> None:
    path = mkimg_vmdk(tmp_path / "FreeBSD-14.1-RELEASE-amd64.vmdk", 16 * MIB // 512)
    verdict = assert_passes_like_qemu(path, "vmdk", "monolithicSparse")
    assert verdict.info is not None and verdict.info.cluster_size == 8 * KIB
    assert verdict.info.references == () and verdict.info.header["cid"] == 0


def test_freebsd_mkimg_vhd_footer_geometry(tmp_path: Path) -> None:
    # mkimg writes creator "*img" / "FBSD": qemu 7.2 sizes it by CHS; for disks over 127.5 GiB
    # mkimg's cylinder count (65536) wraps to 0 in the 16-bit field, and qemu says 0 bytes.
    path = fixed_vhd(tmp_path / "small.vhd", 64 * MIB, b"*img")
    verdict = assert_passes_like_qemu(path, "vpc", "fixed")
    cylinders, heads, per_track = testing.vhd_geometry(64 * MIB // 512)
    assert verdict.info is not None
    assert verdict.info.virtual_size == cylinders * heads * per_track * 512
    big = fixed_vhd(tmp_path / "big.vhd", 200 * GIB, b"*img")
    with big.open("r+b") as file:
        file.seek(200 * GIB)
        data = bytearray(file.read(512))
        struct.pack_into(">HBB", data, 56, 0, 16, 255)
        struct.pack_into(">I", data, 64, _vhd_checksum(data))
        file.seek(200 * GIB)
        file.write(bytes(data))
    info = imgguard.inspect(big)
    assert info.virtual_size == qemu_info(big, "vpc")["virtual-size"] == 0


def test_virtualbox_base_vhd_with_empty_parent_locators(tmp_path: Path) -> None:
    # Older VirtualBox releases reserved the four Windows parent locators in every dynamic VHD,
    # with no data in them: no reference, and qemu opens the disk.
    path = qemu_create(tmp_path / "vbox.vhd", "vpc", "1G")
    data = bytearray(path.read_bytes())
    footer = bytearray(data[:512])
    footer[28:40] = b"vbox" + b"\x00\x04\x00\x00" + b"Wi2k"
    struct.pack_into(">I", footer, 64, _vhd_checksum(footer))
    header = bytearray(data[512:1536])
    entries = struct.unpack_from(">I", header, 28)[0]
    at = 1536 + -(-entries * 4 // 512) * 512
    reserved = 0
    for index, (code, space) in enumerate(
        ((b"Wi2r", 512), (b"Wi2k", 512), (b"W2ru", 1024), (b"W2ku", 1024))
    ):
        struct.pack_into(">4sIIIQ", header, 576 + 24 * index, code, space // 512, 0, 0, at)
        at += space
        reserved += space
    struct.pack_into(">I", header, 36, 0)
    struct.pack_into(">I", header, 36, ~sum(header) & 0xFFFFFFFF)
    body = bytes(footer) + bytes(header) + bytes(data[1536:-512])
    path.write_bytes(body + bytes(reserved) + bytes(footer))
    verdict = assert_passes_like_qemu(path, "vpc", "dynamic")
    assert verdict.info is not None and verdict.info.references == ()
