"""mbr: a DOS (MBR) partition table at the start of a raw disk.

qemu has no prober for partition tables: `raw_probe()` (`block/raw-format.c`) claims these bytes
with score 1 and `qemu-img info` reports `raw` with the file size as the virtual size. imgguard
reads the table to report the partitions as facts of the raw image (`variant="mbr"`).

Layout (the IBM PC MBR as util-linux, Linux `block/partitions/msdos.c` and the UEFI spec 5.2.1
describe it): 440 bytes of boot code, a 4-byte disk signature, 2 reserved bytes, four 16-byte
partition entries at offset 446 and the boot signature 0x55 0xAA at offset 510. LBAs count
512-byte sectors (a raw image file has no other sector size to go by).

Logical partitions live in a chain of extended boot records (EBRs) that starts at the extended
partition (type 0x05, 0x0F or 0x85): each EBR's first entry is a logical partition (start relative
to the EBR), its second entry links to the next EBR (start relative to the extended partition).
The chain is followed for at most `MAX_LOGICAL` links, and a link that points back is a Problem.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

from imgguard.errors import ImageError, TruncatedImage
from imgguard.formats._common import qemu_length
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo, Problem, ProblemKind
from imgguard.reader import ImageReader, parse_struct

NAME = "mbr"

SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"
PARTITION_TABLE_OFFSET = 446
ENTRY_SIZE = 16

# Partition types with a meaning to this module (the rest are reported as numbers).
TYPE_EMPTY = 0x00
TYPE_GPT_PROTECTIVE = 0xEE  # UEFI spec 5.2.3: the disk holds a GPT; see gpt.py
TYPE_EFI_SYSTEM = 0xEF
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})  # DOS, Win95 LBA and Linux extended

# Logical partitions followed through the EBR chain. Linux stops at its minor-number limit (256
# partitions per disk); no real disk has more than a few dozen.
MAX_LOGICAL = 128

# Overlapping pairs reported (n partitions can make n^2 / 2 of them).
MAX_OVERLAPS_REPORTED = 16

_LBA_LIMIT = 1 << 32  # start and count are 32-bit sector numbers

# One partition entry (UEFI spec table 5-2, "Legacy MBR Partition Record").
PartitionRecord = Struct(
    "boot_indicator" / Int8ul,  # 0x80 = active ("bootable"), 0x00 = inactive; nothing else
    "starting_chs" / Bytes(3),  # cylinder/head/sector, obsolete since LBA; not checked
    "os_type" / Int8ul,  # the partition type byte
    "ending_chs" / Bytes(3),
    "starting_lba" / Int32ul,
    "size_in_lba" / Int32ul,
)

# The whole sector (UEFI spec table 5-1, "Legacy MBR").
MasterBootRecord = Struct(
    "boot_code" / Bytes(440),
    "unique_mbr_disk_signature" / Int32ul,
    "unknown" / Int16ul,  # 0x5A5A marks a copy-protected disk on some old systems
    "partition_record" / Array(4, PartitionRecord),
    "signature" / Const(BOOT_SIGNATURE),
).compile()
MBR_SIZE = 512

# Fast view of the four records for `recognise` (no construct parse in the hot path):
# boot_indicator, os_type, starting_lba, size_in_lba.
_RECORD = struct.Struct("<B3xB3xII")


class Partition(NamedTuple):
    """One partition as reported in `header["partitions"]` (1-based index, as Linux numbers them:
    primaries 1-4, logical partitions from 5)."""

    number: int
    type: int
    start_lba: int
    sectors: int
    bootable: bool


def primary_records(sector: bytes) -> tuple[tuple[int, int, int, int], ...]:
    """The four (boot_indicator, os_type, starting_lba, size_in_lba) records of an MBR sector."""
    return tuple(
        _RECORD.unpack_from(sector, PARTITION_TABLE_OFFSET + ENTRY_SIZE * i) for i in range(4)
    )


def looks_like_fat_boot_sector(sector: bytes) -> bool:
    """True when `sector` is a FAT, exFAT or NTFS volume boot record rather than an MBR.

    Such boot sectors end in 0x55AA too. libblkid (`partitions/dos.c`) rejects them before it
    looks at the table (`blkid_probe_is_vfat`, `blkid_probe_is_exfat`; Linux `msdos.c` does a
    similar FAT test): a jump instruction and a plausible BIOS parameter block.
    """
    if len(sector) < 512:
        return False
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    if not (sector[0] == 0xEB and sector[2] == 0x90) and sector[0] != 0xE9:
        return False
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    sectors_per_cluster = sector[13]
    reserved_sectors = int.from_bytes(sector[14:16], "little")
    fats = sector[16]
    media = sector[21]
    return (
        bytes_per_sector in (512, 1024, 2048, 4096)
        and sectors_per_cluster != 0
        and sectors_per_cluster & (sectors_per_cluster - 1) == 0
        and reserved_sectors != 0
        and fats in (1, 2)
        and (media == 0xF0 or media >= 0xF8)
    )


def looks_like_mbr(sector: bytes) -> bool:
    """Whether a 512-byte sector is a DOS partition table.

    0x55AA alone is far too weak (FAT/NTFS boot sectors and many other headers end in it), so,
    like libblkid and Linux: every boot indicator must be 0x00 or 0x80, at least one record must
    describe sectors, no record may run past the 32-bit LBA space (except a GPT protective
    record, whose size 0xFFFFFFFF means "the rest of the disk"), and the sector must not be a FAT,
    exFAT or NTFS boot sector.
    """
    if len(sector) < MBR_SIZE or sector[510:512] != BOOT_SIGNATURE:
        return False
    used = 0
    for boot_indicator, os_type, start, sectors in primary_records(sector):
        if boot_indicator not in (0x00, 0x80):
            return False
        if sectors == 0:
            continue  # unused, whatever its type byte says (Linux msdos.c)
        if os_type != TYPE_GPT_PROTECTIVE and start + sectors > _LBA_LIMIT:
            return False
        used += 1
    return used > 0 and not looks_like_fat_boot_sector(sector)


def recognise(reader: ImageReader) -> bool:
    return looks_like_mbr(reader.head[:MBR_SIZE])


def probe(reader: ImageReader) -> int:
    # qemu has no partition-table prober; raw_probe() claims these bytes with 1.
    return 0


def _partition_problems(
    partition: Partition, file_sectors: int, field: str, offset: int | None
) -> list[Problem]:
    problems: list[Problem] = []
    end = partition.start_lba + partition.sectors
    if partition.type == TYPE_GPT_PROTECTIVE and partition.sectors == 0xFFFFFFFF:
        return problems  # "the whole disk, however large" (UEFI spec 5.2.3)
    if end > _LBA_LIMIT:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                f"partition {partition.number} ends at sector {end}, past the 32-bit LBA space",
                field=field,
                offset=offset,
            )
        )
    if end > file_sectors:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"partition {partition.number} (sectors {partition.start_lba}..{end - 1}) ends "
                f"past the end of the file ({file_sectors} sectors)",
                field=field,
                offset=offset,
            )
        )
    return problems


def _walk_extended(
    reader: ImageReader, extended: Partition, next_index: int, budget: int
) -> tuple[list[Partition], list[Problem]]:
    """Follow one EBR chain (Linux `parse_extended()`), at most `budget` links."""
    partitions: list[Partition] = []
    problems: list[Problem] = []
    ebr_lba = extended.start_lba
    seen: set[int] = set()
    while True:
        offset = ebr_lba * SECTOR_SIZE
        field = f"extended_boot_record[{len(seen)}]"
        if ebr_lba in seen:
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"the EBR chain loops back to sector {ebr_lba}",
                    field=field,
                    offset=offset,
                )
            )
            break
        if len(seen) >= budget:
            problems.append(
                Problem(
                    ProblemKind.LIMIT,
                    f"more than {MAX_LOGICAL} logical partitions; the rest are not read",
                    field=field,
                    offset=offset,
                )
            )
            break
        seen.add(ebr_lba)
        try:
            sector = reader.read(offset, MBR_SIZE, field=field)
        except ImageError as error:
            kind = ProblemKind.TRUNCATED if isinstance(error, TruncatedImage) else ProblemKind.LIMIT
            problems.append(Problem(kind, f"cannot read EBR: {error.message}", field, offset))
            break
        if sector[510:512] != BOOT_SIGNATURE:
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    "extended boot record has no 0x55AA signature",
                    field=f"{field}.signature",
                    offset=offset + 510,
                )
            )
            break
        records = primary_records(sector)
        boot_indicator, os_type, start, sectors = records[0]
        if sectors:
            logical = Partition(
                next_index + len(partitions),
                os_type,
                ebr_lba + start,
                sectors,
                boot_indicator == 0x80,
            )
            partitions.append(logical)
            if boot_indicator not in (0x00, 0x80):
                problems.append(
                    Problem(
                        ProblemKind.MALFORMED,
                        f"logical partition {logical.number} has boot indicator "
                        f"{boot_indicator:#04x}",
                        field=f"{field}.partition_record[0].boot_indicator",
                        offset=offset + PARTITION_TABLE_OFFSET,
                    )
                )
            if start + sectors > _LBA_LIMIT - ebr_lba:
                problems.append(
                    Problem(
                        ProblemKind.MALFORMED,
                        f"logical partition {logical.number} runs past the 32-bit LBA space",
                        field=f"{field}.partition_record[0]",
                        offset=offset + PARTITION_TABLE_OFFSET,
                    )
                )
        _, link_type, link_start, link_sectors = records[1]
        if link_type not in EXTENDED_TYPES or link_sectors == 0:
            break
        ebr_lba = extended.start_lba + link_start
    return partitions, problems


def _overlaps(partitions: list[Partition]) -> tuple[tuple[int, int], ...]:
    spans = sorted(
        (p.start_lba, p.start_lba + p.sectors, p.number)
        for p in partitions
        if p.sectors and p.type not in EXTENDED_TYPES
    )
    found: list[tuple[int, int]] = []
    for i, (_start, end, index) in enumerate(spans):
        for other_start, _other_end, other in spans[i + 1 :]:
            if other_start >= end or len(found) >= MAX_OVERLAPS_REPORTED:
                break
            found.append((min(index, other), max(index, other)))
    return tuple(sorted(found))


def inspect(reader: ImageReader) -> ImageInfo:
    if reader.size < MBR_SIZE:
        raise TruncatedImage(
            f"an MBR needs {MBR_SIZE} bytes, the file has {reader.size}", field="mbr", offset=0
        )
    sector = reader.head[:MBR_SIZE]
    mbr = parse_struct(MasterBootRecord, sector, offset=0, what="mbr")
    file_sectors = reader.size // SECTOR_SIZE
    problems: list[Problem] = []
    partitions: list[Partition] = []
    extended: list[Partition] = []
    for i, record in enumerate(mbr["partition_record"]):
        field = f"partition_record[{i}]"
        offset = PARTITION_TABLE_OFFSET + ENTRY_SIZE * i
        if record["boot_indicator"] not in (0x00, 0x80):
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"boot indicator {record['boot_indicator']:#04x} is neither 0x00 nor 0x80",
                    field=f"{field}.boot_indicator",
                    offset=offset,
                )
            )
        # Linux (msdos.c) skips a record whose size is 0 whatever its type; a record with a
        # size and type 0x00 is still a partition to Linux (isohybrid --uefi writes one).
        if record["size_in_lba"] == 0:
            continue
        partition = Partition(
            i + 1,
            record["os_type"],
            record["starting_lba"],
            record["size_in_lba"],
            record["boot_indicator"] == 0x80,
        )
        partitions.append(partition)
        problems += _partition_problems(partition, file_sectors, field, offset)
        if record["os_type"] in EXTENDED_TYPES:
            extended.append(partition)

    logical: list[Partition] = []
    for partition in extended:
        found, chain_problems = _walk_extended(
            reader, partition, 5 + len(logical), MAX_LOGICAL - len(logical)
        )
        logical += found
        problems += chain_problems
    for partition in logical:
        problems += _partition_problems(
            partition, file_sectors, f"logical_partition[{partition.number}]", None
        )

    everything = partitions + logical
    overlaps = _overlaps(everything)
    for first, second in overlaps:
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                f"partitions {first} and {second} overlap",
                field="partition_record",
                offset=PARTITION_TABLE_OFFSET,
            )
        )
    if not everything:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                "the partition table describes no partition",
                field="partition_record",
                offset=PARTITION_TABLE_OFFSET,
            )
        )
    header = {
        "unique_mbr_disk_signature": mbr["unique_mbr_disk_signature"],
        "boot_code": any(mbr["boot_code"]),
        "partitions": tuple(tuple(p) for p in everything),
        "extended": bool(extended),
        "protective": any(p.type == TYPE_GPT_PROTECTIVE for p in partitions),
        "overlaps": overlaps,
        "sector_size": SECTOR_SIZE,
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
    recognise_signatures=((510, (BOOT_SIGNATURE,)),),
)
