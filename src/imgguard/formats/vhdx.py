"""vhdx: Hyper-V VHDX images (`block/vhdx.c`, `block/vhdx.h`, `block/vhdx-log.c`, MS-VHDX 1.0).

What is read, as qemu 7.2's `vhdx_open()` reads it, and no more:

* the file identifier at offset 0 ("vhdxfile" and the creator, from `reader.head`);
* the two 4 KiB headers at 64 KiB and 128 KiB (`vhdx_parse_header()`), CRC-32C checked;
* 64 bytes at the current header's `log_offset` when its `log_guid` is set, to see whether a
  log entry starts there (qemu would search the log and replay it);
* the 64 KiB region table at 192 KiB (`vhdx_open_region_tables()`; qemu never reads the copy at
  256 KiB), whose CRC-32C covers all 64 KiB;
* the metadata table header and its entries (32 bytes each) at the metadata region, and the
  metadata items qemu reads (file parameters, virtual disk size, logical and physical sector
  size) plus the page 83 data and the parent locator;
* the BAT, only when the entries qemu checks fit in `BAT_SCAN_LIMIT` bytes, to repeat
  `vhdx_check_bat_entries()`.

qemu 7.2 does not implement differencing VHDX: an image with a parent locator metadata item, or
with `has_parent` set, is refused. imgguard still reports the parent locator's paths.
"""

from __future__ import annotations

import array
import functools
import struct as _struct
import sys
import uuid
from collections.abc import Callable
from typing import Any

from construct import Bytes, Const, Int16ul, Int32ul, Int64ul, Struct

from imgguard.errors import ImageError, MalformedImage
from imgguard.formats._common import uuid_text_le
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo, Problem, ProblemKind, Reference, ReferenceKind, Table
from imgguard.reader import ImageReader, parse_struct

NAME = "vhdx"

SIGNATURE = b"vhdxfile"
KiB = 1024
MiB = 1024 * KiB

# vhdx.h: the 1 MiB header section.
HEADER1_OFFSET = 64 * KiB  # VHDX_HEADER1_OFFSET
HEADER2_OFFSET = 128 * KiB  # VHDX_HEADER2_OFFSET
HEADER_SIZE = 4 * KiB  # VHDX_HEADER_SIZE: the header CRC covers all of it
REGION_TABLE_OFFSET = 192 * KiB  # VHDX_REGION_TABLE_OFFSET (the copy at 256 KiB is unused)
REGION_TABLE_SIZE = 64 * KiB  # VHDX_HEADER_BLOCK_SIZE: the region table CRC covers all of it
REGION_TABLE_MAX_ENTRIES = 2047
METADATA_TABLE_MAX_SIZE = 32 * (2047 + 1)  # VHDX_METADATA_TABLE_MAX_SIZE
LOG_MIN_SIZE = 1 * MiB  # VHDX_LOG_MIN_SIZE: log offset and length granularity
BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_SECTORS_PER_BLOCK = 1 << 23
INT64_MAX = (1 << 63) - 1
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

# --- On-disk structures (MS-VHDX section 2; every field little-endian) ----------------------

# 2.1.1 File Type Identifier, at offset 0.
FILE_IDENTIFIER = Struct(
    "signature" / Const(SIGNATURE),
    "creator" / Bytes(512),  # UTF-16LE, diagnostic only
).compile()

# 2.2.2 Header (VHDXHeader); the remaining 4016 bytes of the 4 KiB are reserved but checksummed.
HEADER = Struct(
    "signature" / Const(b"head"),
    "checksum" / Int32ul,  # CRC-32C over the 4 KiB, this field taken as zero
    "sequence_number" / Int64ul,  # the valid header with the higher number is current
    "file_write_guid" / Bytes(16),
    "data_write_guid" / Bytes(16),
    "log_guid" / Bytes(16),  # all zero: no log to replay
    "log_version" / Int16ul,  # must be 0
    "version" / Int16ul,  # must be 1
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
).compile()
HEADER_STRUCT_SIZE = 80

# 2.2.3 Region Table Header and entries (VHDXRegionTableHeader / VHDXRegionTableEntry).
REGION_TABLE_HEADER = Struct(
    "signature" / Const(b"regi"),
    "checksum" / Int32ul,  # CRC-32C over the 64 KiB
    "entry_count" / Int32ul,  # at most 2047
    "reserved" / Int32ul,
).compile()
REGION_TABLE_ENTRY = Struct(
    "guid" / Bytes(16),
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "data_bits" / Int32ul,  # bit 0: required
).compile()
REGION_ENTRY_SIZE = 32
REGION_ENTRY_REQUIRED = 0x1

