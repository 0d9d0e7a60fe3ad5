"""vpc: Connectix / Microsoft Virtual PC "VHD" images (`block/vpc.c`, "Virtual Hard Disk Image
Format Specification" 1.0).

What is read, as qemu 7.2's `vpc_open()` reads it:

* the 512-byte hard disk footer: at offset 0 when the file starts with "conectix" (a dynamic or
  differencing disk keeps a copy of its footer there), otherwise in the last 512 bytes, where
  qemu accepts it only for a fixed disk (disk type 2);
* for a footer at offset 0, the 1024-byte dynamic disk header at the footer's `data_offset`;
* the block allocation table (BAT), only when it is at most `BAT_SCAN_LIMIT` bytes, to repeat
  qemu's "free_data_block_offset points after the end of file" check;
* for each parent locator entry of the dynamic header, its platform data (capped).

qemu 7.2 does not implement differencing disks: it opens one as a standalone dynamic disk, never
reads the parent locators and never opens the parent. imgguard still reports the parent name
and the locators as references, because other tools (and later qemu versions) follow them.
"""

from __future__ import annotations

import array
import sys
import zlib
from typing import Any

from construct import Array, Bytes, Const, Enum, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from imgguard.errors import ImageError, MalformedImage, TruncatedImage
from imgguard.formats._common import qemu_length, uuid_text
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo, Problem, ProblemKind, Reference, ReferenceKind, Table
from imgguard.reader import ImageReader, parse_struct

NAME = "vpc"

COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
FOOTER_SIZE = 512  # HEADER_SIZE in vpc.c
DYNAMIC_HEADER_SIZE = 1024

# --- On-disk structures (VHD spec, "Hard Disk Footer Format" and "Dynamic Disk Header Format";
# every field big-endian). Field names are the spec's, as qemu's VHDFooter spells them.

FOOTER = Struct(
    "cookie" / Const(COOKIE),
    "features" / Int32ub,  # bit 0 temporary, bit 1 reserved (always set)
    "version" / Int32ub,  # file format version, 0x00010000
    "data_offset" / Int64ub,  # dynamic header offset; all ones for a fixed disk
    "timestamp" / Int32ub,  # seconds since 2000-01-01 UTC
    "creator_app" / Bytes(4),  # decides how qemu sizes the disk, see _total_sectors()
    "creator_version" / Int32ub,  # qemu: major (u16), minor (u16)
    "creator_os" / Bytes(4),
    "orig_size" / Int64ub,
    "current_size" / Int64ub,
    "cyls" / Int16ub,
    "heads" / Int8ub,
    "secs_per_cyl" / Int8ub,
    # Unknown values stay visible as integers: qemu 7.2 opens a footer at offset 0 as dynamic
    # whatever its type says.
    "type" / Enum(Int32ub, none=0, reserved1=1, fixed=2, dynamic=3, differencing=4),
    "checksum" / Int32ub,  # one's complement of the byte sum, checksum field taken as zero
    "uuid" / Bytes(16),
    "in_saved_state" / Int8ub,
    "reserved" / Bytes(427),
).compile()

PARENT_LOCATOR = Struct(
    "platform_code" / Bytes(4),  # W2ru, W2ku, Wi2r, Wi2k, Mac , MacX, or zero for none
    "platform_data_space" / Int32ub,  # sectors reserved for the data (bytes in some writers)
    "platform_data_length" / Int32ub,  # bytes
    "reserved" / Int32ub,
    "platform_data_offset" / Int64ub,
)
PARENT_LOCATOR_SIZE = 24

DYNAMIC_HEADER = Struct(
    "cookie" / Const(DYNAMIC_COOKIE),
    "data_offset" / Int64ub,  # unused, all ones
    "table_offset" / Int64ub,  # BAT offset
    "header_version" / Int32ub,  # 0x00010000
    "max_table_entries" / Int32ub,  # BAT entries, 32 bits each
    "block_size" / Int32ub,  # 2 MiB by default, a power of two
    "checksum" / Int32ub,  # like the footer's; qemu 7.2 does not check it
    "parent_uuid" / Bytes(16),
    "parent_timestamp" / Int32ub,
    "reserved" / Int32ub,
    "parent_unicode_name" / Bytes(512),  # UTF-16BE, NUL padded
    "parent_locators" / Array(8, PARENT_LOCATOR),
    "reserved2" / Bytes(256),
).compile()
PARENT_NAME_OFFSET = 64
PARENT_LOCATORS_OFFSET = 576
CHECKSUM_OFFSET_FOOTER = 64
CHECKSUM_OFFSET_DYNAMIC = 36

