"""iso9660: an ISO 9660 (ECMA-119) file system image, read by qemu as a raw disk.

qemu has no ISO prober: `raw_probe()` (`block/raw-format.c`) claims these bytes with score 1, and
`qemu-img info` reports `raw` with the file's length as the virtual size. imgguard reads the
volume descriptors to report the volume as facts of the raw image (`variant="iso9660"`).

What is read (ECMA-119 4th edition, section 8; 2048-byte logical sectors):
- The volume descriptor set from logical sector 16 (offset 32768): each descriptor is one sector
  with a type byte, the standard identifier "CD001" and a version; the set ends at the volume
  descriptor set terminator (type 255). At most `MAX_DESCRIPTORS` sectors are walked.
- The primary volume descriptor (type 1): identifiers, volume space size and logical block size
  (both recorded twice, little and big endian: the copies must agree), dates.
- A boot record (type 0) with "EL TORITO SPECIFICATION" (El Torito 1.0): the boot catalog it
  points to (one 2048-byte sector) is read for its validation entry and boot entries.
- Supplementary volume descriptors (type 2): Joliet when the escape sequences say UCS-2.
- After the terminator, ECMA-167 volume recognition descriptors ("BEA01", "NSR02", "NSR03",
  "TEA01"): a UDF bridge image.
- The system area (sectors 0-15, 32 KiB) for a hybrid MBR or GPT, as isohybrid, xorriso and
  grub-mkrescue write one so the same file boots from a USB stick.
"""

from __future__ import annotations

from typing import Any

from construct import Bytes, Const, Int8ul, Int16ub, Int16ul, Int32ub, Int32ul, Struct

from imgguard.errors import ImageError, MalformedImage, TruncatedImage
from imgguard.formats import gpt, mbr
from imgguard.formats._common import qemu_length
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo, Problem, ProblemKind
from imgguard.reader import ImageReader, parse_struct

NAME = "iso9660"

SECTOR_SIZE = 2048  # ECMA-119 6.1.2: a CD logical sector is 2048 bytes, whatever the block size
SYSTEM_AREA_SIZE = 16 * SECTOR_SIZE  # ECMA-119 6.2.1: sectors 0-15, contents not specified
DESCRIPTORS_OFFSET = SYSTEM_AREA_SIZE
_ZEROS = bytes(SYSTEM_AREA_SIZE)
STANDARD_IDENTIFIER = b"CD001"
# ECMA-167 2/9.1: volume recognition sequence identifiers (UDF, and others ECMA-167 names).
VRS_IDENTIFIERS = {b"BEA01", b"NSR02", b"NSR03", b"TEA01", b"BOOT2", b"CDW02"}

# Volume descriptor sectors walked before giving up on finding the terminator (a real image has
# 3-8: primary, boot record, Joliet, terminator and a UDF recognition sequence).
MAX_DESCRIPTORS = 32
_CHUNK_SECTORS = 8  # descriptors read per request

TYPE_BOOT_RECORD = 0
TYPE_PRIMARY = 1
TYPE_SUPPLEMENTARY = 2
TYPE_PARTITION = 3
TYPE_TERMINATOR = 255
DESCRIPTOR_NAMES = {
    TYPE_BOOT_RECORD: "boot",
    TYPE_PRIMARY: "primary",
    TYPE_SUPPLEMENTARY: "supplementary",
    TYPE_PARTITION: "partition",
    TYPE_TERMINATOR: "terminator",
}
EL_TORITO_ID = b"EL TORITO SPECIFICATION"
# Joliet (Microsoft's Joliet specification 1995): escape sequences for UCS-2 levels 1, 2 and 3.
JOLIET_ESCAPES = {b"%/@": 1, b"%/C": 2, b"%/E": 3}
# El Torito 1.0 section 2.1: platform ids (0xEF added for UEFI by the UEFI spec 2.x, 13.3.2.1).
PLATFORMS = {0x00: "x86", 0x01: "powerpc", 0x02: "mac", 0xEF: "efi"}
MEDIA_TYPES = {0: "no-emulation", 1: "1.2M-floppy", 2: "1.44M-floppy", 3: "2.88M-floppy", 4: "hdd"}


