"""vmdk: VMware virtual disks as qemu 7.2's `block/vmdk.c` reads them.

Three kinds of file reach qemu's vmdk driver (`vmdk_open`):

* a hosted sparse extent, magic `KDMV` (VMware "Virtual Disk Format 1.1", "Hosted Sparse Extent
  Header"; qemu's VMDK4Header), optionally carrying its header again in a streamOptimized footer;
* an ESX sparse extent, magic `COWD` (the spec's COWDisk_Header; qemu's VMDK3Header);
* anything else, which qemu parses as a text descriptor (createType, extent lines, CIDs).

What qemu does with the bytes differs from what the spec says in ways that matter for safety,
and this module follows qemu 7.2 (the comments name the qemu function each rule comes from):

* A descriptor is parsed with strstr()/sscanf(), not line by line: the first "createType",
  "CID", "parentCID" and "parentFileNameHint" anywhere in the text wins, comments included, and
  sscanf() skips newlines, so an extent line may span lines and every blank line in front of an
  extent line makes qemu add that extent once more (`vmdk_parse_extents`).
* Only extent lines with access `RW` and type FLAT/SPARSE/VMFS/VMFSSPARSE/SESPARSE are used;
  RDONLY, NOACCESS, ZERO, VMFSRDM and VMFSRAW lines are skipped without a word.
* The CIDs and parentFileNameHint of a KDMV or COWD file are always read from offset 0x200,
  whatever the header's desc_offset says; the embedded descriptor's extent lines and createType
  are never used, except when the header's capacity is 0 and desc_offset is not: then qemu
  parses the descriptor at desc_offset like a descriptor file and opens the files it names.
* qemu opens parentFileNameHint as a vmdk backing file whatever parentCID says.

Nothing named in the image is opened here; names are reported as `Reference`s.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from construct import Bytes, Const, Int16ul, Int32ul, Int64ul, Padding, Struct

from imgguard.errors import MalformedImage, TruncatedImage
from imgguard.formats._driver import FormatDriver
from imgguard.model import (
    Extent,
    Feature,
    FeatureKind,
    ImageInfo,
    Problem,
    ProblemKind,
    Reference,
    ReferenceKind,
    Table,
)
from imgguard.reader import ImageReader, parse_struct

NAME = "vmdk"

VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
SECTOR = 512
# BLOCK_PROBE_BUF_SIZE: qemu's prober sees the first 2048 bytes, zero-filled past EOF.
PROBE_SIZE = 2048
# vmdk.c DESC_SIZE: vmdk_read_cid() and vmdk_parent_open() read 20 sectors of descriptor.
DESC_SIZE = 20 * SECTOR
# vmdk_read_desc(): a descriptor is read whole, but never more than this ("avoid unbounded
# allocation"); qemu does not refuse a longer one, it silently parses the first 1 MiB - 1.
DESC_READ_MAX = (1 << 20) - 1
# vmdk_open(): the CIDs and parentFileNameHint of a KDMV/COWD file live at this fixed offset.
SPARSE_DESC_OFFSET = 0x200
# vmdk_parent_open(): bs->auto_backing_file is PATH_MAX (4096) bytes.
MAX_PARENT_HINT = 4096 - 1
# vmdk_parse_extents(): "%511[^\n\r\"]" and "%10s".
MAX_EXTENT_NAME = 511
MAX_TOKEN = 10
# imgguard's own cap: places where an extent line may start that it scans in one descriptor
# (a 2 TB twoGbMaxExtent disk has 1024 extents).
MAX_EXTENT_SCANS = 4096
# vmdk_open_desc_file(): char ct[128].
MAX_CREATE_TYPE = 127

VMDK4_FLAG_NL_DETECT = 1 << 0
VMDK4_FLAG_RGD = 1 << 1
VMDK4_FLAG_COMPRESS = 1 << 16
VMDK4_COMPRESSION_DEFLATE = 1
VMDK4_GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
# The spec's newline-detection characters: '\n', ' ', '\r', '\n'.
CHECK_BYTES = b"\n \r\n"
# vmdk_open_vmdk4(): "L2 table size too big".
MAX_GTES_PER_GT = 512
# vmdk_add_extent(): "Invalid granularity" and "L1 size too big".
MAX_CLUSTER_SECTORS = 0x200000
MAX_L1_SIZE = 32 * 1024 * 1024
# Marker types of a streamOptimized file (vmdk.c MARKER_*).
MARKER_END_OF_STREAM = 0
MARKER_FOOTER = 3
FOOTER_SIZE = 3 * SECTOR
# The spec's COWDisk_Header flags.
COWDISK_ROOT = 0x01

# block_int-common.h BDRV_MAX_LENGTH: bdrv_open_driver() refuses total_sectors * 512 above it.
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

# vmdk_open_desc_file(): the createTypes a descriptor may name; anything else is refused.
DESCRIPTOR_CREATE_TYPES = frozenset(
    {
        "monolithicFlat",
        "vmfs",
        "vmfsSparse",
        "seSparse",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    }
)
# vmdk_parse_extents(): the extent types qemu opens; other types are skipped.
QEMU_EXTENT_TYPES = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})
# Extent types whose size qemu takes from the extent file's own header, not from the line.
SPARSE_EXTENT_TYPES = frozenset({"SPARSE", "VMFSSPARSE", "SESPARSE"})

# VMDK 1.1 "Hosted Sparse Extent Header" = qemu's magic + VMDK4Header, little-endian.
VMDK4_HEADER = Struct(
    "magic" / Bytes(4),
    "version" / Int32ul,
    "flags" / Int32ul,
    # In sectors, as are the offsets and sizes below except num_gtes_per_gt.
    "capacity" / Int64ul,
    "granularity" / Int64ul,
    "desc_offset" / Int64ul,
    "desc_size" / Int64ul,
    "num_gtes_per_gt" / Int32ul,
    "rgd_offset" / Int64ul,
    "gd_offset" / Int64ul,
    "grain_offset" / Int64ul,
    "filler" / Bytes(1),
    # singleEndLineChar, nonEndLineChar, doubleEndLineChar1, doubleEndLineChar2.
    "check_bytes" / Bytes(4),
    "compressAlgorithm" / Int16ul,
)
VMDK4_HEADER_SIZE = 4 + 75

# vmdk_open_vmdk4(): the footer qemu reads for gd_offset == GD_AT_END: a footer marker sector,
# the header again (magic included), then the end-of-stream marker sector.
MARKER = Struct("val" / Int64ul, "size" / Int32ul, "type" / Int32ul, Padding(SECTOR - 16))
STREAM_FOOTER = Struct(
    "footer_marker" / MARKER,
    "header" / VMDK4_HEADER,
    Padding(SECTOR - VMDK4_HEADER_SIZE),
    "eos_marker" / MARKER,
)

# The spec's COWDisk_Header (2048 bytes). qemu's VMDK3Header covers the first 44 bytes and
# names them version, flags, disk_sectors, granularity, l1dir_offset, l1dir_size, file_sectors,
# cylinders, heads, sectors_per_track; qemu's names are used here.
VMDK3_HEADER = Struct(
    "magic" / Const(VMDK3_MAGIC),
    "version" / Int32ul,
    "flags" / Int32ul,
    "disk_sectors" / Int32ul,
    "granularity" / Int32ul,
    "l1dir_offset" / Int32ul,
    "l1dir_size" / Int32ul,
    "file_sectors" / Int32ul,
    # union u: root {cylinders, heads, sectors} or child {parentFileName[1024],
    # parentGeneration}; which one is meant depends on flags & COWDISK_ROOT.
    "parentFileName" / Bytes(1024),
    "parentGeneration" / Int32ul,
    "generation" / Int32ul,
    "name" / Bytes(60),
    "description" / Bytes(512),
    "savedGeneration" / Int32ul,
    "reserved" / Bytes(8),
    "uncleanShutdown" / Int32ul,
    Padding(396),
)
VMDK3_HEADER_SIZE = 2048
COWD_PARENT_OFFSET = 32

# vmdk.c VMDK4_FLAG_*: bit number -> name.
VMDK4_FLAGS = {
    0: "newline_detection",
    1: "redundant_grain_table",
    2: "zeroed_grain",
    16: "compressed_grains",
    17: "markers",
}

# C isspace() in the "C" locale: what sscanf's whitespace directives and %s/%d skip.
_WS = b" \t\n\v\f\r"
_WS_RUN = re.compile(rb"[ \t\n\v\f\r]*")
_TOKEN = re.compile(rb"[^ \t\n\v\f\r]{1,%d}" % MAX_TOKEN)
_DECIMAL = re.compile(rb"([+-]?)([0-9]+)")
_HEX = re.compile(rb"([+-]?)(0[xX])?([0-9a-fA-F]*)")
_EXTENT_NAME = re.compile(rb'[^\n\r"]{1,%d}' % MAX_EXTENT_NAME)
# A token equal to an access mode, with the whitespace run in front of it.
_EXTENT_START = re.compile(
    rb"(?:(?<=[^ \t\n\v\f\r])|\A)([ \t\n\v\f\r]*)(RW|RDONLY|NOACCESS)(?![^ \t\n\v\f\r])"
)
_VERSION_LINE = re.compile(rb"^version=([0-9]{1,9})[ \t]*\r?$", re.MULTILINE)
_PROBE_VERSIONS = tuple(
    b"version=%d%s" % (number, ending) for number in (1, 2, 3) for ending in (b"\n", b"\r\n")
)


def _ddb(key: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"^[ \t]*" + re.escape(key) + rb'[ \t]*=[ \t]*"([^"\r\n]*)"', re.MULTILINE)


_DDB_ADAPTER = _ddb(b"ddb.adapterType")
_DDB_HWVERSION = _ddb(b"ddb.virtualHWVersion")


def probe(reader: ImageReader) -> int:
    """vmdk_probe(): KDMV/COWD magic, or a first non-comment, non-blank line `version=1|2|3`."""
    if reader.size == 0:
        # find_image_format() hands empty files to raw before any prober runs.
        return 0
    head = reader.head
    if head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC):
        return 100
    if head and head[0] not in (0x23, 0x20):
        # The usual case, binary data: no comment or blank line, so the first line is the one
        # to test, and no version line has a NUL to match the zero fill (no buffer copied).
        return 100 if head.startswith(_PROBE_VERSIONS) else 0
    # find_image_format() always passes 2048 bytes, zero-filled past the end of the file.
    buf = head[:PROBE_SIZE].ljust(PROBE_SIZE, b"\0")
    end = PROBE_SIZE
    p = 0
    while p < end:
        char = buf[p]
        if char == 0x23:  # '#': skip the comment line and its newline
            newline = buf.find(b"\n", p)
            p = (end if newline < 0 else newline) + 1
            continue
        if char == 0x20:  # a line of spaces (optionally "\r") is a blank line; else give up
            while p < end and buf[p] == 0x20:
                p += 1
            if p < end and buf[p] == 0x0D:
                p += 1
            if p == end or buf[p] != 0x0A:
                return 0
            p += 1
            continue
        return 100 if buf.startswith(_PROBE_VERSIONS, p) else 0
    return 0


def recognise(reader: ImageReader) -> bool:
    """A descriptor qemu's prober misses (no `version=` line first) but `-f vmdk` would open."""
    head = reader.head
    if reader.size < 4 or head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC):
        return False
    # The usual case, binary data: the C string ends inside the head without a createType
    # (what _read_c_text() below would return, without copying the head).
    nul = head.find(b"\0")
    if nul >= 0 and head.find(b"createType", 0, nul) < 0:
        return False
    # vmdk_open() -> vmdk_read_desc() parses the whole C string of up to 1 MiB - 1, not just
    # the prober's 2 KiB: a 5000-byte comment line would otherwise hide the createType and a
    # FLAT extent from imgguard but not from `qemu-img -f vmdk`. Binary data has a NUL in its
    # first bytes, so only text is read past the head.
    text, _ = _read_c_text(reader, 0, min(reader.size, DESC_READ_MAX), "descriptor")
    if b"createType" not in text:
        return False
    scans = itertools.islice(_scan_extents(text), MAX_EXTENT_SCANS)
    return any(scan.access == "RW" and scan.matches >= 4 for scan in scans)