VHD_FIXED = 2
VHD_DYNAMIC = 3
VHD_DIFFERENCING = 4

# vpc.c: total_sectors may not exceed 2040 GiB (VHD_MAX_SECTORS); a CHS geometry of exactly
# 65535 * 16 * 255 sectors (VHD_MAX_GEOMETRY) means "use current_size".
VHD_MAX_SECTORS = 0xFF000000
VHD_MAX_GEOMETRY = 65535 * 16 * 255
# vpc_open(): `max_table_entries > (int) INT_MAX / 4` is refused.
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4
# qemu's bdrv_pread() refuses offsets it cannot add a length to (int64_t arithmetic).
INT64_MAX = (1 << 63) - 1

# In qemu 7.2 only these creator applications make qemu trust current_size over the CHS
# geometry (`vpc_open()`, "use_chs"); every other value, known or not, means CHS. qemu 9.2 later
# inverted the rule (only "vpc " and "qemu" use CHS); imgguard follows 7.2.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

PLATFORM_CODES = {
    b"W2ru": "utf-16-le",  # Windows relative path, UTF-16LE
    b"W2ku": "utf-16-le",  # Windows absolute path, UTF-16LE
    b"Wi2r": "utf-8",  # deprecated Windows relative path (ANSI)
    b"Wi2k": "utf-8",  # deprecated Windows absolute path (ANSI)
    b"MacX": "utf-8",  # Mac OS X "file://" URL, UTF-8
    b"Mac ": "utf-8",  # Mac OS alias record, a binary blob; reported byte for byte
}
# Platform data longer than this is cut (a Windows path is at most 32767 UTF-16 units). The cap
# is shared by all eight locators: qemu never reads them, so a header naming eight 64 KiB
# locators must not make inspection read half a megabyte.
LOCATOR_CAP = 64 * 1024
# The BAT is scanned for qemu's end-of-file check only when it is this small (16384 entries,
# a 32 GiB disk with 2 MiB blocks); larger BATs are located, not read.
BAT_SCAN_LIMIT = 64 * 1024


def probe(reader: ImageReader) -> int:
    # vpc_probe(): "conectix" at offset 0 only; a fixed disk's footer at the end is not seen,
    # so qemu probes a fixed VHD as raw.
    return 100 if reader.head[:8] == COOKIE else 0


def recognise(reader: ImageReader) -> bool:
    """A fixed VHD: no footer at offset 0, and a footer qemu -f vpc accepts in the last 512."""
    if reader.head[:8] == COOKIE or reader.size < FOOTER_SIZE:
        return False
    # Where qemu looks, and where the spec (and every other VHD reader) looks: they differ only
    # for a file whose size is not a multiple of 512, which inspect() reports.
    return _fixed_footer(_end_footer(reader)[1]) or _fixed_footer(reader.tail[-FOOTER_SIZE:])


def _fixed_footer(footer: bytes) -> bool:
    return (
        footer[:8] == COOKIE
        and int.from_bytes(footer[60:64], "big") == VHD_FIXED
        and _checksum(footer, CHECKSUM_OFFSET_FOOTER) == _u32(footer, CHECKSUM_OFFSET_FOOTER)
    )