def _both_endian(name: str, le: Any, be: Any) -> Any:
    # ECMA-119 7.2.3 / 7.3.3: the value recorded little endian, then again big endian.
    return name / Struct("le" / le, "be" / be)


VolumeDescriptorHeader = Struct(
    "volume_descriptor_type" / Int8ul,
    "standard_identifier" / Bytes(5),
    "volume_descriptor_version" / Int8ul,
)

# ECMA-119 8.4 (primary) and 8.5 (supplementary, same layout; flags and escape sequences are
# unused zeros in a primary descriptor).
VolumeDescriptor = Struct(
    "volume_descriptor_type" / Int8ul,
    "standard_identifier" / Const(STANDARD_IDENTIFIER),
    "volume_descriptor_version" / Int8ul,
    "volume_flags" / Int8ul,
    "system_identifier" / Bytes(32),
    "volume_identifier" / Bytes(32),
    "unused_72" / Bytes(8),
    _both_endian("volume_space_size", Int32ul, Int32ub),  # in logical blocks
    "escape_sequences" / Bytes(32),
    _both_endian("volume_set_size", Int16ul, Int16ub),
    _both_endian("volume_sequence_number", Int16ul, Int16ub),
    _both_endian("logical_block_size", Int16ul, Int16ub),
    _both_endian("path_table_size", Int32ul, Int32ub),
    "location_of_type_l_path_table" / Int32ul,
    "location_of_optional_type_l_path_table" / Int32ul,
    "location_of_type_m_path_table" / Int32ub,
    "location_of_optional_type_m_path_table" / Int32ub,
    "directory_record_for_root_directory" / Bytes(34),
    "volume_set_identifier" / Bytes(128),
    "publisher_identifier" / Bytes(128),
    "data_preparer_identifier" / Bytes(128),
    "application_identifier" / Bytes(128),
    "copyright_file_identifier" / Bytes(37),
    "abstract_file_identifier" / Bytes(37),
    "bibliographic_file_identifier" / Bytes(37),
    "volume_creation_date_and_time" / Bytes(17),  # ECMA-119 8.4.26.1: digits + GMT offset
    "volume_modification_date_and_time" / Bytes(17),
    "volume_expiration_date_and_time" / Bytes(17),
    "volume_effective_date_and_time" / Bytes(17),
    "file_structure_version" / Int8ul,
    "reserved_882" / Int8ul,
    "application_use" / Bytes(512),
    "reserved_1395" / Bytes(653),
).compile()

# ECMA-119 8.2 boot record; El Torito 1.0 table 0 puts the boot catalog's sector in the first
# four bytes of the boot system use field.
BootRecord = Struct(
    "volume_descriptor_type" / Const(b"\x00"),
    "standard_identifier" / Const(STANDARD_IDENTIFIER),
    "volume_descriptor_version" / Int8ul,
    "boot_system_identifier" / Bytes(32),
    "boot_identifier" / Bytes(32),
    "boot_catalog_pointer" / Int32ul,
    "boot_system_use" / Bytes(1973),
).compile()

# El Torito 1.0 section 2.1: the validation entry, first 32 bytes of the boot catalog.
ValidationEntry = Struct(
    "header_id" / Int8ul,  # 0x01
    "platform_id" / Int8ul,
    "reserved" / Bytes(2),
    "id_string" / Bytes(24),
    "checksum" / Int16ul,  # the 16 words of the entry sum to zero
    "key" / Bytes(2),  # 0x55 0xAA
).compile()