# --- C string and sscanf emulation -------------------------------------------------------------


def _c_string(data: bytes, start: int = 0) -> bytes:
    """The C string at `start`: the bytes up to the first NUL."""
    nul = data.find(b"\0", start)
    return data[start:] if nul < 0 else data[start:nul]


def _skip_ws(text: bytes, pos: int) -> int:
    match = _WS_RUN.match(text, pos)
    return match.end() if match else pos


def _scan_decimal(text: bytes, pos: int) -> tuple[int, int] | None:
    """glibc "%ld" (SCNd64): skip whitespace, sign, digits; saturates like strtol()."""
    match = _DECIMAL.match(text, _skip_ws(text, pos))
    if match is None:
        return None
    digits = match.group(2).lstrip(b"0")
    value = INT64_MAX + 1 if len(digits) > 19 else int(digits or b"0")
    value = max(-value, INT64_MIN) if match.group(1) == b"-" else min(value, INT64_MAX)
    return value, match.end()


def scan_hex32(text: bytes) -> int | None:
    """glibc sscanf(text, "%x") into a uint32_t (SCNx32): strtoul() then truncation."""
    match = _HEX.match(text, _skip_ws(text, 0))
    if match is None or not (match.group(2) or match.group(3)):
        return None
    digits = match.group(3).lstrip(b"0")
    if len(digits) > 16:
        value = U64  # strtoul() saturates at ULONG_MAX, sign or not
    else:
        value = int(digits or b"0", 16)
        if match.group(1) == b"-":
            value = -value & U64
    return value & U32


