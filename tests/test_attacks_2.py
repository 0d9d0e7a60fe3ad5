"""Red-team pass 2: attack images that got past imgguard's default policy, each checked
against the real qemu-img 7.2, with a near miss that must still pass.

Every attack is a qemu-img-made image edited at the offsets the format's spec gives; each test
says what qemu-img does with it and what imgguard did before the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import imgguard
from conftest import (
    QEMU_IMG,
    assert_passes,
    assert_rejects,
    qemu_convert,
    qemu_create,
    qemu_info,
    rejecting_rules,
    run_qemu_img,
)
from imgguard import inspect
from imgguard.inspection import inspect_reader
from imgguard.reader import ImageReader
from imgguard.report.text import printable

PRLIMIT = shutil.which("prlimit")
GiB = 1 << 30


def qemu_img_limited(*args: str, address_space: int = GiB) -> subprocess.CompletedProcess[str]:
    """qemu-img under the address-space cap OpenStack uses (OSSA-2015-014: 1 GiB)."""
    assert QEMU_IMG is not None and PRLIMIT is not None
    return subprocess.run(
        [PRLIMIT, f"--as={address_space}", "--cpu=30", QEMU_IMG, *args],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
        timeout=120,
    )


# --- qcow2 persistent dirty bitmaps: memory qemu allocates at open ----------------------------


def qcow2_bitmap_entries(data: bytes) -> list[tuple[int, int, int]]:
    """(table offset, table size, granularity bits) of every bitmap directory entry."""
    header_length = struct.unpack_from(">I", data, 100)[0]
    offset = header_length
    while True:
        magic, length = struct.unpack_from(">II", data, offset)
        assert magic != 0, "no bitmaps extension"
        if magic == 0x23852875:
            break
        offset += 8 + (length + 7 & ~7)
    nb_bitmaps, _, _, directory = struct.unpack_from(">IIQQ", data, offset + 8)
    entries = []
    for _ in range(nb_bitmaps):
        table, size, _, _, bits, name_size, extra = struct.unpack_from(">QIIBBHI", data, directory)
        entries.append((table, size, bits))
        directory += 24 + extra + name_size + 7 & ~7
    return entries


def qcow2_with_bitmaps(path: Path, size: str, granularity: int, count: int) -> Path:
    qemu_create(path, "qcow2", size)
    for index in range(count):
        run_qemu_img("bitmap", "--add", "-g", str(granularity), str(path), f"b{index}")
    return path


def test_qcow2_dirty_bitmaps_memory(tmp_path: Path) -> None:
    """Was a bypass (formats/qcow2.py, rules IG503): qcow2_load_dirty_bitmaps() allocates, for
    every persistent bitmap, one bit per granule of the whole disk, even for `qemu-img info`;
    a bitmap table entry of 1 ("all ones") makes qemu write every byte of it. Three
    granularity-512 bitmaps on a 2 TiB disk, all tables set to "all ones": a 655 KB file that
    made `qemu-img info` take 1.6 GB of memory and 5 s (and abort under a 1 GiB address-space
    cap). imgguard read only the bitmap directory's place and passed it."""
    image = qcow2_with_bitmaps(tmp_path / "bitmaps.qcow2", "2T", 512, 3)
    data = bytearray(image.read_bytes())
    for table, size, bits in qcow2_bitmap_entries(bytes(data)):
        assert bits == 9
        for index in range(size):
            struct.pack_into(">Q", data, table + 8 * index, 1)
    image.write_bytes(bytes(data))
    assert image.stat().st_size < 1 << 20
    # qemu-img info cannot open it under the cap: each bitmap is a 512 MiB allocation.
    limited = qemu_img_limited("info", "-f", "qcow2", str(image))
    assert limited.returncode != 0
    assert "failed to allocate 536870912 bytes" in limited.stderr

    info = inspect(image)
    assert info.header["bitmap_memory"] == 3 * (512 << 20)
    table = next(table for table in info.tables if table.name == "dirty_bitmaps")
    assert (table.length, table.loaded_at_open, table.in_file) == (3 * (512 << 20), True, False)
    verdict = assert_rejects(image, "IG503")
    assert "IG504" not in rejecting_rules(verdict)  # memory, not a region past the end of the file


