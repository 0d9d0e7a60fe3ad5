"""ISO 9660 images made by genisoimage, xorriso and isohybrid, read as qemu reads them: raw."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import qemu_info
from imgguard.errors import ImageError, TruncatedImage
from imgguard.formats import gpt, iso9660, mbr
from imgguard.model import ImageInfo, ProblemKind
from imgguard.reader import ImageReader, open_image

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
ISOHDPFX_BIN = Path("/usr/lib/ISOLINUX/isohdpfx.bin")


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def need_isolinux() -> None:
    if not ISOLINUX_BIN.exists() or not ISOHDPFX_BIN.exists():
        pytest.skip("isolinux is not installed")


def run(*args: str | Path) -> None:
    result = subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, f"{args[0]} failed: {result.stderr}"


def inspect(path: Path) -> ImageInfo:
    with open_image(path) as (reader, _):
        return iso9660.inspect(reader)


def reader_of(path: Path) -> ImageReader:
    return ImageReader.from_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small directory to master: a text file, isolinux.bin and a stand-in EFI image."""
    root = tmp_path_factory.mktemp("iso-tree")
    (root / "hello.txt").write_text("hello from imgguard\n")
    (root / "boot" / "isolinux").mkdir(parents=True)
    if ISOLINUX_BIN.exists():
        shutil.copy(ISOLINUX_BIN, root / "boot" / "isolinux" / "isolinux.bin")
    # El Torito only needs the bytes of an EFI image; its content is the firmware's business.
    (root / "efi.img").write_bytes(bytes(range(256)) * 4 * 1440)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("iso-out")


ISOLINUX_BOOT = (
    "-b",
    "boot/isolinux/isolinux.bin",
    "-c",
    "boot/isolinux/boot.cat",
    "-no-emul-boot",
    "-boot-load-size",
    "4",
    "-boot-info-table",
)
EFI_BOOT = ("-eltorito-alt-boot", "-e", "efi.img", "-no-emul-boot")


def check_raw(path: Path, info: ImageInfo) -> None:
    """What qemu-img says: raw, the file's length."""
    qemu = qemu_info(path)
    assert qemu["format"] == "raw"
    assert info.format == "raw"
    assert info.variant == "iso9660"
    assert info.virtual_size == qemu["virtual-size"] == path.stat().st_size


# --- plain volumes -------------------------------------------------------------------------

PLAIN: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "genisoimage-joliet-rr": (
        "genisoimage",
        ["-J", "-R", "-V", "MYVOLUME", "-sysid", "MYSYSTEM", "-publisher", "ACME", "-A", "APP"],
        {"volume_identifier": "MYVOLUME", "system_identifier": "MYSYSTEM",
         "publisher_identifier": "ACME", "application_identifier": "APP", "joliet_level": 3,
         "descriptors": ("primary", "supplementary", "terminator"), "udf": ()},
    ),
    "genisoimage-iso-level1": (
        "genisoimage",
        ["-V", "PLAIN"],
        {"volume_identifier": "PLAIN", "joliet_level": None,
         "descriptors": ("primary", "terminator"), "udf": ()},
    ),
    "genisoimage-udf-bridge": (
        "genisoimage",
        ["-udf", "-V", "UDFVOL"],
        {"volume_identifier": "UDFVOL", "udf": ("BEA01", "NSR02", "TEA01")},
    ),
    "xorriso-joliet": (
        "xorriso",
        ["-J", "-R", "-V", "XVOL", "-publisher", "XPUB"],
        {"volume_identifier": "XVOL", "publisher_identifier": "XPUB", "joliet_level": 3,
         "joliet_volume_identifier": "XVOL"},
    ),
}  # fmt: skip