class ExtentScan(NamedTuple):
    """What `sscanf(p, "%10s %ld %10s \\"%511[^\\n\\r\\"]\\" %ld", ...)` found at one place."""

    start: int
    # How many line starts of the descriptor reach this extent (qemu adds it that many times).
    copies: int
    matches: int
    access: str
    sectors: int = 0
    type: str = ""
    filename: bytes | None = None
    filename_offset: int = 0
    flat_offset: int = -1


def scan_extent_line(text: bytes, pos: int) -> tuple[int, str, int, str, bytes | None, int, int]:
    """sscanf() of vmdk_parse_extents() on the C string text[pos:].

    Returns (matches, access, sectors, type, filename, filename_offset, flat_offset); fields
    not converted keep qemu's initial values. matches is -1 when the input ends before the first
    conversion (sscanf's EOF).
    """
    matches = 0
    access = type_ = ""
    sectors = 0
    flat_offset = -1
    filename: bytes | None = None
    name_at = 0
    pos = _skip_ws(text, pos)
    token = _TOKEN.match(text, pos)
    if token is None:
        return -1, access, sectors, type_, filename, name_at, flat_offset
    access = token.group().decode("latin-1")
    matches = 1
    number = _scan_decimal(text, token.end())
    if number is not None:
        sectors, pos = number
        matches = 2
        token = _TOKEN.match(text, _skip_ws(text, pos))
        if token is not None:
            type_ = token.group().decode("latin-1")
            matches = 3
            pos = _skip_ws(text, token.end())
            if text[pos : pos + 1] == b'"':
                name = _EXTENT_NAME.match(text, pos + 1)
                if name is not None:
                    filename, name_at = name.group(), name.start()
                    matches = 4
                    if text[name.end() : name.end() + 1] == b'"':
                        number = _scan_decimal(text, name.end() + 1)
                        if number is not None:
                            flat_offset = number[0]
                            matches = 5
    return matches, access, sectors, type_, filename, name_at, flat_offset


def _scan_extents(text: bytes) -> Iterator[ExtentScan]:
    """Every place where a line of `text` makes qemu's sscanf() start on an access mode.

    sscanf() skips leading whitespace, newlines included, so all the line starts inside one
    whitespace run reach the same token: the token is scanned once and counted `copies` times.
    """
    for found in _EXTENT_START.finditer(text):
        run = found.group(1)
        if not run and found.start() != 0:
            continue  # glued to the text before it: not the start of a token
        copies = (1 if found.start() == 0 else 0) + run.count(b"\n")
        if copies == 0:
            continue  # inside a line: no line start reaches it
        matches, access, sectors, type_, filename, name_at, flat_offset = scan_extent_line(
            text, found.start(2)
        )
        yield ExtentScan(
            start=found.start(2),
            copies=copies,
            matches=matches,
            access=access,
            sectors=sectors,
            type=type_,
            filename=filename,
            filename_offset=name_at,
            flat_offset=flat_offset,
        )


def _decode(name: bytes) -> str:
    return name.decode("utf-8", errors="surrogateescape")


# --- reading ------------------------------------------------------------------------------------


def _read_c_text(reader: ImageReader, offset: int, limit: int, field: str) -> tuple[bytes, bool]:
    """The C string qemu sees in a `limit`-byte buffer read at `offset` (zero-filled past EOF).

    Returns the text and whether `limit` cut it short (no NUL within it and the file goes on).
    """
    if offset >= reader.size or limit <= 0:
        return b"", False
    available = min(limit, reader.size - offset)
    cut = offset + available < reader.size
    parts = []
    pos = offset
    head = reader.head
    if pos < len(head):
        chunk = head[pos : min(len(head), offset + available)]
        nul = chunk.find(b"\0")
        if nul >= 0:
            return chunk[:nul], False
        parts.append(chunk)
        pos += len(chunk)
    end = offset + available
    while pos < end:
        chunk = reader.read(pos, min(end - pos, 64 * 1024), field=field)
        nul = chunk.find(b"\0")
        if nul >= 0:
            parts.append(chunk[:nul])
            return b"".join(parts), False
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts), cut


def _padded(reader: ImageReader, offset: int, length: int, field: str) -> bytes:
    """`length` bytes at `offset` as qemu's bdrv_pread() returns them: zeros past EOF."""
    if offset + length <= len(reader.head):
        data = reader.head[offset : offset + length]
    else:
        data = reader.read_available(offset, length, field=field)
    return data.ljust(length, b"\0")


def _read_ok(offset: int, length: int) -> bool:
    """Whether bdrv_pread() accepts the request (bdrv_check_qiov_request); offset is int64."""
    if offset >= 1 << 63:
        offset -= 1 << 64
    return offset >= 0 and length <= BDRV_MAX_LENGTH and offset <= BDRV_MAX_LENGTH - length


class _DescriptorFacts(NamedTuple):
    cid: int | None
    parent_cid: int | None
    backing_file: str | None
    hint_offset: int | None
    problems: tuple[Problem, ...]

    def hint_references(self) -> tuple[Reference, ...]:
        """parentFileNameHint as a reference, when the descriptor names a parent."""
        if self.backing_file is None:
            return ()
        return (
            Reference(
                ReferenceKind.PARENT_HINT, self.backing_file, "parentFileNameHint", self.hint_offset
            ),
        )