def test_near_miss_qcow2_with_default_bitmaps(tmp_path: Path) -> None:
    """A 1 TiB qcow2 with two bitmaps of the default granularity (64 KiB): 2 MiB each."""
    image = qcow2_with_bitmaps(tmp_path / "bitmaps.qcow2", "1T", 65536, 2)
    info = inspect(image)
    assert info.header["bitmap_memory"] == 2 * (2 << 20)
    assert qemu_img_limited("info", "-f", "qcow2", str(image)).returncode == 0
    assert_passes(image)


# --- streamOptimized VMDK: grain buffers of a compressed read ----------------------------------


@pytest.fixture
def stream_vmdk(tmp_path: Path) -> Path:
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(range(256)) * 4096)
    return qemu_convert(raw, tmp_path / "stream.vmdk", "vmdk", ("subformat=streamOptimized",))


def test_vmdk_stream_optimized_huge_grain(tmp_path: Path, stream_vmdk: Path) -> None:
    """Was a bypass (formats/vmdk.py): vmdk_read_extent() reads a compressed grain into
    g_malloc(2 * grain) and inflates it into g_malloc(grain). A 1 MiB streamOptimized file
    whose granularity says 0x100000 sectors (512 MiB grains) made `qemu-img convert` take 1 GB
    of memory before failing; 0x200000 overflows qemu's int and aborts it. Both passed."""
    data = bytearray(stream_vmdk.read_bytes())
    assert struct.unpack_from("<Q", data, 20)[0] == 128
    struct.pack_into("<Q", data, 20, 0x100000)
    image = tmp_path / "big-grain.vmdk"
    image.write_bytes(bytes(data))
    assert image.stat().st_size < 2 << 20
    result = qemu_img_limited("convert", "-f", "vmdk", "-O", "raw", str(image), str(tmp_path / "o"))
    assert result.returncode != 0
    info = inspect(image)
    assert (info.variant, info.cluster_size) == ("streamOptimized", 512 << 20)
    table = next(table for table in info.tables if table.name == "compressed_grain_buffers")
    assert (table.length, table.in_file) == (3 * (512 << 20), False)
    assert_rejects(image, "IG503")


def test_near_miss_vmdk_stream_optimized(stream_vmdk: Path) -> None:
    info = inspect(stream_vmdk)
    table = next(table for table in info.tables if table.name == "compressed_grain_buffers")
    assert table.length == 3 * 65536
    assert_passes(stream_vmdk)


# --- raw: qemu's virtual size is the length rounded up to whole sectors -------------------------


