"""QED: real images from qemu-img 7.2 across its options, and crafted oddities beside them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import patched, qemu_convert, qemu_create, qemu_info, qemu_refusal, raw_with_data
from imgguard.errors import ImageError
from imgguard.formats import qed
from imgguard.model import FeatureKind, ImageInfo, ProblemKind, ReferenceKind
from imgguard.reader import ImageReader


def inspect(path: Path) -> ImageInfo:
    return qed.inspect(ImageReader.from_bytes(path.read_bytes()))


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qed")


@pytest.fixture(scope="module")
def plain(workdir: Path) -> Path:
    return qemu_create(workdir / "plain.qed", "qed", "1M")


@pytest.fixture(scope="module")
def with_backing(workdir: Path, plain: Path) -> Path:
    return qemu_create(
        workdir / "overlay.qed", "qed", "1M", ["backing_file=plain.qed", "backing_fmt=qed"]
    )


@pytest.mark.parametrize(
    ("size", "options"),
    [
        pytest.param("1M", [], id="default"),
        pytest.param(1000, [], id="size-rounded-to-sectors"),
        pytest.param("10T", [], id="10T-sparse"),
        pytest.param("1M", ["cluster_size=4096", "table_size=16"], id="4k-clusters-table-16"),
        pytest.param("1M", ["cluster_size=65536", "table_size=2"], id="64k-clusters-table-2"),
        pytest.param("1G", ["cluster_size=1M", "table_size=2"], id="1M-clusters-table-2"),
        pytest.param("1M", ["table_size=8"], id="table-8"),
    ],
)
def test_created_image_matches_qemu_img_info(
    tmp_path: Path, size: str | int, options: list[str]
) -> None:
    path = qemu_create(tmp_path / "image.qed", "qed", size, options)
    expected = qemu_info(path, "qed")

    info = inspect(path)

    assert info.format == expected["format"] == "qed"
    assert info.virtual_size == expected["virtual-size"]
    assert info.cluster_size == expected["cluster-size"]
    assert info.references == () and info.backing_file is None
    assert info.features == ()
    assert info.problems == ()
    (l1,) = info.tables
    assert l1.name == "l1_table"
    assert l1.length == info.header["table_size"] * info.cluster_size
    assert l1.offset + l1.length <= path.stat().st_size
    assert info.virtual_size <= info.header["max_image_size"]


@pytest.mark.parametrize(
    ("backing_format", "absolute"),
    [("qcow2", False), ("qcow2", True), ("raw", False), ("raw", True)],
)
def test_backing_file(tmp_path: Path, backing_format: str, absolute: bool) -> None:
    base = qemu_create(tmp_path / f"base.{backing_format}", backing_format, "1M")
    name = str(base) if absolute else base.name
    path = qemu_create(
        tmp_path / "overlay.qed",
        "qed",
        "1M",
        [f"backing_file={name}", f"backing_fmt={backing_format}"],
    )
    expected = qemu_info(path, "qed")

    info = inspect(path)

    assert info.backing_file == expected["backing-filename"] == name
    # QED stores no format name, only "do not probe, it is raw".
    assert info.backing_format == expected.get("backing-filename-format")
    assert info.backing_format == ("raw" if backing_format == "raw" else None)
    assert ("backing_format_no_probe" in info.feature_names) == (backing_format == "raw")
    (reference,) = info.references
    assert reference.kind is ReferenceKind.BACKING_FILE
    assert reference.target == name
    assert reference.field == "backing_filename_offset"
    assert reference.offset == info.header["backing_filename_offset"] == 64
    assert info.problems == ()


def test_image_with_guest_data(tmp_path: Path) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 4 << 20)
    path = qemu_convert(raw, tmp_path / "disk.qed", "qed")
    expected = qemu_info(path, "qed")
    info = inspect(path)
    assert info.virtual_size == expected["virtual-size"] == 4 << 20
    assert info.problems == ()


def test_table_size_one_is_refused_by_qemu_7_2(tmp_path: Path) -> None:
    # qemu-img creates it, then its own table offset check rejects every one-cluster table.
    path = qemu_create(tmp_path / "t1.qed", "qed", "1M", ["table_size=1"])
    assert "table offset is invalid" in qemu_refusal(path, "qed")
    info = inspect(path)
    assert [(p.kind, p.field) for p in info.problems] == [(ProblemKind.UNSUPPORTED, "table_size")]


@pytest.mark.parametrize(
    ("patch", "message", "field", "kind"),
    [
        ((16, u64(8)), "Unsupported QED features", "features", ProblemKind.UNSUPPORTED),
        ((4, u32(3000)), "cluster size", "cluster_size", ProblemKind.MALFORMED),
        ((4, u32(128 << 20)), "cluster size", "cluster_size", ProblemKind.MALFORMED),
        ((8, u32(3)), "table size", "table_size", ProblemKind.MALFORMED),
        ((8, u32(32)), "table size", "table_size", ProblemKind.MALFORMED),
        ((48, u64(1000)), "image size is invalid", "image_size", ProblemKind.MALFORMED),
        ((48, u64(1 << 60)), "image size is invalid", "image_size", ProblemKind.LIMIT),
        ((40, u64(0)), "table offset is invalid", "l1_table_offset", ProblemKind.INCONSISTENT),
        ((40, u64(0x10200)), "table offset is invalid", "l1_table_offset", ProblemKind.MALFORMED),
        ((40, u64(1 << 40)), "table offset is invalid", "l1_table_offset", ProblemKind.TRUNCATED),
        ((40, u64(2**64 - 65536)), "table offset is invalid", "l1_table_offset", None),
    ],
)
def test_qemu_refuses_and_imgguard_reports(
    tmp_path: Path,
    plain: Path,
    patch: tuple[int, bytes],
    message: str,
    field: str,
    kind: ProblemKind | None,
) -> None:
    path = patched(plain, tmp_path / "odd.qed", patch)
    assert message in qemu_refusal(path, "qed")
    info = inspect(path)
    problem = next(p for p in info.problems if p.field == field)
    assert problem.kind is (kind or ProblemKind.MALFORMED)


def test_backing_filename_outside_the_header(tmp_path: Path, with_backing: Path) -> None:
    path = patched(with_backing, tmp_path / "out.qed", (56, u32(65530)))
    assert "backing filename offset is invalid" in qemu_refusal(path, "qed")
    info = inspect(path)
    assert any(p.field == "backing_filename_offset" for p in info.problems)


def test_header_bytes_are_computed_in_32_bits_as_qemu_does(
    tmp_path: Path, with_backing: Path
) -> None:
    # 64 KiB clusters x 65536 header clusters = 2^32, which qemu's uint32 product wraps to 0.
    path = patched(with_backing, tmp_path / "wrap.qed", (12, u32(65536)))
    qemu_refusal(path, "qed")
    info = inspect(path)
    backing = next(p for p in info.problems if p.field == "backing_filename_offset")
    assert "0-byte header" in backing.message


def test_backing_fields_without_the_feature_are_ignored(tmp_path: Path, with_backing: Path) -> None:
    path = patched(with_backing, tmp_path / "nobit.qed", (16, u64(0)))
    assert "backing-filename" not in qemu_info(path, "qed")
    info = inspect(path)
    assert info.backing_file is None and info.references == ()
    assert [p.kind for p in info.problems] == [ProblemKind.INCONSISTENT]


def test_backing_name_is_a_c_string(tmp_path: Path, with_backing: Path) -> None:
    path = patched(with_backing, tmp_path / "nul.qed", (60, u32(11)), (64, b"plain.qed\0x"))
    expected = qemu_info(path, "qed")
    assert inspect(path).backing_file == expected["backing-filename"] == "plain.qed"


def test_need_check_and_unknown_compat_bits(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "bits.qed", (16, u64(2)), (24, u64(1 << 4)), (32, u64(1)))
    qemu_info(path, "qed")  # read-only: qemu neither checks nor rewrites the header
    info = inspect(path)
    assert [(f.name, f.kind, f.known) for f in info.features] == [
        ("need_check", FeatureKind.INCOMPATIBLE, True),
        ("compatible_bit_4", FeatureKind.COMPATIBLE, False),
        ("autoclear_bit_0", FeatureKind.AUTOCLEAR, False),
    ]
    assert info.problems == ()


def test_probe(tmp_path: Path, plain: Path) -> None:
    assert qed.probe(ImageReader.from_bytes(plain.read_bytes())) == 100
    assert qed.probe(ImageReader.from_bytes(b"QED\0")) == 100
    assert qed.probe(ImageReader.from_bytes(b"QED")) == 0
    other = qemu_create(tmp_path / "x.qcow2", "qcow2", "1M")
    assert qed.probe(ImageReader.from_bytes(other.read_bytes())) == 0


def _outcome(data: bytes) -> ImageInfo | ImageError:
    try:
        return qed.inspect(ImageReader.from_bytes(data))
    except ImageError as error:
        return error


@pytest.mark.parametrize("length", [0, 4, 63, 64, 68, 73, 4096, 65536, 65536 * 4])
def test_truncated_image(with_backing: Path, length: int) -> None:
    outcome = _outcome(with_backing.read_bytes()[:length])
    if length < 64:
        assert isinstance(outcome, ImageError)
    else:
        assert isinstance(outcome, ImageInfo)
        assert outcome.virtual_size == 1 << 20
        assert outcome.truncated  # the L1 table (4 clusters from 64 KiB) is cut off


FIELDS = [(4, 4), (8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8), (56, 4), (60, 4)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(FIELDS),
    value=st.one_of(
        st.integers(0, 70000), st.sampled_from([1 << 12, 1 << 26, 2**32 - 1, 2**63, 2**64 - 1])
    ),
    flips=st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), max_size=4),
)
def test_mutated_header_only_yields_facts_or_image_errors(
    with_backing: Path, field: tuple[int, int], value: int, flips: list[tuple[int, int]]
) -> None:
    offset, width = field
    data = bytearray(with_backing.read_bytes()[:4096])
    data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    for at, byte in flips:
        data[at] = byte
    assert isinstance(_outcome(bytes(data)), ImageInfo | ImageError)
