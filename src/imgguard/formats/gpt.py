"""gpt: a GUID Partition Table inside a raw disk (UEFI spec 2.10, chapter 5.3).

qemu has no prober for partition tables: `raw_probe()` (`block/raw-format.c`) claims these bytes
with score 1 and `qemu-img info` reports `raw` with the file size as the virtual size. imgguard
reads the GPT to report the partitions as facts of the raw image (`variant="gpt"`).

What is read:
- LBA 0: the protective MBR (UEFI 5.2.3), a 0xEE record; a "hybrid" MBR has other records too.
- LBA 1: the primary GPT header (92 bytes used, `header_size` up to one sector), for 512-byte
  sectors at offset 512, for 4096-byte sectors at offset 4096 (tried when LBA 0 has a 0xEE record).
- The partition entry array at `partition_entry_lba`, `number_of_partition_entries` entries of
  `size_of_partition_entry` bytes, read only when the array is at most `MAX_ARRAY_BYTES`.
- The backup header at `alternate_lba` (the last LBA) and its own entry array.

Checks are those of UEFI 5.3.2 ("GPT header validity": signature, header CRC32, my_lba,
partition array CRC32) and Linux `block/partitions/efi.c` `is_gpt_valid()` (header_size, usable
range within the disk, entry size), each failure reported as a Problem. Partitions are reported
from the primary header when it is valid, otherwise from the backup (as firmware recovers).
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from imgguard.errors import ImageError, MalformedImage, TruncatedImage
from imgguard.formats import mbr
from imgguard.formats._common import qemu_length, uuid_text_le
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo, Problem, ProblemKind
from imgguard.reader import ImageReader, parse_struct

NAME = "gpt"

SIGNATURE = b"EFI PART"
SECTOR_SIZES = (512, 4096)
REVISION_1_0 = 0x00010000
MIN_HEADER_SIZE = 92

# Caps on what a header may make imgguard read. UEFI requires at least 16 KiB of entries
# (128 x 128 bytes); Linux allocates count*size in one piece. 1024 entries of 128 bytes (or fewer,
# larger entries) is far beyond any partitioning tool's output.
MAX_ENTRIES = 1024
MAX_ENTRY_SIZE = 4096
MAX_ARRAY_BYTES = 128 * 1024
# Overlapping pairs reported (n partitions can make n^2 / 2 of them).
MAX_OVERLAPS_REPORTED = 16

# UEFI table 5-5, "GPT Header".
GptHeader = Struct(
    "signature" / Const(SIGNATURE),
    "revision" / Int32ul,  # 0x00010000 for every GPT so far
    "header_size" / Int32ul,  # 92 .. logical block size
    "header_crc32" / Int32ul,  # CRC32 of header_size bytes with this field zeroed
    "reserved" / Int32ul,  # must be zero
    "my_lba" / Int64ul,  # the LBA that holds this header
    "alternate_lba" / Int64ul,  # the other header (the backup: the last LBA of the disk)
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "partition_entry_lba" / Int64ul,
    "number_of_partition_entries" / Int32ul,
    "size_of_partition_entry" / Int32ul,  # 128 x 2^n
    "partition_entry_array_crc32" / Int32ul,
).compile()
HEADER_STRUCT_SIZE = 92
_CRC_OFFSET = 16

# UEFI table 5-6, "GPT Partition Entry".
GptPartitionEntry = Struct(
    "partition_type_guid" / Bytes(16),  # all zero = unused entry
    "unique_partition_guid" / Bytes(16),
    "starting_lba" / Int64ul,
    "ending_lba" / Int64ul,  # inclusive
    "attributes" / Int64ul,
    "partition_name" / Bytes(72),  # UTF-16LE, NUL-terminated, 36 code units
).compile()
ENTRY_STRUCT_SIZE = 128
_UNUSED_GUID = bytes(16)

# A few well-known partition types, for readable reports.
KNOWN_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
    "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS+",
    "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple APFS",
}


class GptPartition(NamedTuple):
    """One used entry, as reported in `header["partitions"]` (1-based index, as Linux numbers)."""

    number: int
    type_guid: str
    unique_guid: str
    first_lba: int
    last_lba: int
    attributes: int
    name: str


class _Header(NamedTuple):
    fields: Any
    lba: int
    valid: bool
    problems: list[Problem]


def _guid(raw: bytes) -> str:
    # GUIDs are stored mixed-endian (UEFI appendix A): the first three fields little endian.
    return uuid_text_le(raw)


def _name(raw: bytes) -> str:
    text = raw.decode("utf-16-le", errors="replace")
    return text.split("\x00", 1)[0]


def _has_protective_record(sector: bytes) -> bool:
    if len(sector) < 512 or sector[510:512] != mbr.BOOT_SIGNATURE:
        return False
    return any(
        os_type == mbr.TYPE_GPT_PROTECTIVE for _, os_type, _, _ in mbr.primary_records(sector)
    )


def find_sector_size(reader: ImageReader) -> tuple[int, bool] | None:
    """(sector size, primary header found) for the first GPT signature found, else None.

    The primary header is at LBA 1: offset 512, or 4096 on a 4Kn disk. The 4096 case costs a read
    beyond `reader.head`, so it is only tried when LBA 0 has a protective (0xEE) record. When no
    primary signature is there but the MBR is protective, the backup at the last LBA is tried.
    """
    head = reader.head
    if head[512:520] == SIGNATURE:
        return 512, True
    if not _has_protective_record(head[:512]):
        return None
    if reader.size >= 4096 + HEADER_STRUCT_SIZE and (
        reader.read(4096, len(SIGNATURE), field="gpt_header.signature") == SIGNATURE
    ):
        return 4096, True
    for sector_size in SECTOR_SIZES:
        last = reader.size // sector_size - 1
        if last < 2:
            continue
        offset = last * sector_size
        if reader.read(offset, len(SIGNATURE), field="backup_gpt_header.signature") == SIGNATURE:
            return sector_size, False
    return None


def recognise(reader: ImageReader) -> bool:
    try:
        return find_sector_size(reader) is not None
    except ImageError:
        return False


def probe(reader: ImageReader) -> int:
    # qemu has no partition-table prober; raw_probe() claims these bytes with 1.
    return 0


def _read_header(
    reader: ImageReader, lba: int, sector_size: int, which: str, last_lba: int
) -> _Header | None:
    """Parse and check the header at `lba`; None when there is no header signature there."""
    offset = lba * sector_size
    if offset + sector_size > reader.size:
        return None
    raw = reader.read(offset, sector_size, field=which)
    if raw[:8] != SIGNATURE:
        return None
    fields = parse_struct(GptHeader, raw[:HEADER_STRUCT_SIZE], offset=offset, what=which)
    problems: list[Problem] = []
    valid = True

    def problem(kind: ProblemKind, message: str, name: str, at: int) -> None:
        problems.append(Problem(kind, f"{which}: {message}", f"{which}.{name}", offset + at))

    if fields["revision"] != REVISION_1_0:
        problem(ProblemKind.UNSUPPORTED, f"revision {fields['revision']:#010x}", "revision", 8)
    if not MIN_HEADER_SIZE <= fields["header_size"] <= sector_size:
        problem(
            ProblemKind.MALFORMED,
            f"header_size {fields['header_size']} is outside {MIN_HEADER_SIZE}..{sector_size}",
            "header_size",
            12,
        )
        valid = False
    else:
        covered = bytearray(raw[: fields["header_size"]])
        covered[_CRC_OFFSET : _CRC_OFFSET + 4] = bytes(4)
        crc = zlib.crc32(covered)
        if crc != fields["header_crc32"]:
            problem(
                ProblemKind.MALFORMED,
                f"header CRC32 is {fields['header_crc32']:#010x}, the header sums to {crc:#010x}",
                "header_crc32",
                16,
            )
            valid = False
    if fields["reserved"] != 0:
        problem(ProblemKind.MALFORMED, "reserved field is not zero", "reserved", 20)
    if fields["my_lba"] != lba:
        problem(
            ProblemKind.INCONSISTENT,
            f"my_lba is {fields['my_lba']} but the header is at LBA {lba}",
            "my_lba",
            24,
        )
        valid = False
    if fields["first_usable_lba"] > fields["last_usable_lba"]:
        problem(
            ProblemKind.MALFORMED,
            f"first_usable_lba {fields['first_usable_lba']} is after last_usable_lba "
            f"{fields['last_usable_lba']}",
            "first_usable_lba",
            40,
        )
    elif fields["last_usable_lba"] > last_lba:
        problem(
            ProblemKind.TRUNCATED,
            f"last_usable_lba {fields['last_usable_lba']} is past the end of the file "
            f"(last LBA {last_lba})",
            "last_usable_lba",
            48,
        )
    entry_size = fields["size_of_partition_entry"]
    if (
        entry_size < ENTRY_STRUCT_SIZE
        or entry_size % ENTRY_STRUCT_SIZE
        or (entry_size // ENTRY_STRUCT_SIZE) & (entry_size // ENTRY_STRUCT_SIZE - 1)
    ):
        problem(
            ProblemKind.MALFORMED,
            f"size_of_partition_entry {entry_size} is not 128 x 2^n",
            "size_of_partition_entry",
            84,
        )
        valid = False
    return _Header(fields, lba, valid, problems)


def _read_array(
    reader: ImageReader, header: _Header, sector_size: int, which: str
) -> tuple[bytes | None, list[Problem]]:
    """A header's partition entry array and the Problems with it (CRC mismatch), or None when it
    cannot be read (over the cap, past the end of the file, or an invalid entry size)."""
    fields = header.fields
    count = fields.number_of_partition_entries
    size = fields.size_of_partition_entry
    field = f"{which}.partition_entry_lba"
    offset = fields.partition_entry_lba * sector_size
    if size < ENTRY_STRUCT_SIZE:
        return None, []  # already a Problem of the header (size_of_partition_entry)
    if count > MAX_ENTRIES or size > MAX_ENTRY_SIZE or count * size > MAX_ARRAY_BYTES:
        return None, [
            Problem(
                ProblemKind.LIMIT,
                f"{which}: {count} entries of {size} bytes is over the cap of "
                f"{MAX_ARRAY_BYTES} bytes; the partition array is not read",
                f"{which}.number_of_partition_entries",
                header.lba * sector_size + 80,
            )
        ]
    try:
        array = reader.read(offset, count * size, field=field)
    except ImageError as error:
        kind = ProblemKind.TRUNCATED if isinstance(error, TruncatedImage) else ProblemKind.LIMIT
        return None, [Problem(kind, f"{which}: partition array: {error.message}", field, offset)]
    crc = zlib.crc32(array)
    if crc != fields.partition_entry_array_crc32:
        return array, [
            Problem(
                ProblemKind.MALFORMED,
                f"{which}: partition_entry_array_crc32 is "
                f"{fields.partition_entry_array_crc32:#010x}, the array sums to {crc:#010x}",
                f"{which}.partition_entry_array_crc32",
                header.lba * sector_size + 88,
            )
        ]
    return array, []


def _parse_entries(array: bytes, size: int, offset: int, which: str) -> list[GptPartition]:
    """The used entries (non-zero type GUID) of an array of `size`-byte entries at `offset`."""
    partitions = []
    count = len(array) // size
    # Most of the array is unused entries: skip all-zero runs of 16 entries with one compare.
    block = 16 * size
    zero_block = bytes(block)
    i = 0
    while i < count:
        start = i * size
        if i % 16 == 0 and array[start : start + block] == zero_block:
            i += 16
            continue
        i += 1
        if array[start : start + 16] == _UNUSED_GUID:
            continue
        entry = parse_struct(
            GptPartitionEntry,
            array[start : start + ENTRY_STRUCT_SIZE],
            offset=offset + start,
            what=f"{which}.partition_entry[{i - 1}]",
        )
        partitions.append(
            GptPartition(
                i,
                _guid(entry["partition_type_guid"]),
                _guid(entry["unique_partition_guid"]),
                entry["starting_lba"],
                entry["ending_lba"],
                entry["attributes"],
                _name(entry["partition_name"]),
            )
        )
    return partitions


def _partition_problems(
    partitions: list[GptPartition], fields: Any, last_lba: int, entries_offset: int, size: int
) -> list[Problem]:
    problems = []
    for p in partitions:
        field = f"partition_entry[{p.number - 1}]"
        offset = entries_offset + (p.number - 1) * size
        found: list[tuple[ProblemKind, str]] = []
        if p.first_lba > p.last_lba:
            found.append(
                (
                    ProblemKind.MALFORMED,
                    f"starting_lba {p.first_lba} is after ending_lba {p.last_lba}",
                )
            )
        else:
            if p.first_lba < fields.first_usable_lba or p.last_lba > fields.last_usable_lba:
                found.append(
                    (
                        ProblemKind.INCONSISTENT,
                        f"LBAs {p.first_lba}..{p.last_lba} are outside the usable range "
                        f"{fields.first_usable_lba}..{fields.last_usable_lba}",
                    )
                )
            if p.last_lba > last_lba:
                found.append(
                    (
                        ProblemKind.TRUNCATED,
                        f"ends at LBA {p.last_lba}, past the end of the file (last LBA {last_lba})",
                    )
                )
        problems += [
            Problem(kind, f"partition {p.number}: {message}", field, offset)
            for kind, message in found
        ]
    spans = sorted(
        (p.first_lba, p.last_lba, p.number) for p in partitions if p.first_lba <= p.last_lba
    )
    overlaps = 0
    for i, (_first, last, index) in enumerate(spans):
        for other_first, _other_last, other in spans[i + 1 :]:
            if other_first > last or overlaps >= MAX_OVERLAPS_REPORTED:
                break
            overlaps += 1
            problems.append(
                Problem(
                    ProblemKind.INCONSISTENT,
                    f"partitions {min(index, other)} and {max(index, other)} overlap",
                    "partition_entry",
                    entries_offset,
                )
            )
    return problems


def _compare(primary: _Header, backup: _Header, sector_size: int) -> list[Problem]:
    """The backup must mirror the primary (UEFI 5.3.2): same disk, same array, LBAs swapped."""
    problems = []
    offset = backup.lba * sector_size
    for name, at in (
        ("disk_guid", 56),
        ("first_usable_lba", 40),
        ("last_usable_lba", 48),
        ("number_of_partition_entries", 80),
        ("size_of_partition_entry", 84),
        ("partition_entry_array_crc32", 88),
    ):
        if getattr(primary.fields, name) != getattr(backup.fields, name):
            problems.append(
                Problem(
                    ProblemKind.INCONSISTENT,
                    f"backup {name} differs from the primary header's",
                    f"backup_gpt_header.{name}",
                    offset + at,
                )
            )
    if backup.fields.alternate_lba != primary.lba:
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                f"backup alternate_lba is {backup.fields.alternate_lba}, not {primary.lba}",
                "backup_gpt_header.alternate_lba",
                offset + 32,
            )
        )
    return problems


def _protective_mbr(sector: bytes) -> str:
    """ "protective" (only a 0xEE record), "hybrid" (0xEE and others), "none" (an MBR without
    0xEE, as isohybrid --uefi writes) or "missing" (no 0x55AA at all)."""
    if sector[510:512] != mbr.BOOT_SIGNATURE:
        return "missing"
    types = [os_type for _, os_type, _, sectors in mbr.primary_records(sector) if sectors]
    if mbr.TYPE_GPT_PROTECTIVE not in types:
        return "none"
    return "protective" if len(types) == 1 else "hybrid"


def inspect(reader: ImageReader) -> ImageInfo:
    found = find_sector_size(reader)
    if found is None:
        raise MalformedImage(
            "no GPT header signature at LBA 1 or at the last LBA", field="gpt_header", offset=512
        )
    sector_size, _ = found
    last_lba = reader.size // sector_size - 1
    problems: list[Problem] = []

    pmbr = _protective_mbr(reader.head[:512])
    if pmbr in ("none", "missing"):
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                "LBA 0 has no protective MBR (0xEE) record: Linux ignores such a GPT unless "
                "booted with gpt",
                "protective_mbr",
                mbr.PARTITION_TABLE_OFFSET,
            )
        )

    primary = _read_header(reader, 1, sector_size, "gpt_header", last_lba)
    if primary is None:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                "no primary GPT header at LBA 1",
                "gpt_header.signature",
                sector_size,
            )
        )
    else:
        problems += primary.problems

    # The backup is where the primary says; without a valid primary, at the last LBA.
    expected_backup = last_lba
    # A backup before the last LBA is what growing a disk image (`qemu-img resize`, `truncate`,
    # Azure's 1 MiB size rounding) leaves behind: judged once the backup has been read.
    moved_backup: Problem | None = None
    if primary is not None and primary.valid:
        expected_backup = primary.fields.alternate_lba
        if expected_backup != last_lba:
            moved_backup = Problem(
                ProblemKind.INCONSISTENT,
                f"alternate_lba is {expected_backup}, but the last LBA of the file is {last_lba}",
                "gpt_header.alternate_lba",
                sector_size + 32,
            )
    backup: _Header | None = None
    mirrored = False
    if expected_backup > last_lba:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"the backup GPT header at LBA {expected_backup} is past the end of the file",
                "gpt_header.alternate_lba",
                sector_size + 32,
            )
        )
    elif expected_backup <= 1:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                f"the backup GPT header would be at LBA {expected_backup}, not after the primary",
                "gpt_header.alternate_lba",
                sector_size + 32,
            )
        )
    else:
        backup = _read_header(reader, expected_backup, sector_size, "backup_gpt_header", last_lba)
        if backup is None:
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"no backup GPT header at LBA {expected_backup}",
                    "backup_gpt_header.signature",
                    expected_backup * sector_size,
                )
            )
        else:
            problems += backup.problems
            if primary is not None:
                differences = _compare(primary, backup, sector_size)
                problems += differences
                mirrored = not differences and not backup.problems

    if primary is None and backup is None:
        raise TruncatedImage(
            "no GPT header can be read: the file ends inside the primary header and has no backup",
            field="gpt_header",
            offset=sector_size,
        )

    # UEFI 5.3.2: a header is good when it and its array check out; the partitions come from
    # the primary when it is good, else from the backup, else from whatever header there is.
    arrays: dict[str, bytes | None] = {}
    good: dict[str, bool] = {}
    for table, which in ((primary, "gpt_header"), (backup, "backup_gpt_header")):
        good[which] = False
        if table is None or not table.valid:
            continue
        array, array_problems = _read_array(reader, table, sector_size, which)
        problems += array_problems
        arrays[which] = array
        good[which] = array is not None and not array_problems
    # A grown disk (backup inside the file, intact and mirroring a good primary) is an ordinary
    # image: Linux and UEFI read it and fix the backup's place on the first write.
    grown = (
        moved_backup is not None
        and expected_backup < last_lba
        and mirrored
        and good["gpt_header"]
        and good["backup_gpt_header"]
    )
    if moved_backup is not None and not grown:
        problems.append(moved_backup)
    candidates = [
        (table, which)
        for table, which in ((primary, "gpt_header"), (backup, "backup_gpt_header"))
        if table is not None
    ]
    chosen, chosen_name = min(
        candidates, key=lambda pair: (not good[pair[1]], not pair[0].valid)
    )  # stable: the primary wins ties
    if chosen_name not in arrays:
        # No valid header: still show what the array holds; the problems say why.
        arrays[chosen_name], _ = _read_array(reader, chosen, sector_size, chosen_name)
    array = arrays[chosen_name]
    entries_offset = chosen.fields.partition_entry_lba * sector_size
    partitions = (
        []
        if array is None
        else _parse_entries(
            array, chosen.fields.size_of_partition_entry, entries_offset, chosen_name
        )
    )
    problems += _partition_problems(
        partitions,
        chosen.fields,
        last_lba,
        entries_offset,
        chosen.fields.size_of_partition_entry,
    )

    fields = chosen.fields
    header = {
        "sector_size": sector_size,
        "protective_mbr": pmbr,
        "revision": fields.revision,
        "header_size": fields.header_size,
        "my_lba": fields.my_lba,
        "alternate_lba": fields.alternate_lba,
        "first_usable_lba": fields.first_usable_lba,
        "last_usable_lba": fields.last_usable_lba,
        "disk_guid": _guid(fields.disk_guid),
        "partition_entry_lba": fields.partition_entry_lba,
        "number_of_partition_entries": fields.number_of_partition_entries,
        "size_of_partition_entry": fields.size_of_partition_entry,
        "partition_entry_array_crc32": fields.partition_entry_array_crc32,
        "header_used": chosen_name,
        "primary_valid": good["gpt_header"],
        "backup_valid": good["backup_gpt_header"],
        "grown": grown,
        "partitions": tuple(tuple(p) for p in partitions),
        "partition_types": tuple(KNOWN_TYPES.get(p.type_guid) for p in partitions),
    }
    return ImageInfo(
        format="raw",
        variant=NAME,
        virtual_size=qemu_length(reader),  # qemu raw: the file's length, in whole sectors
        problems=tuple(problems),
        header=header,
    )


DRIVER = FormatDriver(
    name=NAME,
    probe=probe,
    inspect=inspect,
    recognise=recognise,
    raw_layout=True,
    # A primary header at LBA 1 of a 512-byte-sector disk, or else a protective MBR.
    recognise_signatures=((512, (SIGNATURE,)), (510, (mbr.BOOT_SIGNATURE,))),
)