@pytest.mark.parametrize("length", [1, 511, 1000, 4096, 65536 + 7])
def test_raw_virtual_size_is_rounded_up_to_sectors(tmp_path: Path, length: int) -> None:
    """Was wrong (formats/raw.py and the raw layouts): refresh_total_sectors() takes
    DIV_ROUND_UP(length, 512), so `qemu-img info` says a 1000-byte raw file is a 1024-byte
    disk; imgguard said 1000. The raw layouts (ISO 9660, GPT, MBR, a gzip container) and a
    layout that cannot be read are raw disks too."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xf6" * length)
    info = inspect(image)
    assert info.virtual_size == qemu_info(image)["virtual-size"] == -(-length // 512) * 512
    assert_passes(image)


def test_truncated_iso_virtual_size_matches_qemu(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    (source / "file.txt").write_text("imgguard")
    iso = tmp_path / "full.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-o", str(iso), str(source)], check=True, capture_output=True
    )
    image = tmp_path / "cut.iso"
    image.write_bytes(iso.read_bytes()[:36000])
    info = inspect(image)
    assert (info.format, info.variant) == ("raw", "iso9660")
    assert info.virtual_size == qemu_info(image)["virtual-size"] == 36352


def test_luks_virtual_size_is_rounded_up_to_sectors(tmp_path: Path) -> None:
    """Was wrong (formats/luks.py): qemu's LUKS size is the file's length rounded up to whole
    sectors, minus the payload offset; imgguard did not round."""
    image = qemu_create(
        tmp_path / "x.luks", "luks", "1M", ("key-secret=sec0", "iter-time=10"), secret=True
    )
    with image.open("ab") as file:
        file.write(b"\x01" * 100)
    info = inspect(image)
    assert info.virtual_size == qemu_info(image)["virtual-size"] == (1 << 20) + 512


# --- text reports: names from the image or the tree never reach the terminal raw --------------

HOSTILE_NAME = "/x\x1b[2J\x1b[32mPASS\nfake"


def imgguard_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgguard", *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(imgguard.__file__).parent.parent)},
    )


def test_inspect_text_escapes_names_from_the_image(tmp_path: Path) -> None:
    """Was a terminal-injection (cli.py): `imgguard inspect` printed the backing file name
    (and every other string from the header) raw, so an image could clear the operator's
    screen and print a fake line; the JSON report keeps the name exactly."""
    image = tmp_path / "esc.qcow2"
    args = ("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", HOSTILE_NAME, str(image))
    run_qemu_img(*args, "1M")
    assert inspect(image).backing_file == HOSTILE_NAME
    result = imgguard_cli("inspect", str(image))
    assert result.returncode == 0
    assert "\x1b" not in result.stdout and "\nfake" not in result.stdout
    assert "backing_file    /x\\x1b[2J\\x1b[32mPASS\\nfake" in result.stdout
    document = imgguard_cli("inspect", "--format", "json", str(image))
    assert json.loads(document.stdout)["backing_file"] == HOSTILE_NAME


def test_scan_text_escapes_paths(tmp_path: Path) -> None:
    """Was a report-line forgery (report/text.py): a file named "a\\nb.qcow2 ... PASS" in a
    scanned tree printed its own line; an undecodable byte printed as U+FFFD."""
    tree = tmp_path / "tree"
    tree.mkdir()
    seed = qemu_create(tmp_path / "seed.qcow2", "qcow2", "1M").read_bytes()
    names = ["a\nb.qcow2", "y\x1b[31m.qcow2", os.fsdecode(b"x\xff.qcow2")]
    for name in names:
        (tree / name).write_bytes(seed)
    result = imgguard_cli("scan", "--no-progress", str(tree))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(names) + 2  # header, one line per image, blank, summary
    assert f"{tree}/a\\nb.qcow2" in result.stdout
    assert f"{tree}/y\\x1b[31m.qcow2" in result.stdout
    assert f"{tree}/x\\xff.qcow2" in result.stdout


def test_near_miss_plain_names_print_unchanged() -> None:
    assert printable("/srv/images/Ubuntu 22.04 (ça).qcow2") == "/srv/images/Ubuntu 22.04 (ça).qcow2"


# --- a file's name is not a second format ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vdi"])
def test_near_miss_image_named_dmg(tmp_path: Path, fmt: str) -> None:
    """Was a false alarm (inspection.py, stream.py): qemu's dmg prober scores 2 for any name
    ending in ".dmg", so a qcow2 uploaded as "disk.dmg" was "valid as qcow2, dmg" (IG201).
    qemu reads it as qcow2; the name alone is no reading of the bytes."""
    image = qemu_create(tmp_path / "disk.dmg", fmt, "1M")
    info = inspect(image)
    assert info.format == info.qemu_format == qemu_info(image)["format"] == fmt
    assert info.matches == (fmt,)
    assert_passes(image)


def test_raw_bytes_named_dmg_are_still_dmg_to_qemu(tmp_path: Path) -> None:
    # Where nothing else scores, the name makes qemu pick dmg (and fail): still refused.
    image = tmp_path / "disk.dmg"
    image.write_bytes(bytes(1 << 20))
    info = inspect(image)
    assert (info.format, info.qemu_format) == ("dmg", "dmg")
    assert_rejects(image, "IG203")


def test_qcow2_bitmap_directory_read_is_bounded(tmp_path: Path) -> None:
    """65535 bitmaps whose directory (up to 64 MiB, qemu's cap) imgguard cannot read whole:
    it reads 256 KiB of it, counts what it read, and says the rest was not counted."""
    image = qcow2_with_bitmaps(tmp_path / "many.qcow2", "1G", 65536, 1)
    data = bytearray(image.read_bytes())
    header_length = struct.unpack_from(">I", data, 100)[0]
    offset = header_length
    while struct.unpack_from(">I", data, offset)[0] != 0x23852875:
        offset += 8 + (struct.unpack_from(">I", data, offset + 4)[0] + 7 & ~7)
    struct.pack_into(">I", data, offset + 8, 65535)  # nb_bitmaps
    struct.pack_into(">Q", data, offset + 16, 65535 * 1024)  # bitmap_directory_size
    image.write_bytes(bytes(data))
    reader = ImageReader.from_bytes(bytes(data), name=str(image))
    info = inspect_reader(reader)
    assert reader.bytes_read < 1 << 20
    limits = [p for p in info.problems if p.kind.name == "LIMIT"]
    assert [p.field for p in limits] == ["bitmaps.bitmap_directory_size"]
    assert_rejects(image, "IG604")