def inspect(reader: ImageReader) -> ImageInfo:
    problems: list[Problem] = []
    footer_offset, footer_bytes = _find_footer(reader)
    footer = parse_struct(FOOTER, footer_bytes, offset=footer_offset, what="footer")
    at_end = footer_offset != 0
    disk_type = int(footer["type"])
    if at_end and footer_offset != qemu_length(reader) - FOOTER_SIZE:
        problems.append(
            _refused(
                f"the file's size ({reader.size}) is not a multiple of 512, so the footer in its "
                "last 512 bytes is not where vpc_open() looks (invalid VPC image)",
                "footer",
                footer_offset,
            )
        )
    header: dict[str, Any] = {
        "footer_offset": footer_offset,
        "features": footer["features"],
        "version": footer["version"],
        "data_offset": footer["data_offset"],
        "timestamp": footer["timestamp"],
        "creator_app": _ascii(footer["creator_app"]),
        "creator_version": footer["creator_version"],
        "creator_os": _ascii(footer["creator_os"]),
        "orig_size": footer["orig_size"],
        "current_size": footer["current_size"],
        "cyls": footer["cyls"],
        "heads": footer["heads"],
        "secs_per_cyl": footer["secs_per_cyl"],
        "type": disk_type,
        "checksum": footer["checksum"],
        "uuid": uuid_text(footer["uuid"]),
        "in_saved_state": footer["in_saved_state"],
    }

    computed = _checksum(footer_bytes, CHECKSUM_OFFSET_FOOTER)
    if computed != footer["checksum"]:
        # qemu 7.2 refuses the image ("Incorrect header checksum"); older qemu only warned.
        problems.append(
            _refused(
                f"footer checksum {footer['checksum']:#010x} does not match {computed:#010x} "
                "(Incorrect header checksum)",
                "footer.checksum",
                footer_offset + CHECKSUM_OFFSET_FOOTER,
            )
        )
    if footer["features"] & ~0x3:
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                f"unknown feature bits {footer['features'] & ~0x3:#x}",
                "footer.features",
                footer_offset + 8,
            )
        )
    if footer["in_saved_state"]:
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                "the disk is marked as in a saved state",
                "footer.in_saved_state",
                footer_offset + 84,
            )
        )

    total_sectors, size_rule = _total_sectors(footer)
    header["size_rule"] = size_rule
    virtual_size = total_sectors * 512
    if total_sectors > VHD_MAX_SECTORS:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"virtual size {virtual_size} is over 2040 GiB: qemu refuses the image (EFBIG)",
                "footer.current_size" if size_rule == "current_size" else "footer.cyls",
                footer_offset + (48 if size_rule == "current_size" else 56),
            )
        )

    if at_end:
        variant = "fixed"
    elif disk_type == VHD_DIFFERENCING:
        variant = "differencing"
    else:
        variant = "dynamic"
        if disk_type != VHD_DYNAMIC:
            problems.append(
                Problem(
                    ProblemKind.INCONSISTENT,
                    f"disk type {disk_type} in a footer at offset 0: qemu 7.2 opens the image as "
                    "a dynamic disk whatever the type says",
                    "footer.type",
                    60,
                )
            )

    info: dict[str, Any] = {}
    references: list[Reference] = []
    tables: list[Table] = []
    if not at_end:
        # vpc_open(): a footer at offset 0 means a dynamic header, whatever footer.type says.
        _inspect_dynamic(reader, footer, total_sectors, header, info, references, tables, problems)
        if disk_type == VHD_DIFFERENCING:
            problems.append(
                Problem(
                    ProblemKind.UNSUPPORTED,
                    "differencing disk: qemu 7.2 opens it as a standalone dynamic disk and never "
                    "opens the parent, so blocks the parent holds read as zeros",
                    "footer.type",
                    60,
                )
            )
        _check_footer_copy(reader, footer_bytes, problems)

    return ImageInfo(
        format=NAME,
        variant=variant,
        virtual_size=virtual_size,
        version=footer["version"],
        # vpc_get_info(): cluster_size is the block size unless footer.type is fixed.
        cluster_size=info.get("block_size") if disk_type != VHD_FIXED else None,
        references=tuple(references),
        tables=tuple(tables),
        problems=tuple(problems),
        header=header,
    )