def master(tool: str, options: list[str] | tuple[str, ...], out: Path, tree: Path) -> Path:
    need(tool)
    out.unlink(missing_ok=True)
    if tool == "xorriso":
        run("xorriso", "-as", "mkisofs", "-quiet", "-o", out, *options, tree)
    else:
        run("genisoimage", "-quiet", "-o", out, *options, tree)
    return out


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_volume(name: str, tree: Path, workdir: Path) -> None:
    tool, options, expected = PLAIN[name]
    path = master(tool, options, workdir / f"{name}.iso", tree)
    reader = reader_of(path)
    assert iso9660.recognise(reader)
    assert not mbr.recognise(reader) and not gpt.recognise(reader)
    assert iso9660.probe(reader) == 0
    info = inspect(path)
    check_raw(path, info)
    for key, value in expected.items():
        assert info.header[key] == value, key
    assert info.header["logical_block_size"] == 2048
    assert info.header["volume_space_size"] == info.header["volume_space_blocks"] * 2048
    assert 0 < info.header["volume_space_size"] <= path.stat().st_size
    assert info.header["volume_creation_date_and_time"][:2] == "20"
    assert info.header["el_torito"] is False
    assert info.header["hybrid"] is None and not info.header["system_area_other_data"]
    assert info.header["hybrid_boot"] is False
    assert not iso9660.system_area_is_hybrid_boot(reader)
    assert info.problems == ()


def test_el_torito_bios_and_efi(tree: Path, workdir: Path) -> None:
    need_isolinux()
    path = master(
        "genisoimage",
        ["-J", "-V", "BOOTME", *ISOLINUX_BOOT, *EFI_BOOT],
        workdir / "eltorito.iso",
        tree,
    )
    info = inspect(path)
    check_raw(path, info)
    assert info.header["el_torito"] is True
    assert info.header["boot_system_identifier"] == "EL TORITO SPECIFICATION"
    assert info.header["descriptors"] == ("primary", "boot", "supplementary", "terminator")
    assert info.header["el_torito_platforms"] == ("x86", "efi")
    (bios, efi) = info.header["el_torito_entries"]
    assert bios[:3] == ("x86", True, "no-emulation") and bios[4] == 4  # -boot-load-size 4
    assert efi[:3] == ("efi", True, "no-emulation")
    assert info.header["hybrid"] is None
    assert info.problems == ()


# --- hybrid images: the same file is an ISO and a partitioned disk ---------------------------

HYBRIDS = {
    # name: (how to make it, hybrid, El Torito platforms, gpt recognised, MBR partition types)
    "isohybrid": ("isohybrid", "mbr", ("x86",), False, (0x17,)),
    "isohybrid-uefi": ("isohybrid-uefi", "gpt", ("x86", "efi"), True, (0x00, 0xEF)),
    "xorriso-isohybrid-mbr": ("xorriso-mbr", "mbr", ("x86",), False, (0x17,)),
    "xorriso-gpt-basdat": ("xorriso-gpt", "gpt", ("x86", "efi"), True, (0x00, 0xEF)),
    "xorriso-protective-msdos": ("xorriso-protective", "mbr", None, False, (0xCD,)),
    "xorriso-append-esp": ("xorriso-append", "mbr", ("x86",), False, (0x17, 0xEF)),
    "xorriso-append-esp-gpt": ("xorriso-append-gpt", "gpt", ("x86", "efi"), True, (0x00, 0xEF)),
    "xorriso-partition-offset": ("xorriso-offset", "gpt", ("x86", "efi"), True, (0x00, 0xEF)),
}


def make_hybrid(how: str, tree: Path, workdir: Path) -> Path:
    need_isolinux()
    out = workdir / f"{how}.iso"
    esp = workdir / "esp.img"
    esp.write_bytes(b"\xeb\x3c\x90ESP-IMAGE" * 40000)
    isohdpfx = ("-isohybrid-mbr", str(ISOHDPFX_BIN))
    if how in ("isohybrid", "isohybrid-uefi"):
        need("isohybrid")
        efi = EFI_BOOT if how == "isohybrid-uefi" else ()
        master("genisoimage", ["-J", "-R", "-V", "HYB", *ISOLINUX_BOOT, *efi], out, tree)
        run("isohybrid", *(["--uefi"] if how == "isohybrid-uefi" else []), out)
        return out
    options = {
        "xorriso-mbr": [*isohdpfx, *ISOLINUX_BOOT],
        "xorriso-gpt": [*isohdpfx, *ISOLINUX_BOOT, *EFI_BOOT, "-isohybrid-gpt-basdat"],
        "xorriso-offset": [
            *isohdpfx, "-partition_offset", "16", *ISOLINUX_BOOT, *EFI_BOOT,
            "-isohybrid-gpt-basdat",
        ],
        "xorriso-protective": ["--protective-msdos-label"],
        "xorriso-append": [*isohdpfx, *ISOLINUX_BOOT, "-append_partition", "2", "0xef", str(esp)],
        "xorriso-append-gpt": [
            *isohdpfx, *ISOLINUX_BOOT, "-eltorito-alt-boot",
            "-e", "--interval:appended_partition_2:all::", "-no-emul-boot",
            "-isohybrid-gpt-basdat", "-append_partition", "2", "0xef", str(esp),
        ],
    }[how]  # fmt: skip
    return master("xorriso", ["-V", "HYB", *options], out, tree)