# 2.6.1 Metadata Table Header and entries (VHDXMetadataTableHeader / VHDXMetadataTableEntry).
METADATA_TABLE_HEADER = Struct(
    "signature" / Const(b"metadata"),
    "reserved" / Int16ul,
    "entry_count" / Int16ul,
    "reserved2" / Bytes(20),
).compile()
METADATA_ENTRY = Struct(
    "item_id" / Bytes(16),
    "offset" / Int32ul,  # from the start of the metadata region
    "length" / Int32ul,
    "data_bits" / Int32ul,  # bit 0 is_user, bit 1 is_virtual_disk, bit 2 is_required
    "reserved2" / Int32ul,
).compile()
METADATA_ENTRY_SIZE = 32
META_IS_REQUIRED = 0x4

# 2.6.2.1 File Parameters.
FILE_PARAMETERS = Struct(
    "block_size" / Int32ul,
    "data_bits" / Int32ul,  # bit 0 leave_blocks_allocated, bit 1 has_parent
).compile()
PARAMS_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAMS_HAS_PARENT = 0x2

# 2.6.2.6 Parent Locator: a header, then key/value entries whose offsets count from the start
# of the item; keys and values are UTF-16LE.
PARENT_LOCATOR_HEADER = Struct(
    "locator_type" / Bytes(16),
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
).compile()
PARENT_LOCATOR_ENTRY = Struct(
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
).compile()
PARENT_LOCATOR_HEADER_SIZE = 20
PARENT_LOCATOR_ENTRY_SIZE = 12
PARENT_LOCATOR_CAP = 64 * KiB
PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")
LINKAGE_KEYS = ("parent_linkage", "parent_linkage2")

# 2.7 Log entry header: only the signature and the log GUID are looked at.
LOG_ENTRY_SIGNATURE = b"loge"


def _guid(text: str) -> bytes:
    """An MS GUID as stored on disk (first three groups little-endian)."""
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
PARENT_VHDX_LOCATOR_TYPE = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

# Metadata items by GUID, in the order vhdx_parse_metadata() tests them.
METADATA_ITEMS = {
    FILE_PARAMETERS_GUID: "file_parameters",
    VIRTUAL_DISK_SIZE_GUID: "virtual_disk_size",
    PAGE83_GUID: "page83_data",
    LOGICAL_SECTOR_SIZE_GUID: "logical_sector_size",
    PHYSICAL_SECTOR_SIZE_GUID: "physical_sector_size",
    PARENT_LOCATOR_GUID: "parent_locator",
}
# META_ALL_PRESENT: the five required items. A parent locator makes the set differ, so qemu 7.2
# refuses any image that has one (ENOTSUP) before it even reads the file parameters.
REQUIRED_ITEMS = frozenset(
    {
        "file_parameters",
        "virtual_disk_size",
        "page83_data",
        "logical_sector_size",
        "physical_sector_size",
    }
)

# BAT entry states (2.5.1); the file offset is in the top 44 bits, in MiB.
PAYLOAD_BLOCK_FULLY_PRESENT = 6
BAT_STATE_MASK = 0x7
BAT_FILE_OFFSET_MASK = 0xFFFFFFFFFFF00000
# The BAT is scanned for qemu's end-of-file and overlap checks only when the entries qemu
# checks fit in this many bytes; larger BATs are located, not read.
BAT_SCAN_LIMIT = 64 * KiB

# --- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as qemu's crc32c() -------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


CRC32C_TABLE = _crc_table()


@functools.cache
def _zeros_operator(level: int) -> tuple[tuple[int, ...], ...]:
    """Byte tables of the (linear) map that feeds 2**level zero bytes through the CRC register."""
    if level == 0:

        def step(value: int) -> int:
            return CRC32C_TABLE[value & 0xFF] ^ (value >> 8)

    else:
        previous = _zeros_operator(level - 1)

        def step(value: int) -> int:
            return _apply(previous, _apply(previous, value))

    return _tabulate(step)


