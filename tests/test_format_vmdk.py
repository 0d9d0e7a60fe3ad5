"""vmdk: images made by qemu-img, hand-edited descriptors and headers, and hostile bytes.

Every descriptor handed to qemu-img here names only extent files inside tmp_path: qemu-img info
opens the extents a descriptor names.
"""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    QEMU_IMG,
    info_or_image_error,
    qemu_convert,
    qemu_create,
    qemu_info,
    raw_with_data,
)
from imgguard.errors import MalformedImage, TruncatedImage
from imgguard.formats import vmdk
from imgguard.model import ImageInfo, ProblemKind, Reference, ReferenceKind
from imgguard.reader import ImageReader, open_image

GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
U64 = (1 << 64) - 1


def inspect_path(path: Path) -> ImageInfo:
    with open_image(path) as (reader, _stat):
        return vmdk.inspect(reader)


def inspect_bytes(data: bytes) -> ImageInfo:
    return vmdk.inspect(ImageReader.from_bytes(data))


def probe_bytes(data: bytes) -> int:
    return vmdk.probe(ImageReader.from_bytes(data))


def try_qemu_info(path: Path, fmt: str | None = "vmdk") -> dict[str, Any] | str:
    """qemu-img info as JSON, or its error message when it refuses the image."""
    args = [str(QEMU_IMG), "info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    result = subprocess.run(
        [*args, str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        return result.stderr.strip() or f"exit status {result.returncode}"
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def used_extent_names(info: ImageInfo) -> set[str]:
    """Extent files qemu opens: RW lines of a type qemu knows with a positive size."""
    return {
        extent.filename
        for extent in info.extents
        if extent.access == "RW"
        and extent.type in vmdk.QEMU_EXTENT_TYPES
        and extent.size_sectors > 0
        and extent.filename is not None
    }


def assert_matches_qemu(info: ImageInfo, expected: dict[str, Any]) -> None:
    data = expected["format-specific"]["data"]
    assert info.format == expected["format"] == "vmdk"
    assert info.virtual_size == expected["virtual-size"]
    assert (info.variant or "") == data["create-type"]
    assert info.header["cid"] == data["cid"]
    assert info.header["parent_cid"] == data["parent-cid"]
    assert info.backing_file == expected.get("backing-filename")
    if not info.header.get("size_from_extent_headers"):
        # A sparse extent's grain size is in the extent file, which imgguard does not open.
        assert info.cluster_size == expected.get("cluster-size")


def put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, offset, value)


def descriptor(*lines: str, create_type: str = "monolithicFlat", head: str = "") -> bytes:
    text = head or "# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n"
    text += f'createType="{create_type}"\n\n# Extent description\n'
    return (text + "".join(line + "\n" for line in lines)).encode()


@pytest.fixture(scope="module")
def sparse_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("vmdk") / "sparse.vmdk"
    return qemu_create(path, "vmdk", "64M").read_bytes()


@pytest.fixture(scope="module")
def stream_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("vmdk-stream")
    raw = raw_with_data(directory / "disk.raw", 8 << 20)
    target = directory / "stream.vmdk"
    return qemu_convert(raw, target, "vmdk", ["subformat=streamOptimized"]).read_bytes()


# --- images qemu-img makes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ((), "64M"),
        (("subformat=monolithicSparse",), "64M"),
        (("subformat=monolithicFlat",), "64M"),
        (("subformat=streamOptimized",), "64M"),
        (("subformat=twoGbMaxExtentSparse",), 2 * 1024**3 + 1024**2),
        (("subformat=twoGbMaxExtentFlat",), 2 * 1024**3 + 1024**2),
        (("compat6",), "64M"),
        (("adapter_type=ide",), "64M"),
        (("adapter_type=lsilogic",), "64M"),
        (("zeroed_grain=on",), "64M"),
        (("hwversion=8",), "64M"),
        (("subformat=monolithicFlat", "adapter_type=lsilogic"), "32M"),
        (("subformat=streamOptimized", "compat6"), "1G"),
    ],
)
def test_qemu_created_images_match_qemu_info(
    tmp_path: Path, options: tuple[str, ...], size: str | int
) -> None:
    path = qemu_create(tmp_path / "disk.vmdk", "vmdk", size, options)
    info = inspect_path(path)
    expected = qemu_info(path, "vmdk")

    assert vmdk.probe(ImageReader.from_bytes(path.read_bytes()[:4096])) == 100
    assert_matches_qemu(info, expected)
    assert info.problems == ()
    qemu_names = [Path(e["filename"]).name for e in expected["format-specific"]["data"]["extents"]]
    if path.read_bytes()[:4] == b"KDMV":
        # A sparse file is its own single extent; its embedded descriptor names itself.
        assert len(qemu_names) == 1
        assert info.references == ()
        assert info.header["descriptor_extents"] == (
            f'RW {info.virtual_size // 512} SPARSE "disk.vmdk"',
        )
    else:
        assert [extent.filename for extent in info.extents] == qemu_names
        assert info.references == tuple(
            Reference(ReferenceKind.EXTENT, name, f"extent[{index}]", info.references[index].offset)
            for index, name in enumerate(qemu_names)
        )
    header = info.header
    assert header["adapter_type"] == ("lsilogic" if "adapter_type=lsilogic" in options else "ide")
    hwversion = "6" if "compat6" in options else "8" if "hwversion=8" in options else "4"
    assert header["hwversion"] == hwversion
    assert header["compat6"] is ("compat6" in options)
    if "zeroed_grain=on" in options:
        assert "zeroed_grain" in info.feature_names
        assert info.version == 2
    if "subformat=streamOptimized" in options:
        assert info.version == 3
        assert {"compressed_grains", "markers"} <= set(info.feature_names)