def _end_footer(reader: ImageReader) -> tuple[int, bytes]:
    """The 512 bytes vpc_open() reads as a fixed disk's footer: at bdrv_getlength() - 512, where
    the length is rounded up to whole sectors, zero-filled past the end. A file whose size is
    not a multiple of 512 has no footer where qemu looks ("invalid VPC image")."""
    offset = qemu_length(reader) - FOOTER_SIZE
    if offset == reader.size - FOOTER_SIZE:
        return offset, reader.tail[-FOOTER_SIZE:]
    return offset, reader.read_available(offset, FOOTER_SIZE, field="footer").ljust(
        FOOTER_SIZE, b"\0"
    )


def _find_footer(reader: ImageReader) -> tuple[int, bytes]:
    """Where vpc_open() finds the footer: offset 0, else the last 512 bytes of a fixed disk."""
    head = reader.head
    if head[:8] == COOKIE:
        # bdrv_pread() past the end of a short file reads zeros.
        return 0, head[:FOOTER_SIZE].ljust(FOOTER_SIZE, b"\0")
    if reader.size < FOOTER_SIZE:
        raise TruncatedImage(
            f"file of {reader.size} bytes is too small for a VHD footer",
            field="footer",
            offset=0,
        )
    offset, footer = _end_footer(reader)
    if not _fixed_footer(footer) and _fixed_footer(reader.tail[-FOOTER_SIZE:]):
        # The spec's place, which qemu misses in a file of a size not a multiple of 512.
        offset, footer = reader.size - FOOTER_SIZE, reader.tail[-FOOTER_SIZE:]
    if footer[:8] != COOKIE:
        raise MalformedImage(
            "no 'conectix' footer at offset 0 or in the last 512 bytes",
            field="footer.cookie",
            offset=offset,
        )
    if int.from_bytes(footer[60:64], "big") != VHD_FIXED:
        # qemu: "invalid VPC image" -- only a fixed disk may have its footer at the end alone.
        raise MalformedImage(
            "a footer found only at the end must be of a fixed disk (type 2)",
            field="footer.type",
            offset=offset + 60,
        )
    return offset, footer


def _total_sectors(footer: Any) -> tuple[int, str]:
    """bs->total_sectors exactly as vpc_open() in qemu 7.2 computes it."""
    total = footer["cyls"] * footer["heads"] * footer["secs_per_cyl"]
    use_chs = footer["creator_app"] not in CURRENT_SIZE_CREATORS
    # force_size (create) and the force_use_chs/force_use_sz runtime options are not in the file.
    if not use_chs or total == VHD_MAX_GEOMETRY:
        return footer["current_size"] // 512, "current_size"
    return total, "chs"