def _tabulate(step: Callable[[int], int]) -> tuple[tuple[int, ...], ...]:
    """Byte tables of the linear map `step` on the 32-bit register, one per register byte."""
    tables = []
    for shift in (0, 8, 16, 24):
        basis = [step(1 << (shift + bit)) for bit in range(8)]
        table = [0] * 256
        for index in range(1, 256):
            low = index & -index
            table[index] = table[index ^ low] ^ basis[low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


def _apply(tables: tuple[tuple[int, ...], ...], value: int) -> int:
    return (
        tables[0][value & 0xFF]
        ^ tables[1][(value >> 8) & 0xFF]
        ^ tables[2][(value >> 16) & 0xFF]
        ^ tables[3][value >> 24]
    )


def crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """qemu's crc32c(crc, data, len), final inversion included.

    Trailing zero bytes (the reserved part of a header or region table) are not fed one at a time:
    the register is advanced over them with precomputed operators, so a 64 KiB table that is
    mostly zeros costs microseconds.
    """
    zeros = _zero_suffix(data)
    return _advance_zeros(_feed(data, len(data) - zeros, crc), zeros) ^ 0xFFFFFFFF


def _feed(data: bytes, end: int, crc: int) -> int:
    """The register after `data[:end]`: two bytes per step through a 64 Ki-entry table."""
    pairs = end >> 1
    if pairs >= 8:
        table = _crc_pair_table()
        for word in _struct.unpack_from(f"<{pairs}H", data):
            crc = table[(crc ^ word) & 0xFFFF] ^ (crc >> 16)
    else:
        pairs = 0
    table8 = CRC32C_TABLE
    for byte in memoryview(data)[2 * pairs : end]:
        crc = table8[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


@functools.cache
def _crc_pair_table() -> tuple[int, ...]:
    """The register change of two bytes `x & 0xFF`, `x >> 8` fed from a zero register, by x.

    The CRC is linear: feeding the little-endian word w to register r gives
    table[(r ^ w) & 0xFFFF] ^ (r >> 16). Built on first use (~10 ms, 64 Ki entries).
    """
    table = CRC32C_TABLE
    return tuple(
        table[(table[low] ^ high) & 0xFF] ^ (table[low] >> 8)
        for high in range(256)
        for low in range(256)
    )


def _advance_zeros(crc: int, zeros: int) -> int:
    """The register after `zeros` zero bytes: one table step per nonzero hex digit of `zeros`."""
    shift = 0
    while zeros:
        digit = zeros & 0xF
        if digit:
            tables = _zeros_run_operator(digit << shift)
            crc = (
                tables[0][crc & 0xFF]
                ^ tables[1][(crc >> 8) & 0xFF]
                ^ tables[2][(crc >> 16) & 0xFF]
                ^ tables[3][crc >> 24]
            )
        zeros >>= 4
        shift += 4
    return crc


@functools.cache
def _zeros_run_operator(count: int) -> tuple[tuple[int, ...], ...]:
    """Byte tables of the map that feeds `count` zero bytes (a hex digit times a power of 16,
    so at most 15 per power: the cache stays small) through the CRC register."""

    def step(value: int) -> int:
        level, rest = 0, count
        while rest:
            if rest & 1:
                value = _apply(_zeros_operator(level), value)
            rest >>= 1
            level += 1
        return value

    return _tabulate(step)


_ZEROS = bytes(REGION_TABLE_SIZE)


def _zero_suffix(data: bytes) -> int:
    """How many zero bytes end `data`: a few memcmp()s, not a byte-by-byte scan.

    `data.endswith(zeros[: n - start])` compares from `start` on: where data[start:] is not all
    zeros it stops at the first nonzero byte (cheap, as the nonzero bytes of a header or table
    come first), where it is it costs one memcmp of the rest. A galloping search from the front
    brackets the start of the zero run, a binary search over the bracket (comparing only the
    bytes inside it) finds it.
    """
    size = len(data)
    if size > len(_ZEROS):
        return size - len(data.rstrip(b"\0"))
    if data.endswith(_ZEROS[:size]):
        return size
    # Invariant: data[low:] is not all zeros, data[high:] is (high == size: the empty suffix).
    low, high = 0, 64
    while high < size and not data.endswith(_ZEROS[: size - high]):
        low, high = high, high * 2
    high = min(high, size)
    while high - low > 1:
        middle = (low + high) // 2
        # data[high:] is zeros, so only data[middle:high] needs comparing.
        if data.startswith(_ZEROS[: high - middle], middle):
            high = middle
        else:
            low = middle
    return size - high


def _checksum_ok(data: bytes, checksum_offset: int) -> tuple[bool, int, int]:
    """vhdx_checksum_is_valid(): CRC-32C with the checksum field taken as zero."""
    stored = int.from_bytes(data[checksum_offset : checksum_offset + 4], "little")
    # Only the bytes before the trailing zero run are copied (with the field zeroed) and fed;
    # the register is advanced over the zero run.
    end = max(len(data) - _zero_suffix(data), checksum_offset + 4)
    zeroed = data[:checksum_offset] + b"\0\0\0\0" + data[checksum_offset + 4 : end]
    crc = _feed(zeroed, len(zeroed), 0xFFFFFFFF)
    computed = _advance_zeros(crc, max(0, len(data) - len(zeroed))) ^ 0xFFFFFFFF
    return computed == stored, stored, computed


# --- Probe and inspect ------------------------------------------------------------------------


def probe(reader: ImageReader) -> int:
    # vhdx_probe(): "vhdxfile" at offset 0.
    return 100 if reader.head[:8] == SIGNATURE else 0


def inspect(reader: ImageReader) -> ImageInfo:
    head = reader.head
    if head[:8] != SIGNATURE:
        raise MalformedImage("no 'vhdxfile' file identifier", field="signature", offset=0)
    problems: list[Problem] = []
    header: dict[str, Any] = {
        "creator": _utf16_cstring(head[8:520].ljust(512, b"\0")),
    }
    current = _parse_headers(reader, header, problems)
    regions: list[tuple[int, int]] = []
    if current is not None:
        _check_log(reader, current, header, problems)
        # vhdx_parse_header() registers the log as a region the others may not overlap.
        regions.append((current.log_offset, (current.log_offset + current.log_length) & U64))

    tables = [Table(name="region_table", offset=REGION_TABLE_OFFSET, length=REGION_TABLE_SIZE)]
    found = _parse_region_table(reader, regions, header, problems)
    bat_region = found.get("bat")
    metadata_region = found.get("metadata")
    if bat_region is not None:
        # vhdx_open() allocates and reads the whole BAT region (its length, up to 4 GiB).
        tables.append(Table(name="bat", offset=bat_region[0], length=bat_region[1]))
    references: list[Reference] = []
    meta: dict[str, Any] = {}
    if metadata_region is not None:
        tables.append(
            Table(
                name="metadata",
                offset=metadata_region[0],
                length=METADATA_TABLE_MAX_SIZE,
            )
        )
        meta = _parse_metadata(reader, metadata_region[0], header, references, problems)

    block_size = meta.get("block_size")
    data_bits = meta.get("data_bits", 0)
    if data_bits & PARAMS_HAS_PARENT:
        variant = "differencing"
    elif data_bits & PARAMS_LEAVE_BLOCKS_ALLOCATED:
        variant = "fixed"
    else:
        variant = "dynamic"

    virtual_size = None
    if meta.get("valid"):
        virtual_size = _virtual_size(meta, header, problems)
        if bat_region is not None and virtual_size is not None:
            _check_bat(reader, meta, virtual_size, bat_region, regions, header, problems)

    return ImageInfo(
        format=NAME,
        variant=variant,
        virtual_size=virtual_size,
        version=current.version if current is not None else None,
        # vhdx_get_info(): the cluster size is the block size.
        cluster_size=block_size,
        references=tuple(references),
        tables=tuple(tables),
        problems=tuple(problems),
        header=header,
    )


def _parse_headers(
    reader: ImageReader, header: dict[str, Any], problems: list[Problem]
) -> Any | None:
    """vhdx_parse_header(): the valid header with the higher sequence number is current."""
    parsed: list[Any | None] = []
    raw: list[bytes] = []
    for index, offset in enumerate((HEADER1_OFFSET, HEADER2_OFFSET), start=1):
        # bdrv_pread() past the end of the file reads zeros.
        data = reader.read_available(offset, HEADER_SIZE, field=f"header{index}").ljust(
            HEADER_SIZE, b"\0"
        )
        raw.append(data)
        valid, stored, computed = _checksum_ok(data, 4)
        why = None
        if not valid:
            why = f"checksum {stored:#010x} does not match {computed:#010x}"
        elif data[:4] != b"head":
            why = "no 'head' signature"
        elif int.from_bytes(data[66:68], "little") != 1:
            why = f"version {int.from_bytes(data[66:68], 'little')} is not 1"
        if why is not None:
            parsed.append(None)
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"header {index} is invalid: {why}",
                    f"header{index}",
                    offset,
                )
            )
            continue
        parsed.append(
            parse_struct(HEADER, data[:HEADER_STRUCT_SIZE], offset=offset, what=f"header{index}")
        )
    first, second = parsed
    if first is None and second is None:
        problems.append(
            _refused("no valid header (No valid VHDX header found)", "header1", HEADER1_OFFSET)
        )
        return None
    if first is not None and second is not None:
        if first.sequence_number == second.sequence_number and raw[0] != raw[1]:
            problems.append(
                _refused(
                    "both headers are valid with the same sequence number but differ",
                    "header2.sequence_number",
                    HEADER2_OFFSET + 8,
                )
            )
            return None
        index = 2 if second.sequence_number > first.sequence_number else 1
    else:
        index = 1 if first is not None else 2
    current: Any = first if index == 1 else second
    header.update(
        {
            "current_header": index,
            "sequence_number": current.sequence_number,
            "file_write_guid": _guid_text(current.file_write_guid),
            "data_write_guid": _guid_text(current.data_write_guid),
            "log_guid": _guid_text(current.log_guid),
            "log_version": current.log_version,
            "version": current.version,
            "log_length": current.log_length,
            "log_offset": current.log_offset,
        }
    )
    return current


