"""dmg: Apple UDIF disk images (`block/dmg.c`).

A UDIF image is a data fork (guest data, raw or compressed, starting at offset 0), a block map
and a 512-byte big-endian "koly" trailer at the end of the file. The block map is a list of
"mish" (BLKX) tables, found either in a classic resource fork or, in every modern image, base64
encoded inside `<data>` elements of an XML property list.

qemu's prober only looks at the file name (`dmg_probe()`: a ".dmg" suffix scores 2), so the
trailer is what `recognise()` looks for. The virtual size is the trailer's `sector_count`; the
mish tables decide only whether qemu 7.2's `dmg_open()` accepts the image, and their checks are
mirrored here as problems.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Callable
from typing import Any

from construct import Bytes, Const, Int32ub, Int64ub, Struct

from imgguard.errors import MalformedImage
from imgguard.formats._common import refused
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo, Problem, ProblemKind, Table
from imgguard.reader import MAX_REGION, ImageReader, parse_struct

NAME = "dmg"

SECTOR = 512
KOLY_SIZE = 512
KOLY_SIGNATURE = b"koly"
UDIF_VERSION = 4

# dmg.c: "Limit chunk sizes to prevent unreasonable amounts of memory being used".
DMG_LENGTHS_MAX = 64 * 1024 * 1024
DMG_SECTORCOUNTS_MAX = DMG_LENGTHS_MAX // SECTOR
# dmg_read_plist_xml(): "Attempt to set a safe upper cap on the data length".
DMG_PLIST_MAX = 16 * 1024 * 1024
# dmg_read_mish_block(): a mish table shorter than this is skipped.
MISH_MIN_SIZE = 244
MISH_CHUNKS_OFFSET = 204
MISH_CHUNK_SIZE = 40
# block_int-common.h: bdrv_open_driver() refuses a total_sectors * 512 over BDRV_MAX_LENGTH.
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)

# dmg.c block (chunk) types.
UDZE = 0  # zeroes
UDRW = 1  # raw
UDIG = 2  # ignore
UDCO = 0x80000004  # ADC compressed: qemu has no decoder
UDZO = 0x80000005  # zlib
UDBZ = 0x80000006  # bzip2
ULFO = 0x80000007  # lzfse
UDCM = 0x7FFFFFFE  # comment
UDLE = 0xFFFFFFFF  # last entry
# dmg_is_known_block_type() of a qemu without the optional dmg-bz2 / dmg-lzfse modules (Debian's
# qemu-utils 7.2 ships neither): bzip2 and lzfse chunks are skipped like unknown ones.
KNOWN_TYPES = frozenset({UDZE, UDRW, UDIG, UDZO})
HARMLESS_UNKNOWN = frozenset({UDCM, UDLE})
ZERO_TYPES = frozenset({UDZE, UDIG})
TYPE_NAMES = {
    UDZE: "zero",
    UDRW: "raw",
    UDIG: "ignore",
    UDCO: "adc",
    UDZO: "zlib",
    UDBZ: "bzip2",
    ULFO: "lzfse",
    UDCM: "comment",
    UDLE: "last",
}

# The UDIF trailer ("koly" block, UDIFResourceFile), big-endian. qemu reads data_fork_offset
# (0x18), rsrc_fork_offset/length (0x28/0x30), xml_offset/length (0xd8/0xe0) and sector_count
# (0x1ec).
KOLY = Struct(
    "signature" / Const(KOLY_SIGNATURE),
    "version" / Int32ub,
    "header_size" / Int32ub,
    "flags" / Int32ub,
    "running_data_fork_offset" / Int64ub,
    "data_fork_offset" / Int64ub,
    "data_fork_length" / Int64ub,
    "rsrc_fork_offset" / Int64ub,
    "rsrc_fork_length" / Int64ub,
    "segment_number" / Int32ub,
    "segment_count" / Int32ub,
    "segment_id" / Bytes(16),
    "data_checksum_type" / Int32ub,
    "data_checksum_size" / Int32ub,
    "data_checksum" / Bytes(128),
    "xml_offset" / Int64ub,
    "xml_length" / Int64ub,
    "reserved1" / Bytes(120),
    "checksum_type" / Int32ub,
    "checksum_size" / Int32ub,
    "checksum" / Bytes(128),
    "image_variant" / Int32ub,
    "sector_count" / Int64ub,
    "reserved2" / Int32ub,
    "reserved3" / Int32ub,
    "reserved4" / Int32ub,
)
# The same struct compiled to Python code: parses ~5x faster on the hot path.
_KOLY_PARSER = KOLY.compile()

# A "mish" (BLKX) table header; its chunk_count MISH_CHUNK entries follow. qemu ignores
# chunk_count and takes (size - 204) / 40 entries.
MISH = Struct(
    "signature" / Const(b"mish"),
    "version" / Int32ub,
    # qemu's out_offset: chunk sector numbers are relative to it.
    "sector_number" / Int64ub,
    "sector_count" / Int64ub,
    # qemu's data_offset: chunk offsets are relative to data_fork_offset + this.
    "data_offset" / Int64ub,
    "buffers_needed" / Int32ub,
    "block_descriptors" / Int32ub,
    "reserved" / Bytes(24),
    "checksum_type" / Int32ub,
    "checksum_size" / Int32ub,
    "checksum" / Bytes(128),
    "chunk_count" / Int32ub,
)
MISH_CHUNK = Struct(
    "type" / Int32ub,
    "comment" / Int32ub,
    "sector_number" / Int64ub,
    "sector_count" / Int64ub,
    "compressed_offset" / Int64ub,
    "compressed_length" / Int64ub,
)
_CHUNK = struct.Struct(">IIQQQQ")

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# g_base64_decode() skips every byte outside the alphabet; "=" counts as a digit of value 0.
_B64_DELETE = bytes(sorted(set(range(256)) - set(_B64_ALPHABET + b"=")))


def probe(reader: ImageReader) -> int:
    # dmg_probe(): only the file name, "len > 4 && ends with .dmg" scores 2.
    name = reader.name
    # The encoded name ends with b".dmg" exactly when the str does (surrogateescape maps
    # undecodable bytes to lone surrogates, never to ASCII), and a str of 5 or more
    # characters encodes to 5 or more bytes.
    return 2 if name is not None and len(name) > 4 and name.endswith(".dmg") else 0


def recognise(reader: ImageReader) -> bool:
    # A UDIF trailer in the last 512 bytes: signature, version 4 and header_size 512.
    tail = reader.tail
    if len(tail) < KOLY_SIZE:
        return False
    koly = tail[-KOLY_SIZE:]
    return (
        koly[:4] == KOLY_SIGNATURE
        and int.from_bytes(koly[4:8], "big") == UDIF_VERSION
        and int.from_bytes(koly[8:12], "big") == KOLY_SIZE
    )


def _read_zero_filled(reader: ImageReader, offset: int, length: int, field: str) -> bytes:
    # bdrv_pread() past the end of the file returns zeros instead of failing.
    data = reader.read_available(offset, length, field=field)
    return data + bytes(length - len(data))


def _find_koly_offset(reader: ImageReader) -> int:
    """dmg_find_koly_offset(): the first "koly" in a 515-byte window near the end.

    qemu's file length is rounded up to 512 (bdrv_getlength()), and the window starts 1023
    bytes before that, so a "koly" in the data just before the trailer wins over the real one.
    """
    if reader.size == 0:
        raise MalformedImage("dmg file must be at least 512 bytes long", field="koly")
    length = -(-reader.size // SECTOR) * SECTOR
    start = length - 511 - 512 if length > 511 + 512 else 0
    window_length = min(length, 515)
    reader.tail  # noqa: B018 - load the tail so the window comes from cache
    window = _read_zero_filled(reader, start, window_length, "koly")
    index = window.find(KOLY_SIGNATURE, 0, window_length)
    if index < 0:
        raise MalformedImage(
            "Could not locate UDIF trailer in dmg file", field="koly", offset=start
        )
    return start + index


def inspect(reader: ImageReader) -> ImageInfo:
    problems: list[Problem] = []
    koly_offset = _find_koly_offset(reader)
    raw = _read_zero_filled(reader, koly_offset, KOLY_SIZE, "koly")
    if koly_offset + KOLY_SIZE > reader.size:
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"the koly trailer at {koly_offset} runs past the end of the file; qemu reads "
                "zeros there",
                field="koly",
                offset=koly_offset,
            )
        )
    koly = parse_struct(_KOLY_PARSER, raw, offset=koly_offset, what="koly")
    if koly.version != UDIF_VERSION or koly.header_size != KOLY_SIZE:
        # qemu checks neither.
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                f"koly version {koly.version} / header_size {koly.header_size} is not "
                f"{UDIF_VERSION} / {KOLY_SIZE}",
                field="koly.version",
                offset=koly_offset + 4,
            )
        )

    sector_count: int = koly.sector_count
    virtual_size = sector_count * SECTOR
    tables: list[Table] = []
    facts: dict[str, Any] = {
        "koly_offset": koly_offset,
        "version": koly.version,
        "header_size": koly.header_size,
        "flags": koly.flags,
        "running_data_fork_offset": koly.running_data_fork_offset,
        "data_fork_offset": koly.data_fork_offset,
        "data_fork_length": koly.data_fork_length,
        "rsrc_fork_offset": koly.rsrc_fork_offset,
        "rsrc_fork_length": koly.rsrc_fork_length,
        "segment_number": koly.segment_number,
        "segment_count": koly.segment_count,
        "xml_offset": koly.xml_offset,
        "xml_length": koly.xml_length,
        "image_variant": koly.image_variant,
        "sector_count": sector_count,
    }

    def at(field: str) -> int:
        return koly_offset + _KOLY_OFFSETS[field]

    refusal = _open_checks(koly, koly_offset, at)
    if refusal is None and virtual_size > BDRV_MAX_LENGTH:
        refusal = refused(
            f"sector_count {sector_count} is over qemu's maximum size",
            "koly.sector_count",
            at("sector_count"),
        )
    if refusal is not None:
        problems.append(refusal)
    else:
        walk = _MishWalk(reader, koly.data_fork_offset, problems)
        if koly.rsrc_fork_length:
            tables.append(Table("resource_fork", koly.rsrc_fork_offset, koly.rsrc_fork_length))
            walk.resource_fork(koly.rsrc_fork_offset, koly.rsrc_fork_length)
        else:
            tables.append(Table("plist", koly.xml_offset, koly.xml_length))
            walk.plist(koly.xml_offset, koly.xml_length)
        facts.update(walk.facts())

    return ImageInfo(
        format=NAME,
        variant="udif",
        virtual_size=virtual_size,
        version=koly.version,
        tables=tuple(tables),
        problems=tuple(problems),
        header=facts,
    )


# Where dmg_open() reads each trailer field, relative to the "koly" signature.
_KOLY_OFFSETS = {
    "data_fork_offset": 0x18,
    "rsrc_fork_offset": 0x28,
    "rsrc_fork_length": 0x30,
    "xml_offset": 0xD8,
    "xml_length": 0xE0,
    "sector_count": 0x1EC,
}


def _open_checks(koly: Any, koly_offset: int, at: Callable[[str], int]) -> Problem | None:
    """The trailer checks of dmg_open(), in its order; the first failure stops qemu."""
    if koly.data_fork_offset > koly_offset:
        return refused(
            "data_fork_offset is past the trailer", "koly.data_fork_offset", at("data_fork_offset")
        )
    if (
        koly.rsrc_fork_offset >= koly_offset
        or koly.rsrc_fork_length > koly_offset - koly.rsrc_fork_offset
    ):
        # Checked even when rsrc_fork_length is 0.
        return refused(
            "the resource fork does not end before the trailer",
            "koly.rsrc_fork_offset",
            at("rsrc_fork_offset"),
        )
    if koly.xml_offset >= koly_offset or koly.xml_length > koly_offset - koly.xml_offset:
        return refused(
            "the XML plist does not end before the trailer", "koly.xml_offset", at("xml_offset")
        )
    if koly.sector_count >= 1 << 63:
        return refused(
            "sector_count is negative as an int64", "koly.sector_count", at("sector_count")
        )
    if not koly.rsrc_fork_length and not koly.xml_length:
        return refused(
            "neither a resource fork nor an XML plist", "koly.xml_length", at("xml_length")
        )
    return None


class _MishWalk:
    """dmg_read_resource_fork() / dmg_read_plist_xml() / dmg_read_mish_block(), bounded."""

    def __init__(self, reader: ImageReader, data_fork_offset: int, problems: list[Problem]):
        self.reader = reader
        self.data_fork_offset = data_fork_offset
        self.problems = problems
        self.n_chunks = 0
        self.mish_blocks = 0
        self.max_compressed_size = 1
        self.max_sectors_per_chunk = 1
        self.skipped: dict[str, int] = {}
        self.failed = False
        self.data_past_eof = False

    def facts(self) -> dict[str, Any]:
        return {
            "mish_blocks": self.mish_blocks,
            "n_chunks": self.n_chunks,
            "max_compressed_size": self.max_compressed_size,
            "max_sectors_per_chunk": self.max_sectors_per_chunk,
            "skipped_chunk_types": dict(self.skipped),
        }

    def _fail(self, message: str, field: str, offset: int | None) -> None:
        self.failed = True
        self.problems.append(refused(message, field, offset))

    def _truncated(self, what: str, offset: int, length: int) -> None:
        if offset + length > self.reader.size:
            self.problems.append(
                Problem(
                    ProblemKind.TRUNCATED,
                    f"the {what} at {offset} of {length} bytes runs past the end of the file; "
                    "qemu reads zeros there",
                    field=what,
                    offset=offset,
                )
            )

    def resource_fork(self, info_begin: int, info_length: int) -> None:
        head = _read_zero_filled(self.reader, info_begin, 12, "resource_fork")
        rsrc_data_offset = int.from_bytes(head[0:4], "big")
        if rsrc_data_offset > info_length:
            self._fail(
                "resource data offset is past the resource fork", "resource_fork", info_begin
            )
            return
        count = int.from_bytes(head[8:12], "big")
        # uint32_t addition in qemu: it wraps.
        if count == 0 or (rsrc_data_offset + count) & 0xFFFFFFFF > info_length:
            self._fail(
                "resource data length is 0 or past the resource fork",
                "resource_fork",
                info_begin + 8,
            )
            return
        start = info_begin + rsrc_data_offset
        if count > MAX_REGION - 8:
            self.problems.append(
                Problem(
                    ProblemKind.LIMIT,
                    f"resource data of {count} bytes is not walked (over imgguard's cap)",
                    "resource_fork",
                    start,
                )
            )
            return
        self._truncated("resource_fork", start, count)
        # A resource's 4-byte length and its data may run up to 4 bytes past info_end.
        data = _read_zero_filled(self.reader, start, count + 8, "resource_fork")
        pos = 0
        while pos < count and not self.failed:
            size = int.from_bytes(data[pos : pos + 4], "big")
            if size == 0 or size > count - pos:
                self._fail(
                    "resource length is 0 or past the resource data", "resource_fork", start + pos
                )
                return
            pos += 4
            self._mish(data[pos : pos + size], size, start + pos)
            pos += size

    def plist(self, info_begin: int, info_length: int) -> None:
        if info_length > DMG_PLIST_MAX:
            self._fail(f"xml_length {info_length} is over 16 MiB", "koly.xml_length", None)
            return
        if info_length > MAX_REGION:
            self.problems.append(
                Problem(
                    ProblemKind.LIMIT,
                    f"the XML plist of {info_length} bytes is not walked (over imgguard's cap)",
                    "plist",
                    info_begin,
                )
            )
            return
        self._truncated("plist", info_begin, info_length)
        text = _read_zero_filled(self.reader, info_begin, info_length, "plist")
        # qemu walks the plist as a C string with strstr(): an embedded NUL ends it.
        nul = text.find(b"\0")
        if nul >= 0:
            text = text[:nul]
        pos = 0
        while not self.failed:
            begin = text.find(b"<data>", pos)
            if begin < 0:
                return
            begin += 6
            end = text.find(b"</data>", begin)
            if end < 0:
                self._fail("<data> without </data>", "plist", info_begin + begin)
                return
            mish = _glib_base64_decode(text[begin:end])
            self._mish(mish, len(mish) & 0xFFFFFFFF, info_begin + begin)
            pos = end + 1

    def _mish(self, buffer: bytes, count: int, where: int) -> None:
        # "skip data that is not a valid MISH block (invalid magic or too small)"
        if count < MISH_MIN_SIZE or buffer[:4] != b"mish":
            return
        self.mish_blocks += 1
        in_offset = self.data_fork_offset + int.from_bytes(buffer[0x18:0x20], "big")
        chunk_count = (count - MISH_CHUNKS_OFFSET) // MISH_CHUNK_SIZE
        area = buffer[MISH_CHUNKS_OFFSET : MISH_CHUNKS_OFFSET + chunk_count * MISH_CHUNK_SIZE]
        for index, chunk in enumerate(_CHUNK.iter_unpack(area)):
            kind, _comment, _sector, sectors, offset, length = chunk
            if kind not in KNOWN_TYPES:
                # qemu warns (except for comments and the terminator) and skips the entry.
                if kind not in HARMLESS_UNKNOWN:
                    name = TYPE_NAMES.get(kind, f"{kind:#x}")
                    self.skipped[name] = self.skipped.get(name, 0) + 1
                continue
            chunk_at = where + MISH_CHUNKS_OFFSET + index * MISH_CHUNK_SIZE
            if kind not in ZERO_TYPES and sectors > DMG_SECTORCOUNTS_MAX:
                self._fail(
                    f"sector count {sectors} of chunk {self.n_chunks} is over "
                    f"{DMG_SECTORCOUNTS_MAX}",
                    "mish.sector_count",
                    chunk_at + 0x10,
                )
                return
            if length > DMG_LENGTHS_MAX:
                self._fail(
                    f"length {length} of chunk {self.n_chunks} is over {DMG_LENGTHS_MAX}",
                    "mish.compressed_length",
                    chunk_at + 0x20,
                )
                return
            if kind == UDZO:
                self.max_compressed_size = max(self.max_compressed_size, length)
                self.max_sectors_per_chunk = max(self.max_sectors_per_chunk, sectors)
            elif kind == UDRW:
                self.max_sectors_per_chunk = max(self.max_sectors_per_chunk, -(-length // SECTOR))
            if (
                kind not in ZERO_TYPES
                and not self.data_past_eof
                and in_offset + offset + length > self.reader.size
            ):
                self.data_past_eof = True
                self.problems.append(
                    Problem(
                        ProblemKind.TRUNCATED,
                        f"chunk {self.n_chunks} data ends past the end of the file",
                        "mish.compressed_offset",
                        chunk_at + 0x18,
                    )
                )
            self.n_chunks += 1


def _glib_base64_decode(text: bytes) -> bytes:
    """g_base64_decode(): skip non-alphabet bytes, drop a partial last quad, honour "=".

    glib decodes "=" as the digit 0 and omits the second / third byte of a quad whose third /
    fourth character is "=", wherever that quad is.
    """
    chars = text.translate(None, _B64_DELETE)
    chars = chars[: len(chars) - len(chars) % 4]
    if not chars:
        return b""
    decoded = binascii.a2b_base64(chars.replace(b"=", b"A"))
    drop: list[int] = []
    pos = chars.find(b"=")
    while pos >= 0:
        quad = pos // 4
        if chars[quad * 4 + 2] == 0x3D:
            drop.append(quad * 3 + 1)
        if chars[quad * 4 + 3] == 0x3D:
            drop.append(quad * 3 + 2)
        pos = chars.find(b"=", quad * 4 + 4)
    if not drop:
        return decoded
    pieces = []
    start = 0
    for index in drop:
        pieces.append(decoded[start:index])
        start = index + 1
    pieces.append(decoded[start:])
    return b"".join(pieces)


# A dmg's data fork starts at offset 0: a partition table found there is the guest's.
DRIVER = FormatDriver(
    name=NAME,
    probe=probe,
    inspect=inspect,
    recognise=recognise,
    data_at_start=True,
    recognise_signatures=((-KOLY_SIZE, (KOLY_SIGNATURE,)),),
    probe_by_name=True,
)