def _qemu_descriptor_facts(reader: ImageReader, base: int) -> _DescriptorFacts:
    """vmdk_read_cid() (CID, parentCID) and vmdk_parent_open() on the DESC_SIZE bytes at `base`.

    Both take the FIRST occurrence of their key anywhere in the text (strstr), comments and
    other keys included: "CID" is found inside "parentCID" when that comes first.
    """
    problems: list[Problem] = []
    text, _ = _read_c_text(reader, base, DESC_SIZE, "descriptor")
    raw: bytes | None = None

    def raw_buffer() -> bytes:
        # g_malloc0(DESC_SIZE + 1) filled with DESC_SIZE bytes: the bytes after the first NUL
        # matter only when a key sits right at the end of the C string.
        nonlocal raw
        if raw is None:
            raw = _padded(reader, base, DESC_SIZE, "descriptor") + b"\0"
        return raw

    def read_cid(key: bytes, field: str) -> int | None:
        cid_text = text[: DESC_SIZE - 1]  # desc[DESC_SIZE - 1] = '\0'
        where = cid_text.find(key)
        if where < 0:
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"no {key.decode()} in the descriptor at {base:#x}: qemu refuses to open it",
                    field=field,
                    offset=base,
                )
            )
            return None
        value_at = where + len(key) + 1  # p_name += sizeof("CID"): skips the key and one char
        if value_at <= len(cid_text):
            value = scan_hex32(cid_text[value_at:])
        else:
            buffer = raw_buffer()[: DESC_SIZE - 1] + b"\0"
            value = scan_hex32(_c_string(buffer, value_at)) if value_at < len(buffer) else None
        if value is None:
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"{key.decode()} has no hexadecimal value: qemu refuses to open the image",
                    field=field,
                    offset=base + where,
                )
            )
        return value

    # vmdk_open() reads CID first, then parentCID.
    cid = read_cid(b"CID", "CID")
    parent_cid = read_cid(b"parentCID", "parentCID")

    backing = None
    hint_offset = None
    key = b"parentFileNameHint"
    where = text.find(key)
    if where >= 0:
        # p_name += sizeof("parentFileNameHint") + 1: the key, then two characters (="),
        # whatever they are; the name runs to the next '"' (strchr).
        start = where + len(key) + 2
        if start <= len(text):
            quote = text.find(b'"', start)
            name = text[start:quote] if quote >= 0 else None
        else:
            buffer = raw_buffer()
            if start < len(buffer):
                tail = _c_string(buffer, start)
                quote = tail.find(b'"')
                name = tail[:quote] if quote >= 0 else None
            else:
                name = None
        if name is None:
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    "parentFileNameHint has no closing quote: qemu refuses to open the image",
                    field="parentFileNameHint",
                    offset=base + where,
                )
            )
        elif len(name) > MAX_PARENT_HINT:
            problems.append(
                Problem(
                    ProblemKind.LIMIT,
                    f"parentFileNameHint is {len(name)} bytes, over qemu's {MAX_PARENT_HINT}: "
                    "qemu refuses to open the image",
                    field="parentFileNameHint",
                    offset=base + start,
                )
            )
        elif name:
            # An empty hint leaves bs->backing_file empty: no backing file.
            backing = _decode(name)
            hint_offset = base + start
    return _DescriptorFacts(cid, parent_cid, backing, hint_offset, tuple(problems))


def _sparse_descriptor_facts(
    reader: ImageReader, problems: list[Problem], header: dict[str, Any]
) -> _DescriptorFacts:
    """vmdk_open() reads CID, parentCID and parentFileNameHint at 0x200 of a sparse file too."""
    facts = _qemu_descriptor_facts(reader, SPARSE_DESC_OFFSET)
    problems.extend(facts.problems)
    header.update(
        cid=facts.cid, parent_cid=facts.parent_cid, parent_file_name_hint=facts.backing_file
    )
    return facts


def _parse_create_type(text: bytes) -> tuple[str | None, int | None, str | None]:
    """vmdk_parse_description(desc, "createType", ct, 128).

    Returns (createType, offset of its value, why qemu refuses it). The first "createType"
    anywhere wins; the two characters after it are skipped whatever they are.
    """
    where = text.find(b"createType")
    if where < 0:
        return None, None, "no createType"
    start = where + len(b"createType") + 2
    if start >= len(text):
        return None, where, "createType has no value"
    quote = text.find(b'"', start)
    if quote < 0:
        return None, where, "createType has no closing quote"
    if quote - start + 1 > MAX_CREATE_TYPE + 1:
        return None, where, f"createType is longer than {MAX_CREATE_TYPE} bytes"
    return _decode(text[start:quote]), start, None


class _Extents(NamedTuple):
    extents: tuple[Extent, ...]
    references: tuple[Reference, ...]
    problems: tuple[Problem, ...]
    qemu_sectors: int
    qemu_count: int
    sparse: bool
    complete: bool


def _parse_extents(text: bytes, base: int) -> _Extents:
    """vmdk_parse_extents() on the descriptor `text` found at file offset `base`, whose named
    files qemu opens (a descriptor file, or the descriptor of a capacity-0 KDMV header)."""
    extents: list[Extent] = []
    references: list[Reference] = []
    problems: list[Problem] = []
    qemu_sectors = 0
    qemu_count = 0
    sparse = False
    scans = list(itertools.islice(_scan_extents(text), MAX_EXTENT_SCANS + 1))
    complete = len(scans) <= MAX_EXTENT_SCANS
    if not complete:
        scans.pop()
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"more than {MAX_EXTENT_SCANS} extent lines; imgguard reads only those, so the "
                "virtual size is unknown",
                field="extents",
                offset=base + scans[-1].start,
            )
        )
    for scan in scans:
        if scan.matches < 3:
            continue  # no size and type: not an extent line to anyone
        filename = None if scan.filename is None else _decode(scan.filename)
        at = base + scan.start
        field = f"extent[{len(extents)}]"
        extents.append(
            Extent(
                access=scan.access,
                size_sectors=scan.sectors,
                type=scan.type,
                filename=filename,
                offset=scan.flat_offset if scan.matches == 5 and scan.flat_offset >= 0 else 0,
            )
        )
        if filename is not None:
            references.append(
                Reference(ReferenceKind.EXTENT, filename, field, base + scan.filename_offset)
            )
        verdict = _qemu_extent_verdict(scan)
        if verdict == "invalid":
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"invalid extent line for qemu ({scan.type} with the wrong number of "
                    "fields or a negative offset): qemu refuses to open the image",
                    field=field,
                    offset=at,
                )
            )
        elif verdict != "used":
            problems.append(
                Problem(
                    ProblemKind.UNSUPPORTED,
                    f"qemu ignores this extent ({verdict}); VMware would not",
                    field=field,
                    offset=at,
                )
            )
        else:
            qemu_sectors += scan.sectors * scan.copies
            qemu_count += scan.copies
            sparse = sparse or scan.type in SPARSE_EXTENT_TYPES
            if scan.copies > 1:
                problems.append(
                    Problem(
                        ProblemKind.INCONSISTENT,
                        f"qemu adds this extent {scan.copies} times: sscanf() skips the blank "
                        "lines in front of it and each of them starts a scan",
                        field=field,
                        offset=at,
                    )
                )
    return _Extents(
        tuple(extents),
        tuple(references),
        tuple(problems),
        qemu_sectors,
        qemu_count,
        sparse,
        complete,
    )