def _check_log(
    reader: ImageReader, current: Any, header: dict[str, Any], problems: list[Problem]
) -> None:
    """vhdx_parse_log(), up to where it would search the log for entries to replay."""
    base = HEADER1_OFFSET if header["current_header"] == 1 else HEADER2_OFFSET
    if current.log_offset < LOG_MIN_SIZE or current.log_offset % LOG_MIN_SIZE:
        problems.append(
            _refused(
                f"log offset {current.log_offset:#x} is not a multiple of 1 MiB past 0",
                "header.log_offset",
                base + 72,
            )
        )
        return
    if current.log_version != 0:
        problems.append(
            _refused(f"log version {current.log_version} is not 0", "header.log_version", base + 64)
        )
        return
    if not any(current.log_guid) or current.log_length == 0:
        return  # no log to replay
    if current.log_length % LOG_MIN_SIZE:
        problems.append(
            _refused(
                f"log length {current.log_length} is not a multiple of 1 MiB",
                "header.log_length",
                base + 68,
            )
        )
        return
    entry = reader.read_available(current.log_offset, 64, field="log")
    starts = entry[:4] == LOG_ENTRY_SIGNATURE and entry[32:48] == current.log_guid
    header["log_entry_at_log_offset"] = starts
    problems.append(
        Problem(
            ProblemKind.INCONSISTENT,
            "the log GUID is set, so qemu searches the log for entries to replay: when it finds "
            "some, a read-only open (qemu-img info, convert) is refused and a read-write open "
            "writes the logged data into the image"
            + (
                " (a log entry of this log starts at log_offset)"
                if starts
                else " (no log entry starts at log_offset)"
            ),
            "header.log_guid",
            base + 48,
        )
    )