# El Torito 1.0 sections 2.2/2.4: initial/default and section entries (same layout).
BootEntry = Struct(
    "boot_indicator" / Int8ul,  # 0x88 bootable, 0x00 not bootable
    "boot_media_type" / Int8ul,
    "load_segment" / Int16ul,
    "system_type" / Int8ul,
    "unused" / Int8ul,
    "sector_count" / Int16ul,  # 512-byte virtual sectors
    "load_rba" / Int32ul,  # 2048-byte CD sector
    "selection_criteria" / Bytes(20),
).compile()
# El Torito 1.0 section 2.3: section header.
SectionHeader = Struct(
    "header_indicator" / Int8ul,  # 0x90 more headers follow, 0x91 final header
    "platform_id" / Int8ul,
    "number_of_section_entries" / Int16ul,
    "id_string" / Bytes(28),
).compile()
CATALOG_ENTRY_SIZE = 32


def _text(raw: bytes) -> str | None:
    # a-/d-characters padded with spaces (ECMA-119 7.4); some writers pad with NULs.
    text = raw.decode("ascii", errors="replace").rstrip(" \x00")
    return text or None


def _ucs2(raw: bytes) -> str | None:
    text = raw[: len(raw) & ~1].decode("utf-16-be", errors="replace").rstrip(" \x00")
    return text or None


def _date(raw: bytes) -> str | None:
    """ECMA-119 8.4.26.1: "YYYYMMDDHHMMSScc" and a signed offset from GMT in 15-minute units.
    All-zero digits mean "not specified"."""
    digits = raw[:16]
    if digits in (b"0" * 16, bytes(16), b" " * 16):
        return None
    if not digits.isdigit():
        return digits.decode("ascii", errors="replace")
    text = digits.decode("ascii")
    offset = int.from_bytes(raw[16:17], "little", signed=True) * 15
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset), 60)
    return (
        f"{text[0:4]}-{text[4:6]}-{text[6:8]}T{text[8:10]}:{text[10:12]}:{text[12:14]}"
        f".{text[14:16]}{sign}{hours:02d}:{minutes:02d}"
    )


# ECMA-167 2/9.1: a UDF volume without an ISO 9660 bridge starts its recognition sequence at
# sector 16 with BEA01 (oslo's ISO inspector looks for NSR02/NSR03 there; Linux for any of
# them). A qcow2 carrying one is as much a polyglot as one carrying CD001.
UDF_FIRST_IDENTIFIERS = frozenset({b"BEA01", b"NSR02", b"NSR03"})


def recognise(reader: ImageReader) -> bool:
    """A volume descriptor ("CD001") or a UDF recognition sequence at logical sector 16."""
    if reader.size < DESCRIPTORS_OFFSET + SECTOR_SIZE:
        return False
    identifier = reader.peek(DESCRIPTORS_OFFSET + 1, 5)
    return identifier == STANDARD_IDENTIFIER or identifier in UDF_FIRST_IDENTIFIERS


def probe(reader: ImageReader) -> int:
    # qemu has no ISO 9660 prober; raw_probe() claims these bytes with 1.
    return 0


class _Facts:
    """Accumulates header facts and Problems while the descriptors are walked."""

    def __init__(self) -> None:
        self.header: dict[str, Any] = {}
        self.problems: list[Problem] = []

    def problem(self, kind: ProblemKind, message: str, field: str, offset: int | None) -> None:
        self.problems.append(Problem(kind, message, field, offset))


def _both(facts: _Facts, value: Any, name: str, offset: int) -> int:
    if value.le != value.be:
        facts.problem(
            ProblemKind.INCONSISTENT,
            f"{name}: little-endian copy {value.le} and big-endian copy {value.be} differ",
            name,
            offset,
        )
    return int(value.le)