def _inspect_dynamic(
    reader: ImageReader,
    footer: Any,
    total_sectors: int,
    header: dict[str, Any],
    info: dict[str, Any],
    references: list[Reference],
    tables: list[Table],
    problems: list[Problem],
) -> None:
    offset = footer.data_offset
    if offset > INT64_MAX - DYNAMIC_HEADER_SIZE:
        problems.append(
            _refused(
                f"dynamic header offset {offset:#x} is not a file offset",
                "footer.data_offset",
                16,
            )
        )
        return
    data = reader.read_available(offset, DYNAMIC_HEADER_SIZE, field="dynamic_header")
    if data[:8] != DYNAMIC_COOKIE:
        # Past the end of the file qemu reads zeros, so a missing header fails the same way.
        problems.append(
            _refused(
                "no 'cxsparse' dynamic disk header at data_offset (Invalid header magic)",
                "dynamic_header.cookie",
                offset,
            )
        )
        return
    if len(data) < DYNAMIC_HEADER_SIZE:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"dynamic disk header is cut short at {len(data)} of 1024 bytes",
                "dynamic_header",
                offset,
            )
        )
        data = data.ljust(DYNAMIC_HEADER_SIZE, b"\0")
    dyn = parse_struct(DYNAMIC_HEADER, data, offset=offset, what="dynamic_header")
    block_size = dyn["block_size"]
    max_entries = dyn["max_table_entries"]
    header.update(
        {
            "table_offset": dyn["table_offset"],
            "header_version": dyn["header_version"],
            "max_table_entries": max_entries,
            "block_size": block_size,
            "dynamic_header_checksum": dyn["checksum"],
            "parent_uuid": uuid_text(dyn["parent_uuid"]),
            "parent_timestamp": dyn["parent_timestamp"],
        }
    )
    computed = _checksum(data, CHECKSUM_OFFSET_DYNAMIC)
    if computed != dyn["checksum"]:
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                f"dynamic header checksum {dyn['checksum']:#010x} does not match {computed:#010x} "
                "(qemu 7.2 does not check it)",
                "dynamic_header.checksum",
                offset + CHECKSUM_OFFSET_DYNAMIC,
            )
        )

    _parent_references(reader, footer, dyn, offset, references, problems)

    # vpc_open()'s checks on the dynamic header, in its order; each one makes qemu refuse.
    if block_size < 512 or block_size & (block_size - 1):
        problems.append(
            _refused(f"invalid block size {block_size}", "dynamic_header.block_size", offset + 32)
        )
        return
    info["block_size"] = block_size
    if (total_sectors * 512) // block_size > 0xFFFFFFFF:
        problems.append(
            _refused("too many blocks for the disk size", "dynamic_header.block_size", offset + 32)
        )
    if max_entries * block_size < total_sectors * 512:
        problems.append(
            _refused(
                f"{max_entries} BAT entries of {block_size} bytes cover less than the virtual "
                "size (Page table too small)",
                "dynamic_header.max_table_entries",
                offset + 28,
            )
        )
    if max_entries > MAX_TABLE_ENTRIES:
        problems.append(
            _refused(
                f"max_table_entries {max_entries} is over {MAX_TABLE_ENTRIES}",
                "dynamic_header.max_table_entries",
                offset + 28,
            )
        )
        return
    bat_offset = dyn["table_offset"]
    bat_length = max_entries * 4
    # qemu allocates the whole BAT (max_table_entries * 4 bytes) and reads it at open.
    tables.append(Table(name="bat", offset=bat_offset, length=bat_length))
    if bat_offset > INT64_MAX - bat_length:
        problems.append(
            _refused(
                f"BAT offset {bat_offset:#x} is not a file offset",
                "dynamic_header.table_offset",
                offset + 16,
            )
        )
        return
    # free_data_block_offset starts just past the BAT and grows past every allocated block;
    # qemu refuses the image when it ends up past the end of the file.
    free_offset = (bat_offset + bat_length + 511) & ~511
    # ... compared with bdrv_getlength(), the file's length in whole sectors.
    length = qemu_length(reader)
    if free_offset > length:
        problems.append(
            _refused(
                f"the BAT ({bat_length} bytes at {bat_offset:#x}) runs past the end of the file "
                f"at {reader.size}",
                "dynamic_header.table_offset",
                offset + 16,
                ProblemKind.TRUNCATED,
            )
        )
        return
    if bat_length <= BAT_SCAN_LIMIT:
        raw_bat = reader.read_available(bat_offset, bat_length, field="bat")
        entries = array.array("I", raw_bat.ljust(bat_length, b"\0"))
        if sys.byteorder == "little":
            entries.byteswap()
        allocated = [entry for entry in entries if entry != 0xFFFFFFFF]
        if allocated:
            bitmap_size = ((block_size // (8 * 512)) + 511) & ~511
            free_offset = max(free_offset, 512 * max(allocated) + bitmap_size + block_size)
        header["allocated_blocks"] = len(allocated)
        if free_offset > length:
            problems.append(
                _refused(
                    f"an allocated block ends at {free_offset}, past the end of the file at "
                    f"{reader.size} (free_data_block_offset points after the end of file)",
                    "bat",
                    bat_offset,
                    ProblemKind.TRUNCATED,
                )
            )


def _parent_references(
    reader: ImageReader,
    footer: Any,
    dyn: Any,
    offset: int,
    references: list[Reference],
    problems: list[Problem],
) -> None:
    """The parent's name, UUID and locators: facts, whatever the disk type says."""
    name = _cstring(dyn["parent_unicode_name"].decode("utf-16-be", errors="replace"))
    if name:
        references.append(
            Reference(
                ReferenceKind.PARENT_HINT,
                name,
                "dynamic_header.parent_unicode_name",
                offset + PARENT_NAME_OFFSET,
            )
        )
    if int(footer["type"]) == VHD_DIFFERENCING and any(dyn["parent_uuid"]):
        references.append(
            Reference(
                ReferenceKind.PARENT_UUID,
                uuid_text(dyn["parent_uuid"]),
                "dynamic_header.parent_uuid",
                offset + 40,
            )
        )
    budget = LOCATOR_CAP
    for index, locator in enumerate(dyn["parent_locators"]):
        code = locator["platform_code"]
        if code == b"\0\0\0\0":
            continue
        field = f"dynamic_header.parent_locators[{index}]"
        entry_offset = offset + PARENT_LOCATORS_OFFSET + index * PARENT_LOCATOR_SIZE
        encoding = PLATFORM_CODES.get(code)
        if encoding is None:
            problems.append(
                Problem(
                    ProblemKind.UNSUPPORTED,
                    f"unknown parent locator platform code {code!r}",
                    f"{field}.platform_code",
                    entry_offset,
                )
            )
            encoding = "utf-8"
        length = locator["platform_data_length"]
        data_offset = locator["platform_data_offset"]
        if length == 0:
            continue
        if length > budget:
            problems.append(
                Problem(
                    ProblemKind.LIMIT,
                    f"parent locator data of {length} bytes, read only the first {budget} "
                    f"(all locators share a cap of {LOCATOR_CAP})",
                    f"{field}.platform_data_length",
                    entry_offset + 8,
                )
            )
            length = budget
        if length == 0:
            continue
        budget -= length
        try:
            data = reader.read(data_offset, length, field=f"{field}.platform_data_offset")
        except ImageError as error:
            problems.append(
                Problem(
                    ProblemKind.TRUNCATED,
                    f"parent locator data cannot be read: {error.message}",
                    f"{field}.platform_data_offset",
                    entry_offset + 16,
                )
            )
            continue
        target = _cstring(data.decode(encoding, errors="replace"))
        if target:
            references.append(
                Reference(
                    ReferenceKind.PARENT_LOCATOR,
                    target,
                    f"{field}[{code.decode('latin-1')}]",
                    data_offset,
                )
            )


def _check_footer_copy(reader: ImageReader, footer_bytes: bytes, problems: list[Problem]) -> None:
    # The spec keeps a copy of the footer in the last 512 bytes of a dynamic disk; qemu does
    # not read it, but a missing copy is how a truncated or appended-to file shows.
    if reader.size < 2 * FOOTER_SIZE or reader.tail[-FOOTER_SIZE:] != footer_bytes:
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                "the last 512 bytes are not a copy of the footer at offset 0",
                "footer",
                max(0, reader.size - FOOTER_SIZE),
            )
        )


