"""QED: the QEMU Enhanced Disk format (`block/qed.c`, `block/qed.h`, `docs/interop/qed_spec.txt`).

What is read: the 64-byte little-endian header at offset 0 and the backing file name it points
at. The L1 table (`table_size` clusters at `l1_table_offset`, loaded whole at open) is located
and reported as a `Table`. qemu 7.2's `bdrv_qed_do_open()` checks are reproduced as `Problem`s,
including its integer widths where they differ from plain arithmetic.
"""

from __future__ import annotations

from typing import Any

from construct import Const, Int32ul, Int64ul, Struct

from imgguard.formats._common import Problems, c_string, fixed_header
from imgguard.formats._driver import FormatDriver
from imgguard.model import (
    Feature,
    FeatureKind,
    ImageInfo,
    ProblemKind,
    Reference,
    ReferenceKind,
    Table,
)
from imgguard.reader import ImageReader, parse_struct

NAME = "qed"

MAGIC = b"QED\0"

# QEDHeader (block/qed.h), little-endian, packed.
HEADER = Struct(
    "magic" / Const(MAGIC),
    "cluster_size" / Int32ul,  # in bytes
    "table_size" / Int32ul,  # L1 and L2 tables, in clusters
    "header_size" / Int32ul,  # in clusters
    "features" / Int64ul,
    "compat_features" / Int64ul,
    "autoclear_features" / Int64ul,
    "l1_table_offset" / Int64ul,  # in bytes
    "image_size" / Int64ul,  # the virtual size, in bytes
    "backing_filename_offset" / Int32ul,  # in bytes from the start of the file
    "backing_filename_size" / Int32ul,
).compile()
HEADER_SIZE = 64

QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURES = {0: "backing_file", 1: "need_check", 2: "backing_format_no_probe"}
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
# qemu 7.2 defines no compat and no autoclear features.

QED_MIN_CLUSTER_SIZE = 4 * 1024
QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024
QED_MIN_TABLE_SIZE = 1
QED_MAX_TABLE_SIZE = 16
# qed_read_string() reads into bs->backing_file, a char[PATH_MAX].
BACKING_FILE_BUFFER = 4096

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def probe(reader: ImageReader) -> int:
    # bdrv_qed_probe(): the little-endian magic "QED\0" in the (zero-padded) probe buffer.
    return 100 if reader.head[:4] == MAGIC else 0


