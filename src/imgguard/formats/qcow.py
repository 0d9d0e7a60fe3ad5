"""qcow: the original QEMU copy-on-write format, version 1 (`block/qcow.c`).

There is no written spec beyond qemu's `QCowHeader`; qemu 7.2's `qcow_open()` is the reference.
What is read: the 48-byte header at offset 0 and the backing file name it points at. The L1
table is located, not read: qemu computes its length from the virtual size (there is no l1_size
field) and loads it whole at open, so it is reported as a `Table` of that length.
"""

from __future__ import annotations

from typing import Any

from construct import Const, Enum, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from imgguard.formats._common import Problems, c_string, fixed_header
from imgguard.formats._driver import FormatDriver
from imgguard.model import (
    Encryption,
    ImageInfo,
    ProblemKind,
    Reference,
    ReferenceKind,
    Table,
)
from imgguard.reader import ImageReader, parse_struct

NAME = "qcow"

MAGIC = b"QFI\xfb"
QCOW_VERSION = 1

# QCowHeader (block/qcow.c), big-endian, packed.
HEADER = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "mtime" / Int32ub,
    "size" / Int64ub,  # in bytes
    "cluster_bits" / Int8ub,
    "l2_bits" / Int8ub,  # log2 of the number of 8-byte entries in an L2 table
    "padding" / Int16ub,
    # qemu 7.2 knows 0 (none) and 1 (AES-128-CBC); anything else stays a visible integer.
    "crypt_method" / Enum(Int32ub, none=0, aes=1),
    "l1_table_offset" / Int64ub,
).compile()
HEADER_SIZE = 48

CRYPT_NONE = 0
CRYPT_AES = 1

# qcow_open()'s limits.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 16
# An L2 table is 512 bytes to 64 KiB: 2^6 to 2^13 entries of 8 bytes.
MIN_L2_BITS = 9 - 3
MAX_L2_BITS = 16 - 3
MAX_BACKING_FILE_SIZE = 1023
INT_MAX = (1 << 31) - 1
UINT64_MAX = (1 << 64) - 1


def probe(reader: ImageReader) -> int:
    # qcow_probe(): the magic and version 1 in the (zero-padded) 2 KiB probe buffer.
    head = reader.head[:8].ljust(8, b"\0")
    if head[:4] == MAGIC and int.from_bytes(head[4:8], "big") == QCOW_VERSION:
        return 100
    return 0