def test_split_flat_extents_are_sparse_files(tmp_path: Path) -> None:
    path = qemu_create(
        tmp_path / "split.vmdk", "vmdk", 2 * 1024**3 + 1024**2, ["subformat=twoGbMaxExtentFlat"]
    )
    info = inspect_path(path)
    assert [(e.size_sectors, e.filename) for e in info.extents] == [
        (4194304, "split-f001.vmdk"),
        (2048, "split-f002.vmdk"),
    ]
    assert info.header["size_from_extent_headers"] is False
    used = sum(p.stat().st_blocks for p in tmp_path.iterdir()) * 512
    assert used < 16 * 1024**2


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized", "monolithicFlat"])
def test_images_with_data_match_qemu_info(tmp_path: Path, subformat: str) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 16 << 20)
    path = qemu_convert(raw, tmp_path / "disk.vmdk", "vmdk", [f"subformat={subformat}"])
    info = inspect_path(path)
    assert_matches_qemu(info, qemu_info(path, "vmdk"))
    assert info.problems == ()
    if subformat != "monolithicFlat":
        grain_directory = next(t for t in info.tables if t.name == "grain_directory")
        # 16 MiB in 64 KiB grains, 512 grain table entries per table: one directory entry.
        assert grain_directory.length == 4
        assert grain_directory.offset + grain_directory.length <= path.stat().st_size


def test_backing_file_is_the_parent_file_name_hint(tmp_path: Path) -> None:
    base = qemu_create(tmp_path / "base.vmdk", "vmdk", "64M")
    overlay = qemu_create(
        tmp_path / "overlay.vmdk", "vmdk", "64M", ["backing_file=base.vmdk", "backing_fmt=vmdk"]
    )
    info = inspect_path(overlay)
    expected = qemu_info(overlay, "vmdk")

    assert_matches_qemu(info, expected)
    assert info.backing_file == "base.vmdk" == expected["backing-filename"]
    assert info.backing_format == "vmdk"
    assert info.header["parent_cid"] == inspect_path(base).header["cid"]
    (reference,) = info.references
    assert reference.kind is ReferenceKind.PARENT_HINT
    assert reference.target == "base.vmdk"
    assert overlay.read_bytes()[reference.offset : reference.offset + 9] == b"base.vmdk"


# --- streamOptimized with the header in the footer -----------------------------------------------


def with_footer(stream: bytes, start_capacity: int, footer_type: int = 3) -> bytes:
    """A VMware-style stream: gd_offset GD_AT_END up front, the real header in the footer."""
    data = bytearray(stream)
    real_header = bytes(data[:512])
    put(data, 56, "<Q", GD_AT_END)
    put(data, 12, "<Q", start_capacity)
    footer_marker = struct.pack("<QII", 1, 0, footer_type).ljust(512, b"\0")
    eos_marker = bytes(512)
    return bytes(data) + footer_marker + real_header + eos_marker