def _extent_lines(text: bytes, scans: Iterable[ExtentScan] | None = None) -> tuple[str, ...]:
    """The extent lines of a descriptor qemu does not open, as text (facts only); `scans` are
    the first MAX_EXTENT_SCANS scans of `text` where the caller has them already."""
    if scans is None:
        scans = itertools.islice(_scan_extents(text), MAX_EXTENT_SCANS)
    lines = []
    for scan in scans:
        if scan.matches >= 3:
            end = text.find(b"\n", scan.start)
            line = text[scan.start : len(text) if end < 0 else end]
            lines.append(_decode(line.rstrip(b"\r")))
    return tuple(lines)


def _embedded_extent_problems(
    text: bytes, base: int, scans: Iterable[ExtentScan] | None = None
) -> list[Problem]:
    """Extent lines of a sparse file's embedded descriptor that name anything but the file.

    qemu never opens them (vmdk_open_vmdk4() uses the header), but VMware reads the embedded
    descriptor, and a hosted sparse or streamOptimized file names exactly one SPARSE extent:
    itself, by a bare file name. A FLAT/VMFS/... line, or a name with a directory, a drive or a
    protocol in it, points outside the file (oslo's format_inspector refuses such lines too).
    """
    if scans is None:
        scans = itertools.islice(_scan_extents(text), MAX_EXTENT_SCANS)
    problems = []
    for index, scan in enumerate(scans):
        if scan.matches < 3:
            continue
        name = scan.filename or b""
        if scan.type == "SPARSE" and not any(char in name for char in b"/\\:"):
            continue
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                f"the embedded descriptor names a {scan.type} extent {_decode(name)!r}, not "
                "this sparse file: qemu ignores it, VMware would open it",
                field=f"descriptor_extents[{index}]",
                offset=base + scan.start,
            )
        )
    return problems


def _qemu_extent_verdict(scan: ExtentScan) -> str:
    """What vmdk_parse_extents() does with one scan: "used", "invalid" or why it skips it."""
    if scan.matches < 4:
        return f"{scan.type} extent without a quoted file name"
    if scan.access != "RW":
        return f"access {scan.access} is not RW"
    if scan.type == "FLAT":
        if scan.matches != 5 or scan.flat_offset < 0:
            return "invalid"
    elif scan.type == "VMFS":
        if scan.matches != 4:
            return "invalid"
    elif scan.matches != 4:
        return "invalid"
    if scan.sectors <= 0:
        return f"size {scan.sectors} is not positive"
    if scan.type not in QEMU_EXTENT_TYPES:
        return f"type {scan.type} is not one qemu opens"
    return "used"


def _ddb_facts(text: bytes) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    adapter = _DDB_ADAPTER.search(text)
    if adapter:
        facts["adapter_type"] = _decode(adapter.group(1))
    hwversion = _DDB_HWVERSION.search(text)
    if hwversion:
        facts["hwversion"] = _decode(hwversion.group(1))
        # qemu-img's compat6 option is ddb.virtualHWVersion = "6".
        facts["compat6"] = hwversion.group(1) == b"6"
    version = _VERSION_LINE.search(text)
    if version:
        facts["descriptor_version"] = int(version.group(1))
    return facts


def _size_problems(sectors: int, field: str, offset: int | None) -> list[Problem]:
    """bdrv_open_driver()/bdrv_getlength(): total_sectors * 512 must fit BDRV_MAX_LENGTH."""
    if 0 <= sectors * SECTOR <= BDRV_MAX_LENGTH:
        return []
    return [
        Problem(
            ProblemKind.LIMIT,
            f"{sectors} sectors is over qemu's maximum disk size ({BDRV_MAX_LENGTH} bytes): "
            "qemu-img cannot open the image",
            field=field,
            offset=offset,
        )
    ]


# --- descriptor files ---------------------------------------------------------------------------


def _descriptor_info(
    reader: ImageReader,
    text: bytes,
    base: int,
    *,
    capped: bool,
    facts_base: int,
    header: dict[str, Any],
    problems: list[Problem],
    version: int | None,
) -> ImageInfo:
    """vmdk_open_desc_file() on `text` (read at `base`), with CIDs and hint from `facts_base`."""
    create_type, type_offset, refusal = _parse_create_type(text)
    if refusal is not None:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                f"{refusal}: qemu refuses the descriptor (invalid VMDK image descriptor)",
                field="createType",
                offset=base + (type_offset or 0),
            )
        )
    elif create_type not in DESCRIPTOR_CREATE_TYPES:
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                f"qemu refuses a descriptor of createType {create_type!r}",
                field="createType",
                offset=base + (type_offset or 0),
            )
        )
    if capped:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"the descriptor is longer than {DESC_READ_MAX} bytes; qemu parses only those",
                field="descriptor",
                offset=base,
            )
        )
    parsed = _parse_extents(text, base)
    problems.extend(parsed.problems)
    if (
        parsed.complete
        and parsed.qemu_count == 0
        and not any(p.kind is ProblemKind.MALFORMED for p in problems)
    ):
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                "the descriptor has no extent qemu uses; qemu-img info aborts on it",
                field="extents",
                offset=base,
            )
        )
    problems.extend(_size_problems(parsed.qemu_sectors, "extents", base))
    facts = _qemu_descriptor_facts(reader, facts_base)
    problems.extend(facts.problems)
    references = (*parsed.references, *facts.hint_references())
    header.update(_ddb_facts(text))
    header.update(
        create_type=create_type,
        cid=facts.cid,
        parent_cid=facts.parent_cid,
        parent_file_name_hint=facts.backing_file,
        extent_lines=len(parsed.extents),
        qemu_extents=parsed.qemu_count,
        # qemu takes a sparse extent's size from that file's own header, not from the line.
        size_from_extent_headers=parsed.sparse,
    )
    return ImageInfo(
        format=NAME,
        variant=create_type,
        virtual_size=parsed.qemu_sectors * SECTOR if parsed.complete else None,
        version=version if version is not None else header.get("descriptor_version"),
        backing_file=facts.backing_file,
        backing_format=NAME if facts.backing_file is not None else None,
        extents=parsed.extents,
        references=references,
        problems=tuple(problems),
        header=header,
    )