def _refused(
    message: str, field: str, offset: int, kind: ProblemKind = ProblemKind.MALFORMED
) -> Problem:
    return Problem(kind, f"qemu refuses the image: {message}", field, offset)


def _checksum(data: bytes, checksum_offset: int) -> int:
    """vpc_checksum(): one's complement of the byte sum, the checksum field counted as zero."""
    total = _byte_sum(data) - sum(data[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def _byte_sum(data: bytes) -> int:
    """sum(data), in C: Adler-32's A is 1 + the byte sum modulo 65521, and the sum of 256
    bytes is at most 65280, so for chunks of 256 bytes A - 1 is their exact byte sum."""
    view = memoryview(data)
    total = 0
    for start in range(0, len(data), 256):
        total += (zlib.adler32(view[start : start + 256]) & 0xFFFF) - 1
    return total


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "big")


def _ascii(value: bytes) -> str:
    return value.decode("latin-1")


def _cstring(text: str) -> str:
    """Up to the first NUL, as a C string would end."""
    return text.split("\0", 1)[0]


DRIVER = FormatDriver(
    name=NAME,
    probe=probe,
    inspect=inspect,
    recognise=recognise,
    data_at_start=True,
    magic=(COOKIE,),
    # The recogniser reads the footer in the last 512 bytes (the dmg trailer's place too, whose
    # signature is 4 bytes: the cookie's first 4 share the dispatch).
    recognise_signatures=((-FOOTER_SIZE, (COOKIE[:4],)),),
)
