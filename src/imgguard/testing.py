"""Hypothesis strategies for disk images: valid headers of every format, and hostile mutations.

Services that take images from users can property-test their own pipeline with these::

    from hypothesis import given
    from imgguard import testing

    @given(testing.mutated(testing.images()))
    def test_upload_never_crashes(data: bytes) -> None:
        handle_upload(data)  # must answer every input with an accept or a reject

Every image is built with the same `construct` definitions imgguard's parsers read it with (the
module-level structs of `imgguard.formats.*`), so a generated header and its parse are two views
of one specification: `GeneratedImage` records what the bytes say (format, virtual size,
references) and `imgguard.inspect_bytes(image.data)` must report exactly that.

* `images(formats=...)` draws from every format builder; `qcow2_images()`, `vmdk_descriptors()`
  and friends draw one format (see `STRATEGIES`).
* `images_with_reference()` plants a name that points outside the file (backing file, external
  data file, extent, parent hint/locator/UUID) wherever the format has room for one.
* `mutated(images())` applies one or more of: bit flips inside header fields, integer fields
  pushed to their bounds (0, 1, 2^31-1, 2^32-1, 2^63-1, 2^64-1, file size +- 1), truncation,
  overwritten bytes, and polyglot splices (a VDI signature at 64, an MBR partition table at
  446/510, a VHD footer or a dmg koly trailer appended, another format's header spliced in).
* `build_*()` functions make one image from explicit parameters, for seeds and regression tests.

This module needs `hypothesis` (an optional dependency: `pip install imgguard[dev]`); nothing
else in imgguard imports it.
"""

from __future__ import annotations

import base64
import struct as _struct
import uuid as _uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import construct
from attrs import field, frozen
from hypothesis import strategies as st

from imgguard.formats import (
    bochs,
    cloop,
    dmg,
    gpt,
    iso9660,
    luks,
    mbr,
    parallels,
    qcow,
    qcow2,
    qed,
    vdi,
    vhdx,
    vmdk,
    vpc,
)
from imgguard.model import ReferenceKind

__all__ = [
    "BOUNDARY_VALUES",
    "FORMATS",
    "REFERENCE_FORMATS",
    "STRATEGIES",
    "FieldSpan",
    "GeneratedImage",
    "append_koly_trailer",
    "append_vhd_footer",
    "bochs_images",
    "build_bochs",
    "build_cloop",
    "build_dmg",
    "build_gpt",
    "build_iso9660",
    "build_luks",
    "build_mbr",
    "build_parallels",
    "build_qcow",
    "build_qcow2",
    "build_qed",
    "build_raw",
    "build_vdi",
    "build_vhdx",
    "build_vmdk3",
    "build_vmdk_descriptor",
    "build_vmdk_sparse",
    "build_vpc",
    "cloop_images",
    "dmg_images",
    "field_layout",
    "gpt_images",
    "images",
    "images_with_reference",
    "iso9660_images",
    "luks_images",
    "mbr_images",
    "mutated",
    "parallels_images",
    "plant_mbr",
    "plant_vdi_signature",
    "polyglots",
    "qcow2_images",
    "qcow_images",
    "qed_images",
    "raw_images",
    "reference_names",
    "vdi_images",
    "vhd_geometry",
    "vhdx_images",
    "vmdk3_images",
    "vmdk_descriptors",
    "vmdk_images",
    "vmdk_sparse_images",
    "vpc_images",
]

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512

# --- what a generated image is ----------------------------------------------------------------


@frozen
class FieldSpan:
    """Where one header field lies in a generated file; `byteorder` is None for byte strings."""

    name: str
    offset: int
    size: int
    byteorder: str | None = None

    @property
    def is_integer(self) -> bool:
        return self.byteorder is not None


@frozen
class GeneratedImage:
    """A built image and the facts its bytes state, as inspection must report them.

    `format` is imgguard's `ImageInfo.format`, `variant` its `ImageInfo.variant` (None where the
    builder does not promise one), `virtual_size` the size qemu would give the guest (None where
    qemu would refuse the image, e.g. a VHDX with a parent locator), `references` the
    `(kind, target)` pairs a reader must report. `fields` locates the header fields the builder
    wrote, for mutations.
    """

    data: bytes = field(repr=lambda data: f"<{len(data)} bytes>")
    format: str
    virtual_size: int | None
    variant: str | None = None
    references: tuple[tuple[ReferenceKind, str], ...] = ()
    fields: tuple[FieldSpan, ...] = field(default=(), repr=False)

    @property
    def size(self) -> int:
        return len(self.data)


# --- struct plumbing ------------------------------------------------------------------------------


def _declarative(struct: Any) -> Any:
    """The declarative struct behind a compiled one (`Struct(...).compile()` keeps it)."""
    inner = getattr(struct, "defersubcon", None)
    return inner if inner is not None else struct


def _build(struct: Any, values: dict[str, Any], **context: Any) -> bytes:
    data: bytes = _declarative(struct).build(values, **context)
    return data


def _unwrap(con: Any) -> Any:
    while not isinstance(con, (construct.Struct, construct.Array, construct.FormatField)):
        inner = getattr(con, "subcon", None)
        if inner is None:
            return con
        con = inner
    return con