@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_hybrid_iso(name: str, tree: Path, workdir: Path) -> None:
    how, hybrid, platforms, has_gpt, mbr_types = HYBRIDS[name]
    path = make_hybrid(how, tree, workdir)
    reader = reader_of(path)
    # All three layouts see their part of the same bytes; the ISO is the whole picture.
    assert iso9660.recognise(reader)
    assert mbr.recognise(reader)
    assert gpt.recognise(reader) is has_gpt
    info = inspect(path)
    check_raw(path, info)
    assert info.header["volume_identifier"] == "HYB"
    assert info.header["hybrid"] == hybrid
    assert info.header["system_area_mbr"] is True
    assert info.header["system_area_gpt"] is has_gpt
    assert info.header["hybrid_boot"] is True
    assert iso9660.system_area_is_hybrid_boot(reader)
    if platforms is None:
        assert info.header["el_torito"] is False
    else:
        assert info.header["el_torito_platforms"] == platforms
    assert not info.truncated and info.problems == ()
    table = mbr.inspect(reader)
    assert tuple(p[1] for p in table.header["partitions"]) == mbr_types
    assert all((p[2] + p[3]) * 512 <= path.stat().st_size for p in table.header["partitions"])
    if has_gpt:
        layout = gpt.inspect(reader)
        assert layout.header["primary_valid"] and layout.header["backup_valid"]
        # A hybrid's GPT has its first partition over the ISO's start (LBA 0, or 64 with
        # -partition_offset 16), overlapping the others, and no 0xEE record: Problems for the
        # GPT on its own, and exactly what the ISO check accepts.
        assert layout.header["partitions"][0][3] * 512 <= 32768
        assert any(p.kind is ProblemKind.INCONSISTENT for p in layout.problems)