def _inspect_descriptor_file(reader: ImageReader) -> ImageInfo:
    # vmdk_open(): a file without a sparse magic is a descriptor, read whole up to 1 MiB - 1.
    text, capped = _read_c_text(reader, 0, min(reader.size, DESC_READ_MAX), "descriptor")
    if b"createType" not in text and next(_scan_extents(text), None) is None:
        raise MalformedImage(
            "not a VMDK descriptor: no createType and no extent line", field="createType", offset=0
        )
    header: dict[str, Any] = {"descriptor_offset": 0, "descriptor_length": len(text)}
    return _descriptor_info(
        reader,
        text,
        0,
        capped=capped,
        facts_base=0,
        header=header,
        problems=[],
        version=None,
    )


# --- KDMV (hosted sparse) ------------------------------------------------------------------------


def _vmdk4_features(flags: int) -> tuple[Feature, ...]:
    # qemu ignores flag bits it does not know, so none of them stops it: all are "compatible".
    return tuple(
        Feature(VMDK4_FLAGS.get(bit, f"bit{bit}"), FeatureKind.COMPATIBLE, bit, bit in VMDK4_FLAGS)
        for bit in range(32)
        if flags >> bit & 1
    )


def _read_footer(reader: ImageReader, problems: list[Problem]) -> Any | None:
    """The streamOptimized footer, where vmdk_open_vmdk4() looks for it, or None."""
    # qemu reads at total_sectors * 512 - 1536 where total_sectors rounds the size up.
    rounded = -(-reader.size // SECTOR) * SECTOR
    at = rounded - FOOTER_SIZE
    if at < 0:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                "gd_offset is GD_AT_END but the file is too small for a footer: "
                "qemu fails to read it",
                field="footer",
                offset=0,
            )
        )
        return None
    if at == reader.size - FOOTER_SIZE:
        data = reader.tail
    else:
        data = _padded(reader, at, FOOTER_SIZE, "footer")
    footer = parse_struct(STREAM_FOOTER, data, offset=at, what="footer")
    if (
        footer["header"]["magic"] != VMDK4_MAGIC
        or footer["footer_marker"]["size"] != 0
        or footer["footer_marker"]["type"] != MARKER_FOOTER
        or footer["eos_marker"]["val"] != 0
        or footer["eos_marker"]["size"] != 0
        or footer["eos_marker"]["type"] != MARKER_END_OF_STREAM
    ):
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                "gd_offset is GD_AT_END but the footer marker, footer header or end-of-stream "
                "marker is wrong: qemu refuses the image (Invalid footer)",
                field="footer",
                offset=at,
            )
        )
        return None
    return footer