def test_gd_at_end_reads_the_header_from_the_footer(tmp_path: Path, stream_image: bytes) -> None:
    path = tmp_path / "footer.vmdk"
    path.write_bytes(with_footer(stream_image, start_capacity=12345))
    info = inspect_path(path)
    expected = qemu_info(path, "vmdk")

    assert_matches_qemu(info, expected)
    assert info.virtual_size == 8 << 20  # the footer's capacity, not the first header's
    assert info.header["header_in_footer"] is True
    assert info.variant == "streamOptimized"


def test_bad_footer_is_a_problem_qemu_refuses(tmp_path: Path, stream_image: bytes) -> None:
    path = tmp_path / "badfooter.vmdk"
    path.write_bytes(with_footer(stream_image, start_capacity=12345, footer_type=2))
    info = inspect_path(path)
    assert "Invalid footer" in str(try_qemu_info(path))
    assert [p.field for p in info.problems if p.kind is ProblemKind.MALFORMED] == ["footer"]
    assert info.header["header_in_footer"] is False


# --- hand-edited descriptors compared with qemu --------------------------------------------------

FLAT = 'RW 2048 FLAT "e1.raw" 0'
CASES: dict[str, bytes] = {
    "crlf": descriptor(FLAT).replace(b"\n", b"\r\n"),
    "leading-spaces": descriptor("   " + FLAT, '\t RW 4096 FLAT "e2.raw" 7'),
    "createType-in-comment": descriptor(
        FLAT, head='# createType="vmfs"\nversion=1\nCID=5\nparentCID=ffffffff\n'
    ),
    "duplicate-createType": descriptor(FLAT, create_type="twoGbMaxExtentFlat").replace(
        b"# Extent", b'createType="monolithicFlat"\n# Extent'
    ),
    "version-after-comments": descriptor(
        FLAT, head="# one\n#two\n   \n  \r\nversion=1\nCID=77\nparentCID=ffffffff\n"
    ),
    "blank-lines-repeat-an-extent": descriptor("", "  ", FLAT),
    "rdonly-noaccess-zero-ignored": descriptor(
        FLAT, 'RDONLY 4096 FLAT "e2.raw" 0', 'NOACCESS 10 FLAT "e2.raw" 0', "RW 100 ZERO"
    ),
    "extent-across-lines": descriptor('RW 2048 FLAT\n"e1.raw"\n 3', 'RW 10 VMFS "e2.raw"'),
    "hint-in-comment": descriptor(FLAT).replace(b"version=1", b'#parentFileNameHint="b.vmdk"'),
    "CID-found-in-parentCID": descriptor(FLAT, head="version=1\nparentCID=abcdef01\nCID=5\n"),
    "plus-signs-and-huge-offset": descriptor('RW +2048 FLAT "e1.raw" +99999999999999999999'),
    "name-with-spaces": descriptor('RW 2048 FLAT "e 3.raw" 0'),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_edited_descriptors_match_qemu(tmp_path: Path, case: str) -> None:
    for name in ("e1.raw", "e2.raw", "e 3.raw"):
        (tmp_path / name).write_bytes(bytes(4096))
    path = tmp_path / "desc.vmdk"
    path.write_bytes(CASES[case])
    info = inspect_path(path)
    expected = qemu_info(path, "vmdk")

    assert_matches_qemu(info, expected)
    qemu_extents = expected["format-specific"]["data"]["extents"]
    assert info.header["qemu_extents"] == len(qemu_extents)
    assert used_extent_names(info) == {Path(e["filename"]).name for e in qemu_extents}
    # Probing: qemu-img info without -f picks vmdk exactly when vmdk.probe says 100.
    probed = qemu_info(path)["format"]
    assert (probed == "vmdk") == (probe_bytes(path.read_bytes()) == 100)


def test_descriptor_quirks_are_reported(tmp_path: Path) -> None:
    repeated = inspect_bytes(CASES["blank-lines-repeat-an-extent"])
    assert repeated.virtual_size == 3 * 2048 * 512
    assert [p.kind for p in repeated.problems] == [ProblemKind.INCONSISTENT]

    ignored = inspect_bytes(CASES["rdonly-noaccess-zero-ignored"])
    assert [(e.access, e.type, e.filename) for e in ignored.extents] == [
        ("RW", "FLAT", "e1.raw"),
        ("RDONLY", "FLAT", "e2.raw"),
        ("NOACCESS", "FLAT", "e2.raw"),
        ("RW", "ZERO", None),
    ]
    assert [p.kind for p in ignored.problems] == [ProblemKind.UNSUPPORTED] * 3
    assert ignored.virtual_size == 2048 * 512

    across = inspect_bytes(CASES["extent-across-lines"])
    assert across.extents[0].offset == 3
    assert inspect_bytes(CASES["createType-in-comment"]).variant == "vmfs"
    assert inspect_bytes(CASES["CID-found-in-parentCID"]).header["cid"] == 0xABCDEF01
    hinted = inspect_bytes(CASES["hint-in-comment"])
    assert hinted.backing_file == "b.vmdk"
    assert hinted.header["parent_cid"] == 0xFFFFFFFF  # qemu opens the parent all the same


@pytest.mark.parametrize(
    ("body", "kind", "field"),
    [
        (descriptor('RW 10 ZERO "e1.raw" 5'), ProblemKind.MALFORMED, "extent[0]"),
        (descriptor('RW 10 FLAT "e1.raw"'), ProblemKind.MALFORMED, "extent[0]"),
        (descriptor('RW 10 FLAT "e1.raw" -1'), ProblemKind.MALFORMED, "extent[0]"),
        (descriptor('RW 10 VMFS "e1.raw" 0'), ProblemKind.MALFORMED, "extent[0]"),
        (descriptor(FLAT, head="version=1\n"), ProblemKind.MALFORMED, "CID"),
        (descriptor(FLAT, head="version=1\nCID=zz\n"), ProblemKind.MALFORMED, "CID"),
        (descriptor(FLAT, create_type="monolithicSparse"), ProblemKind.UNSUPPORTED, "createType"),
        (descriptor(FLAT, create_type="x" * 128), ProblemKind.MALFORMED, "createType"),
        (descriptor(FLAT) + b'parentFileNameHint="no-end', ProblemKind.MALFORMED, None),
        (
            descriptor(FLAT) + b'parentFileNameHint="' + b"a" * 4096 + b'"',
            ProblemKind.LIMIT,
            "parentFileNameHint",
        ),
    ],
)
def test_descriptors_qemu_refuses(
    tmp_path: Path, body: bytes, kind: ProblemKind, field: str | None
) -> None:
    (tmp_path / "e1.raw").write_bytes(bytes(4096))
    path = tmp_path / "refused.vmdk"
    path.write_bytes(body)
    info = inspect_path(path)
    assert isinstance(try_qemu_info(path), str)
    assert kind in {p.kind for p in info.problems}
    if field is not None:
        assert field in {p.field for p in info.problems if p.kind is kind}


def test_descriptor_without_extents_is_a_problem() -> None:
    # qemu-img info hits assert(s->num_extents) in vmdk_co_get_info() on this one.
    info = inspect_bytes(descriptor("# nothing here"))
    assert info.virtual_size == 0
    assert [p.field for p in info.problems] == ["extents"]


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "/dev/sda",
        "../../secret.img",
        "json:{'driver': 'nbd', 'host': '203.0.113.1', 'export': 'x'}",
        "nbd://203.0.113.1:10809/export",
        "http://example.com/disk.img",
        "\u00e9t\u00e9.raw",
    ],
)
def test_extent_names_are_reported_verbatim(name: str) -> None:
    data = descriptor(f'RW 2048 FLAT "{name}" 0')
    info = inspect_bytes(data)
    (reference,) = info.references
    assert reference.kind is ReferenceKind.EXTENT
    assert reference.target == name
    encoded = name.encode()
    assert data[reference.offset : reference.offset + len(encoded)] == encoded
    assert info.extents[0].filename == name