def _descriptors(reader: ImageReader) -> list[tuple[int, bytes]]:
    """(offset, sector) for each descriptor sector read, up to the terminator (and the UDF
    recognition sequence after it) or `MAX_DESCRIPTORS`."""
    sectors: list[tuple[int, bytes]] = []
    offset = DESCRIPTORS_OFFSET
    while len(sectors) < MAX_DESCRIPTORS:
        want = min(_CHUNK_SECTORS, MAX_DESCRIPTORS - len(sectors)) * SECTOR_SIZE
        chunk = reader.read_available(offset, want, field="volume_descriptor")
        whole = len(chunk) // SECTOR_SIZE
        for i in range(whole):
            sector = chunk[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
            sectors.append((offset + i * SECTOR_SIZE, sector))
            if not _continues(sectors):
                return sectors
        if whole * SECTOR_SIZE < want:
            break  # the file ends
        offset += want
    return sectors


def _continues(sectors: list[tuple[int, bytes]]) -> bool:
    """Whether the walk goes on after the last sector read."""
    _, sector = sectors[-1]
    identifier = sector[1:6]
    if identifier == STANDARD_IDENTIFIER:
        return True  # another ISO descriptor, or the terminator with a UDF sequence maybe next
    if identifier in VRS_IDENTIFIERS:
        return identifier != b"TEA01"
    # Neither: the set ended (after a terminator) or is broken; stop here.
    return False


def _el_torito(reader: ImageReader, facts: _Facts, record: Any, offset: int) -> None:
    lba = record.boot_catalog_pointer
    facts.header["boot_catalog_lba"] = lba
    catalog_offset = lba * SECTOR_SIZE
    field = "boot_catalog"
    try:
        catalog = reader.read(catalog_offset, SECTOR_SIZE, field=field)
    except ImageError as error:
        facts.problem(
            ProblemKind.TRUNCATED if isinstance(error, TruncatedImage) else ProblemKind.LIMIT,
            f"El Torito boot catalog at sector {lba}: {error.message}",
            "boot_catalog_pointer",
            offset + 71,
        )
        return
    validation = parse_struct(
        ValidationEntry, catalog[:CATALOG_ENTRY_SIZE], offset=catalog_offset, what=field
    )
    words = sum(
        int.from_bytes(catalog[i : i + 2], "little") for i in range(0, CATALOG_ENTRY_SIZE, 2)
    )
    if validation["header_id"] != 1 or validation["key"] != b"\x55\xaa" or words & 0xFFFF:
        facts.problem(
            ProblemKind.MALFORMED,
            "El Torito validation entry is not valid (header id, checksum or 0x55AA key)",
            "boot_catalog.validation_entry",
            catalog_offset,
        )
        return
    entries: list[tuple[str, bool, str, int, int]] = []
    platform = validation["platform_id"]

    def add(entry_offset: int, platform_id: int) -> None:
        entry = parse_struct(
            BootEntry,
            catalog[entry_offset : entry_offset + CATALOG_ENTRY_SIZE],
            offset=catalog_offset + entry_offset,
            what=f"{field}.entry",
        )
        entries.append(
            (
                PLATFORMS.get(platform_id, f"{platform_id:#04x}"),
                entry["boot_indicator"] == 0x88,
                MEDIA_TYPES.get(
                    entry["boot_media_type"] & 0x0F, str(entry["boot_media_type"] & 0x0F)
                ),
                entry["load_rba"],
                entry["sector_count"],
            )
        )
        if entry["load_rba"] * SECTOR_SIZE >= reader.size:
            facts.problem(
                ProblemKind.TRUNCATED,
                f"El Torito boot image at sector {entry['load_rba']} is past the end of the file",
                f"{field}.entry.load_rba",
                catalog_offset + entry_offset + 8,
            )

    add(CATALOG_ENTRY_SIZE, platform)  # the initial/default entry
    position = 2 * CATALOG_ENTRY_SIZE
    while position + CATALOG_ENTRY_SIZE <= SECTOR_SIZE:
        indicator = catalog[position]
        if indicator not in (0x90, 0x91):
            break
        section = parse_struct(
            SectionHeader,
            catalog[position : position + CATALOG_ENTRY_SIZE],
            offset=catalog_offset + position,
            what=f"{field}.section_header",
        )
        position += CATALOG_ENTRY_SIZE
        remaining = section["number_of_section_entries"]
        while remaining and position + CATALOG_ENTRY_SIZE <= SECTOR_SIZE:
            if catalog[position] in (0x88, 0x00):
                add(position, section["platform_id"])
                remaining -= 1
            elif catalog[position] != 0x44:  # 0x44: extension entry of the previous entry
                break
            position += CATALOG_ENTRY_SIZE
        if indicator == 0x91:
            break
    facts.header["el_torito_entries"] = tuple(entries)
    facts.header["el_torito_platforms"] = tuple(dict.fromkeys(entry[0] for entry in entries))


def _primary(facts: _Facts, pvd: Any, offset: int) -> None:
    header = facts.header
    blocks = _both(facts, pvd.volume_space_size, "volume_space_size", offset + 80)
    block_size = _both(facts, pvd.logical_block_size, "logical_block_size", offset + 128)
    _both(facts, pvd.volume_set_size, "volume_set_size", offset + 120)
    _both(facts, pvd.volume_sequence_number, "volume_sequence_number", offset + 124)
    _both(facts, pvd.path_table_size, "path_table_size", offset + 132)
    if pvd.volume_descriptor_version != 1:
        facts.problem(
            ProblemKind.UNSUPPORTED,
            f"primary volume descriptor version {pvd.volume_descriptor_version}",
            "volume_descriptor_version",
            offset + 6,
        )
    # ECMA-119 6.1.2: 2^(n+9), at most the sector size. Linux isofs accepts 512, 1024 and 2048.
    if block_size not in (512, 1024, 2048):
        facts.problem(
            ProblemKind.MALFORMED,
            f"logical_block_size {block_size} is not 512, 1024 or 2048",
            "logical_block_size",
            offset + 128,
        )
    header.update(
        system_identifier=_text(pvd.system_identifier),
        volume_identifier=_text(pvd.volume_identifier),
        volume_set_identifier=_text(pvd.volume_set_identifier),
        publisher_identifier=_text(pvd.publisher_identifier),
        data_preparer_identifier=_text(pvd.data_preparer_identifier),
        application_identifier=_text(pvd.application_identifier),
        volume_creation_date_and_time=_date(pvd.volume_creation_date_and_time),
        volume_modification_date_and_time=_date(pvd.volume_modification_date_and_time),
        logical_block_size=block_size,
        volume_space_blocks=blocks,
        volume_space_size=blocks * block_size,
    )


def _hybrid(reader: ImageReader) -> dict[str, Any]:
    """What the system area holds: an MBR and/or a GPT, and other non-zero bytes."""
    area = reader.read(0, SYSTEM_AREA_SIZE, field="system_area")
    has_mbr = mbr.looks_like_mbr(area[:512])
    has_gpt = area[512:520] == gpt.SIGNATURE
    structures: list[tuple[int, int]] = []
    if has_mbr or area[510:512] == mbr.BOOT_SIGNATURE:
        structures.append((0, 512))
    if has_gpt:
        structures.append((512, 1024))
        entries_lba = int.from_bytes(area[512 + 72 : 512 + 80], "little")
        count = int.from_bytes(area[512 + 80 : 512 + 84], "little")
        size = int.from_bytes(area[512 + 84 : 512 + 88], "little")
        start = min(entries_lba * 512, SYSTEM_AREA_SIZE)
        structures.append((start, min(start + count * size, SYSTEM_AREA_SIZE)))
    other = False
    position = 0
    for start, end in [*sorted(structures), (SYSTEM_AREA_SIZE, SYSTEM_AREA_SIZE)]:
        # A slice compare is a memcmp; bytes.strip() would walk the 32 KiB a byte at a time.
        if start > position and area[position:start] != _ZEROS[: start - position]:
            other = True
        position = max(position, end)
    return {
        "hybrid": "gpt" if has_gpt else "mbr" if has_mbr else None,
        "system_area_mbr": has_mbr,
        "system_area_gpt": has_gpt,
        "system_area_other_data": other,
    }


def _partition_spans(reader: ImageReader) -> list[tuple[int, int]] | None:
    """(start, end) byte ranges of the partitions the system area's MBR and GPT describe."""
    spans: list[tuple[int, int]] = []
    head = reader.head
    if mbr.looks_like_mbr(head[:512]):
        for _, os_type, start, sectors in mbr.primary_records(head[:512]):
            if not sectors:
                continue
            if os_type == mbr.TYPE_GPT_PROTECTIVE and sectors == 0xFFFFFFFF:
                spans.append((start * 512, reader.size))
            else:
                spans.append((start * 512, (start + sectors) * 512))
    if head[512:520] == gpt.SIGNATURE:
        try:
            info = gpt.inspect(reader)
        except ImageError:
            return None
        if info.header["sector_size"] != 512 or not (
            info.header["primary_valid"] or info.header["backup_valid"]
        ):
            return None
        for partition in info.header["partitions"]:
            first, last = partition[3], partition[4]
            spans.append((first * 512, (last + 1) * 512))
    return spans


def system_area_is_hybrid_boot(reader: ImageReader) -> bool:
    """Whether an ISO's system area holds an MBR and/or GPT of the shape isohybrid, xorriso
    (-isohybrid-mbr, -isohybrid-gpt-basdat, --protective-msdos-label, -append_partition) and
    grub-mkrescue write, so that ISO and partition table are one legitimate image.

    That shape: every partition lies inside the file, and at least one partition begins in the
    system area (at or before the volume descriptors at 32 KiB) and extends past it, i.e. it
    contains the ISO 9660 volume. Partitions appended after the volume (an EFI system partition)
    and partitions inside the volume (the El Torito EFI image) are fine. Boot code in the first
    440 bytes and other system-area data do not matter. A table whose partitions miss the ISO,
    or run past the end of the file, is not such an image.
    """
    if not recognise(reader):
        return False
    try:
        spans = _partition_spans(reader)
    except ImageError:
        return False
    if not spans:
        return False
    if any(end > reader.size or start >= end for start, end in spans):
        return False
    return any(start <= DESCRIPTORS_OFFSET < end for start, end in spans)


def inspect(reader: ImageReader) -> ImageInfo:
    if reader.size < DESCRIPTORS_OFFSET + SECTOR_SIZE:
        raise TruncatedImage(
            f"an ISO 9660 volume needs its descriptors at {DESCRIPTORS_OFFSET}; the file has "
            f"{reader.size} bytes",
            field="volume_descriptor",
            offset=DESCRIPTORS_OFFSET,
        )
    sectors = _descriptors(reader)
    first = sectors[0][1] if sectors else b""
    if first[1:6] in UDF_FIRST_IDENTIFIERS:
        # A UDF volume without ISO 9660 descriptors: a raw disk to qemu, named for what it is.
        sequence = tuple(
            sector[1:6].decode("ascii") for _, sector in sectors if sector[1:6] in VRS_IDENTIFIERS
        )
        return ImageInfo(
            format="raw",
            variant=NAME,
            virtual_size=qemu_length(reader),  # qemu raw: the file's length, in whole sectors
            header={"descriptors": (), "udf": sequence, "el_torito": False, "joliet_level": None},
        )
    if first[1:6] != STANDARD_IDENTIFIER:
        raise MalformedImage(
            "no ISO 9660 volume descriptor (CD001) at sector 16",
            field="volume_descriptor.standard_identifier",
            offset=DESCRIPTORS_OFFSET + 1,
        )
    facts = _Facts()
    header = facts.header
    kinds: list[str] = []
    udf: list[str] = []
    primary_seen = terminated = False
    for offset, sector in sectors:
        kind = sector[0]
        identifier = sector[1:6]
        if identifier in VRS_IDENTIFIERS:
            udf.append(identifier.decode("ascii"))
            continue
        if identifier != STANDARD_IDENTIFIER:
            if not terminated:
                facts.problem(
                    ProblemKind.MALFORMED,
                    "the volume descriptor set ends without a terminator",
                    "volume_descriptor.standard_identifier",
                    offset + 1,
                )
            break
        if terminated:
            facts.problem(
                ProblemKind.MALFORMED,
                "a volume descriptor follows the set terminator",
                "volume_descriptor_type",
                offset,
            )
            break
        kinds.append(DESCRIPTOR_NAMES.get(kind, str(kind)))
        if kind == TYPE_TERMINATOR:
            terminated = True
        elif kind == TYPE_PRIMARY:
            pvd = parse_struct(
                VolumeDescriptor, sector, offset=offset, what="primary_volume_descriptor"
            )
            if primary_seen:
                continue  # ECMA-119 6.7.1.1: the first primary descriptor describes the volume
            primary_seen = True
            _primary(facts, pvd, offset)
        elif kind == TYPE_SUPPLEMENTARY:
            svd = parse_struct(
                VolumeDescriptor, sector, offset=offset, what="supplementary_volume_descriptor"
            )
            level = JOLIET_ESCAPES.get(svd["escape_sequences"][:3])
            if level is not None and "joliet_level" not in header:
                header["joliet_level"] = level
                header["joliet_volume_identifier"] = _ucs2(svd["volume_identifier"])
            elif svd["volume_descriptor_version"] == 2:
                header["enhanced_volume_descriptor"] = True  # ISO 9660:1999
        elif kind == TYPE_BOOT_RECORD:
            record = parse_struct(BootRecord, sector, offset=offset, what="boot_record")
            system_id = record["boot_system_identifier"].rstrip(b"\x00 ")
            header.setdefault("boot_system_identifier", _text(system_id))
            if system_id == EL_TORITO_ID and "el_torito" not in header:
                header["el_torito"] = True
                _el_torito(reader, facts, record, offset)
    else:
        if not terminated:
            facts.problem(
                ProblemKind.LIMIT if len(sectors) >= MAX_DESCRIPTORS else ProblemKind.TRUNCATED,
                f"no volume descriptor set terminator in the first {len(sectors)} descriptors",
                "volume_descriptor_type",
                DESCRIPTORS_OFFSET,
            )
    if not primary_seen:
        facts.problem(
            ProblemKind.MALFORMED,
            "the volume descriptor set has no primary volume descriptor",
            "volume_descriptor_type",
            DESCRIPTORS_OFFSET,
        )
    header["descriptors"] = tuple(kinds)
    header["udf"] = tuple(udf)
    header.setdefault("el_torito", False)
    header.setdefault("joliet_level", None)
    size = header.get("volume_space_size")
    if size is not None and size > reader.size:
        facts.problem(
            ProblemKind.TRUNCATED,
            f"the volume is {size} bytes (volume_space_size) but the file has {reader.size}",
            "volume_space_size",
            DESCRIPTORS_OFFSET + 80,
        )
    try:
        header.update(_hybrid(reader))
    except ImageError as error:  # pragma: no cover - the file is longer than 32 KiB here
        facts.problem(ProblemKind.TRUNCATED, error.message, "system_area", 0)
    header["hybrid_boot"] = header.get("hybrid") is not None and system_area_is_hybrid_boot(reader)
    return ImageInfo(
        format="raw",
        variant=NAME,
        virtual_size=qemu_length(reader),  # qemu raw: the file's length, in whole sectors
        problems=tuple(facts.problems),
        header=header,
    )


DRIVER = FormatDriver(name=NAME, probe=probe, inspect=inspect, recognise=recognise, raw_layout=True)
