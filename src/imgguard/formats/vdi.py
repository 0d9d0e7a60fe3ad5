"""vdi: VirtualBox Disk Image, header version 1.1 (qemu's `block/vdi.c`).

The header is one 512-byte sector, little-endian. Field names follow qemu's `VdiHeader`
(VirtualBox's `VDIHEADER1` names are given in comments). qemu 7.2 supports one layout only:
version 1.1, 512-byte sectors, 1 MiB blocks, no parent image; everything else it refuses at open,
and those refusals are reported here as `Problem`s. qemu ignores `header_size`, `image_type` and
`image_flags` altogether, so a "static", "undo" or "diff" image is opened just like a dynamic one.
"""

from __future__ import annotations

import construct

from imgguard.errors import MalformedImage, TruncatedImage
from imgguard.formats._common import uuid_text_le
from imgguard.formats._driver import FormatDriver
from imgguard.model import (
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

NAME = "vdi"

VDI_SIGNATURE = 0xBEDA107F
VDI_VERSION_1_1 = 0x00010001
SECTOR_SIZE = 512
DEFAULT_CLUSTER_SIZE = 1 << 20  # the only block size qemu accepts
# qemu 7.2: VDI_BLOCKS_IN_IMAGE_MAX = QEMU_ALIGN_DOWN(INT_MAX, SECTOR_SIZE) / sizeof(uint32_t),
# so the block map fits in one read; measured: "too many blocks 1073741824, max is 536870784".
VDI_BLOCKS_IN_IMAGE_MAX = 0x1FFFFF80
VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * DEFAULT_CLUSTER_SIZE
# VirtualBox VDIHEADER1 (0x180 bytes after `version`) and VDIHEADER1PLUS (0x190, adds the LCHS
# geometry in what qemu calls unused2).
VDI_HEADER_SIZES = (0x180, 0x190)
# VirtualBox VD_VDI_IMAGE_FLAGS_ZERO_EXPAND; the only flag bit the format defines.
VDI_FLAGS = {8: "zero_expand"}

VDI_HEADER = construct.Struct(
    "text" / construct.Bytes(64),  # free text, e.g. "<<< Oracle VM VirtualBox Disk Image >>>\n"
    "signature" / construct.Const(VDI_SIGNATURE, construct.Int32ul),
    "version" / construct.Int32ul,  # major << 16 | minor
    "header_size" / construct.Int32ul,  # cbHeader: bytes of header after this point
    "image_type"
    / construct.Enum(construct.Int32ul, dynamic=1, static=2, undo=3, diff=4),  # u32Type
    "image_flags" / construct.Int32ul,  # fFlags
    "description" / construct.Bytes(256),  # szComment
    "offset_bmap" / construct.Int32ul,  # offBlocks: file offset of the block map
    "offset_data" / construct.Int32ul,  # offData: file offset of block 0
    "cylinders" / construct.Int32ul,  # legacy geometry, unused by qemu
    "heads" / construct.Int32ul,
    "sectors" / construct.Int32ul,
    "sector_size" / construct.Int32ul,  # cbSector
    "unused1" / construct.Int32ul,
    "disk_size" / construct.Int64ul,  # cbDisk: guest disk size in bytes
    "block_size" / construct.Int32ul,  # cbBlock
    "block_extra" / construct.Int32ul,  # cbBlockExtra, unused by qemu
    "blocks_in_image" / construct.Int32ul,  # cBlocks: block map entries
    "blocks_allocated" / construct.Int32ul,  # cBlocksAllocated
    "uuid_image" / construct.Bytes(16),  # uuidCreate
    "uuid_last_snap" / construct.Bytes(16),  # uuidModify
    "uuid_link" / construct.Bytes(16),  # uuidLinkage: the parent image's uuid_image
    "uuid_parent" / construct.Bytes(16),  # uuidParentModify: the parent's uuid_last_snap
    "unused2" / construct.Bytes(56),
)
VDI_HEADER_SIZE = 512
_PARSER = VDI_HEADER.compile()

# Byte offsets of the fields problems point at.
_OFFSETS = {
    "signature": 64,
    "version": 68,
    "header_size": 72,
    "image_type": 76,
    "image_flags": 80,
    "offset_bmap": 340,
    "offset_data": 344,
    "sector_size": 360,
    "disk_size": 368,
    "block_size": 376,
    "blocks_in_image": 384,
    "blocks_allocated": 388,
    "uuid_image": 392,
    "uuid_last_snap": 408,
    "uuid_link": 424,
    "uuid_parent": 440,
}
_NULL_UUID = bytes(16)
_SIGNATURE_BYTES = VDI_SIGNATURE.to_bytes(4, "little")


def probe(reader: ImageReader) -> int:
    # vdi_probe(): buf_size >= sizeof(VdiHeader) and the signature. qemu 7.2's
    # find_image_format() always passes its whole 2048-byte buffer (zero-filled past the end
    # of the file), so in practice only the signature at offset 64 counts.
    head = reader.head
    if len(head) >= 68 and head[64:68] == _SIGNATURE_BYTES:
        return 100
    return 0


def inspect(reader: ImageReader) -> ImageInfo:
    head = reader.head
    problems: list[Problem] = []

    def problem(kind: ProblemKind, message: str, field: str) -> None:
        problems.append(Problem(kind, message, field=field, offset=_OFFSETS.get(field)))

    if len(head) < 68:
        raise TruncatedImage(
            f"file of {reader.size} bytes ends before the signature",
            field="vdi.signature",
            offset=64,
        )
    data = head[:VDI_HEADER_SIZE]
    if len(data) < VDI_HEADER_SIZE:
        # vdi_open() reads the sector through the block layer, which fills the rest with zeros.
        problem(
            ProblemKind.TRUNCATED,
            f"header is cut short at {len(data)} bytes; qemu reads zeros for the rest",
            "header",
        )
        data += bytes(VDI_HEADER_SIZE - len(data))
    if data[64:68] != _SIGNATURE_BYTES:
        raise MalformedImage(
            f"bad signature {int.from_bytes(data[64:68], 'little'):08x}",
            field="vdi.signature",
            offset=64,
        )
    hdr = parse_struct(_PARSER, data, offset=0, what="vdi")

    version: int = hdr["version"]
    disk_size: int = hdr["disk_size"]
    block_size: int = hdr["block_size"]
    blocks: int = hdr["blocks_in_image"]
    offset_bmap: int = hdr["offset_bmap"]
    offset_data: int = hdr["offset_data"]

    # vdi_open(), in its order. qemu stops at the first; all are reported here.
    if disk_size > VDI_DISK_SIZE_MAX:
        problem(
            ProblemKind.UNSUPPORTED,
            f"disk size {disk_size:#x} is over qemu's maximum {VDI_DISK_SIZE_MAX:#x}",
            "disk_size",
        )
    # "'VBoxManage convertfromraw' can create images with odd disk sizes": qemu rounds up.
    virtual_size = -(-disk_size // SECTOR_SIZE) * SECTOR_SIZE
    if version != VDI_VERSION_1_1:
        problem(
            ProblemKind.UNSUPPORTED,
            f"version {version >> 16}.{version & 0xFFFF} is not 1.1",
            "version",
        )
    if offset_bmap % SECTOR_SIZE:
        problem(
            ProblemKind.UNSUPPORTED,
            f"block map offset {offset_bmap:#x} is unaligned",
            "offset_bmap",
        )
    if offset_data % SECTOR_SIZE:
        problem(
            ProblemKind.UNSUPPORTED, f"data offset {offset_data:#x} is unaligned", "offset_data"
        )
    if hdr["sector_size"] != SECTOR_SIZE:
        problem(
            ProblemKind.UNSUPPORTED, f"sector size {hdr['sector_size']} is not 512", "sector_size"
        )
    if block_size != DEFAULT_CLUSTER_SIZE:
        problem(ProblemKind.UNSUPPORTED, f"block size {block_size} is not 1048576", "block_size")
    if virtual_size > blocks * block_size:
        problem(
            ProblemKind.INCONSISTENT,
            f"disk size {virtual_size} is more than the block map has room for "
            f"({blocks * block_size})",
            "disk_size",
        )

    references: list[Reference] = []
    for name in ("uuid_link", "uuid_parent"):
        raw: bytes = hdr[name]
        if raw != _NULL_UUID:
            references.append(
                Reference(ReferenceKind.PARENT_UUID, _uuid(raw), name, _OFFSETS[name])
            )
            problem(
                ProblemKind.UNSUPPORTED,
                f"non-NULL {name.replace('_', ' ')} UUID: a child of another image, "
                "which qemu cannot open",
                name,
            )
    if blocks > VDI_BLOCKS_IN_IMAGE_MAX:
        problem(
            ProblemKind.UNSUPPORTED,
            f"too many blocks {blocks}, qemu's maximum is {VDI_BLOCKS_IN_IMAGE_MAX}",
            "blocks_in_image",
        )

    # Oddities qemu does not check.
    image_type = hdr["image_type"]
    variant = str(image_type) if isinstance(image_type, str) else None
    if variant is None:
        problem(
            ProblemKind.MALFORMED,
            f"image type {int(image_type)} is not one VirtualBox defines (qemu ignores it)",
            "image_type",
        )
    if variant == "diff" and hdr["uuid_link"] == _NULL_UUID:
        problem(ProblemKind.INCONSISTENT, "diff image without a parent (uuid_link)", "image_type")
    if hdr["header_size"] not in VDI_HEADER_SIZES:
        problem(
            ProblemKind.MALFORMED,
            f"header size {hdr['header_size']:#x} is not 0x180 or 0x190 (qemu ignores it)",
            "header_size",
        )
    if block_size and blocks > -(-disk_size // block_size):
        problem(
            ProblemKind.INCONSISTENT,
            f"{blocks} blocks for a disk of {disk_size} bytes",
            "blocks_in_image",
        )
    if hdr["blocks_allocated"] > blocks:
        problem(
            ProblemKind.INCONSISTENT,
            f"{hdr['blocks_allocated']} blocks allocated of {blocks}",
            "blocks_allocated",
        )

    # vdi_open() allocates and reads the whole block map, rounded up to whole sectors.
    bmap_length = -(-blocks * 4 // SECTOR_SIZE) * SECTOR_SIZE
    if offset_bmap < VDI_HEADER_SIZE and bmap_length:
        problem(
            ProblemKind.INCONSISTENT,
            f"block map at {offset_bmap} overlaps the header",
            "offset_bmap",
        )
    if offset_bmap + bmap_length > reader.size:
        # qemu reads zeros past the end, i.e. every block "allocated" at data block 0.
        problem(
            ProblemKind.TRUNCATED,
            f"block map ({bmap_length} bytes at {offset_bmap}) runs past the end of the file",
            "offset_bmap",
        )
    if offset_bmap < offset_data < offset_bmap + bmap_length:
        problem(ProblemKind.INCONSISTENT, "data area overlaps the block map", "offset_data")
    if hdr["blocks_allocated"] and offset_data > reader.size:
        problem(
            ProblemKind.TRUNCATED,
            f"data area at {offset_data} starts past the end of the file",
            "offset_data",
        )

    image_flags: int = hdr["image_flags"]
    features = (
        tuple(
            Feature(VDI_FLAGS.get(bit, f"bit{bit}"), FeatureKind.COMPATIBLE, bit, bit in VDI_FLAGS)
            for bit in range(32)
            if image_flags >> bit & 1
        )
        if image_flags
        else ()
    )
    header = {
        "text": _c_string(hdr["text"]),
        "version": version,
        "header_size": hdr["header_size"],
        "image_type": int(image_type),
        "image_flags": hdr["image_flags"],
        "description": _c_string(hdr["description"]),
        "offset_bmap": offset_bmap,
        "offset_data": offset_data,
        "sector_size": hdr["sector_size"],
        "disk_size": disk_size,
        "block_size": block_size,
        "block_extra": hdr["block_extra"],
        "blocks_in_image": blocks,
        "blocks_allocated": hdr["blocks_allocated"],
        "uuid_image": _uuid(hdr["uuid_image"]),
        "uuid_last_snap": _uuid(hdr["uuid_last_snap"]),
        "uuid_link": _uuid(hdr["uuid_link"]),
        "uuid_parent": _uuid(hdr["uuid_parent"]),
    }
    return ImageInfo(
        format=NAME,
        variant=variant,
        virtual_size=virtual_size,
        version=version >> 16,
        cluster_size=block_size,
        references=tuple(references),
        features=features,
        tables=(Table("block_map", offset_bmap, bmap_length),),
        problems=tuple(problems),
        header=header,
    )


def _uuid(raw: bytes) -> str:
    # VirtualBox stores RTUUIDs with the first three fields little-endian (qemu's uuid_convert /
    # qemu_uuid_bswap turns them around before printing).
    if raw == _NULL_UUID:
        return _NULL_UUID_TEXT
    return uuid_text_le(raw)


_NULL_UUID_TEXT = uuid_text_le(_NULL_UUID)


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="backslashreplace")


DRIVER = FormatDriver(
    name=NAME, probe=probe, inspect=inspect, probe_signatures=((64, (_SIGNATURE_BYTES,)),)
)