def test_extent_names_keep_undecodable_bytes() -> None:
    info = inspect_bytes(descriptor('RW 8 SPARSE "X"').replace(b"X", b"\xff\xfe.vmdk"))
    assert info.references[0].target.encode("utf-8", "surrogateescape") == b"\xff\xfe.vmdk"


def test_extent_name_over_511_bytes_is_cut_like_sscanf() -> None:
    long_name = "n" * 600
    info = inspect_bytes(descriptor(f'RW 8 SPARSE "{long_name}"'))
    # %511[^\n\r"] stops after 511 bytes; the closing quote is then missing, but a SPARSE line
    # needs only four fields, so qemu opens the first 511 bytes as the file name.
    assert info.references[0].target == "n" * 511
    flat = inspect_bytes(descriptor(f'RW 8 FLAT "{long_name}" 0'))
    assert [p.kind for p in flat.problems] == [ProblemKind.MALFORMED]


def test_raw_disk_that_starts_with_a_descriptor(tmp_path: Path) -> None:
    (tmp_path / "e1.raw").write_bytes(bytes(8 << 20))
    text = descriptor('RW 16384 FLAT "e1.raw" 0')
    path = tmp_path / "disk.img"
    path.write_bytes(text + b"\0" + b"\xeb\x3c\x90" + bytes(1 << 20))
    info = inspect_path(path)
    expected = qemu_info(path)  # probed, no -f

    assert expected["format"] == "vmdk"
    assert probe_bytes(path.read_bytes()[:4096]) == 100
    assert_matches_qemu(info, expected)
    assert info.header["descriptor_length"] == len(text)