def field_layout(struct: Any, base: int = 0, prefix: str = "") -> tuple[FieldSpan, ...]:
    """The fixed-size fields of a construct struct, flattened, at file offset `base`.

    Stops at the first field whose size depends on the data (a `Switch`, a `GreedyBytes`).
    """
    spans: list[FieldSpan] = []
    offset = base
    for sub in _declarative(struct).subcons:
        name = f"{prefix}{sub.name}" if sub.name else ""
        try:
            size = sub.sizeof()
        except construct.ConstructError:
            break
        inner = _unwrap(sub)
        if isinstance(inner, construct.Struct):
            spans.extend(field_layout(inner, offset, f"{name}."))
        elif isinstance(inner, construct.Array) and isinstance(
            _unwrap(inner.subcon), construct.Struct
        ):
            element = inner.subcon.sizeof()
            for index in range(size // element if element else 0):
                spans.extend(
                    field_layout(
                        _unwrap(inner.subcon), offset + index * element, f"{name}[{index}]."
                    )
                )
        elif isinstance(inner, construct.FormatField) and name:
            order = "big" if inner.fmtstr[0] == ">" else "little"
            spans.append(FieldSpan(name, offset, size, order))
        elif name and size:
            spans.append(FieldSpan(name, offset, size))
        offset += size
    return tuple(spans)


def _put(buffer: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(buffer):
        buffer.extend(bytes(end - len(buffer)))
    buffer[offset:end] = data


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _cstr(text: str, size: int) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise ValueError(f"{text!r} does not fit in {size} bytes with its NUL")
    return raw.ljust(size, b"\0")


# --- names --------------------------------------------------------------------------------------

_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def reference_names(max_size: int = 48) -> st.SearchStrategy[str]:
    """File names a hostile image might point at: relative, absolute, `..`, protocol names."""
    plain = st.text(_NAME_ALPHABET, min_size=1, max_size=max(1, max_size - 16))
    return st.one_of(
        plain,
        plain.map(lambda name: f"/etc/{name}"[:max_size]),
        plain.map(lambda name: f"../../{name}"[:max_size]),
        plain.map(lambda name: f"nbd:{name}:10809"[:max_size]),
        st.sampled_from(["/etc/shadow", "/dev/sda", "base.qcow2", "http://x/y", "json:{}"]),
    ).filter(lambda name: bool(name) and not name.endswith(" "))


# --- qcow2 --------------------------------------------------------------------------------------


def _qcow2_extension(magic: int, payload: bytes) -> bytes:
    head = _build(qcow2.EXTENSION_HEADER, {"magic": magic, "len": len(payload)})
    return head + payload.ljust(_round_up(len(payload), 8), b"\0")


def build_qcow2(
    *,
    virtual_size: int = MiB,
    version: int = 3,
    cluster_bits: int = 16,
    backing_file: str | None = None,
    backing_format: str | None = None,
    data_file: str | None = None,
    lazy_refcounts: bool = False,
) -> GeneratedImage:
    """A qcow2 image as `qemu-img create -f qcow2` lays it out: header, extensions and the
    backing file name in cluster 0, then the refcount table, a refcount block and the L1 table.
    """
    cluster = 1 << cluster_bits
    header_length = qcow2.QEMU_HEADER_SIZE if version >= 3 else qcow2.HEADER_V2_SIZE
    extensions = b""
    if backing_format is not None:
        extensions += _qcow2_extension(qcow2.EXT_BACKING_FORMAT, backing_format.encode())
    if data_file is not None:
        if version < 3:
            raise ValueError("an external data file needs qcow2 version 3")
        extensions += _qcow2_extension(qcow2.EXT_DATA_FILE, data_file.encode())
    if extensions or version >= 3:
        extensions += bytes(8)  # end of extensions
    backing = backing_file.encode() if backing_file is not None else b""
    backing_offset = header_length + len(extensions) if backing else 0
    if header_length + len(extensions) + len(backing) > cluster:
        raise ValueError("the header, its extensions and the backing name exceed a cluster")
    l2_entries = cluster // 8
    l1_size = max(1, -(-virtual_size // (cluster * l2_entries)))
    l1_clusters = _round_up(l1_size * 8, cluster) // cluster
    refcount_table, refcount_block, l1_table = cluster, 2 * cluster, 3 * cluster
    total_clusters = 3 + l1_clusters
    incompatible = qcow2.INCOMPAT_DATA_FILE if data_file is not None else 0
    compatible = 1 if lazy_refcounts else 0
    v2 = {
        "version": version,
        "backing_file_offset": backing_offset,
        "backing_file_size": len(backing),
        "cluster_bits": cluster_bits,
        "size": virtual_size,
        "crypt_method": "none",
        "l1_size": l1_size,
        "l1_table_offset": l1_table,
        "refcount_table_offset": refcount_table,
        "refcount_table_clusters": 1,
        "nb_snapshots": 0,
        "snapshots_offset": 0,
    }
    image = bytearray(_build(qcow2.HEADER_V2, v2))
    fields = list(field_layout(qcow2.HEADER_V2))
    if version >= 3:
        v3 = {
            "incompatible_features": incompatible,
            "compatible_features": compatible,
            "autoclear_features": 0,
            "refcount_order": 4,
            "header_length": header_length,
        }
        image += _build(qcow2.HEADER_V3, v3)
        fields += field_layout(qcow2.HEADER_V3, qcow2.HEADER_V2_SIZE)
        image += bytes(header_length - len(image))  # compression_type zlib and padding
    image += extensions + backing
    image += bytes(total_clusters * cluster - len(image))
    # One refcount block covering the image's clusters, each used once (16-bit refcounts).
    _put(image, refcount_table, refcount_block.to_bytes(8, "big"))
    _put(image, refcount_block, b"\x00\x01" * total_clusters)
    references: list[tuple[ReferenceKind, str]] = []
    if backing_file:
        references.append((ReferenceKind.BACKING_FILE, backing_file))
    if data_file:
        references.append((ReferenceKind.DATA_FILE, data_file))
    return GeneratedImage(
        bytes(image),
        "qcow2",
        virtual_size,
        variant=None,
        references=tuple(references),
        fields=tuple(fields),
    )


@st.composite
def qcow2_images(
    draw: st.DrawFn, *, references: bool | None = None, max_virtual_size: int = 1 << 40
) -> GeneratedImage:
    """qcow2 v2/v3 headers; `references=True` always plants a backing or data file name."""
    version = draw(st.sampled_from([2, 3]))
    plant = draw(st.booleans()) if references is None else references
    backing = backing_format = data_file = None
    if plant:
        kinds = ["backing", "data"] if version >= 3 else ["backing"]
        kind = draw(st.sampled_from(kinds))
        if kind == "backing" or draw(st.booleans()):
            backing = draw(reference_names())
            backing_format = draw(st.sampled_from([None, "qcow2", "raw", "vmdk"]))
        if kind == "data":
            data_file = draw(reference_names())
    cluster_bits = draw(st.integers(12 if plant else 9, 16))
    cluster = 1 << cluster_bits
    # Keep the L1 table to at most 64 KiB, as small test files should be.
    limit = min(max_virtual_size, 8 * KiB * cluster * (cluster // 8))
    size = draw(st.integers(1, limit // SECTOR)) * SECTOR
    return build_qcow2(
        virtual_size=size,
        version=version,
        cluster_bits=cluster_bits,
        backing_file=backing,
        backing_format=backing_format,
        data_file=data_file,
        lazy_refcounts=version >= 3 and draw(st.booleans()),
    )


# --- qcow (v1) ----------------------------------------------------------------------------------


def build_qcow(
    *,
    virtual_size: int = MiB,
    cluster_bits: int = 12,
    l2_bits: int = 9,
    backing_file: str | None = None,
) -> GeneratedImage:
    """A qcow (version 1) image: header, backing name, then the L1 table."""
    header_size = qcow.HEADER_SIZE
    backing = backing_file.encode() if backing_file is not None else b""
    backing_offset = header_size if backing else 0
    l1_offset = _round_up(header_size + len(backing), 8)
    shift = cluster_bits + l2_bits
    l1_size = -(-virtual_size // (1 << shift))
    values = {
        "version": qcow.QCOW_VERSION,
        "backing_file_offset": backing_offset,
        "backing_file_size": len(backing),
        "mtime": 0,
        "size": virtual_size,
        "cluster_bits": cluster_bits,
        "l2_bits": l2_bits,
        "padding": 0,
        "crypt_method": "none",
        "l1_table_offset": l1_offset,
    }
    image = bytearray(_build(qcow.HEADER, values)) + backing
    image += bytes(l1_offset + l1_size * 8 - len(image))
    refs = ((ReferenceKind.BACKING_FILE, backing_file),) if backing_file else ()
    return GeneratedImage(
        bytes(image), "qcow", virtual_size, references=refs, fields=field_layout(qcow.HEADER)
    )


@st.composite
def qcow_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """qcow (version 1) images; `references=True` always plants a backing file name."""
    plant = draw(st.booleans()) if references is None else references
    cluster_bits = draw(st.integers(qcow.MIN_CLUSTER_BITS, qcow.MAX_CLUSTER_BITS))
    l2_bits = draw(st.integers(qcow.MIN_L2_BITS, qcow.MAX_L2_BITS))
    # At most 8192 L1 entries.
    limit = min(1 << 40, 8192 << (cluster_bits + l2_bits))
    size = draw(st.integers(2, limit // SECTOR)) * SECTOR
    backing = draw(reference_names()) if plant else None
    return build_qcow(
        virtual_size=size, cluster_bits=cluster_bits, l2_bits=l2_bits, backing_file=backing
    )


# --- qed ----------------------------------------------------------------------------------------


def build_qed(
    *,
    virtual_size: int = MiB,
    cluster_size: int = 64 * KiB,
    table_size: int = 4,
    backing_file: str | None = None,
    backing_format_no_probe: bool = False,
) -> GeneratedImage:
    """A qed image: one header cluster (header and backing name), then the L1 table."""
    backing = backing_file.encode() if backing_file is not None else b""
    features = 0
    if backing:
        features |= qed.QED_F_BACKING_FILE
        if backing_format_no_probe:
            features |= qed.QED_F_BACKING_FORMAT_NO_PROBE
    header_clusters = max(1, -(-(qed.HEADER_SIZE + len(backing)) // cluster_size))
    l1_offset = header_clusters * cluster_size
    values = {
        "cluster_size": cluster_size,
        "table_size": table_size,
        "header_size": header_clusters,
        "features": features,
        "compat_features": 0,
        "autoclear_features": 0,
        "l1_table_offset": l1_offset,
        "image_size": virtual_size,
        "backing_filename_offset": qed.HEADER_SIZE if backing else 0,
        "backing_filename_size": len(backing),
    }
    image = bytearray(_build(qed.HEADER, values)) + backing
    image += bytes(l1_offset + table_size * cluster_size - len(image))
    refs = ((ReferenceKind.BACKING_FILE, backing_file),) if backing_file else ()
    return GeneratedImage(
        bytes(image), "qed", virtual_size, references=refs, fields=field_layout(qed.HEADER)
    )


@st.composite
def qed_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """qed images of 4-64 KiB clusters; `references=True` always plants a backing file name."""
    plant = draw(st.booleans()) if references is None else references
    cluster_size = 1 << draw(st.integers(12, 16))
    table_size = 1 << draw(st.integers(0, 2))
    entries = table_size * cluster_size // 8
    limit = min(1 << 40, entries * entries * cluster_size)
    size = draw(st.integers(1, limit // SECTOR)) * SECTOR
    return build_qed(
        virtual_size=size,
        cluster_size=cluster_size,
        table_size=table_size,
        backing_file=draw(reference_names()) if plant else None,
        backing_format_no_probe=draw(st.booleans()),
    )


# --- vmdk ---------------------------------------------------------------------------------------


def _vmdk_descriptor_text(
    *,
    create_type: str,
    extents: Sequence[tuple[str, int, str, str | None]],
    cid: int = 0x12345678,
    parent_hint: str | None = None,
    hw_version: str = "4",
    adapter: str = "ide",
) -> bytes:
    """A descriptor as qemu-img writes one (`vmdk_co_do_create` desc_template)."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={0x12345678 if parent_hint else 0xFFFFFFFF:08x}",
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description"]
    for access, sectors, kind, filename in extents:
        line = f"{access} {sectors} {kind}"
        if filename is not None:
            line += f' "{filename}"'
            if kind == "FLAT":  # a VMFS line has no offset (qemu: exactly 4 fields)
                line += " 0"
        lines.append(line)
    lines += [
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        f'ddb.virtualHWVersion = "{hw_version}"',
        'ddb.geometry.cylinders = "16"',
        'ddb.geometry.heads = "16"',
        'ddb.geometry.sectors = "63"',
        f'ddb.adapterType = "{adapter}"',
        "",
    ]
    return "\n".join(lines).encode()


def build_vmdk_descriptor(
    *,
    create_type: str = "monolithicFlat",
    extents: Sequence[tuple[str, int, str, str | None]] = (("RW", 2048, "FLAT", "disk-flat.vmdk"),),
    parent_hint: str | None = None,
) -> GeneratedImage:
    """A VMDK descriptor file; every RW extent line of a type qemu opens is a reference."""
    text = _vmdk_descriptor_text(create_type=create_type, extents=extents, parent_hint=parent_hint)
    used = [e for e in extents if e[0] == "RW" and e[2] in vmdk.QEMU_EXTENT_TYPES]
    refs = [(ReferenceKind.EXTENT, name) for _, _, _, name in used if name is not None]
    if parent_hint is not None:
        refs.append((ReferenceKind.PARENT_HINT, parent_hint))
    size = sum(sectors for _, sectors, _, _ in used) * SECTOR
    return GeneratedImage(text, "vmdk", size, variant=create_type, references=tuple(refs))


@st.composite
def vmdk_descriptors(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Descriptor files: monolithicFlat / twoGbMaxExtent* / vmfs with 1-4 extent lines."""
    create_type = draw(
        st.sampled_from(["monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse", "vmfs"])
    )
    kind = "SPARSE" if create_type.endswith("Sparse") else "FLAT"
    if create_type == "vmfs":
        kind = "VMFS"
    count = draw(st.integers(1, 4))
    extents = [
        ("RW", draw(st.integers(1, 1 << 22)), kind, draw(reference_names(max_size=40)))
        for _ in range(count)
    ]
    plant = draw(st.booleans()) if references is None else references
    parent = draw(reference_names()) if plant and draw(st.booleans()) else None
    return build_vmdk_descriptor(create_type=create_type, extents=extents, parent_hint=parent)


# VMDK 1.1 "Hosted Sparse Extent Header" flag bits (qemu's VMDK4_FLAG_*).
_VMDK4_FLAG_NL_DETECT = 1 << 0
_VMDK4_FLAG_RGD = 1 << 1
_VMDK4_FLAG_COMPRESS = 1 << 16
_VMDK4_FLAG_MARKER = 1 << 17


def build_vmdk_sparse(
    *,
    capacity: int = 2048,
    granularity: int = 128,
    stream_optimized: bool = False,
    parent_hint: str | None = None,
) -> GeneratedImage:
    """A hosted sparse extent (KDMV) with its embedded descriptor at sector 1; streamOptimized
    images carry the header again in a footer at the end, as `qemu-img convert` writes them.
    """
    create_type = "streamOptimized" if stream_optimized else "monolithicSparse"
    desc = _vmdk_descriptor_text(
        create_type=create_type,
        extents=(("RW", capacity, "SPARSE", "generated.vmdk"),),
        parent_hint=parent_hint,
    )
    desc_sectors = max(20, -(-len(desc) // SECTOR))
    gtes = vmdk.MAX_GTES_PER_GT
    gd_entries = max(1, -(-capacity // (gtes * granularity)))
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    gt_sectors = gd_entries * (gtes * 4 // SECTOR)
    rgd = 1 + desc_sectors
    gd = rgd + gd_sectors + gt_sectors
    grain = _round_up(gd + gd_sectors + gt_sectors, granularity)
    flags = _VMDK4_FLAG_NL_DETECT | _VMDK4_FLAG_RGD
    if stream_optimized:
        flags = _VMDK4_FLAG_NL_DETECT | _VMDK4_FLAG_COMPRESS | _VMDK4_FLAG_MARKER
    values = {
        "magic": vmdk.VMDK4_MAGIC,
        "version": 3 if stream_optimized else 1,
        "flags": flags,
        "capacity": capacity,
        "granularity": granularity,
        "desc_offset": 1,
        "desc_size": desc_sectors,
        "num_gtes_per_gt": gtes,
        "rgd_offset": 0 if stream_optimized else rgd,
        "gd_offset": vmdk.VMDK4_GD_AT_END if stream_optimized else gd,
        "grain_offset": grain,
        "filler": b"\0",
        "check_bytes": vmdk.CHECK_BYTES,
        "compressAlgorithm": vmdk.VMDK4_COMPRESSION_DEFLATE if stream_optimized else 0,
    }
    image = bytearray(_build(vmdk.VMDK4_HEADER, values))
    _put(image, SECTOR, desc)
    image += bytes(grain * SECTOR - len(image))
    if not stream_optimized:
        # Redundant and primary grain directories pointing at their (empty) grain tables.
        for directory in (rgd, gd):
            tables = directory + gd_sectors
            entries = b"".join(
                (tables + i * (gtes * 4 // SECTOR)).to_bytes(4, "little") for i in range(gd_entries)
            )
            _put(image, directory * SECTOR, entries)
    else:
        footer_gd = len(image) // SECTOR
        image += bytes(_round_up(gd_entries * 4, SECTOR))
        footer_values = dict(values, gd_offset=footer_gd)
        marker = {"val": 0, "size": 0, "type": vmdk.MARKER_FOOTER}
        eos = {"val": 0, "size": 0, "type": vmdk.MARKER_END_OF_STREAM}
        image += _build(
            vmdk.STREAM_FOOTER,
            {"footer_marker": marker, "header": footer_values, "eos_marker": eos},
        )
    refs = ((ReferenceKind.PARENT_HINT, parent_hint),) if parent_hint is not None else ()
    return GeneratedImage(
        bytes(image),
        "vmdk",
        capacity * SECTOR,
        variant=create_type,
        references=refs,
        fields=field_layout(vmdk.VMDK4_HEADER),
    )


@st.composite
def vmdk_sparse_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """monolithicSparse and streamOptimized (KDMV) files; `references=True` plants a
    parentFileNameHint in the embedded descriptor."""
    plant = draw(st.booleans()) if references is None else references
    granularity = 1 << draw(st.integers(3, 9))
    capacity = draw(st.integers(1, 256)) * granularity * draw(st.sampled_from([1, 8, 64]))
    return build_vmdk_sparse(
        capacity=capacity,
        granularity=granularity,
        stream_optimized=draw(st.booleans()),
        parent_hint=draw(reference_names()) if plant else None,
    )


# qemu's vmdk_open_vmfs_sparse(): a COWD grain table has 4096 entries.
_VMDK3_L2_SIZE = 4096
_COWD_DESCRIPTOR_KEYS = b"CID=fffffffe\nparentCID=ffffffff\n"


def build_vmdk3(
    *, virtual_size: int = MiB, granularity: int = 8, parent: str | None = None
) -> GeneratedImage:
    """An ESX sparse extent (COWD); a child (flags without COWDISK_ROOT) names its parent."""
    sectors = virtual_size // SECTOR
    l1_size = max(1, -(-sectors // (_VMDK3_L2_SIZE * granularity)))
    l1_offset = vmdk.VMDK3_HEADER_SIZE // SECTOR
    values = {
        "version": 1,
        "flags": 0 if parent is not None else vmdk.COWDISK_ROOT,
        "disk_sectors": sectors,
        "granularity": granularity,
        "l1dir_offset": l1_offset,
        "l1dir_size": l1_size,
        "file_sectors": l1_offset + -(-l1_size * 4 // SECTOR),
        "parentFileName": _cstr(parent or "", 1024),
        "parentGeneration": 0,
        "generation": 1,
        "name": bytes(60),
        "description": bytes(512),
        "savedGeneration": 0,
        "reserved": bytes(8),
        "uncleanShutdown": 0,
    }
    image = bytearray(_build(vmdk.VMDK3_HEADER, values))
    # qemu's vmdk_open() reads CID and parentCID as descriptor text at 0x200 of any sparse
    # file, inside the COWD header; VMware leaves them there too.
    _put(image, vmdk.SPARSE_DESC_OFFSET, _COWD_DESCRIPTOR_KEYS)
    image += bytes(_round_up(l1_size * 4, SECTOR))
    refs = ((ReferenceKind.PARENT_HINT, parent),) if parent else ()
    return GeneratedImage(
        bytes(image),
        "vmdk",
        sectors * SECTOR,
        references=refs,
        fields=field_layout(vmdk.VMDK3_HEADER),
    )


@st.composite
def vmdk3_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """ESX sparse (COWD) files; `references=True` makes a child that names its parent."""
    plant = draw(st.booleans()) if references is None else references
    # A COWD parent name shares bytes 0x200.. with where qemu looks for descriptor keys: keep
    # it inside the first 480 bytes of the field.
    parent = draw(reference_names(max_size=200)) if plant else None
    return build_vmdk3(
        virtual_size=draw(st.integers(1, 1 << 22)) * SECTOR,
        granularity=1 << draw(st.integers(0, 7)),
        parent=parent,
    )


def vmdk_images(*, references: bool | None = None) -> st.SearchStrategy[GeneratedImage]:
    """Every kind of file qemu's vmdk driver opens: KDMV, COWD and descriptor files."""
    return st.one_of(
        vmdk_sparse_images(references=references),
        vmdk3_images(references=references),
        vmdk_descriptors(references=references),
    )


# --- vpc (VHD) ----------------------------------------------------------------------------------

_VHD_EPOCH_TIMESTAMP = 0x2A000000


def _vhd_checksum(data: bytes | bytearray) -> int:
    return ~sum(data) & 0xFFFFFFFF


def vhd_geometry(total_sectors: int) -> tuple[int, int, int]:
    """The VHD spec's CHS calculation (Appendix "CHS Calculation"), as Hyper-V and qemu
    compute a disk's (cylinders, heads, sectors per track)."""
    total = min(total_sectors, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


def _vhd_footer(
    *,
    disk_type: int,
    current_size: int,
    data_offset: int,
    creator_app: bytes,
    geometry: tuple[int, int, int],
    uid: bytes,
) -> bytes:
    cyls, heads, secs = geometry
    values = {
        "features": 2,
        "version": 0x00010000,
        "data_offset": data_offset,
        "timestamp": _VHD_EPOCH_TIMESTAMP,
        "creator_app": creator_app,
        "creator_version": 0x00050003,
        "creator_os": b"Wi2k",
        "orig_size": current_size,
        "current_size": current_size,
        "cyls": cyls,
        "heads": heads,
        "secs_per_cyl": secs,
        "type": disk_type,
        "checksum": 0,
        "uuid": uid,
        "in_saved_state": 0,
        "reserved": bytes(427),
    }
    footer = bytearray(_build(vpc.FOOTER, values))
    footer[64:68] = _vhd_checksum(footer).to_bytes(4, "big")
    return bytes(footer)


def build_vpc(
    *,
    virtual_size: int = MiB,
    subformat: str = "dynamic",
    block_size: int = 2 * MiB,
    use_chs: bool = False,
    parent: str | None = None,
    parent_uuid: bytes | None = None,
    locators: Sequence[tuple[bytes, str]] | None = None,
) -> GeneratedImage:
    """A VHD: fixed (data then footer), dynamic, or differencing (a dynamic disk of type 4 that
    names its parent by UTF-16 name, UUID and platform locators).

    With `use_chs` the creator is "vpc " and qemu sizes the disk by its CHS geometry, so the
    virtual size is the geometry's (a multiple of whole cylinders); otherwise the creator is
    "win " and current_size counts.
    """
    if parent is not None and locators is None:
        locators = ((b"W2ku", f"C:\\images\\{parent}"), (b"W2ru", f".\\{parent}"))
    differencing = subformat == "differencing" or parent is not None or bool(locators)
    if differencing:
        subformat = "differencing"
    geometry = vhd_geometry(virtual_size // SECTOR)
    if use_chs and geometry[0] * geometry[1] * geometry[2]:
        cyls, heads, secs = geometry
        virtual_size = cyls * heads * secs * SECTOR
        creator = b"vpc "
    else:
        creator = b"win "
        virtual_size = virtual_size // SECTOR * SECTOR
    uid = _uuid.UUID(int=virtual_size + 1).bytes
    if subformat == "fixed":
        if not virtual_size:
            raise ValueError("a fixed VHD of 0 bytes is its footer alone, read as dynamic")
        footer = _vhd_footer(
            disk_type=vpc.VHD_FIXED,
            current_size=virtual_size,
            data_offset=(1 << 64) - 1,
            creator_app=creator,
            geometry=geometry,
            uid=uid,
        )
        data = bytes(virtual_size) + footer
        return GeneratedImage(
            data,
            "vpc",
            virtual_size,
            variant="fixed",
            fields=field_layout(vpc.FOOTER, virtual_size),
        )
    entries = max(1, -(-virtual_size // block_size))
    bat_offset = 3 * SECTOR
    bat_length = _round_up(entries * 4, SECTOR)
    cursor = bat_offset + bat_length
    refs: list[tuple[ReferenceKind, str]] = []
    locator_values = []
    locator_data = bytearray()
    for code, target in locators or ():
        encoding = vpc.PLATFORM_CODES[code]
        raw = target.encode(encoding)
        locator_values.append(
            {
                "platform_code": code,
                "platform_data_space": _round_up(len(raw), SECTOR) // SECTOR,
                "platform_data_length": len(raw),
                "reserved": 0,
                "platform_data_offset": cursor + len(locator_data),
            }
        )
        locator_data += raw.ljust(_round_up(len(raw), SECTOR), b"\0")
        refs.append((ReferenceKind.PARENT_LOCATOR, target))
    empty = {
        "platform_code": bytes(4),
        "platform_data_space": 0,
        "platform_data_length": 0,
        "reserved": 0,
        "platform_data_offset": 0,
    }
    locator_values += [empty] * (8 - len(locator_values))
    puid = parent_uuid or (_uuid.UUID(int=virtual_size + 2).bytes if differencing else bytes(16))
    name = (parent or "").encode("utf-16-be")
    dyn_values = {
        "data_offset": (1 << 64) - 1,
        "table_offset": bat_offset,
        "header_version": 0x00010000,
        "max_table_entries": entries,
        "block_size": block_size,
        "checksum": 0,
        "parent_uuid": puid,
        "parent_timestamp": _VHD_EPOCH_TIMESTAMP if differencing else 0,
        "reserved": 0,
        "parent_unicode_name": name.ljust(512, b"\0"),
        "parent_locators": locator_values,
        "reserved2": bytes(256),
    }
    dynamic = bytearray(_build(vpc.DYNAMIC_HEADER, dyn_values))
    dynamic[36:40] = _vhd_checksum(dynamic).to_bytes(4, "big")
    footer = _vhd_footer(
        disk_type=vpc.VHD_DIFFERENCING if differencing else vpc.VHD_DYNAMIC,
        current_size=virtual_size,
        data_offset=SECTOR,
        creator_app=creator,
        geometry=geometry,
        uid=uid,
    )
    image = footer + bytes(dynamic) + b"\xff" * (entries * 4)
    image += bytes(cursor - len(image)) + bytes(locator_data) + footer
    if parent:
        refs.insert(0, (ReferenceKind.PARENT_HINT, parent))
    if differencing and any(puid):
        refs.append((ReferenceKind.PARENT_UUID, str(_uuid.UUID(bytes=puid))))
    fields = field_layout(vpc.FOOTER) + field_layout(vpc.DYNAMIC_HEADER, SECTOR)
    return GeneratedImage(
        image, "vpc", virtual_size, variant=subformat, references=tuple(refs), fields=fields
    )


@st.composite
def vpc_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Fixed and dynamic VHDs; `references=True` makes a differencing disk with a parent
    name, UUID and 0-3 platform locators."""
    plant = draw(st.booleans()) if references is None else references
    subformat = "differencing" if plant else draw(st.sampled_from(["dynamic", "fixed"]))
    limit = 64 * KiB if subformat == "fixed" else 64 * 1024 * 2 * MiB
    size = draw(st.integers(1, limit // SECTOR)) * SECTOR
    block_size = 1 << draw(st.integers(16, 21))
    size = min(size, block_size * 16384)
    parent = draw(reference_names()) if plant else None
    locators = None
    if plant:
        codes = draw(st.lists(st.sampled_from(sorted(vpc.PLATFORM_CODES)), max_size=3))
        locators = [(code, draw(reference_names())) for code in codes]
    return build_vpc(
        virtual_size=max(size, 3 * SECTOR * 17 * 4) if draw(st.booleans()) else size,
        subformat=subformat,
        block_size=block_size,
        use_chs=draw(st.booleans()),
        parent=parent,
        locators=locators,
    )


# --- vhdx ---------------------------------------------------------------------------------------


def _with_crc32c(block: bytearray, checksum_offset: int) -> bytes:
    block[checksum_offset : checksum_offset + 4] = bytes(4)
    block[checksum_offset : checksum_offset + 4] = vhdx.crc32c(bytes(block)).to_bytes(4, "little")
    return bytes(block)


def _utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


def build_vhdx(
    *,
    virtual_size: int = 8 * MiB,
    block_size: int = MiB,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    parent: str | None = None,
    parent_linkage: str | None = None,
) -> GeneratedImage:
    """A VHDX with the header section at 0-256 KiB, the metadata region at 256 KiB, the BAT
    after it and a (zero-length) log at 1 MiB. A parent makes it a differencing image whose
    parent locator names it (relative_path, absolute_win32_path) and its parent_linkage GUID;
    qemu 7.2 refuses those, so the virtual size is then None.
    """
    image = bytearray(
        _build(vhdx.FILE_IDENTIFIER, {"creator": _utf16("imgguard.testing").ljust(512, b"\0")})
    )
    fields = list(field_layout(vhdx.FILE_IDENTIFIER))
    for index, offset in enumerate((vhdx.HEADER1_OFFSET, vhdx.HEADER2_OFFSET), start=1):
        values = {
            "checksum": 0,
            "sequence_number": index,
            "file_write_guid": _uuid.UUID(int=1).bytes_le,
            "data_write_guid": _uuid.UUID(int=2).bytes_le,
            "log_guid": bytes(16),
            "log_version": 0,
            "version": 1,
            "log_length": MiB,
            "log_offset": MiB,
        }
        block = bytearray(_build(vhdx.HEADER, values).ljust(vhdx.HEADER_SIZE, b"\0"))
        _put(image, offset, _with_crc32c(block, 4))
        fields += field_layout(vhdx.HEADER, offset)

    # After the region table and its copy (192 and 256 KiB).
    metadata_offset = 320 * KiB
    items: list[tuple[bytes, bytes, int]] = []  # (guid, data, data_bits)
    has_parent = parent is not None or parent_linkage is not None
    params = _build(
        vhdx.FILE_PARAMETERS,
        {"block_size": block_size, "data_bits": vhdx.PARAMS_HAS_PARENT if has_parent else 0},
    )
    items.append((vhdx.FILE_PARAMETERS_GUID, params, vhdx.META_IS_REQUIRED))
    items.append(
        (vhdx.VIRTUAL_DISK_SIZE_GUID, virtual_size.to_bytes(8, "little"), 0x6)  # virtual, required
    )
    items.append((vhdx.PAGE83_GUID, _uuid.UUID(int=3).bytes_le, 0x6))
    items.append((vhdx.LOGICAL_SECTOR_SIZE_GUID, logical_sector_size.to_bytes(4, "little"), 0x6))
    items.append((vhdx.PHYSICAL_SECTOR_SIZE_GUID, physical_sector_size.to_bytes(4, "little"), 0x6))
    refs: list[tuple[ReferenceKind, str]] = []
    if has_parent:
        pairs: list[tuple[str, str]] = []
        if parent_linkage is None:
            parent_linkage = "{" + str(_uuid.UUID(int=virtual_size + 7)).upper() + "}"
        pairs.append(("parent_linkage", parent_linkage))
        refs.append((ReferenceKind.PARENT_UUID, parent_linkage))
        if parent is not None:
            pairs.append(("relative_path", f".\\{parent}"))
            pairs.append(("absolute_win32_path", f"C:\\images\\{parent}"))
            refs.append((ReferenceKind.PARENT_LOCATOR, f".\\{parent}"))
            refs.append((ReferenceKind.PARENT_LOCATOR, f"C:\\images\\{parent}"))
        table_size = vhdx.PARENT_LOCATOR_HEADER_SIZE + len(pairs) * vhdx.PARENT_LOCATOR_ENTRY_SIZE
        entries = b""
        strings = b""
        for key, value in pairs:
            key_raw, value_raw = _utf16(key), _utf16(value)
            key_at = table_size + len(strings)
            strings += key_raw
            value_at = table_size + len(strings)
            strings += value_raw
            entries += _build(
                vhdx.PARENT_LOCATOR_ENTRY,
                {
                    "key_offset": key_at,
                    "value_offset": value_at,
                    "key_length": len(key_raw),
                    "value_length": len(value_raw),
                },
            )
        locator = (
            _build(
                vhdx.PARENT_LOCATOR_HEADER,
                {
                    "locator_type": vhdx.PARENT_VHDX_LOCATOR_TYPE,
                    "reserved": 0,
                    "key_value_count": len(pairs),
                },
            )
            + entries
            + strings
        )
        items.append((vhdx.PARENT_LOCATOR_GUID, locator, vhdx.META_IS_REQUIRED))
    table = _build(
        vhdx.METADATA_TABLE_HEADER,
        {"reserved": 0, "entry_count": len(items), "reserved2": bytes(20)},
    )
    fields += field_layout(vhdx.METADATA_TABLE_HEADER, metadata_offset)
    item_cursor = 64 * KiB
    payload = bytearray()
    for index, (guid, data, bits) in enumerate(items):
        table += _build(
            vhdx.METADATA_ENTRY,
            {
                "item_id": guid,
                "offset": item_cursor + len(payload),
                "length": len(data),
                "data_bits": bits,
                "reserved2": 0,
            },
        )
        fields += field_layout(vhdx.METADATA_ENTRY, metadata_offset + 32 + 32 * index, "item.")
        payload += data.ljust(_round_up(len(data), 8), b"\0")
    metadata_length = _round_up(item_cursor + len(payload), 64 * KiB)
    _put(image, metadata_offset, table)
    _put(image, metadata_offset + item_cursor, bytes(payload))

    chunk_ratio = (vhdx.MAX_SECTORS_PER_BLOCK * logical_sector_size) // block_size
    data_blocks = -(-virtual_size // block_size)
    bat_entries = data_blocks + (data_blocks - 1) // chunk_ratio if data_blocks else 0
    bat_offset = metadata_offset + metadata_length
    bat_length = _round_up(max(bat_entries * 8, 1), 64 * KiB)
    if bat_offset + bat_length > MiB:
        raise ValueError("the BAT must end before the log at 1 MiB: use a smaller virtual size")
    regions = [
        (vhdx.BAT_GUID, bat_offset, bat_length),
        (vhdx.METADATA_GUID, metadata_offset, metadata_length),
    ]
    region_table = bytearray(
        _build(vhdx.REGION_TABLE_HEADER, {"checksum": 0, "entry_count": 2, "reserved": 0})
    )
    for guid, offset, length in regions:
        region_table += _build(
            vhdx.REGION_TABLE_ENTRY,
            {
                "guid": guid,
                "file_offset": offset,
                "length": length,
                "data_bits": vhdx.REGION_ENTRY_REQUIRED,
            },
        )
    fields += field_layout(vhdx.REGION_TABLE_HEADER, vhdx.REGION_TABLE_OFFSET)
    for index in range(2):
        fields += field_layout(
            vhdx.REGION_TABLE_ENTRY, vhdx.REGION_TABLE_OFFSET + 16 + 32 * index, f"region{index}."
        )
    region_table += bytes(vhdx.REGION_TABLE_SIZE - len(region_table))
    region_bytes = _with_crc32c(region_table, 4)
    _put(image, vhdx.REGION_TABLE_OFFSET, region_bytes)
    _put(image, vhdx.REGION_TABLE_OFFSET + vhdx.REGION_TABLE_SIZE, region_bytes)
    image += bytes(bat_offset + bat_length - len(image))
    return GeneratedImage(
        bytes(image),
        "vhdx",
        None if has_parent else virtual_size // SECTOR * SECTOR,
        variant="differencing" if has_parent else "dynamic",
        references=tuple(refs),
        fields=tuple(fields),
    )


@st.composite
def vhdx_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """VHDX images of 1-256 MiB blocks; `references=True` adds a parent locator."""
    plant = draw(st.booleans()) if references is None else references
    block_size = 1 << draw(st.integers(20, 28))
    chunk_ratio = (vhdx.MAX_SECTORS_PER_BLOCK * SECTOR) // block_size
    # Keep the BAT under 512 KiB so that it ends before the log.
    max_blocks = 512 * KiB // 8 * chunk_ratio // (chunk_ratio + 1) - 1
    size = draw(st.integers(1, max_blocks * block_size // SECTOR)) * SECTOR
    parent = draw(reference_names()) if plant else None
    return build_vhdx(
        virtual_size=size,
        block_size=block_size,
        physical_sector_size=draw(st.sampled_from([512, 4096])),
        parent=parent,
    )


# --- vdi ----------------------------------------------------------------------------------------


def build_vdi(
    *,
    virtual_size: int = MiB,
    static: bool = False,
    parent_uuid: bytes | None = None,
) -> GeneratedImage:
    """A VirtualBox VDI as qemu-img creates it; `parent_uuid` makes it a diff image."""
    block_size = vdi.DEFAULT_CLUSTER_SIZE
    blocks = -(-virtual_size // block_size)
    bmap_length = _round_up(blocks * 4, SECTOR)
    offset_bmap = vdi.VDI_HEADER_SIZE
    offset_data = offset_bmap + bmap_length
    image_type = "diff" if parent_uuid else ("static" if static else "dynamic")
    values = {
        "text": b"<<< QEMU VM Virtual Disk Image >>>\n".ljust(64, b"\0"),
        "version": vdi.VDI_VERSION_1_1,
        "header_size": 0x190,
        "image_type": image_type,
        "image_flags": 0,
        "description": bytes(256),
        "offset_bmap": offset_bmap,
        "offset_data": offset_data,
        "cylinders": 0,
        "heads": 0,
        "sectors": 0,
        "sector_size": SECTOR,
        "unused1": 0,
        "disk_size": virtual_size,
        "block_size": block_size,
        "block_extra": 0,
        "blocks_in_image": blocks,
        "blocks_allocated": 0,
        "uuid_image": _uuid.UUID(int=virtual_size + 11).bytes_le,
        "uuid_last_snap": _uuid.UUID(int=virtual_size + 12).bytes_le,
        "uuid_link": parent_uuid or bytes(16),
        "uuid_parent": bytes(16),
        "unused2": bytes(56),
    }
    header = _build(vdi.VDI_HEADER, values)
    bmap = b"\xff\xff\xff\xff" * blocks
    image = header + bmap.ljust(bmap_length, b"\0")
    refs: tuple[tuple[ReferenceKind, str], ...] = ()
    if parent_uuid:
        refs = ((ReferenceKind.PARENT_UUID, str(_uuid.UUID(bytes_le=parent_uuid))),)
    return GeneratedImage(
        image,
        "vdi",
        _round_up(virtual_size, SECTOR),
        variant=image_type,
        references=refs,
        fields=field_layout(vdi.VDI_HEADER),
    )


@st.composite
def vdi_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Dynamic and static VDIs; `references=True` makes a diff image with a parent UUID."""
    plant = draw(st.booleans()) if references is None else references
    size = draw(st.integers(1, 1 << 40))
    if draw(st.booleans()):
        size = _round_up(size, SECTOR)
    parent = draw(st.binary(min_size=16, max_size=16).filter(any)) if plant else None
    return build_vdi(virtual_size=size, static=draw(st.booleans()), parent_uuid=parent)


# --- luks ---------------------------------------------------------------------------------------


def build_luks(
    *,
    payload_size: int = 64 * KiB,
    cipher: tuple[str, str, int] = ("aes", "xts-plain64", 32),
    hash_spec: str = "sha256",
    iterations: int = 1000,
    active_slots: int = 1,
) -> GeneratedImage:
    """A LUKS1 volume as qemu-img creates one: header, 8 key slot areas, then the payload.
    The key material and digests are zeros; nothing here can unlock it.
    """
    cipher_name, cipher_mode, key_bytes = cipher
    material = key_bytes * luks.LUKS_STRIPES
    slot_sectors = _round_up(material, 4096) // SECTOR
    first = luks.KEY_SLOT_OFFSET // SECTOR
    slots = []
    for index in range(luks.NUM_KEY_SLOTS):
        active = index < active_slots
        slots.append(
            {
                "active": "enabled" if active else "disabled",
                "iterations": iterations if active else 0,
                "salt": bytes(32),
                "key_material_offset": first + index * slot_sectors,
                "stripes": luks.LUKS_STRIPES,
            }
        )
    payload_offset = first + luks.NUM_KEY_SLOTS * slot_sectors
    values = {
        "version": 1,
        "cipher_name": _cstr(cipher_name, 32),
        "cipher_mode": _cstr(cipher_mode, 32),
        "hash_spec": _cstr(hash_spec, 32),
        "payload_offset": payload_offset,
        "key_bytes": key_bytes,
        "mk_digest": bytes(20),
        "mk_digest_salt": bytes(32),
        "mk_digest_iterations": iterations,
        "uuid": _cstr(str(_uuid.UUID(int=payload_size + 5)), 40),
        "key_slots": slots,
    }
    header = _build(luks.LUKS1_HEADER, values)
    image = header + bytes(payload_offset * SECTOR - len(header) + payload_size)
    return GeneratedImage(
        image, "luks", payload_size, variant=None, fields=field_layout(luks.LUKS1_HEADER)
    )


@st.composite
def luks_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """LUKS1 volumes with the ciphers and hashes qemu-img creates; never a reference."""
    cipher = draw(
        st.sampled_from(
            [
                ("aes", "xts-plain64", 32),
                ("aes", "xts-plain64", 64),
                ("aes", "cbc-essiv:sha256", 32),
                ("aes", "cbc-plain64", 16),
                ("twofish", "xts-plain64", 64),
                ("serpent", "cbc-plain", 32),
            ]
        )
    )
    return build_luks(
        payload_size=draw(st.integers(0, 256)) * SECTOR,
        cipher=cipher,
        hash_spec=draw(st.sampled_from(["sha1", "sha256", "sha512"])),
        iterations=draw(st.integers(1000, 1 << 20)),
        active_slots=draw(st.integers(1, luks.NUM_KEY_SLOTS)),
    )


# --- parallels ----------------------------------------------------------------------------------


def build_parallels(
    *, virtual_size: int = MiB, cluster_sectors: int = 8, new_magic: bool = False
) -> GeneratedImage:
    """A Parallels image: header, BAT, data from the next cluster boundary."""
    sectors = virtual_size // SECTOR
    bat_entries = max(1, -(-sectors // cluster_sectors))
    header_and_bat = parallels.HEADER_SIZE + bat_entries * 4
    data_off = _round_up(header_and_bat, cluster_sectors * SECTOR) // SECTOR
    values = {
        "magic": parallels.HEADER_MAGIC2 if new_magic else parallels.HEADER_MAGIC,
        "version": parallels.HEADER_VERSION,
        "heads": 16,
        "cylinders": max(1, sectors // (16 * 32)),
        "tracks": cluster_sectors,
        "bat_entries": bat_entries,
        "nb_sectors": sectors,
        "inuse": 0,
        "data_off": data_off,
        "flags": 0,
        "ext_off": 0,
    }
    header = _build(parallels.PARALLELS_HEADER, values)
    image = header + bytes(data_off * SECTOR - len(header))
    return GeneratedImage(
        image,
        "parallels",
        sectors * SECTOR,
        variant="ploop" if new_magic else "parallels",
        fields=field_layout(parallels.PARALLELS_HEADER),
    )


@st.composite
def parallels_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Parallels images with either magic; never a reference."""
    cluster_sectors = 1 << draw(st.integers(0, 11))
    max_sectors = 16384 * cluster_sectors
    sectors = draw(st.integers(1, max_sectors))
    return build_parallels(
        virtual_size=sectors * SECTOR,
        cluster_sectors=cluster_sectors,
        new_magic=draw(st.booleans()),
    )


# --- dmg ----------------------------------------------------------------------------------------


def _koly(*, data_fork_length: int, xml_offset: int, xml_length: int, sectors: int) -> bytes:
    values = {
        "version": dmg.UDIF_VERSION,
        "header_size": dmg.KOLY_SIZE,
        "flags": 1,
        "running_data_fork_offset": 0,
        "data_fork_offset": 0,
        "data_fork_length": data_fork_length,
        "rsrc_fork_offset": 0,
        "rsrc_fork_length": 0,
        "segment_number": 1,
        "segment_count": 1,
        "segment_id": bytes(16),
        "data_checksum_type": 2,
        "data_checksum_size": 32,
        "data_checksum": bytes(128),
        "xml_offset": xml_offset,
        "xml_length": xml_length,
        "reserved1": bytes(120),
        "checksum_type": 2,
        "checksum_size": 32,
        "checksum": bytes(128),
        "image_variant": 1,
        "sector_count": sectors,
        "reserved2": 0,
        "reserved3": 0,
        "reserved4": 0,
    }
    return _build(dmg.KOLY, values)


def _mish(chunks: Iterable[tuple[int, int, int, int, int]], sectors: int) -> bytes:
    listed = list(chunks)
    values = {
        "version": 1,
        "sector_number": 0,
        "sector_count": sectors,
        "data_offset": 0,
        "buffers_needed": 2056,
        "block_descriptors": 0,
        "reserved": bytes(24),
        "checksum_type": 2,
        "checksum_size": 32,
        "checksum": bytes(128),
        "chunk_count": len(listed),
    }
    out = _build(dmg.MISH, values)
    for kind, sector, count, offset, length in listed:
        out += _build(
            dmg.MISH_CHUNK,
            {
                "type": kind,
                "comment": 0,
                "sector_number": sector,
                "sector_count": count,
                "compressed_offset": offset,
                "compressed_length": length,
            },
        )
    return out


def _plist(mish_blocks: Iterable[bytes]) -> bytes:
    entries = "".join(
        "<dict><key>Attributes</key><string>0x0050</string><key>Data</key>"
        f"<data>{base64.b64encode(block).decode()}</data><key>ID</key><string>0</string></dict>"
        for block in mish_blocks
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
        f"<key>resource-fork</key><dict><key>blkx</key><array>{entries}</array></dict>"
        "</dict></plist>\n"
    ).encode()


def build_dmg(
    *, sectors: int = 64, raw_sectors: int = 8, zlib_chunk: bool = True
) -> GeneratedImage:
    """A UDIF image: a data fork of raw (and zlib) chunks, a plist with one mish block whose
    remaining sectors are a zero chunk, then the koly trailer."""
    raw_sectors = min(raw_sectors, sectors)
    data = bytearray(b"\x5a" * (raw_sectors * SECTOR))
    chunks = []
    if raw_sectors:
        chunks.append((dmg.UDRW, 0, raw_sectors, 0, raw_sectors * SECTOR))
    done = raw_sectors
    if zlib_chunk and done < sectors:
        count = min(sectors - done, 2048)
        packed = zlib.compress(bytes(count * SECTOR))
        chunks.append((dmg.UDZO, done, count, len(data), len(packed)))
        data += packed
        done += count
    if done < sectors:
        chunks.append((dmg.UDZE, done, sectors - done, len(data), 0))
    chunks.append((dmg.UDLE, sectors, 0, len(data), 0))
    xml = _plist([_mish(chunks, sectors)])
    koly = _koly(
        data_fork_length=len(data), xml_offset=len(data), xml_length=len(xml), sectors=sectors
    )
    image = bytes(data) + xml + koly
    return GeneratedImage(
        image,
        "dmg",
        sectors * SECTOR,
        variant="udif",
        fields=field_layout(dmg.KOLY, len(image) - dmg.KOLY_SIZE),
    )


@st.composite
def dmg_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """UDIF images of raw, zlib and zero chunks; never a reference."""
    sectors = draw(st.integers(1, 1 << 24))
    return build_dmg(
        sectors=sectors,
        raw_sectors=draw(st.integers(0, min(sectors, 16))),
        zlib_chunk=draw(st.booleans()),
    )


# --- bochs --------------------------------------------------------------------------------------


def build_bochs(
    *, virtual_size: int = MiB, extent: int = 64 * KiB, version: int = bochs.HEADER_VERSION
) -> GeneratedImage:
    """A Bochs growing redolog: header, catalog of unallocated extents."""
    catalog = max(1, -(-virtual_size // extent))
    extra = {"disk": virtual_size}
    if version != bochs.HEADER_V1:
        extra = {"reserved": 0, "disk": virtual_size}
    values = {
        "magic": _cstr(bochs.HEADER_MAGIC.decode(), 32),
        "type": _cstr(bochs.REDOLOG_TYPE.decode(), 16),
        "subtype": _cstr(bochs.GROWING_TYPE.decode(), 16),
        "version": version,
        "header": bochs.HEADER_SIZE,
        "catalog": catalog,
        "bitmap": 1,
        "extent": extent,
        "extra": extra,
    }
    header = _build(bochs.BOCHS_HEADER, values)
    image = header.ljust(bochs.HEADER_SIZE, b"\0") + b"\xff" * (catalog * 4)
    return GeneratedImage(
        image,
        "bochs",
        virtual_size // SECTOR * SECTOR,
        variant="growing",
        fields=field_layout(bochs.BOCHS_HEADER),
    )


@st.composite
def bochs_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Bochs growing redologs, versions 1 and 2; never a reference."""
    extent = 1 << draw(st.integers(9, 23))
    catalog = draw(st.integers(1, 4096))
    return build_bochs(
        virtual_size=draw(st.integers(1, catalog * extent // SECTOR)) * SECTOR,
        extent=extent,
        version=draw(st.sampled_from([bochs.HEADER_VERSION, bochs.HEADER_V1])),
    )


# --- cloop --------------------------------------------------------------------------------------


def build_cloop(*, block_size: int = 64 * KiB, n_blocks: int = 4) -> GeneratedImage:
    """A cloop V2.0 image: preamble, header, offsets table, zlib blocks of zeros."""
    packed = zlib.compress(bytes(block_size))
    start = cloop.HEADER_SIZE + (n_blocks + 1) * 8
    offsets = [start + index * len(packed) for index in range(n_blocks + 1)]
    header = _build(
        cloop.CLOOP_HEADER,
        {
            "preamble": cloop.MAGIC_VERSION_2_0.ljust(cloop.PREAMBLE_SIZE, b"\0"),
            "block_size": block_size,
            "n_blocks": n_blocks,
        },
    )
    image = header + _struct.pack(f">{n_blocks + 1}Q", *offsets) + packed * n_blocks
    return GeneratedImage(
        image,
        "cloop",
        n_blocks * block_size,
        variant="v2.0",
        fields=field_layout(cloop.CLOOP_HEADER),
    )


@st.composite
def cloop_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """cloop V2.0 images of 0-64 zlib blocks; never a reference."""
    return build_cloop(
        block_size=draw(st.integers(1, 512)) * SECTOR, n_blocks=draw(st.integers(0, 64))
    )


# --- raw disks and their layouts ----------------------------------------------------------------


def build_raw(*, size: int = 64 * KiB, fill: int = 0) -> GeneratedImage:
    """A raw disk with no recognisable layout; qemu counts its size in whole sectors."""
    return GeneratedImage(bytes([fill]) * size, "raw", -(-size // SECTOR) * SECTOR)


@st.composite
def raw_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Raw disks without a layout (zeros or 0xF6 fill), some not a whole number of sectors."""
    size = draw(st.integers(0, 256)) * SECTOR + draw(st.sampled_from([0, 0, 1, 511]))
    return build_raw(size=size, fill=draw(st.sampled_from([0, 0xF6])))


def _mbr_record(boot: int, kind: int, start: int, count: int) -> dict[str, Any]:
    return {
        "boot_indicator": boot,
        "starting_chs": b"\xfe\xff\xff",
        "os_type": kind,
        "ending_chs": b"\xfe\xff\xff",
        "starting_lba": start,
        "size_in_lba": count,
    }


_EMPTY_RECORD = _mbr_record(0, 0, 0, 0)
_EMPTY_RECORD["starting_chs"] = _EMPTY_RECORD["ending_chs"] = bytes(3)


def _mbr_sector(records: Sequence[dict[str, Any]], disk_signature: int = 0x1D6B5E0A) -> bytes:
    values = {
        "boot_code": bytes(440),
        "unique_mbr_disk_signature": disk_signature,
        "unknown": 0,
        "partition_record": list(records) + [_EMPTY_RECORD] * (4 - len(records)),
    }
    return _build(mbr.MasterBootRecord, values)


def build_mbr(
    *, disk_sectors: int = 8192, partitions: Sequence[tuple[int, int, int]] = ((0x83, 2048, 2048),)
) -> GeneratedImage:
    """A raw disk with an MBR partition table of (type, start LBA, sectors) primaries."""
    records = [
        _mbr_record(0x80 if index == 0 else 0, kind, start, count)
        for index, (kind, start, count) in enumerate(partitions)
    ]
    image = _mbr_sector(records) + bytes((disk_sectors - 1) * SECTOR)
    return GeneratedImage(
        image, "raw", len(image), variant="mbr", fields=field_layout(mbr.MasterBootRecord)
    )


@st.composite
def mbr_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Raw disks with 1-4 non-overlapping MBR primary partitions."""
    disk = draw(st.integers(64, 4096))
    count = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(1, disk - 1), min_size=count * 2, max_size=count * 2)))
    partitions = []
    for index in range(count):
        start, end = cuts[2 * index], cuts[2 * index + 1]
        if end > start:
            kind = draw(st.sampled_from([0x83, 0x07, 0x0C, 0x82, 0x8E]))
            partitions.append((kind, start, end - start))
    if not partitions:
        partitions = [(0x83, 1, disk - 1)]
    return build_mbr(disk_sectors=disk, partitions=partitions)


def _gpt_header(
    *, my_lba: int, alternate: int, last_usable: int, entries_lba: int, entries_crc: int
) -> bytes:
    values = {
        "revision": gpt.REVISION_1_0,
        "header_size": 92,
        "header_crc32": 0,
        "reserved": 0,
        "my_lba": my_lba,
        "alternate_lba": alternate,
        "first_usable_lba": 34,
        "last_usable_lba": last_usable,
        "disk_guid": _uuid.UUID(int=0x6A).bytes_le,
        "partition_entry_lba": entries_lba,
        "number_of_partition_entries": 128,
        "size_of_partition_entry": 128,
        "partition_entry_array_crc32": entries_crc,
    }
    header = bytearray(_build(gpt.GptHeader, values))
    header[16:20] = zlib.crc32(bytes(header)).to_bytes(4, "little")
    return bytes(header).ljust(SECTOR, b"\0")


_GPT_TYPES = {
    "linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
}


def build_gpt(
    *,
    disk_sectors: int = 8192,
    partitions: Sequence[tuple[str, int, int]] = (("linux", 2048, 4095),),
) -> GeneratedImage:
    """A raw disk with a protective MBR, primary and backup GPT of (type, first, last LBA)."""
    entries = bytearray()
    for index, (kind, first, last) in enumerate(partitions):
        entries += _build(
            gpt.GptPartitionEntry,
            {
                "partition_type_guid": _uuid.UUID(_GPT_TYPES[kind]).bytes_le,
                "unique_partition_guid": _uuid.UUID(int=0x100 + index).bytes_le,
                "starting_lba": first,
                "ending_lba": last,
                "attributes": 0,
                "partition_name": _utf16(f"part{index}").ljust(72, b"\0"),
            },
        )
    entries += bytes(128 * 128 - len(entries))
    crc = zlib.crc32(bytes(entries))
    last_lba = disk_sectors - 1
    protective = _mbr_sector([_mbr_record(0, 0xEE, 1, min(disk_sectors - 1, 0xFFFFFFFF))])
    image = bytearray(protective)
    image += _gpt_header(
        my_lba=1, alternate=last_lba, last_usable=last_lba - 33, entries_lba=2, entries_crc=crc
    )
    image += entries
    image += bytes((last_lba - 32) * SECTOR - len(image))
    image += entries
    image += _gpt_header(
        my_lba=last_lba,
        alternate=1,
        last_usable=last_lba - 33,
        entries_lba=last_lba - 32,
        entries_crc=crc,
    )
    return GeneratedImage(
        bytes(image), "raw", len(image), variant="gpt", fields=field_layout(gpt.GptHeader, SECTOR)
    )


@st.composite
def gpt_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """Raw disks with a protective MBR and 1-4 GPT partitions (primary and backup)."""
    disk = draw(st.integers(128, 8192))
    usable_first, usable_last = 34, disk - 34
    count = draw(st.integers(1, 4))
    cuts = sorted(
        draw(
            st.lists(
                st.integers(usable_first, usable_last),
                min_size=count * 2,
                max_size=count * 2,
                unique=True,
            )
        )
    )
    partitions = [
        (draw(st.sampled_from(sorted(_GPT_TYPES))), cuts[2 * i], cuts[2 * i + 1])
        for i in range(count)
    ]
    return build_gpt(disk_sectors=disk, partitions=partitions)


def _both(le: int) -> dict[str, int]:
    return {"le": le, "be": le}


def _iso_date() -> bytes:
    return b"2024010112000000\x00"


def build_iso9660(
    *, volume_blocks: int = 32, volume_id: str = "IMGGUARD", el_torito: bool = False
) -> GeneratedImage:
    """An ISO 9660 volume: system area, primary descriptor, optional El Torito boot record
    with its catalog, terminator, and a root directory."""
    sector = iso9660.SECTOR_SIZE
    descriptors = 3 if el_torito else 2
    root_block = 16 + descriptors + (1 if el_torito else 0)
    volume_blocks = max(volume_blocks, root_block + 2)
    root = bytearray(34)
    root[0] = 34
    root[2:10] = root_block.to_bytes(4, "little") + root_block.to_bytes(4, "big")
    root[10:18] = sector.to_bytes(4, "little") + sector.to_bytes(4, "big")
    root[25] = 2  # directory
    root[28:32] = (1).to_bytes(2, "little") + (1).to_bytes(2, "big")
    root[32] = 1
    values = {
        "volume_descriptor_type": iso9660.TYPE_PRIMARY,
        "volume_descriptor_version": 1,
        "volume_flags": 0,
        "system_identifier": b"LINUX".ljust(32),
        "volume_identifier": volume_id.encode().ljust(32),
        "unused_72": bytes(8),
        "volume_space_size": _both(volume_blocks),
        "escape_sequences": bytes(32),
        "volume_set_size": _both(1),
        "volume_sequence_number": _both(1),
        "logical_block_size": _both(sector),
        "path_table_size": _both(10),
        "location_of_type_l_path_table": 0,
        "location_of_optional_type_l_path_table": 0,
        "location_of_type_m_path_table": 0,
        "location_of_optional_type_m_path_table": 0,
        "directory_record_for_root_directory": bytes(root),
        "volume_set_identifier": b" " * 128,
        "publisher_identifier": b" " * 128,
        "data_preparer_identifier": b" " * 128,
        "application_identifier": b"IMGGUARD.TESTING".ljust(128),
        "copyright_file_identifier": b" " * 37,
        "abstract_file_identifier": b" " * 37,
        "bibliographic_file_identifier": b" " * 37,
        "volume_creation_date_and_time": _iso_date(),
        "volume_modification_date_and_time": _iso_date(),
        "volume_expiration_date_and_time": b"0" * 16 + b"\x00",
        "volume_effective_date_and_time": b"0" * 16 + b"\x00",
        "file_structure_version": 1,
        "reserved_882": 0,
        "application_use": bytes(512),
        "reserved_1395": bytes(653),
    }
    image = bytearray(16 * sector)
    image += _build(iso9660.VolumeDescriptor, values)
    fields = list(field_layout(iso9660.VolumeDescriptor, 16 * sector))
    if el_torito:
        catalog_block = 16 + descriptors
        image += _build(
            iso9660.BootRecord,
            {
                "volume_descriptor_version": 1,
                "boot_system_identifier": iso9660.EL_TORITO_ID.ljust(32, b"\0"),
                "boot_identifier": bytes(32),
                "boot_catalog_pointer": catalog_block,
                "boot_system_use": bytes(1973),
            },
        )
    terminator = bytes([iso9660.TYPE_TERMINATOR]) + iso9660.STANDARD_IDENTIFIER + b"\x01"
    image += terminator.ljust(sector, b"\0")
    if el_torito:
        validation = bytearray(
            _build(
                iso9660.ValidationEntry,
                {
                    "header_id": 1,
                    "platform_id": 0,
                    "reserved": bytes(2),
                    "id_string": bytes(24),
                    "checksum": 0,
                    "key": b"\x55\xaa",
                },
            )
        )
        words = sum(int.from_bytes(validation[i : i + 2], "little") for i in range(0, 32, 2))
        validation[28:30] = (-words & 0xFFFF).to_bytes(2, "little")
        entry = _build(
            iso9660.BootEntry,
            {
                "boot_indicator": 0x88,
                "boot_media_type": 0,
                "load_segment": 0,
                "system_type": 0,
                "unused": 0,
                "sector_count": 4,
                "load_rba": root_block + 1,
                "selection_criteria": bytes(20),
            },
        )
        image += (bytes(validation) + entry).ljust(sector, b"\0")
    directory = bytearray(root)
    directory[32] = 1
    dotdot = bytearray(root)
    dotdot[33] = 1
    image += (bytes(directory) + bytes(dotdot)).ljust(sector, b"\0")
    image += bytes(volume_blocks * sector - len(image))
    return GeneratedImage(bytes(image), "raw", len(image), variant="iso9660", fields=tuple(fields))


@st.composite
def iso9660_images(draw: st.DrawFn, *, references: bool | None = None) -> GeneratedImage:
    """ISO 9660 volumes, with or without an El Torito boot record."""
    return build_iso9660(
        volume_blocks=draw(st.integers(24, 64)),
        volume_id=draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=32)),
        el_torito=draw(st.booleans()),
    )


# --- every format -------------------------------------------------------------------------------

StrategyFactory = Callable[..., st.SearchStrategy[GeneratedImage]]

STRATEGIES: dict[str, StrategyFactory] = {
    "qcow2": qcow2_images,
    "qcow": qcow_images,
    "qed": qed_images,
    "vmdk": vmdk_images,
    "vpc": vpc_images,
    "vhdx": vhdx_images,
    "vdi": vdi_images,
    "luks": luks_images,
    "parallels": parallels_images,
    "dmg": dmg_images,
    "bochs": bochs_images,
    "cloop": cloop_images,
    "raw": raw_images,
    "iso9660": iso9660_images,
    "mbr": mbr_images,
    "gpt": gpt_images,
}
"""Strategy factory per format (the raw layouts under their own names); each takes
`references=` (True: always plant one, False: never, None: either)."""

FORMATS = tuple(STRATEGIES)
# The formats with a field that names another file or image.
REFERENCE_FORMATS = ("qcow2", "qcow", "qed", "vmdk", "vpc", "vhdx", "vdi")


def images(
    formats: Iterable[str] | None = None, *, references: bool | None = None
) -> st.SearchStrategy[GeneratedImage]:
    """Valid images of the given formats (default: all of `FORMATS`)."""
    names = tuple(formats) if formats is not None else FORMATS
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"no strategy for {', '.join(unknown)} (one of {', '.join(FORMATS)})")
    return st.one_of([STRATEGIES[name](references=references) for name in names])


def images_with_reference(
    formats: Iterable[str] | None = None,
) -> st.SearchStrategy[GeneratedImage]:
    """Images with a reference planted wherever the format allows one (see REFERENCE_FORMATS)."""
    names = tuple(formats) if formats is not None else REFERENCE_FORMATS
    return images(names, references=True).filter(lambda image: bool(image.references))


# --- polyglots ----------------------------------------------------------------------------------


def plant_vdi_signature(data: bytes) -> bytes:
    """The VDI signature at offset 64, where other headers can carry it."""
    buffer = bytearray(data.ljust(68, b"\0"))
    buffer[64:68] = vdi.VDI_SIGNATURE.to_bytes(4, "little")
    return bytes(buffer)


def plant_mbr(
    data: bytes, partitions: Sequence[tuple[int, int, int]] = ((0x83, 1, 2047),)
) -> bytes:
    """An MBR partition table at 446 and the 0x55AA signature at 510."""
    sector = _mbr_sector([_mbr_record(0, kind, start, count) for kind, start, count in partitions])
    buffer = bytearray(data.ljust(SECTOR, b"\0"))
    buffer[446:512] = sector[446:512]
    return bytes(buffer)


def append_vhd_footer(data: bytes, current_size: int | None = None) -> bytes:
    """A fixed-VHD footer after the data (what makes any file a fixed VHD to `qemu -f vpc`)."""
    size = len(data) if current_size is None else current_size
    footer = _vhd_footer(
        disk_type=vpc.VHD_FIXED,
        current_size=size,
        data_offset=(1 << 64) - 1,
        creator_app=b"win ",
        geometry=vhd_geometry(size // SECTOR),
        uid=bytes(16),
    )
    return data + footer


def append_koly_trailer(data: bytes, sectors: int | None = None) -> bytes:
    """A plist and a UDIF koly trailer after the data (a dmg to anything that looks at the end)."""
    count = -(-len(data) // SECTOR) if sectors is None else sectors
    xml = _plist([_mish([(dmg.UDRW, 0, count, 0, len(data)), (dmg.UDLE, count, 0, 0, 0)], count)])
    koly = _koly(
        data_fork_length=len(data), xml_offset=len(data), xml_length=len(xml), sectors=count
    )
    return data + xml + koly


def _splice(first: bytes, second: bytes, at: int) -> bytes:
    return first[:at] + second[at:]


@st.composite
def polyglots(draw: st.DrawFn, base: st.SearchStrategy[GeneratedImage] | None = None) -> bytes:
    """One image made to look like two formats at once."""
    image = draw(base if base is not None else images())
    data = image.data
    kind = draw(st.sampled_from(["vdi", "mbr", "vhd", "koly", "splice"]))
    if kind == "vdi":
        return plant_vdi_signature(data)
    if kind == "mbr":
        return plant_mbr(data)
    if kind == "vhd":
        return append_vhd_footer(data, draw(st.sampled_from([None, 0, len(data) + 1])))
    if kind == "koly":
        return append_koly_trailer(data)
    other = draw(images()).data
    at = draw(st.sampled_from([4, 8, 64, 68, 512, 1024, 2048, 4096]))
    return _splice(data, other, at) if draw(st.booleans()) else _splice(other, data, at)


# --- mutations ----------------------------------------------------------------------------------

BOUNDARY_VALUES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1)
"""Integers that header arithmetic gets wrong: zero, one, and the signed/unsigned limits."""


def _mutation_spans(image: GeneratedImage) -> list[FieldSpan]:
    if image.fields:
        return [span for span in image.fields if span.offset + span.size <= len(image.data)]
    # No layout known: the first 4 KiB and the last 1536 bytes in 8-byte words.
    spans = [FieldSpan(f"head{off}", off, 8, "little") for off in range(0, 4096, 8)]
    spans += [
        FieldSpan(f"tail{off}", off, 8, "big")
        for off in range(max(0, len(image.data) - 1536), len(image.data) - 8, 8)
    ]
    return [span for span in spans if span.offset + span.size <= len(image.data)]


@st.composite
def _mutate(draw: st.DrawFn, image: GeneratedImage, max_mutations: int) -> bytes:
    data = bytearray(image.data)
    spans = _mutation_spans(image)
    for _ in range(draw(st.integers(1, max_mutations))):
        size = len(data)
        op = draw(st.sampled_from(["flip", "bound", "bound", "bytes", "truncate", "polyglot"]))
        if op in ("flip", "bound", "bytes") and not spans:
            op = "truncate"
        if op == "flip":
            span = draw(st.sampled_from(spans))
            bit = draw(st.integers(0, span.size * 8 - 1))
            if span.offset + bit // 8 < len(data):
                data[span.offset + bit // 8] ^= 1 << (bit % 8)
        elif op == "bound":
            integers = [span for span in spans if span.is_integer] or spans
            span = draw(st.sampled_from(integers))
            value = draw(st.sampled_from([*BOUNDARY_VALUES, size - 1, size, size + 1]))
            if draw(st.booleans()) and span.size <= 8:
                # The same bound in the field's unit (sectors, clusters) when it has one.
                value = draw(
                    st.sampled_from([value, max(0, size // SECTOR - 1), size // SECTOR + 1])
                )
            mask = (1 << (8 * span.size)) - 1
            raw = (value & mask).to_bytes(span.size, span.byteorder or "little")  # type: ignore[arg-type]
            data[span.offset : span.offset + span.size] = raw
        elif op == "bytes":
            span = draw(st.sampled_from(spans))
            raw = draw(st.binary(min_size=span.size, max_size=span.size))
            data[span.offset : span.offset + span.size] = raw
        elif op == "truncate":
            cut = draw(
                st.one_of(
                    st.integers(0, size),
                    st.sampled_from([s.offset for s in spans] or [0]),
                    st.sampled_from([size - 1, size - SECTOR, size // 2, 0]),
                )
            )
            del data[max(0, cut) :]
        else:
            kind = draw(st.sampled_from(["vdi", "mbr", "vhd", "koly"]))
            planted = {
                "vdi": plant_vdi_signature,
                "mbr": plant_mbr,
                "vhd": append_vhd_footer,
                "koly": append_koly_trailer,
            }[kind](bytes(data))
            data = bytearray(planted)
    return bytes(data)


def mutated(
    base: st.SearchStrategy[GeneratedImage] | None = None, *, max_mutations: int = 4
) -> st.SearchStrategy[bytes]:
    """Valid images from `base` (default `images()`), then 1..`max_mutations` hostile edits."""
    source = base if base is not None else images()
    return source.flatmap(lambda image: _mutate(image, max_mutations))