def _parse_region_table(
    reader: ImageReader,
    regions: list[tuple[int, int]],
    header: dict[str, Any],
    problems: list[Problem],
) -> dict[str, tuple[int, int]]:
    """vhdx_open_region_tables(): the BAT and metadata regions, or Problems."""
    data = reader.read_available(REGION_TABLE_OFFSET, REGION_TABLE_SIZE, field="region_table")
    data = data.ljust(REGION_TABLE_SIZE, b"\0")
    found: dict[str, tuple[int, int]] = {}
    valid, stored, computed = _checksum_ok(data, 4)
    if not valid:
        problems.append(
            _refused(
                f"region table checksum {stored:#010x} does not match {computed:#010x}",
                "region_table.checksum",
                REGION_TABLE_OFFSET + 4,
            )
        )
    if data[:4] != b"regi":
        problems.append(
            _refused(
                "no 'regi' region table signature", "region_table.signature", REGION_TABLE_OFFSET
            )
        )
        return found
    table = parse_struct(
        REGION_TABLE_HEADER, data[:16], offset=REGION_TABLE_OFFSET, what="region_table"
    )
    header["region_entry_count"] = table["entry_count"]
    count = table["entry_count"]
    if count > REGION_TABLE_MAX_ENTRIES:
        problems.append(
            _refused(
                f"{count} region table entries, over 2047",
                "region_table.entry_count",
                REGION_TABLE_OFFSET + 8,
            )
        )
        count = REGION_TABLE_MAX_ENTRIES
    refused = not valid or table["entry_count"] > REGION_TABLE_MAX_ENTRIES
    for index in range(count):
        start = 16 + index * REGION_ENTRY_SIZE
        entry_offset = REGION_TABLE_OFFSET + start
        entry = parse_struct(
            REGION_TABLE_ENTRY,
            data[start : start + REGION_ENTRY_SIZE],
            offset=entry_offset,
            what=f"region_table.entries[{index}]",
        )
        field = f"region_table.entries[{index}]"
        end = (entry["file_offset"] + entry["length"]) & U64
        if not refused and _overlaps(regions, entry["file_offset"], end):
            problems.append(
                _refused(
                    f"region {entry['file_offset']:#x}+{entry['length']:#x} overlaps another "
                    "region or the log",
                    f"{field}.file_offset",
                    entry_offset + 16,
                )
            )
            refused = True
        regions.append((entry["file_offset"], end))
        name = {BAT_GUID: "bat", METADATA_GUID: "metadata"}.get(entry["guid"])
        if name is not None:
            if name in found:
                if not refused:
                    problems.append(
                        _refused(f"a second {name} region", f"{field}.guid", entry_offset)
                    )
                refused = True
                continue
            found[name] = (entry["file_offset"], entry["length"])
            header[f"{name}_region_offset"] = entry["file_offset"]
            header[f"{name}_region_length"] = entry["length"]
            continue
        if entry["data_bits"] & REGION_ENTRY_REQUIRED and not refused:
            problems.append(
                Problem(
                    ProblemKind.UNSUPPORTED,
                    "qemu refuses the image: required region "
                    f"{_guid_text(entry['guid'])} is unknown",
                    f"{field}.guid",
                    entry_offset,
                )
            )
            refused = True
    for name in ("bat", "metadata"):
        if name not in found and not refused:
            problems.append(
                _refused(f"no {name} region", "region_table.entry_count", REGION_TABLE_OFFSET + 8)
            )
            refused = True
    return found