def test_descriptor_qemu_probes_as_raw_is_still_recognised(tmp_path: Path) -> None:
    (tmp_path / "e1.raw").write_bytes(bytes(4096))
    path = tmp_path / "blank-first.vmdk"
    path.write_bytes(b"\n" + descriptor(FLAT))
    reader = ImageReader.from_bytes(path.read_bytes())
    assert vmdk.probe(reader) == 0
    assert vmdk.recognise(reader)
    assert qemu_info(path)["format"] == "raw"
    assert_matches_qemu(inspect_path(path), qemu_info(path, "vmdk"))
    assert not vmdk.recognise(ImageReader.from_bytes(b"createType is mentioned in prose\n"))


def test_long_descriptor_is_cut_at_qemus_read_limit() -> None:
    filler = b"# " + b"x" * 1000 + b"\n"
    data = descriptor(FLAT) + filler * 1100 + b'RW 2048 FLAT "late.raw" 0\n'
    info = inspect_bytes(data)
    assert [p.kind for p in info.problems] == [ProblemKind.LIMIT]
    assert [r.target for r in info.references] == ["e1.raw"]


def test_extent_lines_over_imgguards_cap() -> None:
    info = inspect_bytes(descriptor(*['RW 1 FLAT "a.raw" 0'] * (vmdk.MAX_EXTENT_SCANS + 5)))
    assert len(info.extents) == vmdk.MAX_EXTENT_SCANS
    assert info.virtual_size is None
    assert [p.kind for p in info.problems] == [ProblemKind.LIMIT]


# --- KDMV headers edited by hand -----------------------------------------------------------------


def embed(image: bytes, text: bytes, at: int = 0x200) -> bytes:
    data = bytearray(image)
    data[at : at + 10240] = text.ljust(10240, b"\0")
    return bytes(data)


def test_capacity_zero_makes_qemu_open_the_embedded_descriptor(
    tmp_path: Path, sparse_image: bytes
) -> None:
    (tmp_path / "e1.raw").write_bytes(bytes(1 << 20))
    data = bytearray(embed(sparse_image, descriptor(FLAT)))
    put(data, 12, "<Q", 0)
    path = tmp_path / "cap0.vmdk"
    path.write_bytes(data)
    info = inspect_path(path)
    expected = qemu_info(path, "vmdk")

    assert_matches_qemu(info, expected)
    assert info.variant == "monolithicFlat"
    assert info.header["descriptor_in_sparse_header"] is True
    name_at = bytes(data).find(b'"e1.raw"') + 1
    assert info.references == (Reference(ReferenceKind.EXTENT, "e1.raw", "extent[0]", name_at),)
    assert [e["filename"] for e in expected["format-specific"]["data"]["extents"]] == [
        str(tmp_path / "e1.raw")
    ]