def test_partitions_that_miss_the_volume_are_not_a_hybrid(tree: Path, workdir: Path) -> None:
    """An MBR whose only partition starts after the ISO's descriptors is a second layout."""
    path = master("genisoimage", ["-V", "POLY"], workdir / "poly.iso", tree)
    data = bytearray(path.read_bytes())
    size_sectors = len(data) // 512
    entry = bytes([0x00, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
    entry += (size_sectors - 2048).to_bytes(4, "little")
    data[446:462] = entry
    data[510:512] = b"\x55\xaa"
    reader = ImageReader.from_bytes(bytes(data))
    assert mbr.recognise(reader)
    info = iso9660.inspect(reader)
    assert info.header["hybrid"] == "mbr"
    assert info.header["hybrid_boot"] is False
    assert not iso9660.system_area_is_hybrid_boot(reader)
    # Covering the volume but running past the end of the file is no hybrid either.
    data[446:462] = entry[:8] + (0).to_bytes(4, "little") + (size_sectors + 8).to_bytes(4, "little")
    assert not iso9660.system_area_is_hybrid_boot(ImageReader.from_bytes(bytes(data)))
    data[446:462] = entry[:8] + (0).to_bytes(4, "little") + size_sectors.to_bytes(4, "little")
    assert iso9660.system_area_is_hybrid_boot(ImageReader.from_bytes(bytes(data)))


def test_other_system_area_data_is_reported(tree: Path, workdir: Path) -> None:
    path = master("genisoimage", ["-V", "SYSAREA"], workdir / "sysarea.iso", tree)
    data = bytearray(path.read_bytes())
    data[20000:20005] = b"HELLO"
    info = iso9660.inspect(ImageReader.from_bytes(bytes(data)))
    assert info.header["system_area_other_data"] is True
    assert info.header["hybrid"] is None


# --- damaged volumes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def boot_iso(tree: Path, workdir: Path) -> Path:
    need_isolinux()
    return master(
        "genisoimage", ["-J", "-R", "-V", "DAMAGE", *ISOLINUX_BOOT], workdir / "d.iso", tree
    )


def test_truncated_volume(boot_iso: Path, workdir: Path) -> None:
    path = workdir / "truncated.iso"
    data = boot_iso.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    info = inspect(path)
    check_raw(path, info)  # qemu reads the shorter file as a shorter raw disk
    assert info.header["volume_space_size"] == len(data)
    assert info.truncated
    assert [p.field for p in info.problems if p.kind is ProblemKind.TRUNCATED] == [
        "volume_space_size"
    ]


def test_both_endian_copies_must_agree(boot_iso: Path) -> None:
    data = bytearray(boot_iso.read_bytes())
    offset = 32768 + 84  # the big-endian copy of the volume space size
    data[offset : offset + 4] = (12345).to_bytes(4, "big")
    info = iso9660.inspect(ImageReader.from_bytes(bytes(data)))
    (problem,) = info.problems
    assert problem.kind is ProblemKind.INCONSISTENT
    assert problem.field == "volume_space_size" and problem.offset == 32768 + 80
    assert info.header["volume_space_blocks"] == len(data) // 2048  # the little-endian copy


def test_missing_terminator_and_primary(boot_iso: Path) -> None:
    data = bytearray(boot_iso.read_bytes())
    info = iso9660.inspect(ImageReader.from_bytes(bytes(data)))
    terminator = 32768 + 2048 * info.header["descriptors"].index("terminator")
    data[terminator : terminator + 2048] = bytes(2048)
    info = iso9660.inspect(ImageReader.from_bytes(bytes(data)))
    assert any("terminator" in p.message for p in info.problems)
    data[32768] = 2  # the primary descriptor now claims to be supplementary
    info = iso9660.inspect(ImageReader.from_bytes(bytes(data)))
    assert any("no primary volume descriptor" in p.message for p in info.problems)
    assert "volume_space_size" not in info.header


def test_broken_boot_catalog(boot_iso: Path) -> None:
    data = bytearray(boot_iso.read_bytes())
    catalog = iso9660.inspect(ImageReader.from_bytes(bytes(data))).header["boot_catalog_lba"]
    data[catalog * 2048 + 30] ^= 0xFF  # the 0x55AA key
    info = iso9660.inspect(ImageReader.from_bytes(bytes(data)))
    assert [p.field for p in info.problems] == ["boot_catalog.validation_entry"]
    data[32768 + 2048 + 71 : 32768 + 2048 + 75] = (10**6).to_bytes(4, "little")
    info = iso9660.inspect(ImageReader.from_bytes(bytes(data)))
    assert [(p.kind, p.field) for p in info.problems] == [
        (ProblemKind.TRUNCATED, "boot_catalog_pointer")
    ]


def test_too_short_for_descriptors_raises() -> None:
    reader = ImageReader.from_bytes(bytes(40000))
    assert not iso9660.recognise(reader)
    with pytest.raises(ImageError):
        iso9660.inspect(reader)
    with pytest.raises(TruncatedImage):
        iso9660.inspect(ImageReader.from_bytes(bytes(1000)))


@pytest.mark.parametrize("cut", [0, 512, 32768, 32769, 34816, 36000, 38912, 40960, 43008, 90000])
def test_truncation_points(boot_iso: Path, cut: int) -> None:
    reader = ImageReader.from_bytes(boot_iso.read_bytes()[:cut])
    assert not iso9660.system_area_is_hybrid_boot(reader)
    try:
        info = iso9660.inspect(reader)
    except ImageError:
        assert cut < 34816 or not iso9660.recognise(reader)
    else:
        assert info.virtual_size == -(-cut // 512) * 512  # qemu: whole sectors
        assert info.truncated


@pytest.fixture(scope="module")
def hybrid_bytes(tree: Path, workdir: Path) -> bytes:
    return make_hybrid("xorriso-gpt", tree, workdir).read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.integers(0, 1023),  # MBR and GPT header
                st.integers(32768, 32768 + 4 * 2048),  # the volume descriptors
                st.integers(0, 80000),
            ),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from([None, 36000, 60000, 2048 * 100]),
)
def test_mutations_only_give_info_or_image_error(
    hybrid_bytes: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(hybrid_bytes)
    for offset, value in edits:
        data[offset] = value
    reader = ImageReader.from_bytes(bytes(data[:cut]))
    iso9660.recognise(reader)
    iso9660.system_area_is_hybrid_boot(reader)
    try:
        info = iso9660.inspect(reader)
    except ImageError:
        return
    assert info.format == "raw" and info.virtual_size == -(-reader.size // 512) * 512