def _overlaps(regions: list[tuple[int, int]], start: int, end: int) -> bool:
    # vhdx_region_check(): [start, end) against every region registered so far.
    return any(not (start >= r_end or end <= r_start) for r_start, r_end in regions)


def _parse_metadata(
    reader: ImageReader,
    region_offset: int,
    header: dict[str, Any],
    references: list[Reference],
    problems: list[Problem],
) -> dict[str, Any]:
    """vhdx_parse_metadata(): the metadata table and the items qemu reads."""
    meta: dict[str, Any] = {}
    if region_offset > INT64_MAX - METADATA_TABLE_MAX_SIZE:
        problems.append(
            _refused(
                f"metadata region offset {region_offset:#x} is not a file offset",
                "region_table.metadata",
                REGION_TABLE_OFFSET,
            )
        )
        return meta
    # qemu reads 64 KiB here; the header says how much of it holds entries.
    top = reader.read_available(region_offset, 32, field="metadata").ljust(32, b"\0")
    if top[:8] != b"metadata":
        problems.append(
            _refused("no 'metadata' table signature", "metadata.signature", region_offset)
        )
        return meta
    table = parse_struct(METADATA_TABLE_HEADER, top, offset=region_offset, what="metadata")
    count = table["entry_count"]
    header["metadata_entry_count"] = count
    if count * METADATA_ENTRY_SIZE > METADATA_TABLE_MAX_SIZE - 32:
        problems.append(
            _refused(
                f"{count} metadata entries, over 2047", "metadata.entry_count", region_offset + 10
            )
        )
        return meta
    data = reader.read_available(
        region_offset + 32, count * METADATA_ENTRY_SIZE, field="metadata.entries"
    )
    data = data.ljust(count * METADATA_ENTRY_SIZE, b"\0")
    entries: dict[str, Any] = {}
    refused = False
    for index in range(count):
        start = index * METADATA_ENTRY_SIZE
        entry_offset = region_offset + 32 + start
        field = f"metadata.entries[{index}]"
        entry = parse_struct(
            METADATA_ENTRY,
            data[start : start + METADATA_ENTRY_SIZE],
            offset=entry_offset,
            what=field,
        )
        name = METADATA_ITEMS.get(entry.item_id)
        if name is not None:
            if name in entries:
                if not refused:
                    problems.append(
                        _refused(f"a second {name} item", f"{field}.item_id", entry_offset)
                    )
                refused = True
                continue
            entries[name] = entry
            continue
        if entry.data_bits & META_IS_REQUIRED and not refused:
            problems.append(
                Problem(
                    ProblemKind.UNSUPPORTED,
                    f"qemu refuses the image: required metadata item "
                    f"{_guid_text(entry.item_id)} is unknown",
                    f"{field}.item_id",
                    entry_offset,
                )
            )
            refused = True

    def item(name: str, size: int) -> tuple[bytes, int] | None:
        entry = entries.get(name)
        if entry is None:
            return None
        offset = region_offset + entry.offset
        # qemu reads the item without looking at its length; past the end of file are zeros.
        return reader.read_available(offset, size, field=f"metadata.{name}").ljust(
            size, b"\0"
        ), offset

    values: dict[str, int] = {}
    for name, size in (
        ("virtual_disk_size", 8),
        ("logical_sector_size", 4),
        ("physical_sector_size", 4),
    ):
        found = item(name, size)
        if found is not None:
            values[name] = int.from_bytes(found[0], "little")
            meta[f"{name}_offset"] = found[1]
    params = item("file_parameters", 8)
    if params is not None:
        parsed = parse_struct(
            FILE_PARAMETERS, params[0], offset=params[1], what="metadata.file_parameters"
        )
        meta["block_size"] = parsed["block_size"]
        meta["data_bits"] = parsed["data_bits"]
        meta["file_parameters_offset"] = params[1]
        header["block_size"] = parsed["block_size"]
        header["leave_blocks_allocated"] = bool(parsed["data_bits"] & PARAMS_LEAVE_BLOCKS_ALLOCATED)
        header["has_parent"] = bool(parsed["data_bits"] & PARAMS_HAS_PARENT)
    page83 = item("page83_data", 16)
    if page83 is not None:
        header["page83_data"] = _guid_text(page83[0])
    header.update(values)
    meta.update(values)

    if "parent_locator" in entries:
        entry = entries["parent_locator"]
        _parse_parent_locator(
            reader, region_offset + entry.offset, entry.length, header, references, problems
        )

    if refused:
        return meta
    present = frozenset(entries)
    if present != REQUIRED_ITEMS:
        missing = sorted(REQUIRED_ITEMS - present)
        why = f"missing {', '.join(missing)}" if missing else "a parent locator is present"
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                f"qemu refuses the image: the metadata items are not the five it supports ({why})",
                "metadata.entries",
                region_offset + 32,
            )
        )
        return meta
    if meta["data_bits"] & PARAMS_HAS_PARENT:
        # The parent locator is absent here (its presence was refused above): EINVAL.
        problems.append(
            _refused(
                "has_parent is set but there is no parent locator",
                "metadata.file_parameters.data_bits",
                meta["file_parameters_offset"] + 4,
            )
        )
        return meta
    block_size = meta["block_size"]
    sector = meta["logical_sector_size"]
    if block_size < BLOCK_SIZE_MIN or block_size > BLOCK_SIZE_MAX:
        problems.append(
            _refused(
                f"block size {block_size} is not within 1 MiB..256 MiB",
                "metadata.file_parameters.block_size",
                meta["file_parameters_offset"],
            )
        )
        return meta
    if sector != 512:
        # The spec allows 512 and 4096; qemu 7.2 as shipped (with the upstream fix that stopped
        # it from misreading 4096-byte-sector images) supports 512 only and answers ENOTSUP.
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                f"qemu refuses the image: logical sector size {sector} is not 512"
                + (" (valid VHDX, but qemu does not support it)" if sector == 4096 else ""),
                "metadata.logical_sector_size",
                meta["logical_sector_size_offset"],
            )
        )
        return meta
    sectors_per_block = block_size // sector
    chunk_ratio = MAX_SECTORS_PER_BLOCK * sector // block_size
    if (
        sectors_per_block & (sectors_per_block - 1)
        or chunk_ratio & (chunk_ratio - 1)
        or block_size & (block_size - 1)
    ):
        problems.append(
            _refused(
                f"block size {block_size} is not a power of two",
                "metadata.file_parameters.block_size",
                meta["file_parameters_offset"],
            )
        )
        return meta
    meta["chunk_ratio"] = chunk_ratio
    header["chunk_ratio"] = chunk_ratio
    meta["valid"] = True
    return meta