def test_sparse_file_ignores_embedded_extent_lines(sparse_image: bytes) -> None:
    info = inspect_bytes(
        embed(sparse_image, descriptor('RW 131072 FLAT "/etc/passwd" 0', create_type="vmfs"))
    )
    assert info.references == ()
    assert info.header["descriptor_extents"] == ('RW 131072 FLAT "/etc/passwd" 0',)
    assert info.variant == "monolithicSparse"
    # Two inconsistencies: the createType, and the FLAT extent naming a host file (which qemu
    # ignores but VMware would open; see test_attacks.py).
    assert [p.kind for p in info.problems] == [ProblemKind.INCONSISTENT] * 2


def test_hint_in_a_sparse_file_is_a_backing_file(tmp_path: Path, sparse_image: bytes) -> None:
    text = descriptor().replace(b"# Extent", b'parentFileNameHint="/etc/passwd"\n# Extent')
    path = tmp_path / "hint.vmdk"
    path.write_bytes(embed(sparse_image, text))
    info = inspect_path(path)
    expected = qemu_info(path, "vmdk")
    assert info.backing_file == "/etc/passwd" == expected["backing-filename"]
    assert info.references[0].kind is ReferenceKind.PARENT_HINT


def test_sparse_file_reads_cids_at_0x200_whatever_desc_offset_says(
    tmp_path: Path, sparse_image: bytes
) -> None:
    data = bytearray(sparse_image)
    hinted = descriptor().replace(b"CID=1234abcd", b'CID=99\nparentFileNameHint="x.vmdk"')
    data[3 * 512 : 3 * 512 + len(hinted)] = hinted
    put(data, 28, "<Q", 3)
    path = tmp_path / "descoff.vmdk"
    path.write_bytes(data)
    info = inspect_path(path)
    assert_matches_qemu(info, qemu_info(path, "vmdk"))
    assert info.backing_file is None
    assert info.header["desc_offset"] == 3


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "kind", "field"),
    [
        (4, "<I", 4, ProblemKind.UNSUPPORTED, "version"),
        (44, "<I", 1024, ProblemKind.LIMIT, "num_gtes_per_gt"),
        (20, "<Q", 0, ProblemKind.MALFORMED, "granularity"),
        (20, "<Q", 0x400000, ProblemKind.LIMIT, "granularity"),
        (64, "<Q", 1 << 40, ProblemKind.TRUNCATED, "grain_offset"),
        (12, "<Q", 1 << 54, ProblemKind.LIMIT, "capacity"),
        (12, "<Q", 1 << 63, ProblemKind.LIMIT, "capacity"),
        (56, "<Q", 1 << 54, ProblemKind.MALFORMED, "gd_offset"),
        (12, "<Q", (1 << 41) + (1 << 16), ProblemKind.LIMIT, "gd_offset"),
    ],
)
def test_header_values_qemu_refuses(
    tmp_path: Path,
    sparse_image: bytes,
    offset: int,
    fmt: str,
    value: int,
    kind: ProblemKind,
    field: str,
) -> None:
    data = bytearray(sparse_image)
    put(data, offset, fmt, value)
    path = tmp_path / "edited.vmdk"
    path.write_bytes(data)
    info = inspect_path(path)
    assert isinstance(try_qemu_info(path), str)
    assert (kind, field) in {(p.kind, p.field) for p in info.problems}


def test_header_oddities_qemu_accepts(tmp_path: Path, sparse_image: bytes) -> None:
    data = bytearray(sparse_image)
    put(data, 4, "<I", 3)  # version 3 uncompressed: qemu opens it read-only
    put(data, 20, "<Q", 96)  # granularity not a power of two
    data[73:77] = b"\n \n\n"  # newline detection bytes mangled
    put(data, 8, "<I", 3 | 1 << 20)  # an unknown flag bit
    path = tmp_path / "odd.vmdk"
    path.write_bytes(data)
    info = inspect_path(path)
    assert_matches_qemu(info, qemu_info(path, "vmdk"))
    assert info.header["read_only"] is True
    assert {(p.kind, p.field) for p in info.problems} == {
        (ProblemKind.MALFORMED, "granularity"),
        (ProblemKind.INCONSISTENT, "check_bytes"),
    }
    assert [(f.name, f.known) for f in info.features if f.bit == 20] == [("bit20", False)]