def _inspect_vmdk4(reader: ImageReader) -> ImageInfo:
    problems: list[Problem] = []
    if reader.size < VMDK4_HEADER_SIZE:
        # bdrv_pread() zero-fills: qemu reads the missing fields as zeros.
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"the header needs {VMDK4_HEADER_SIZE} bytes but the file has {reader.size}",
                field="header",
                offset=0,
            )
        )
    first = parse_struct(
        VMDK4_HEADER, _padded(reader, 0, VMDK4_HEADER_SIZE, "header"), offset=0, what="header"
    )

    if first["capacity"] == 0 and first["desc_offset"] != 0:
        return _inspect_vmdk4_descriptor(reader, first, problems)

    header_at = 0
    hdr = first
    from_footer = False
    if first["gd_offset"] == VMDK4_GD_AT_END:
        # "The footer takes precedence over the header".
        footer = _read_footer(reader, problems)
        if footer is not None:
            hdr = footer["header"]
            header_at = -(-reader.size // SECTOR) * SECTOR - FOOTER_SIZE + SECTOR
            from_footer = True

    compressed = hdr["compressAlgorithm"] == VMDK4_COMPRESSION_DEFLATE
    variant = "streamOptimized" if compressed else "monolithicSparse"
    flags = hdr["flags"]
    if hdr["version"] > 3:
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                f"VMDK version {hdr['version']}: qemu supports 1 to 3",
                field="version",
                offset=header_at + 4,
            )
        )
    if hdr["compressAlgorithm"] not in (0, VMDK4_COMPRESSION_DEFLATE):
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                f"unknown compressAlgorithm {hdr['compressAlgorithm']}; qemu reads the grains "
                "as uncompressed",
                field="compressAlgorithm",
                offset=header_at + 77,
            )
        )
    if bool(flags & VMDK4_FLAG_COMPRESS) != compressed:
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                "the compressed-grains flag and compressAlgorithm disagree; qemu goes by "
                "compressAlgorithm",
                field="flags",
                offset=header_at + 8,
            )
        )
    if flags & VMDK4_FLAG_NL_DETECT and hdr["check_bytes"] != CHECK_BYTES:
        problems.append(
            Problem(
                ProblemKind.INCONSISTENT,
                f"newline-detection bytes are {hdr['check_bytes']!r}, not {CHECK_BYTES!r}: the "
                "file went through a text-mode transfer",
                field="check_bytes",
                offset=header_at + 73,
            )
        )

    tables: list[Table] = []
    l1_size = None
    if hdr["num_gtes_per_gt"] > MAX_GTES_PER_GT:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"num_gtes_per_gt {hdr['num_gtes_per_gt']} is over qemu's {MAX_GTES_PER_GT}",
                field="num_gtes_per_gt",
                offset=header_at + 44,
            )
        )
    # uint32_t l1_entry_sectors = num_gtes_per_gt * granularity (64-bit product, truncated).
    l1_entry_sectors = (hdr["num_gtes_per_gt"] * hdr["granularity"]) & U32
    if l1_entry_sectors == 0:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                "num_gtes_per_gt * granularity is 0 modulo 2**32: qemu refuses the image "
                "(L1 entry size is invalid)",
                field="granularity",
                offset=header_at + 20,
            )
        )
    else:
        # uint32_t l1_size = (capacity + l1_entry_sectors - 1) / l1_entry_sectors, in 64 bits.
        l1_size = (((hdr["capacity"] + l1_entry_sectors - 1) & U64) // l1_entry_sectors) & U32
    granularity = hdr["granularity"]
    if granularity == 0 or granularity & (granularity - 1):
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                f"granularity {granularity} is not a power of two as the spec requires "
                "(qemu does not check)",
                field="granularity",
                offset=header_at + 20,
            )
        )
    nb_sectors = -(-reader.size // SECTOR)
    if nb_sectors < hdr["grain_offset"]:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"grain_offset {hdr['grain_offset']} is past the end of the file ({nb_sectors} "
                "sectors): qemu refuses the image (File truncated)",
                field="grain_offset",
                offset=header_at + 64,
            )
        )
    if granularity > MAX_CLUSTER_SECTORS:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"granularity {granularity} sectors is over qemu's {MAX_CLUSTER_SECTORS}",
                field="granularity",
                offset=header_at + 20,
            )
        )
    if l1_size is not None and l1_size > MAX_L1_SIZE:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"the grain directory has {l1_size} entries, over qemu's {MAX_L1_SIZE}",
                field="gd_offset",
                offset=header_at + 56,
            )
        )
    # Without a usable footer the grain directory's place is unknown ("Invalid footer" above).
    footer_missing = first["gd_offset"] == VMDK4_GD_AT_END and not from_footer
    if l1_size is not None and not footer_missing:
        length = l1_size * 4
        gd_at = (hdr["gd_offset"] << 9) & U64
        tables.append(Table("grain_directory", hdr["gd_offset"] * SECTOR, length))
        if not _read_ok(gd_at, length):
            problems.append(
                Problem(
                    ProblemKind.MALFORMED,
                    f"gd_offset {hdr['gd_offset']:#x} is beyond what qemu can read",
                    field="gd_offset",
                    offset=header_at + 56,
                )
            )
        rgd_at = (hdr["rgd_offset"] << 9) & U64
        if flags & VMDK4_FLAG_RGD and rgd_at:
            tables.append(Table("redundant_grain_directory", hdr["rgd_offset"] * SECTOR, length))
            if not _read_ok(rgd_at, length):
                problems.append(
                    Problem(
                        ProblemKind.MALFORMED,
                        f"rgd_offset {hdr['rgd_offset']:#x} is beyond what qemu can read",
                        field="rgd_offset",
                        offset=header_at + 48,
                    )
                )
    if compressed and 0 < granularity <= MAX_CLUSTER_SECTORS:
        # vmdk_read_extent(): every read of a compressed grain allocates two grains for the
        # compressed data (g_malloc(2 * cluster_bytes), read whole, past EOF as zeros) and one
        # for the inflated grain. A 1 MiB streamOptimized file saying granularity 0x100000
        # made `qemu-img convert` take 1 GB; 0x200000 overflows qemu's int and aborts it.
        tables.append(
            Table(
                "compressed_grain_buffers",
                header_at + 20,
                3 * granularity * SECTOR,
                loaded_at_open=True,
                in_file=False,
            )
        )
    problems.extend(_size_problems(hdr["capacity"], "capacity", header_at + 12))

    header: dict[str, Any] = {
        "version": hdr["version"],
        "flags": flags,
        "capacity": hdr["capacity"],
        "granularity": granularity,
        "desc_offset": hdr["desc_offset"],
        "desc_size": hdr["desc_size"],
        "num_gtes_per_gt": hdr["num_gtes_per_gt"],
        "rgd_offset": hdr["rgd_offset"],
        "gd_offset": hdr["gd_offset"],
        "grain_offset": hdr["grain_offset"],
        "check_bytes": hdr["check_bytes"].hex(),
        "compressAlgorithm": hdr["compressAlgorithm"],
        "l1_size": l1_size,
        "header_in_footer": from_footer,
        # vmdk_open_vmdk4(): version 3 without compression opens read-only only.
        "read_only": hdr["version"] == 3 and not compressed,
        "create_type": variant,
    }

    # The embedded descriptor as VMware reads it (desc_offset, desc_size): facts only, qemu
    # never parses its createType or extent lines for a sparse file with a capacity.
    if first["desc_offset"] and first["desc_size"]:
        desc_at = first["desc_offset"] * SECTOR
        desc_len = min(first["desc_size"] * SECTOR, DESC_READ_MAX)
        if desc_at + min(first["desc_size"] * SECTOR, DESC_READ_MAX) > reader.size:
            problems.append(
                Problem(
                    ProblemKind.TRUNCATED,
                    "the embedded descriptor ends past the end of the file",
                    field="desc_offset",
                    offset=28,
                )
            )
        text, _ = _read_c_text(reader, desc_at, desc_len, "descriptor")
        embedded_type, _, _ = _parse_create_type(text)
        header["descriptor_create_type"] = embedded_type
        if embedded_type is not None and embedded_type != variant:
            problems.append(
                Problem(
                    ProblemKind.INCONSISTENT,
                    f"the embedded descriptor says createType {embedded_type!r} but qemu reads "
                    f"the file as {variant} (it goes by compressAlgorithm)",
                    field="createType",
                    offset=desc_at,
                )
            )
        # One scan of the descriptor serves both.
        scans = list(itertools.islice(_scan_extents(text), MAX_EXTENT_SCANS))
        header["descriptor_extents"] = _extent_lines(text, scans)
        problems.extend(_embedded_extent_problems(text, desc_at, scans))
        header.update(_ddb_facts(text))

    facts = _sparse_descriptor_facts(reader, problems, header)
    return ImageInfo(
        format=NAME,
        variant=variant,
        virtual_size=hdr["capacity"] * SECTOR,
        version=hdr["version"],
        cluster_size=granularity * SECTOR,
        backing_file=facts.backing_file,
        backing_format=NAME if facts.backing_file is not None else None,
        # The one extent qemu builds: the file itself.
        extents=(Extent(access="RW", size_sectors=hdr["capacity"], type="SPARSE", filename=None),),
        references=facts.hint_references(),
        features=_vmdk4_features(flags),
        tables=tuple(tables),
        problems=tuple(problems),
        header=header,
    )