def _power_of_two_in(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def _max_image_size(cluster_size: int, table_size: int) -> int:
    # qed_max_image_size(), in qemu's uint64_t arithmetic (the product can wrap).
    table_entries = (table_size * cluster_size) // 8
    l2_size = table_entries * cluster_size
    return (l2_size * table_entries) & U64


def inspect(reader: ImageReader) -> ImageInfo:
    raw_header = fixed_header(reader, HEADER_SIZE, "QED")
    h = parse_struct(HEADER, raw_header, offset=0, what="header")
    problems = Problems()
    cluster_size: int = h["cluster_size"]
    table_size: int = h["table_size"]
    header_size: int = h["header_size"]
    features_value: int = h["features"]
    image_size: int = h["image_size"]
    l1_table_offset: int = h["l1_table_offset"]
    facts: dict[str, Any] = {
        name: int(h[name])
        for name in (
            "cluster_size",
            "table_size",
            "header_size",
            "features",
            "compat_features",
            "autoclear_features",
            "l1_table_offset",
            "image_size",
            "backing_filename_offset",
            "backing_filename_size",
        )
    }

    features: list[Feature] = []
    for kind, value, names in (
        (FeatureKind.INCOMPATIBLE, features_value, FEATURES),
        (FeatureKind.COMPATIBLE, h["compat_features"], {}),
        (FeatureKind.AUTOCLEAR, h["autoclear_features"], {}),
    ):
        rest = int(value)
        while rest:
            bit = (rest & -rest).bit_length() - 1
            rest &= rest - 1
            name = names.get(bit)
            features.append(
                Feature(
                    name=name or f"{kind.value}_bit_{bit}", kind=kind, bit=bit, known=bool(name)
                )
            )
    if features_value & ~QED_FEATURE_MASK:
        problems.add(
            ProblemKind.UNSUPPORTED,
            f"unknown feature bits {features_value & ~QED_FEATURE_MASK:#x} (qemu refuses them)",
            "features",
            16,
        )

    # The checks of bdrv_qed_do_open(), in its order.
    cluster_valid = _power_of_two_in(cluster_size, QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE)
    if not cluster_valid:
        problems.add(
            ProblemKind.MALFORMED,
            f"cluster size {cluster_size} is not a power of 2 from 4 KiB to 64 MiB",
            "cluster_size",
            4,
        )
    table_valid = _power_of_two_in(table_size, QED_MIN_TABLE_SIZE, QED_MAX_TABLE_SIZE)
    if not table_valid:
        problems.add(
            ProblemKind.MALFORMED,
            f"table size {table_size} is not a power of 2 from 1 to 16 clusters",
            "table_size",
            8,
        )
    if image_size % 512:
        problems.add(
            ProblemKind.MALFORMED,
            f"image size {image_size} is not a multiple of 512",
            "image_size",
            48,
        )

    tables: list[Table] = []
    if cluster_valid and table_valid:
        max_size = _max_image_size(cluster_size, table_size)
        facts["max_image_size"] = max_size
        if image_size > max_size:
            problems.add(
                ProblemKind.LIMIT,
                f"image size {image_size} is over the {max_size} bytes the tables can map",
                "image_size",
                48,
            )
        length = table_size * cluster_size
        tables.append(Table(name="l1_table", offset=l1_table_offset, length=length))
        _check_table_offset(
            reader.size, l1_table_offset, cluster_size, table_size, header_size, problems
        )

    references: list[Reference] = []
    backing_file = backing_format = None
    offset: int = h["backing_filename_offset"]
    size: int = h["backing_filename_size"]
    if features_value & QED_F_BACKING_FILE:
        # qemu compares against cluster_size * header_size computed in 32 bits (it wraps).
        header_bytes = (cluster_size * header_size) & U32
        if offset + size > header_bytes:
            problems.add(
                ProblemKind.MALFORMED,
                f"backing filename ({size} bytes at {offset:#x}) does not lie in the "
                f"{header_bytes}-byte header (qemu: backing filename offset is invalid)",
                "backing_filename_offset",
                56,
            )
        if size >= BACKING_FILE_BUFFER:
            problems.add(
                ProblemKind.LIMIT,
                f"backing filename of {size} bytes does not fit qemu's {BACKING_FILE_BUFFER}-"
                "byte buffer",
                "backing_filename_size",
                60,
            )
        wanted = min(size, BACKING_FILE_BUFFER)
        raw = reader.read_available(offset, wanted, field="backing_filename")
        if len(raw) < wanted:
            problems.add(
                ProblemKind.TRUNCATED,
                f"the backing filename ({size} bytes at {offset:#x}) runs past the end of the "
                "file (qemu reads zeros there)",
                "backing_filename_offset",
                56,
            )
        if offset < HEADER_SIZE:
            problems.add(
                ProblemKind.INCONSISTENT,
                f"the backing filename at {offset:#x} overlaps the header fields",
                "backing_filename_offset",
                56,
            )
        # qed_read_string() NUL-terminates; qemu then uses it as a C string.
        name = c_string(raw)
        if name:
            backing_file = name
            references.append(
                Reference(
                    kind=ReferenceKind.BACKING_FILE,
                    target=name,
                    field="backing_filename_offset",
                    offset=offset,
                )
            )
            if features_value & QED_F_BACKING_FORMAT_NO_PROBE:
                # "The backing file format must not be probed, treat as raw image."
                backing_format = "raw"
        else:
            problems.add(
                ProblemKind.INCONSISTENT,
                "the backing_file feature is set but the backing filename is empty (qemu "
                "sees no backing file)",
                "backing_filename_size",
                60,
            )
    elif offset or size:
        # qemu reads no name without the feature bit; the fields are a leftover or a decoy.
        problems.add(
            ProblemKind.INCONSISTENT,
            "backing filename fields set without the backing_file feature (qemu ignores them)",
            "backing_filename_offset",
            56,
        )
    if features_value & QED_F_BACKING_FORMAT_NO_PROBE and not features_value & QED_F_BACKING_FILE:
        problems.add(
            ProblemKind.INCONSISTENT,
            "backing_format_no_probe is set without the backing_file feature",
            "features",
            16,
        )

    return ImageInfo(
        format=NAME,
        # qemu: total_sectors = image_size / 512.
        virtual_size=image_size // 512 * 512,
        backing_file=backing_file,
        backing_format=backing_format,
        references=tuple(references),
        cluster_size=cluster_size if cluster_valid else None,
        features=tuple(features),
        tables=tuple(tables),
        problems=tuple(problems),
        header=facts,
    )


def _check_table_offset(
    file_size: int,
    offset: int,
    cluster_size: int,
    table_size: int,
    header_size: int,
    problems: Problems,
) -> None:
    """qed_check_table_offset(): first and last cluster of the table lie in the file."""
    # qemu compares against the file size rounded down to a whole cluster.
    usable = file_size & ~(cluster_size - 1)
    end_offset = (offset + (table_size - 1) * cluster_size) & U64
    if end_offset <= offset:
        if table_size == 1:
            # The "overflow check" is also true for a one-cluster table: qemu 7.2 refuses every
            # image with table_size 1, although its own create accepts it.
            problems.add(
                ProblemKind.UNSUPPORTED,
                "table_size 1: qemu 7.2's table offset check rejects every one-cluster table "
                "(QED table offset is invalid)",
                "table_size",
                8,
            )
        else:
            problems.add(
                ProblemKind.MALFORMED,
                f"l1_table_offset {offset:#x} overflows (QED table offset is invalid)",
                "l1_table_offset",
                40,
            )
        return
    header_bytes = header_size * cluster_size
    if offset % cluster_size:
        problems.add(
            ProblemKind.MALFORMED,
            f"l1_table_offset {offset:#x} is not cluster aligned (QED table offset is invalid)",
            "l1_table_offset",
            40,
        )
    elif offset < header_bytes:
        problems.add(
            ProblemKind.INCONSISTENT,
            f"l1_table at {offset:#x} overlaps the {header_bytes}-byte header (QED table offset "
            "is invalid)",
            "l1_table_offset",
            40,
        )
    if end_offset >= usable:
        problems.add(
            ProblemKind.TRUNCATED,
            f"l1_table ({table_size * cluster_size} bytes at {offset:#x}) runs past the end of "
            f"the file at {file_size:#x} (QED table offset is invalid)",
            "l1_table_offset",
            40,
        )


DRIVER = FormatDriver(name=NAME, probe=probe, inspect=inspect, magic=(MAGIC,))