def test_l1_size_wraps_like_qemus_uint32(sparse_image: bytes) -> None:
    data = bytearray(sparse_image)
    put(data, 12, "<Q", (1 << 48) + 65536)  # l1_size = 2**32 + 1 truncated to 1
    info = inspect_bytes(bytes(data))
    assert info.header["l1_size"] == 1
    assert {t.length for t in info.tables} == {4}


# --- COWD ----------------------------------------------------------------------------------------


def cowd(flags: int, parent: bytes = b"", desc: bytes = b"CID=5 parentCID=7\n") -> bytes:
    header = b"COWD" + struct.pack("<7I", 1, flags, 2048, 16, 4, 1, 100)
    data = bytearray(4096)
    data[: len(header)] = header
    data[32 : 32 + len(parent)] = parent
    data[0x200 : 0x200 + len(desc)] = desc
    return bytes(data)


def test_cowd_root_matches_qemu(tmp_path: Path) -> None:
    path = tmp_path / "root.vmdk"
    path.write_bytes(cowd(flags=3))
    info = inspect_path(path)
    assert_matches_qemu(info, qemu_info(path, "vmdk"))
    assert probe_bytes(path.read_bytes()) == 100
    assert info.variant is None
    assert info.references == ()
    assert info.tables[0].offset == 4 * 512


def test_cowd_child_names_its_parent(tmp_path: Path) -> None:
    path = tmp_path / "child.vmdk"
    path.write_bytes(cowd(flags=2, parent=b"/vmfs/volumes/ds/parent.vmdk\0junk"))
    info = inspect_path(path)
    # qemu never reads parentFileName: no backing file for qemu, but the parent is a fact.
    assert_matches_qemu(info, qemu_info(path, "vmdk"))
    assert info.references == (
        Reference(ReferenceKind.PARENT_HINT, "/vmfs/volumes/ds/parent.vmdk", "parentFileName", 32),
    )


def test_cowd_without_cid_is_refused() -> None:
    info = inspect_bytes(cowd(flags=3, desc=b""))
    assert {p.field for p in info.problems} == {"CID", "parentCID"}


# --- probing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "score"),
    [
        (b"version=1\n", 100),
        (b"version=3\r\n", 100),
        (b"# c\n#\nversion=2\n", 100),
        (b"   \n \r\nversion=1\n", 100),
        (b"\nversion=1\n", 0),
        (b"\r\nversion=1\n", 0),
        (b"\tversion=1\n", 0),
        (b" x\nversion=1\n", 0),
        (b"version=4\n", 0),
        (b"version=1 \n", 0),
        (b"version= 1\n", 0),
        (b"Version=1\n", 0),
    ],
)
def test_probe_matches_qemu(tmp_path: Path, prefix: bytes, score: int) -> None:
    (tmp_path / "e1.raw").write_bytes(bytes(4096))
    data = prefix + b'CID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n' + FLAT.encode()
    path = tmp_path / "probe.vmdk"
    path.write_bytes(data + b"\n")
    assert probe_bytes(path.read_bytes()) == score
    assert qemu_info(path)["format"] == ("vmdk" if score else "raw")


def test_probe_edge_cases() -> None:
    assert probe_bytes(b"") == 0
    assert probe_bytes(b"KDMV") == 100
    assert probe_bytes(b"COWD" + bytes(600)) == 100
    assert probe_bytes(b"version=1") == 0
    # Only the first 2048 bytes count: a comment that runs past them hides the version line.
    assert probe_bytes(b"#" + b"x" * 2046 + b"\nversion=1\n") == 0
    assert probe_bytes(b"#" + b"x" * 2030 + b"\nversion=1\n") == 100


# --- sscanf emulation against the C library ------------------------------------------------------

LIBC = ctypes.CDLL(None)
EXTENT_FORMAT = b'%10s %ld %10s "%511[^\n\r"]" %ld'


def libc_scan_extent(text: bytes) -> tuple[int, str, int, str, bytes | None, int]:
    access = ctypes.create_string_buffer(11)
    type_ = ctypes.create_string_buffer(11)
    name = ctypes.create_string_buffer(512)
    sectors = ctypes.c_int64(0)
    flat_offset = ctypes.c_int64(-1)
    matches = LIBC.sscanf(
        text,
        EXTENT_FORMAT,
        access,
        ctypes.byref(sectors),
        type_,
        name,
        ctypes.byref(flat_offset),
    )
    return (
        matches,
        access.value.decode("latin-1"),
        sectors.value,
        type_.value.decode("latin-1"),
        name.value if matches >= 4 else None,
        flat_offset.value,
    )