def _parse_parent_locator(
    reader: ImageReader,
    offset: int,
    length: int,
    header: dict[str, Any],
    references: list[Reference],
    problems: list[Problem],
) -> None:
    """The parent locator item: its key/value pairs, the path-valued ones as references."""
    field = "metadata.parent_locator"
    if length > PARENT_LOCATOR_CAP:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"parent locator of {length} bytes, read only the first {PARENT_LOCATOR_CAP}",
                field,
                offset,
            )
        )
        length = PARENT_LOCATOR_CAP
    try:
        data = reader.read(offset, length, field=field)
    except ImageError as error:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"parent locator cannot be read: {error.message}",
                field,
                offset,
            )
        )
        return
    if len(data) < PARENT_LOCATOR_HEADER_SIZE:
        problems.append(
            Problem(
                ProblemKind.MALFORMED, "parent locator is shorter than its header", field, offset
            )
        )
        return
    top = parse_struct(
        PARENT_LOCATOR_HEADER, data[:PARENT_LOCATOR_HEADER_SIZE], offset=offset, what=field
    )
    header["parent_locator_type"] = _guid_text(top["locator_type"])
    if top["locator_type"] != PARENT_VHDX_LOCATOR_TYPE:
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                "parent locator type is not VHDX",
                f"{field}.locator_type",
                offset,
            )
        )
    count = top["key_value_count"]
    available = (len(data) - PARENT_LOCATOR_HEADER_SIZE) // PARENT_LOCATOR_ENTRY_SIZE
    if count > available:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                f"{count} parent locator entries do not fit in its {length} bytes",
                f"{field}.key_value_count",
                offset + 18,
            )
        )
        count = available
    pairs: dict[str, str] = {}
    for index in range(count):
        start = PARENT_LOCATOR_HEADER_SIZE + index * PARENT_LOCATOR_ENTRY_SIZE
        entry = parse_struct(
            PARENT_LOCATOR_ENTRY,
            data[start : start + PARENT_LOCATOR_ENTRY_SIZE],
            offset=offset + start,
            what=f"{field}.entries[{index}]",
        )
        key_end = entry["key_offset"] + entry["key_length"]
        value_end = entry["value_offset"] + entry["value_length"]
        if key_end > len(data) or value_end > len(data):
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    "parent locator key or value lies outside the item",
                    f"{field}.entries[{index}]",
                    offset + start,
                )
            )
            continue
        key = _utf16_cstring(data[entry["key_offset"] : key_end])
        value = _utf16_cstring(data[entry["value_offset"] : value_end])
        pairs[key] = value
        value_offset = offset + entry["value_offset"]
        if key in PATH_KEYS and value:
            references.append(
                Reference(ReferenceKind.PARENT_LOCATOR, value, f"{field}.{key}", value_offset)
            )
        elif key in LINKAGE_KEYS and value:
            references.append(
                Reference(ReferenceKind.PARENT_UUID, value, f"{field}.{key}", value_offset)
            )
    header["parent_locator"] = pairs


