"""qcow2: QEMU copy-on-write version 2 and 3 (`block/qcow2.c`, `docs/interop/qcow2.txt`).

What is read, as qemu 7.2's `qcow2_do_open()` reads it:

* the header at offset 0: 72 bytes for version 2, `header_length` (>= 104) for version 3, with
  `compression_type` at 104 when `header_length` covers it;
* the header extensions, from `header_length` up to `backing_file_offset` (when set) or the end
  of the first cluster, whichever comes first (`qcow2_read_extensions()`);
* the backing file name at `backing_file_offset`;
* the LUKS header that the full disk encryption extension points at (`imgguard.formats.luks`).

The L1, refcount, snapshot and bitmap directory tables are not read, only located: they are
reported as `Table`s with the length qemu allocates for them at open, so that a policy can see
tables past the end of the file or larger than its memory budget. Everything qemu 7.2 refuses is
reported as a `Problem` (with the header field and offset) and inspection goes on, so that the
references of a refused image are still visible.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from construct import Const, Enum, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from imgguard.errors import ImageError, LimitExceeded, TruncatedImage
from imgguard.formats._common import c_string
from imgguard.formats._driver import FormatDriver
from imgguard.model import (
    Encryption,
    Feature,
    FeatureKind,
    ImageInfo,
    Problem,
    ProblemKind,
    Reference,
    ReferenceKind,
    Table,
)
from imgguard.reader import ImageReader, fields_unpacker, parse_struct

NAME = "qcow2"

MAGIC = b"QFI\xfb"

# --- On-disk structures (docs/interop/qcow2.txt "Header"; all fields big-endian) -------------

# Bytes 0-71: the version 2 header, also the start of every later version's header.
HEADER_V2 = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    # Unknown values stay visible as plain integers (qemu 7.2 refuses anything above 2).
    "crypt_method" / Enum(Int32ub, none=0, aes=1, luks=2),
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
).compile()
HEADER_V2_SIZE = 72

# Bytes 72-103: the version 3 additions.
HEADER_V3 = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
).compile()
HEADER_V3_SIZE = 104
# Byte 104: the first "additional field"; qemu reads it only when header_length > 104.
COMPRESSION_TYPE_OFFSET = 104
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
# sizeof(QCowHeader) in qemu 7.2: the v3 header, compression_type and 7 bytes of padding.
QEMU_HEADER_SIZE = 112

# The whole version 3 header in one parse: the two definitions above, back to back.
HEADER_V2_V3 = Struct(*HEADER_V2.defersubcon.subcons, *HEADER_V3.defersubcon.subcons)
# The version 2 fields copied to the report as they are.
HEADER_V2_INTEGERS = (
    "backing_file_offset",
    "backing_file_size",
    "cluster_bits",
    "size",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
)
_header_v2_integers = itemgetter(*HEADER_V2_INTEGERS)

# "Header extensions": an 8-byte (magic, length) pair, then the data padded to 8 bytes.
EXTENSION_HEADER = Struct("magic" / Int32ub, "len" / Int32ub).compile()
EXTENSION_HEADER_SIZE = 8
_unpack_extension_header = fields_unpacker(EXTENSION_HEADER)
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
EXTENSION_NAMES = {
    EXT_BACKING_FORMAT: "backing_format",
    EXT_FEATURE_TABLE: "feature_name_table",
    EXT_CRYPTO_HEADER: "full_disk_encryption_header",
    EXT_BITMAPS: "bitmaps",
    EXT_DATA_FILE: "external_data_file_name",
}
# Qcow2CryptoHeaderExtension: where the LUKS header lives in the file.
CRYPTO_HEADER_EXTENSION = Struct("offset" / Int64ub, "length" / Int64ub).compile()
CRYPTO_HEADER_EXTENSION_SIZE = 16
# Qcow2BitmapHeaderExt.
BITMAPS_EXTENSION = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
).compile()
BITMAPS_EXTENSION_SIZE = 24
# Qcow2BitmapDirEntry: the fixed part of a bitmap directory entry, then extra data and the name,
# padded to 8 bytes.
BITMAP_DIR_ENTRY = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
).compile()
BITMAP_DIR_ENTRY_SIZE = 24
_unpack_bitmap_dir_entry = fields_unpacker(BITMAP_DIR_ENTRY)
# imgguard reads at most this much of a bitmap directory (qemu allows 64 MiB).
BITMAP_DIRECTORY_READ_CAP = 256 << 10
# One entry of the feature name table: type (1), bit (1), name (46).
FEATURE_TABLE_ENTRY_SIZE = 48
# sizeof(QCowSnapshotHeader): the fixed part of a snapshot table entry.
SNAPSHOT_HEADER_SIZE = 40

# --- qemu 7.2 limits (block/qcow2.h) -------------------------------------------------------

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW_MAX_REFTABLE_SIZE = 8 << 20
QCOW_MAX_L1_SIZE = 32 << 20
QCOW_MAX_SNAPSHOTS = 65536
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
# Extended L2 entries split a cluster into 32 subclusters, which must be >= 512 bytes.
QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32
# qemu reads a backing file name of at most 1023 bytes (and into a PATH_MAX buffer).
MAX_BACKING_FILE_SIZE = 1023
# The backing format is read into bs->backing_format, a char[16].
BACKING_FORMAT_BUFFER = 16
# qemu has no limit but the extension area for the data file name; imgguard reads at most this
# much of any name (qemu hands the name to open(), where PATH_MAX is 4096).
NAME_READ_CAP = 4096
# qemu walks as many extensions as fit (up to 2 MiB / 8); imgguard stops after this many.
MAX_EXTENSIONS = 1024
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
# The fixed part of a LUKS1 header, which qemu reads through the crypto header extension.
LUKS_PHDR_SIZE = 592

# The tables qemu 7.2 loads at open, in the order it checks them: name, offset field (and its
# offset in the header), count field (and its offset), entry length (0: a cluster) and qemu's
# limit on the table's bytes. The refcount table is loaded whole, refcount_table_clusters
# clusters (qcow2_refcount_init()). Each snapshot entry is at least 40 bytes, the rest depends on
# the entries, so that length is a lower bound (qcow2_read_snapshots()). The active L1 table is
# l1_size 8-byte entries, read whole.
_TABLES = (
    (
        "refcount_table",
        "refcount_table_offset",
        48,
        "refcount_table_clusters",
        56,
        0,
        QCOW_MAX_REFTABLE_SIZE,
    ),
    (
        "snapshot_table",
        "snapshots_offset",
        64,
        "nb_snapshots",
        60,
        SNAPSHOT_HEADER_SIZE,
        SNAPSHOT_HEADER_SIZE * QCOW_MAX_SNAPSHOTS,
    ),
    ("l1_table", "l1_table_offset", 40, "l1_size", 36, 8, QCOW_MAX_L1_SIZE),
)

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# "Feature bits" of the version 3 header, by kind and bit, named as the spec names them.
INCOMPATIBLE_FEATURES = {
    0: "dirty",
    1: "corrupt",
    2: "external_data_file",
    3: "compression_type",
    4: "extended_l2",
}
COMPATIBLE_FEATURES = {0: "lazy_refcounts"}
AUTOCLEAR_FEATURES = {0: "bitmaps", 1: "raw_external_data"}
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1


def probe(reader: ImageReader) -> int:
    # qcow2_probe(): the magic and a version >= 2 in the (zero-padded) 2 KiB probe buffer.
    head = reader.head[:8].ljust(8, b"\0")
    if head[:4] == MAGIC and int.from_bytes(head[4:8], "big") >= 2:
        return 100
    return 0


def recognise(reader: ImageReader) -> bool:
    # The magic with version 0, which no qemu prober claims (qcow_probe wants 1, qcow2_probe
    # >= 2): qemu falls back to raw, and `-f qcow2` refuses "Unsupported qcow2 version 0". The
    # bytes are still a qcow2 header, not guest data: report them as qcow2 so that the version
    # problem below is seen instead of a silent raw pass.
    head = reader.head[:8].ljust(8, b"\0")
    return head[:4] == MAGIC and int.from_bytes(head[4:8], "big") == 0


def inspect(reader: ImageReader) -> ImageInfo:
    return _Inspection(reader).run()


class _Inspection:
    """One pass over one image; collects facts and problems as it goes."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader
        self.problems: list[Problem] = []
        self.references: list[Reference] = []
        self.tables: list[Table] = []
        self.header: dict[str, Any] = {}
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.crypto_header: tuple[int, int, int] | None = None  # (offset, length, ext offset)

    def problem(
        self, kind: ProblemKind, message: str, field: str | None, offset: int | None
    ) -> None:
        self.problems.append(Problem(kind=kind, message=message, field=field, offset=offset))

    def run(self) -> ImageInfo:
        reader = self.reader
        if reader.size < HEADER_V2_SIZE:
            raise TruncatedImage(
                f"the qcow2 header needs {HEADER_V2_SIZE} bytes, the file has {reader.size}",
                field="header",
                offset=0,
            )
        # qemu reads sizeof(QCowHeader) bytes and sees zeros past the end of the file. The head
        # holds them (it is the first 4 KiB, or the whole file).
        raw = reader.head[:QEMU_HEADER_SIZE].ljust(QEMU_HEADER_SIZE, b"\0")
        # The version 3 fields are parsed too and used only for version 3 and later.
        v2 = parse_struct(HEADER_V2_V3, raw, offset=0, what="header")
        version: int = v2["version"]
        header = self.header
        header["version"] = version
        if version < 2:
            # A qcow (version 1) header has another layout: nothing after `version` means what
            # the v2 layout says.
            self.problem(
                ProblemKind.UNSUPPORTED,
                f"unsupported qcow2 version {version} (qemu refuses it; version 1 is qcow)",
                "version",
                4,
            )
            return ImageInfo(
                format=NAME,
                variant=f"v{version}",
                version=version,
                problems=tuple(self.problems),
                header=header,
            )
        if version > 3:
            # qemu 7.2 refuses; later versions would extend the v3 header, so read it as v3.
            self.problem(
                ProblemKind.UNSUPPORTED,
                f"unsupported qcow2 version {version} (qemu 7.2 reads versions 2 and 3 only)",
                "version",
                4,
            )
        header.update(zip(HEADER_V2_INTEGERS, _header_v2_integers(v2), strict=True))
        crypt_method = int(v2["crypt_method"])
        header["crypt_method"] = crypt_method

        cluster_bits: int = v2["cluster_bits"]
        cluster_valid = MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
        if not cluster_valid:
            self.problem(
                ProblemKind.MALFORMED,
                f"unsupported cluster size 2^{cluster_bits} (qemu allows 2^9 to 2^21)",
                "cluster_bits",
                20,
            )
        # Where a cluster size is needed to go on reading (the extension area), a bad one is
        # clamped into qemu's range; facts that depend on it are not reported.
        cluster_size = 1 << min(max(cluster_bits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)

        incompatible = compatible = autoclear = 0
        refcount_order = 4
        header_length = HEADER_V2_SIZE
        compression_type = 0
        if version >= 3:
            incompatible = v2["incompatible_features"]
            compatible = v2["compatible_features"]
            autoclear = v2["autoclear_features"]
            refcount_order = v2["refcount_order"]
            header_length = v2["header_length"]
            header.update(
                incompatible_features=incompatible,
                compatible_features=compatible,
                autoclear_features=autoclear,
                refcount_order=refcount_order,
                header_length=header_length,
            )
            if header_length < HEADER_V3_SIZE:
                self.problem(
                    ProblemKind.MALFORMED,
                    f"header_length {header_length} is below 104 (qemu: header too short)",
                    "header_length",
                    100,
                )
            if header_length > COMPRESSION_TYPE_OFFSET:
                compression_type = raw[COMPRESSION_TYPE_OFFSET]
            header["compression_type"] = COMPRESSION_TYPES.get(compression_type, compression_type)
            if reader.size < min(max(header_length, HEADER_V3_SIZE), QEMU_HEADER_SIZE):
                self.problem(
                    ProblemKind.TRUNCATED,
                    f"the file ends at {reader.size}, inside the header (qemu reads zeros)",
                    "header_length",
                    reader.size,
                )
        if header_length > cluster_size and cluster_valid:
            self.problem(
                ProblemKind.MALFORMED,
                f"header_length {header_length} exceeds the cluster size {cluster_size}",
                "header_length",
                100,
            )

        features = (
            self._features(incompatible, compatible, autoclear)
            if incompatible or compatible or autoclear
            else ()
        )
        if compression_type or incompatible & INCOMPAT_COMPRESSION:
            self._check_compression(compression_type, incompatible)

        # Extended L2 entries are 16 bytes and cut clusters into 32 subclusters.
        extended_l2 = bool(incompatible & INCOMPAT_EXTL2)
        subcluster_size = cluster_size // QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
        if cluster_valid and extended_l2 and subcluster_size < 1 << MIN_CLUSTER_BITS:
            self.problem(
                ProblemKind.MALFORMED,
                f"subclusters of {subcluster_size} bytes are below 512 (extended_l2 needs"
                " clusters of 16 KiB or more)",
                "incompatible_features",
                72,
            )
        if refcount_order > 6:
            self.problem(
                ProblemKind.MALFORMED,
                f"refcount_order {refcount_order} is over 6 (qemu: refcount width over 64 bits)",
                "refcount_order",
                96,
            )
        else:
            header["refcount_bits"] = 1 << refcount_order

        encrypted = crypt_method != CRYPT_NONE
        if crypt_method > CRYPT_LUKS:
            self.problem(
                ProblemKind.UNSUPPORTED,
                f"unknown encryption method {crypt_method} (qemu: unsupported encryption method)",
                "crypt_method",
                32,
            )

        size: int = v2["size"]
        # bdrv total_sectors = size / 512: qemu-img reports the size rounded down to sectors.
        virtual_size = size // 512 * 512
        if cluster_valid:
            self._tables(v2, cluster_bits, extended_l2, size)

        # Header extensions: from header_length up to the backing file name or the end of the
        # first cluster (qcow2_do_open's ext_end).
        backing_file_offset: int = v2["backing_file_offset"]
        ext_start = header_length if version < 3 else max(header_length, HEADER_V3_SIZE)
        ext_end = min(backing_file_offset, cluster_size) if backing_file_offset else cluster_size
        self._extensions(ext_start, ext_end, crypt_method, autoclear, cluster_size)

        backing_file = self._backing_file(v2, cluster_size, header_length, cluster_valid)

        if incompatible & INCOMPAT_DATA_FILE and self.data_file is None:
            self.problem(
                ProblemKind.INCONSISTENT,
                "the external_data_file bit is set but the image names no data file (qemu "
                "reads the guest data only with a data-file option)",
                "incompatible_features",
                72,
            )
        if self.data_file is not None and not incompatible & INCOMPAT_DATA_FILE:
            self.problem(
                ProblemKind.INCONSISTENT,
                "the image names a data file but the external_data_file bit is clear (qemu "
                "keeps the data in the image file and ignores the name)",
                "incompatible_features",
                72,
            )
        if autoclear & AUTOCLEAR_DATA_FILE_RAW and not incompatible & INCOMPAT_DATA_FILE:
            self.problem(
                ProblemKind.INCONSISTENT,
                "raw_external_data is set without external_data_file (qemu: data-file-raw "
                "requires a data file)",
                "autoclear_features",
                88,
            )

        if backing_file is not None and autoclear & AUTOCLEAR_DATA_FILE_RAW:
            # The spec: "backing files are incompatible with raw external data files"; qemu 7.2
            # refuses to create the pair but opens it.
            self.problem(
                ProblemKind.INCONSISTENT,
                "a backing file together with raw_external_data (the spec says they are "
                "incompatible)",
                "autoclear_features",
                88,
            )

        encryption = self._encryption(crypt_method) if encrypted else None

        return ImageInfo(
            format=NAME,
            variant=f"v{version}",
            virtual_size=virtual_size,
            version=version,
            backing_file=backing_file,
            backing_format=self.backing_format,
            data_file=self.data_file,
            references=tuple(self.references),
            encrypted=encrypted,
            encryption=encryption,
            cluster_size=1 << cluster_bits if cluster_valid else None,
            features=features,
            tables=tuple(self.tables),
            problems=tuple(self.problems),
            header=header,
        )

    # --- header fields ---------------------------------------------------------------------

    def _features(self, incompatible: int, compatible: int, autoclear: int) -> tuple[Feature, ...]:
        features: list[Feature] = []
        for kind, value, names, offset in (
            (FeatureKind.INCOMPATIBLE, incompatible, INCOMPATIBLE_FEATURES, 72),
            (FeatureKind.COMPATIBLE, compatible, COMPATIBLE_FEATURES, 80),
            (FeatureKind.AUTOCLEAR, autoclear, AUTOCLEAR_FEATURES, 88),
        ):
            unknown = 0
            rest = value
            while rest:
                bit = (rest & -rest).bit_length() - 1
                rest &= rest - 1
                name = names.get(bit)
                features.append(
                    Feature(
                        name=name or f"{kind.value}_bit_{bit}", kind=kind, bit=bit, known=bool(name)
                    )
                )
                if name is None:
                    unknown |= 1 << bit
            if unknown and kind is FeatureKind.INCOMPATIBLE:
                # qemu refuses unknown incompatible bits; it ignores unknown compatible ones and
                # clears unknown autoclear ones when it opens the image read-write.
                self.problem(
                    ProblemKind.UNSUPPORTED,
                    f"unknown incompatible feature bits {unknown:#x} (qemu refuses the image)",
                    f"{kind.value}_features",
                    offset,
                )
        return tuple(features)

    def _check_compression(self, compression_type: int, incompatible: int) -> None:
        # validate_compression_type(): zlib (0) needs the bit clear, anything else needs it set.
        if compression_type not in COMPRESSION_TYPES:
            self.problem(
                ProblemKind.UNSUPPORTED,
                f"unknown compression type {compression_type}",
                "compression_type",
                COMPRESSION_TYPE_OFFSET,
            )
        elif compression_type == 0 and incompatible & INCOMPAT_COMPRESSION:
            self.problem(
                ProblemKind.MALFORMED,
                "the compression_type bit is set but the compression type is zlib",
                "incompatible_features",
                72,
            )
        elif compression_type != 0 and not incompatible & INCOMPAT_COMPRESSION:
            self.problem(
                ProblemKind.MALFORMED,
                f"compression type {COMPRESSION_TYPES[compression_type]} without the "
                "compression_type incompatible bit",
                "compression_type",
                COMPRESSION_TYPE_OFFSET,
            )

    # --- tables ----------------------------------------------------------------------------

    def _tables(self, v2: Any, cluster_bits: int, extended_l2: bool, size: int) -> None:
        cluster_size = 1 << cluster_bits
        if v2["refcount_table_clusters"] == 0:
            self.problem(
                ProblemKind.MALFORMED,
                "the image has no refcount table (refcount_table_clusters is 0)",
                "refcount_table_clusters",
                56,
            )
        file_size = self.reader.size
        add_table = self.tables.append
        for name, offset_field, offset_at, count_field, count_at, entry_len, max_bytes in _TABLES:
            # qcow2_validate_table(), then the table as a fact.
            offset: int = v2[offset_field]
            entries: int = v2[count_field]
            entry_len = entry_len or cluster_size
            length = entries * entry_len
            if entries > max_bytes // entry_len:
                self.problem(
                    ProblemKind.LIMIT,
                    f"{name} of {length} bytes is over qemu's limit of {max_bytes} (too large)",
                    count_field,
                    count_at,
                )
            if INT64_MAX - length < offset or offset % cluster_size:
                self.problem(
                    ProblemKind.MALFORMED,
                    f"{name} offset {offset:#x} is not cluster aligned or too large (offset "
                    "invalid)",
                    offset_field,
                    offset_at,
                )
            if entries == 0:
                continue
            add_table(Table(name, offset, length))
            if offset + length > file_size or offset < cluster_size:
                self._check_region(name, offset_field, offset_at, offset, length, cluster_size)

        # The L1 table must map the whole virtual disk (size_to_l1()).
        l1_size: int = v2["l1_size"]
        l2_bits = cluster_bits - (4 if extended_l2 else 3)
        shift = cluster_bits + l2_bits
        l1_needed = (size + (1 << shift) - 1) >> shift
        self.header["l1_size_needed"] = l1_needed
        if l1_needed > INT_MAX:
            self.problem(
                ProblemKind.LIMIT,
                f"the virtual size {size} needs {l1_needed} L1 entries (qemu: image is too big)",
                "size",
                24,
            )
        elif l1_size < l1_needed:
            self.problem(
                ProblemKind.INCONSISTENT,
                f"l1_size {l1_size} is below the {l1_needed} entries the virtual size needs "
                "(qemu: L1 table is too small)",
                "l1_size",
                36,
            )

    def _check_region(
        self, name: str, field: str, field_offset: int, offset: int, length: int, cluster_size: int
    ) -> None:
        if offset + length > self.reader.size:
            self.problem(
                ProblemKind.TRUNCATED,
                f"{name} ({length} bytes at {offset:#x}) runs past the end of the file at "
                f"{self.reader.size:#x} (qemu reads zeros there)",
                field,
                field_offset,
            )
        if offset < cluster_size:
            self.problem(
                ProblemKind.INCONSISTENT,
                f"{name} at {offset:#x} overlaps the header cluster",
                field,
                field_offset,
            )

    # --- header extensions -----------------------------------------------------------------

    def _read_padded(self, offset: int, length: int, field: str) -> bytes:
        """What qemu's bdrv_pread() returns: the bytes, then zeros past the end of the file."""
        return self.reader.read_available(offset, length, field=field).ljust(length, b"\0")

    def _extensions(
        self, start: int, end: int, crypt_method: int, autoclear: int, cluster_size: int
    ) -> None:
        """qcow2_read_extensions(): walk (magic, len, data) records until an end marker."""
        unknown: list[int] = []
        seen: set[int] = set()
        head = self.reader.head
        head_end = len(head) - EXTENSION_HEADER_SIZE
        file_size = self.reader.size
        offset = start
        count = 0
        while offset < end:
            if offset >= file_size:
                break  # qemu reads zeros: an end-of-extensions marker
            if count == MAX_EXTENSIONS:
                self.problem(
                    ProblemKind.LIMIT,
                    f"more than {MAX_EXTENSIONS} header extensions; the rest were not read",
                    "header_extension",
                    offset,
                )
                break
            count += 1
            ext_offset = offset
            if offset <= head_end:
                magic, length = _unpack_extension_header(head, offset)
            else:
                ext = parse_struct(
                    EXTENSION_HEADER,
                    self._read_padded(offset, EXTENSION_HEADER_SIZE, "header_extension"),
                    offset=offset,
                    what="header_extension",
                )
                magic, length = ext["magic"], ext["len"]
            offset += EXTENSION_HEADER_SIZE
            if offset > end or length > end - offset:
                self.problem(
                    ProblemKind.MALFORMED,
                    f"header extension {magic:#010x} of {length} bytes runs past the extension "
                    f"area ending at {end:#x} (qemu: header extension too large)",
                    "header_extension.len",
                    ext_offset + 4,
                )
                break
            if magic == EXT_END:
                break
            if magic in seen and magic in EXTENSION_NAMES:
                self.problem(
                    ProblemKind.INCONSISTENT,
                    f"{EXTENSION_NAMES[magic]} extension appears twice (qemu uses the last one)",
                    "header_extension",
                    ext_offset,
                )
            seen.add(magic)
            if magic == EXT_BACKING_FORMAT:
                self._backing_format_extension(offset, length)
            elif magic == EXT_FEATURE_TABLE:
                self.header["feature_table_entries"] = length // FEATURE_TABLE_ENTRY_SIZE
            elif magic == EXT_CRYPTO_HEADER:
                self._crypto_extension(offset, length, crypt_method, cluster_size)
            elif magic == EXT_BITMAPS:
                self._bitmaps_extension(offset, length, autoclear, cluster_size)
            elif magic == EXT_DATA_FILE:
                self._data_file_extension(offset, length)
            else:
                unknown.append(magic)
            offset += (length + 7) & ~7
        if unknown:
            self.header["unknown_extensions"] = tuple(unknown)

    def _backing_format_extension(self, offset: int, length: int) -> None:
        if length >= BACKING_FORMAT_BUFFER:
            self.problem(
                ProblemKind.MALFORMED,
                f"backing format name of {length} bytes does not fit qemu's 16-byte buffer",
                "backing_format",
                offset,
            )
        raw = self._read_padded(offset, min(length, NAME_READ_CAP), "backing_format")
        self.backing_format = c_string(raw)

    def _data_file_extension(self, offset: int, length: int) -> None:
        if length > NAME_READ_CAP:
            self.problem(
                ProblemKind.LIMIT,
                f"data file name extension of {length} bytes; only {NAME_READ_CAP} were read",
                "external_data_file_name",
                offset,
            )
        raw = self._read_padded(offset, min(length, NAME_READ_CAP), "external_data_file_name")
        name = c_string(raw)
        # An empty name is what qemu keeps too (and then asks for a data-file option).
        self.data_file = name or None
        if name:
            self.references.append(
                Reference(
                    kind=ReferenceKind.DATA_FILE,
                    target=name,
                    field="external_data_file_name",
                    offset=offset,
                )
            )

    def _crypto_extension(
        self, offset: int, length: int, crypt_method: int, cluster_size: int
    ) -> None:
        if crypt_method != CRYPT_LUKS:
            self.problem(
                ProblemKind.MALFORMED,
                "full disk encryption header extension without LUKS encryption (qemu refuses)",
                "crypt_method",
                32,
            )
        if length != CRYPTO_HEADER_EXTENSION_SIZE:
            self.problem(
                ProblemKind.MALFORMED,
                f"full disk encryption header extension of {length} bytes, not 16",
                "full_disk_encryption_header",
                offset - 4,
            )
            return
        ext = parse_struct(
            CRYPTO_HEADER_EXTENSION,
            self._read_padded(offset, 16, "crypto_header"),
            offset=offset,
            what="crypto_header",
        )
        crypto_offset: int = ext["offset"]
        crypto_length: int = ext["length"]
        self.header["crypto_header_offset"] = crypto_offset
        self.header["crypto_header_length"] = crypto_length
        if crypto_offset % cluster_size:
            self.problem(
                ProblemKind.MALFORMED,
                f"encryption header offset {crypto_offset:#x} is not cluster aligned",
                "full_disk_encryption_header.offset",
                offset,
            )
        # Not loaded whole at open: qemu-img info reads the LUKS header, not the key material.
        self.tables.append(
            Table(
                name="crypto_header",
                offset=crypto_offset,
                length=crypto_length,
                loaded_at_open=False,
            )
        )
        self._check_region(
            "crypto_header",
            "full_disk_encryption_header.offset",
            offset,
            crypto_offset,
            crypto_length,
            cluster_size,
        )
        if crypto_length < LUKS_PHDR_SIZE:
            self.problem(
                ProblemKind.MALFORMED,
                f"encryption header length {crypto_length} is shorter than a LUKS header",
                "full_disk_encryption_header.length",
                offset + 8,
            )
        self.crypto_header = (crypto_offset, crypto_length, offset)

    def _bitmaps_extension(
        self, offset: int, length: int, autoclear: int, cluster_size: int
    ) -> None:
        if length != BITMAPS_EXTENSION_SIZE:
            self.problem(
                ProblemKind.MALFORMED,
                f"bitmaps extension of {length} bytes, not 24",
                "bitmaps",
                offset - 4,
            )
            return
        if not autoclear & AUTOCLEAR_BITMAPS:
            # A program without bitmap support wrote the image and cleared the bit, exactly as
            # the spec intends: qemu warns, ignores the extension (and drops it on its next
            # write). The guest data is untouched, so this is a fact, not a problem.
            self.header["bitmaps_ignored"] = True
            return
        ext = parse_struct(
            BITMAPS_EXTENSION,
            self._read_padded(offset, 24, "bitmaps"),
            offset=offset,
            what="bitmaps",
        )
        nb_bitmaps: int = ext["nb_bitmaps"]
        directory_size: int = ext["bitmap_directory_size"]
        directory_offset: int = ext["bitmap_directory_offset"]
        self.header.update(
            nb_bitmaps=nb_bitmaps,
            bitmap_directory_size=directory_size,
            bitmap_directory_offset=directory_offset,
        )
        if ext["reserved32"]:
            self.problem(
                ProblemKind.MALFORMED,
                "bitmaps extension reserved field is not zero",
                "bitmaps.reserved32",
                offset + 4,
            )
        if nb_bitmaps > QCOW2_MAX_BITMAPS:
            self.problem(
                ProblemKind.LIMIT,
                f"{nb_bitmaps} bitmaps, over qemu's maximum of {QCOW2_MAX_BITMAPS}",
                "bitmaps.nb_bitmaps",
                offset,
            )
        if nb_bitmaps == 0:
            self.problem(
                ProblemKind.MALFORMED,
                "bitmaps extension with zero bitmaps",
                "bitmaps.nb_bitmaps",
                offset,
            )
        if directory_offset % cluster_size:
            self.problem(
                ProblemKind.MALFORMED,
                f"bitmap directory offset {directory_offset:#x} is not cluster aligned",
                "bitmaps.bitmap_directory_offset",
                offset + 16,
            )
        if directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            self.problem(
                ProblemKind.LIMIT,
                f"bitmap directory of {directory_size} bytes is over qemu's maximum of "
                f"{QCOW2_MAX_BITMAP_DIRECTORY_SIZE}",
                "bitmaps.bitmap_directory_size",
                offset + 8,
            )
        # qcow2_load_dirty_bitmaps() reads the whole directory at open.
        self.tables.append(
            Table(name="bitmap_directory", offset=directory_offset, length=directory_size)
        )
        if 0 < nb_bitmaps <= QCOW2_MAX_BITMAPS and (
            directory_size <= QCOW2_MAX_BITMAP_DIRECTORY_SIZE
        ):
            self._bitmap_memory(directory_offset, directory_size, nb_bitmaps)
        self._check_region(
            "bitmap_directory",
            "bitmaps.bitmap_directory_offset",
            offset + 16,
            directory_offset,
            directory_size,
            cluster_size,
        )

    def _bitmap_memory(self, directory_offset: int, directory_size: int, nb_bitmaps: int) -> None:
        """The memory qcow2_load_dirty_bitmaps() allocates at open, even for `qemu-img info`.

        load_bitmap() creates an in-memory dirty bitmap of ceil(disk size / granularity) bits
        for every entry (an HBitmap: one bit per granule, 8-byte words), and fills it from the
        bitmap table; a table entry of 1 ("all ones") makes qemu write every byte of it. So a
        small file whose entries say granularity 512 on a 2 TiB disk costs 512 MiB of memory per
        bitmap: qemu-img info on a 650 KB file with three of them took 1.6 GB.
        """
        disk = self.header["size"] // 512 * 512
        read = min(directory_size, BITMAP_DIRECTORY_READ_CAP)
        data = self._read_padded(directory_offset, read, "bitmap_directory")
        total = 0
        pos = 0
        parsed = 0
        while parsed < nb_bitmaps and pos + BITMAP_DIR_ENTRY_SIZE <= len(data):
            # Up to ~10,000 entries in the bytes read: unpacked, not parsed one by one.
            _, _, _, _, granularity_bits, name_size, extra_data_size = _unpack_bitmap_dir_entry(
                data, pos
            )
            granules = -(-disk >> granularity_bits) if disk else 0
            total += -(-granules // 64) * 8
            parsed += 1
            size = BITMAP_DIR_ENTRY_SIZE + extra_data_size + name_size
            pos += (size + 7) & ~7
        self.header["bitmap_memory"] = total
        if parsed < nb_bitmaps and directory_size > read:
            self.problem(
                ProblemKind.LIMIT,
                f"the bitmap directory ({directory_size} bytes) holds more bitmaps than the "
                f"{read} bytes imgguard reads; only {parsed} of {nb_bitmaps} were counted",
                "bitmaps.bitmap_directory_size",
                directory_offset,
            )
        # Memory, not a region of the file: loaded at open, but never "past the end".
        self.tables.append(
            Table(
                name="dirty_bitmaps",
                offset=directory_offset,
                length=total,
                loaded_at_open=True,
                in_file=False,
            )
        )

    # --- backing file and encryption -------------------------------------------------------

    def _backing_file(
        self, v2: Any, cluster_size: int, header_length: int, cluster_valid: bool
    ) -> str | None:
        offset: int = v2["backing_file_offset"]
        size: int = v2["backing_file_size"]
        if offset == 0:
            return None
        if cluster_valid and offset > cluster_size:
            self.problem(
                ProblemKind.MALFORMED,
                f"backing_file_offset {offset:#x} is past the first cluster (qemu: invalid "
                "backing file offset)",
                "backing_file_offset",
                8,
            )
        # qemu: len > MIN(1023, cluster_size - backing_file_offset) is "too long"; the
        # subtraction is unsigned, so an offset past the cluster leaves 1023.
        limit = MAX_BACKING_FILE_SIZE
        if offset <= cluster_size:
            limit = min(limit, cluster_size - offset)
        if size > limit:
            self.problem(
                ProblemKind.LIMIT,
                f"backing file name of {size} bytes is over qemu's limit of {limit} here "
                "(qemu: backing file name too long)",
                "backing_file_size",
                16,
            )
        if offset < header_length:
            self.problem(
                ProblemKind.INCONSISTENT,
                f"the backing file name at {offset:#x} overlaps the header (and hides the "
                "header extensions from qemu)",
                "backing_file_offset",
                8,
            )
        wanted = min(size, NAME_READ_CAP)
        raw = self.reader.read_available(offset, wanted, field="backing_file_name")
        if len(raw) < wanted:
            self.problem(
                ProblemKind.TRUNCATED,
                f"the backing file name ({size} bytes at {offset:#x}) runs past the end of "
                "the file (qemu reads zeros there)",
                "backing_file_offset",
                8,
            )
        name = c_string(raw)
        if not name:
            if size:
                self.problem(
                    ProblemKind.INCONSISTENT,
                    "the backing file name is empty (starts with NUL); qemu sees no backing file",
                    "backing_file_offset",
                    8,
                )
            return None
        self.references.append(
            Reference(
                kind=ReferenceKind.BACKING_FILE,
                target=name,
                field="backing_file_offset",
                offset=offset,
            )
        )
        return name

    def _encryption(self, crypt_method: int) -> Encryption:
        if crypt_method == CRYPT_AES:
            # The legacy scheme: AES-128-CBC, the sector number as IV, the key straight from the
            # password. qemu-img still opens (and creates) it; system emulators refuse it.
            return Encryption(
                method="aes",
                format="aes",
                cipher_name="aes",
                cipher_mode="cbc-plain64",
                key_bytes=16,
            )
        if crypt_method != CRYPT_LUKS:
            return Encryption(method=f"unknown-{crypt_method}")
        if self.crypto_header is None:
            # qemu-img 7.2 crashes (SIGSEGV) on such an image in `qemu-img info`.
            self.problem(
                ProblemKind.MALFORMED,
                "LUKS encryption without a full disk encryption header extension (qemu: "
                "missing CRYPTO header; qemu-img 7.2 info crashes on it)",
                "crypt_method",
                32,
            )
            return Encryption(method="luks", format="luks")
        crypto_offset, crypto_length, ext_offset = self.crypto_header
        # The LUKS module is imported on first use, as the detector imports format modules.
        from imgguard.formats.luks import parse_luks_header

        try:
            luks = parse_luks_header(self.reader, crypto_offset)
        except ImageError as error:
            kind = ProblemKind.MALFORMED
            if isinstance(error, TruncatedImage):
                kind = ProblemKind.TRUNCATED
            elif isinstance(error, LimitExceeded):
                kind = ProblemKind.LIMIT
            self.problem(
                kind,
                f"the LUKS header the encryption extension points at: {error.message}",
                error.field or "full_disk_encryption_header.offset",
                error.offset if error.offset is not None else ext_offset,
            )
            return Encryption(method="luks", format="luks")
        self.problems.extend(luks.problems)
        if luks.version != 1:
            # qcrypto_block_luks_open() in qemu 7.2 reads LUKS version 1 only.
            self.problem(
                ProblemKind.UNSUPPORTED,
                f"LUKS version {luks.version} header (qemu 7.2 reads only LUKS1 in qcow2)",
                "full_disk_encryption_header.offset",
                ext_offset,
            )
        crypto_end = crypto_offset + crypto_length
        for table in luks.tables:
            self.tables.append(table)
            # qcow2_crypto_hdr_read_func() refuses reads outside the extension's region.
            if table.offset < crypto_offset or table.offset + table.length > crypto_end:
                self.problem(
                    ProblemKind.INCONSISTENT,
                    f"LUKS {table.name} ({table.length} bytes at {table.offset:#x}) lies outside "
                    "the encryption header region the extension declares",
                    "full_disk_encryption_header.length",
                    ext_offset + 8,
                )
        return luks.encryption


DRIVER = FormatDriver(
    name=NAME,
    probe=probe,
    inspect=inspect,
    recognise=recognise,
    magic=(MAGIC,),
    recognise_magic=(MAGIC,),
)