EXTENT_ALPHABET = st.sampled_from(
    [
        b"RW",
        b"RDONLY",
        b"FLAT",
        b"SPARSE",
        b"VMFS",
        b" ",
        b"\t",
        b"\n",
        b"\r",
        b'"',
        b"0",
        b"7",
        b"-",
        b"+",
        b"x",
        b"ab.vmdk",
        b"9" * 21,
        b"\xff",
        b"\x0b",
        b"A" * 12,
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(EXTENT_ALPHABET, max_size=14).map(b"".join))
def test_extent_scan_agrees_with_libc_sscanf(text: bytes) -> None:
    matches, access, sectors, type_, name, _at, flat_offset = vmdk.scan_extent_line(text, 0)
    expected = libc_scan_extent(text)
    ours = (matches, access, sectors, type_, name, flat_offset)
    if expected[0] == -1:
        assert matches == -1
    else:
        assert ours == expected


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"0", b"x", b"X", b"f", b"9", b"-", b"+", b" ", b"\n", b"g", b"F" * 17]),
        max_size=8,
    ).map(b"".join)
)
def test_hex_scan_agrees_with_libc_sscanf(text: bytes) -> None:
    value = ctypes.c_uint32(0)
    matches = LIBC.sscanf(text, b"%x", ctypes.byref(value))
    assert vmdk.scan_hex32(text) == (value.value if matches == 1 else None)


# --- hostile bytes -------------------------------------------------------------------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 0x200 + 700), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.none() | st.integers(0, 20000),
)
def test_mutated_sparse_headers_never_crash(
    sparse_image: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(sparse_image)
    for offset, value in edits:
        data[offset] = value
    info_or_image_error(inspect_bytes, bytes(data[:cut]) if cut is not None else bytes(data))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fields=st.lists(
        st.tuples(st.sampled_from([4, 8, 12, 20, 28, 36, 44, 48, 56, 64, 77]), st.integers(0, U64)),
        min_size=1,
        max_size=4,
    ),
    footer=st.booleans(),
)
def test_mutated_header_fields_never_crash(
    stream_image: bytes, fields: list[tuple[int, int]], footer: bool
) -> None:
    data = bytearray(with_footer(stream_image, 1) if footer else stream_image)
    base = len(data) - 1024 if footer else 0
    for offset, value in fields:
        size = 2 if offset == 77 else 4 if offset in (4, 8, 44) else 8
        data[base + offset : base + offset + size] = (value % (1 << (8 * size))).to_bytes(
            size, "little"
        )
    info_or_image_error(inspect_bytes, bytes(data))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"RW ",
                b"RDONLY ",
                b"2048 ",
                b"-1 ",
                b"FLAT ",
                b"SPARSE ",
                b'"',
                b"e.raw",
                b"\n",
                b"\r\n",
                b"  ",
                b"createType",
                b'="',
                b"CID",
                b"parentCID=",
                b"parentFileNameHint",
                b"#",
                b"\0",
                b"\xff",
                b"version=1\n",
                b"9" * 30,
            ]
        ),
        max_size=40,
    ).map(b"".join)
)
def test_random_descriptors_never_crash(text: bytes) -> None:
    info_or_image_error(inspect_bytes, text)
    info_or_image_error(inspect_bytes, bytes(0x200) + text)
    probe_bytes(text)


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 40, 79, 511, 600, 1535, 4096, 70000])
def test_truncated_images(sparse_image: bytes, stream_image: bytes, cut: int) -> None:
    for image in (sparse_image, with_footer(stream_image, 1), cowd(flags=3)):
        data = image[:cut]
        if cut < 4:
            with pytest.raises(TruncatedImage):
                inspect_bytes(data)
        else:
            info_or_image_error(inspect_bytes, data)


def test_not_a_descriptor_is_malformed() -> None:
    with pytest.raises(MalformedImage):
        inspect_bytes(b"\x7fELF" + bytes(100))