def _virtual_size(
    meta: dict[str, Any], header: dict[str, Any], problems: list[Problem]
) -> int | None:
    """bs->total_sectors * 512 as vhdx_open() in qemu 7.2 sets it."""
    size = meta["virtual_disk_size"]
    # vhdx_open(): total_sectors = virtual_disk_size >> logical_sector_size_bits; only 512-byte
    # logical sectors get this far, so the size is rounded down to a multiple of 512.
    total_sectors = size >> 9
    if total_sectors > INT64_MAX // 512:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"qemu refuses the image: virtual disk size {size} does not fit in a 63-bit "
                "byte count",
                "metadata.virtual_disk_size",
                meta["virtual_disk_size_offset"],
            )
        )
        return None
    return int(total_sectors * 512)


def _check_bat(
    reader: ImageReader,
    meta: dict[str, Any],
    virtual_size: int,
    bat_region: tuple[int, int],
    regions: list[tuple[int, int]],
    header: dict[str, Any],
    problems: list[Problem],
) -> None:
    """vhdx_calc_bat_entries() and vhdx_check_bat_entries()."""
    block_size = meta["block_size"]
    chunk_ratio = meta["chunk_ratio"]
    chunk_bits = chunk_ratio.bit_length() - 1
    size = meta["virtual_disk_size"]
    # uint32_t arithmetic, as in qemu.
    data_blocks = (-(-size // block_size)) & U32
    bat_entries = (data_blocks + (((data_blocks - 1) & U32) >> chunk_bits)) & U32
    header["bat_entries"] = bat_entries
    bat_offset, bat_length = bat_region
    if bat_entries > bat_length // 8:
        problems.append(
            _refused(
                f"the BAT region of {bat_length} bytes is too small for {bat_entries} entries",
                "region_table.bat.length",
                REGION_TABLE_OFFSET,
            )
        )
        return
    if bat_offset > INT64_MAX - bat_length or bat_offset + bat_length > reader.size:
        # qemu reads zeros past the end of the file: not an error by itself.
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"the BAT region ({bat_length} bytes at "
                f"{bat_offset:#x}) runs past the end of the file",
                "region_table.bat",
                bat_offset,
            )
        )
    if bat_entries * 8 > BAT_SCAN_LIMIT:
        return
    data = reader.read_available(bat_offset, bat_entries * 8, field="bat").rstrip(b"\0")
    data = data.ljust(-(-len(data) // 8) * 8, b"\0")
    entries = array.array("Q", data)
    if sys.byteorder == "big":
        entries.byteswap()
    payload_left = chunk_ratio
    file_size = reader.size
    for index, entry in enumerate(entries):
        if entry & BAT_STATE_MASK != PAYLOAD_BLOCK_FULLY_PRESENT:
            continue
        offset = entry & BAT_FILE_OFFSET_MASK
        remaining = (virtual_size - index * block_size) & U64
        block_length = min(block_size, remaining)
        where = bat_offset + index * 8
        if offset > INT64_MAX - block_size:
            problems.append(_refused(f"BAT entry {index} offset overflows", "bat", where))
            return
        if offset >= file_size or offset + block_length > file_size:
            problems.append(
                _refused(
                    f"BAT entry {index} points past the end of the file at "
                    f"{file_size} (Image has probably been truncated)",
                    "bat",
                    where,
                    ProblemKind.TRUNCATED,
                )
            )
            return
        if payload_left:
            payload_left -= 1
            if _overlaps(regions, offset, offset + block_size):
                problems.append(
                    _refused(
                        f"BAT entry {index} block overlaps a metadata region or the log",
                        "bat",
                        where,
                    )
                )
                return
        else:
            payload_left = chunk_ratio


def _refused(
    message: str, field: str, offset: int, kind: ProblemKind = ProblemKind.MALFORMED
) -> Problem:
    return Problem(kind, f"qemu refuses the image: {message}", field, offset)


def _guid_text(raw: bytes) -> str:
    return uuid_text_le(bytes(raw))


def _utf16_cstring(raw: bytes) -> str:
    if len(raw) % 2:
        raw = raw[:-1]
    return raw.decode("utf-16-le", errors="replace").split("\0", 1)[0]


DRIVER = FormatDriver(name=NAME, probe=probe, inspect=inspect, magic=(SIGNATURE,))