def inspect(reader: ImageReader) -> ImageInfo:
    raw_header = fixed_header(reader, HEADER_SIZE, "qcow")
    header = parse_struct(HEADER, raw_header, offset=0, what="header")
    problems = Problems()
    version: int = header["version"]
    facts: dict[str, Any] = {"version": version}
    if version != QCOW_VERSION:
        hint = " (versions 2 and 3 are qcow2)" if version in (2, 3) else ""
        problems.add(
            ProblemKind.UNSUPPORTED,
            f"qcow version {version} is not 1; qemu's qcow driver refuses it{hint}",
            "version",
            4,
        )
        # Another version's header has another layout: nothing more is known.
        return ImageInfo(
            format=NAME,
            variant=f"v{version}",
            version=version,
            problems=tuple(problems),
            header=facts,
        )

    size: int = header["size"]
    cluster_bits: int = header["cluster_bits"]
    l2_bits: int = header["l2_bits"]
    crypt_method = int(header["crypt_method"])
    facts.update(
        backing_file_offset=header["backing_file_offset"],
        backing_file_size=header["backing_file_size"],
        mtime=header["mtime"],
        size=size,
        cluster_bits=cluster_bits,
        l2_bits=l2_bits,
        crypt_method=crypt_method,
        l1_table_offset=header["l1_table_offset"],
    )

    if size <= 1:
        problems.add(
            ProblemKind.MALFORMED,
            f"image size {size} is too small (qemu: must be at least 2 bytes)",
            "size",
            24,
        )
    cluster_valid = MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
    if not cluster_valid:
        problems.add(
            ProblemKind.MALFORMED,
            f"cluster size 2^{cluster_bits} is not between 512 and 64k",
            "cluster_bits",
            32,
        )
    l2_valid = MIN_L2_BITS <= l2_bits <= MAX_L2_BITS
    if not l2_valid:
        problems.add(
            ProblemKind.MALFORMED,
            f"L2 table size 2^{l2_bits} entries is not between 512 bytes and 64k",
            "l2_bits",
            33,
        )

    encryption = None
    if crypt_method == CRYPT_AES:
        # AES-128-CBC with the sector number as IV; qemu-img opens it, system emulators refuse.
        encryption = Encryption(
            method="aes", format="aes", cipher_name="aes", cipher_mode="cbc-plain64", key_bytes=16
        )
    elif crypt_method != CRYPT_NONE:
        problems.add(
            ProblemKind.UNSUPPORTED,
            f"unknown encryption method {crypt_method} (qemu: invalid encryption method)",
            "crypt_method",
            36,
        )
        encryption = Encryption(method=f"unknown-{crypt_method}")

    tables: list[Table] = []
    l1_table_offset: int = header["l1_table_offset"]
    if cluster_valid and l2_valid:
        # The L1 table covers the virtual size; qemu allocates and reads it whole.
        shift = cluster_bits + l2_bits
        if size > UINT64_MAX - (1 << shift):
            problems.add(ProblemKind.LIMIT, f"image size {size} is too large", "size", 24)
        else:
            l1_size = (size + (1 << shift) - 1) >> shift
            facts["l1_size"] = l1_size
            if l1_size > INT_MAX // 8:
                problems.add(
                    ProblemKind.LIMIT,
                    f"image size {size} needs {l1_size} L1 entries (qemu: image too large)",
                    "size",
                    24,
                )
            if l1_size:
                length = l1_size * 8
                tables.append(Table(name="l1_table", offset=l1_table_offset, length=length))
                if l1_table_offset + length > reader.size:
                    problems.add(
                        ProblemKind.TRUNCATED,
                        f"l1_table ({length} bytes at {l1_table_offset:#x}) runs past the end "
                        f"of the file at {reader.size:#x} (qemu reads zeros there)",
                        "l1_table_offset",
                        40,
                    )
                if l1_table_offset < HEADER_SIZE:
                    problems.add(
                        ProblemKind.INCONSISTENT,
                        f"l1_table at {l1_table_offset:#x} overlaps the header",
                        "l1_table_offset",
                        40,
                    )

    references: list[Reference] = []
    backing_file = None
    backing_file_offset: int = header["backing_file_offset"]
    backing_file_size: int = header["backing_file_size"]
    if backing_file_offset:
        if backing_file_size > MAX_BACKING_FILE_SIZE:
            problems.add(
                ProblemKind.LIMIT,
                f"backing file name of {backing_file_size} bytes is over qemu's limit of "
                f"{MAX_BACKING_FILE_SIZE} (qemu: backing file name too long)",
                "backing_file_size",
                16,
            )
        wanted = min(backing_file_size, 4096)
        raw = reader.read_available(backing_file_offset, wanted, field="backing_file_name")
        if len(raw) < wanted:
            problems.add(
                ProblemKind.TRUNCATED,
                f"the backing file name ({backing_file_size} bytes at {backing_file_offset:#x}) "
                "runs past the end of the file (qemu reads zeros there)",
                "backing_file_offset",
                8,
            )
        if backing_file_offset < HEADER_SIZE:
            problems.add(
                ProblemKind.INCONSISTENT,
                f"the backing file name at {backing_file_offset:#x} overlaps the header",
                "backing_file_offset",
                8,
            )
        # qemu NUL-terminates what it read and copies it as a C string.
        name = c_string(raw)
        if name:
            backing_file = name
            references.append(
                Reference(
                    kind=ReferenceKind.BACKING_FILE,
                    target=name,
                    field="backing_file_offset",
                    offset=backing_file_offset,
                )
            )
        elif backing_file_size:
            problems.add(
                ProblemKind.INCONSISTENT,
                "the backing file name is empty (starts with NUL); qemu sees no backing file",
                "backing_file_offset",
                8,
            )

    return ImageInfo(
        format=NAME,
        variant="v1",
        # qemu: total_sectors = size / 512.
        virtual_size=size // 512 * 512,
        version=version,
        backing_file=backing_file,
        references=tuple(references),
        encrypted=crypt_method != CRYPT_NONE,
        encryption=encryption,
        cluster_size=1 << cluster_bits if cluster_valid else None,
        tables=tuple(tables),
        problems=tuple(problems),
        header=facts,
    )


DRIVER = FormatDriver(name=NAME, probe=probe, inspect=inspect, magic=(MAGIC,))