def _inspect_vmdk4_descriptor(
    reader: ImageReader, first: Any, problems: list[Problem]
) -> ImageInfo:
    """vmdk_open_vmdk4() with capacity 0 and a desc_offset: the descriptor there is opened as a
    descriptor file (its extents are opened); nothing else in the header is looked at."""
    desc_at = (first.desc_offset << 9) & U64
    length = min(reader.size, DESC_READ_MAX)
    header: dict[str, Any] = {
        "version": first.version,
        "flags": first.flags,
        "capacity": 0,
        "desc_offset": first.desc_offset,
        "desc_size": first.desc_size,
        "descriptor_offset": desc_at,
        # The extents named in this descriptor are opened like those of a descriptor file.
        "descriptor_in_sparse_header": True,
    }
    if not _read_ok(desc_at, length):
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                f"desc_offset {first.desc_offset:#x} is beyond what qemu can read",
                field="desc_offset",
                offset=28,
            )
        )
        text, capped = b"", False
    else:
        # Past the end of the file qemu reads zeros: the descriptor ends there.
        text, capped = _read_c_text(reader, desc_at, length, "descriptor")
    header["descriptor_length"] = len(text)
    return _descriptor_info(
        reader,
        text,
        desc_at,
        capped=capped,
        # vmdk_open() sets s->desc_offset = 0x200 after vmdk_open_sparse() returns.
        facts_base=SPARSE_DESC_OFFSET,
        header=header,
        problems=problems,
        version=first.version,
    )


# --- COWD (ESX sparse) ----------------------------------------------------------------------------


def _inspect_vmdk3(reader: ImageReader) -> ImageInfo:
    problems: list[Problem] = []
    if reader.size < 4 + 40:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"the header needs 44 bytes but the file has {reader.size}",
                field="header",
                offset=0,
            )
        )
    data = _padded(reader, 0, VMDK3_HEADER_SIZE, "header")
    hdr = parse_struct(VMDK3_HEADER, data, offset=0, what="header")
    # vmdk_open_vmfs_sparse() -> vmdk_add_extent(sectors=disk_sectors, l1 at l1dir_offset,
    # l1_size=l1dir_size, l2_size=4096, cluster_sectors=granularity).
    if hdr["granularity"] > MAX_CLUSTER_SECTORS:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"granularity {hdr['granularity']} sectors is over qemu's {MAX_CLUSTER_SECTORS}",
                field="granularity",
                offset=16,
            )
        )
    elif hdr["granularity"] == 0:
        problems.append(
            Problem(
                ProblemKind.MALFORMED,
                "granularity 0: qemu does not check it and divides by zero on the first read",
                field="granularity",
                offset=16,
            )
        )
    if hdr["l1dir_size"] > MAX_L1_SIZE:
        problems.append(
            Problem(
                ProblemKind.LIMIT,
                f"the grain directory has {hdr['l1dir_size']} entries, over qemu's {MAX_L1_SIZE}",
                field="l1dir_size",
                offset=24,
            )
        )
    tables = (Table("grain_directory", hdr["l1dir_offset"] * SECTOR, hdr["l1dir_size"] * 4),)
    problems.extend(_size_problems(hdr["disk_sectors"], "disk_sectors", 12))

    references: list[Reference] = []
    parent_name = None
    header: dict[str, Any] = {
        "version": hdr["version"],
        "flags": hdr["flags"],
        "disk_sectors": hdr["disk_sectors"],
        "granularity": hdr["granularity"],
        "l1dir_offset": hdr["l1dir_offset"],
        "l1dir_size": hdr["l1dir_size"],
        "file_sectors": hdr["file_sectors"],
        "generation": hdr["generation"],
        "uncleanShutdown": hdr["uncleanShutdown"],
        "create_type": None,
    }
    if not hdr["flags"] & COWDISK_ROOT:
        # A child (redo log): u.child.parentFileName names its parent. qemu never reads it;
        # VMware follows it, so it is reported as the parent the image depends on.
        name = _c_string(hdr["parentFileName"])
        header["parentGeneration"] = hdr["parentGeneration"]
        if name:
            parent_name = _decode(name)
            references.append(
                Reference(
                    ReferenceKind.PARENT_HINT, parent_name, "parentFileName", COWD_PARENT_OFFSET
                )
            )
    header["parentFileName"] = parent_name

    # vmdk_open() still reads CID, parentCID and parentFileNameHint at 0x200 (inside the COWD
    # header: the tail of parentFileName, name and description).
    facts = _sparse_descriptor_facts(reader, problems, header)
    references.extend(facts.hint_references())
    return ImageInfo(
        format=NAME,
        # qemu leaves create_type NULL for a COWD file (qemu-img info prints "").
        variant=None,
        virtual_size=hdr["disk_sectors"] * SECTOR,
        version=hdr["version"],
        cluster_size=hdr["granularity"] * SECTOR,
        backing_file=facts.backing_file,
        backing_format=NAME if facts.backing_file is not None else None,
        extents=(
            Extent(access="RW", size_sectors=hdr["disk_sectors"], type="VMFSSPARSE", filename=None),
        ),
        references=tuple(references),
        tables=tables,
        problems=tuple(problems),
        header=header,
    )


def inspect(reader: ImageReader) -> ImageInfo:
    """Read a KDMV or COWD sparse file or a text descriptor the way vmdk_open() does."""
    if reader.size < 4:
        # vmdk_read_desc(): "File is too small, not a valid image".
        raise TruncatedImage(
            f"a VMDK file needs at least 4 bytes, this one has {reader.size}",
            field="magic",
            offset=0,
        )
    magic = reader.head[:4]
    if magic == VMDK4_MAGIC:
        return _inspect_vmdk4(reader)
    if magic == VMDK3_MAGIC:
        return _inspect_vmdk3(reader)
    return _inspect_descriptor_file(reader)


DRIVER = FormatDriver(
    name=NAME,
    probe=probe,
    inspect=inspect,
    recognise=recognise,
    # vmdk_probe() scores only a magic or a text whose first line is a comment, a blank line
    # or `version=`.
    probe_signatures=((0, (b"#", b" ", b"v", VMDK4_MAGIC[:1], VMDK3_MAGIC[:1])),),
)
