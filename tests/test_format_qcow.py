"""qcow (version 1): real images from qemu-img 7.2, and crafted oddities beside them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import patched, qemu_convert, qemu_create, qemu_info, qemu_refusal, raw_with_data
from imgguard.errors import ImageError
from imgguard.formats import qcow
from imgguard.model import ImageInfo, ProblemKind, ReferenceKind
from imgguard.reader import ImageReader


def inspect(path: Path) -> ImageInfo:
    return qcow.inspect(ImageReader.from_bytes(path.read_bytes()))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow")


@pytest.fixture(scope="module")
def plain(workdir: Path) -> Path:
    return qemu_create(workdir / "plain.qcow", "qcow", "1M")


@pytest.fixture(scope="module")
def with_backing(workdir: Path, plain: Path) -> Path:
    return qemu_create(
        workdir / "overlay.qcow", "qcow", "1M", ["backing_file=plain.qcow", "backing_fmt=qcow"]
    )


@pytest.mark.parametrize(
    ("size", "options", "cluster_size"),
    [
        pytest.param("1M", [], 4096, id="1M"),
        pytest.param(1000, [], 4096, id="size-rounded-to-sectors"),
        pytest.param("100G", [], 4096, id="100G"),
        pytest.param("1M", ["encryption=on", "encrypt.key-secret=sec0"], 4096, id="encryption-on"),
        pytest.param(
            "1M", ["encrypt.format=aes", "encrypt.key-secret=sec0"], 4096, id="encrypt-aes"
        ),
    ],
)
def test_created_image_matches_qemu_img_info(
    tmp_path: Path, size: str | int, options: list[str], cluster_size: int
) -> None:
    path = qemu_create(tmp_path / "image.qcow", "qcow", size, options, secret=bool(options))
    expected = qemu_info(path, "qcow")

    info = inspect(path)

    assert info.format == expected["format"] == "qcow"
    assert info.variant == "v1" and info.version == 1
    assert info.virtual_size == expected["virtual-size"]
    assert info.cluster_size == expected["cluster-size"] == cluster_size
    assert info.encrypted is expected.get("encrypted", False)
    if info.encrypted:
        assert info.encryption is not None and info.encryption.method == "aes"
    assert info.references == () and info.backing_file is None
    assert info.problems == ()
    (l1,) = info.tables
    # qemu sizes the L1 table from the virtual size: one entry per 2^(cluster_bits + l2_bits).
    shift = info.header["cluster_bits"] + info.header["l2_bits"]
    assert l1.length == -(-info.header["size"] // (1 << shift)) * 8
    assert l1.offset + l1.length <= path.stat().st_size


@pytest.mark.parametrize("absolute", [False, True])
def test_backing_file(tmp_path: Path, absolute: bool) -> None:
    base = qemu_create(tmp_path / "base.qcow2", "qcow2", "1M")
    name = str(base) if absolute else base.name
    path = qemu_create(
        tmp_path / "overlay.qcow", "qcow", "1M", [f"backing_file={name}", "backing_fmt=qcow2"]
    )
    expected = qemu_info(path, "qcow")

    info = inspect(path)

    assert info.backing_file == expected["backing-filename"] == name
    # qcow has nowhere to store a backing format.
    assert info.backing_format is None and "backing-filename-format" not in expected
    # With a backing file qemu-img picks 512-byte clusters and 32 KiB L2 tables.
    assert info.cluster_size == expected["cluster-size"] == 512
    (reference,) = info.references
    assert reference.kind is ReferenceKind.BACKING_FILE
    assert reference.target == name
    assert reference.field == "backing_file_offset"
    assert reference.offset == 48
    assert info.problems == ()


def test_image_with_guest_data(tmp_path: Path) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 4 << 20)
    path = qemu_convert(raw, tmp_path / "disk.qcow", "qcow")
    expected = qemu_info(path, "qcow")
    info = inspect(path)
    assert info.virtual_size == expected["virtual-size"] == 4 << 20
    assert info.problems == ()


def test_backing_name_is_a_c_string(tmp_path: Path, with_backing: Path) -> None:
    path = patched(with_backing, tmp_path / "nul.qcow", (16, struct.pack(">I", 12)))
    data = bytearray(path.read_bytes())
    data[48 : 48 + 12] = b"plain.qcow\0x"
    path.write_bytes(bytes(data))
    expected = qemu_info(path, "qcow")
    assert inspect(path).backing_file == expected["backing-filename"] == "plain.qcow"


@pytest.mark.parametrize(
    ("patch", "message", "field", "kind"),
    [
        ((24, struct.pack(">Q", 1)), "Image size is too small", "size", ProblemKind.MALFORMED),
        ((32, bytes([17])), "Cluster size must be", "cluster_bits", ProblemKind.MALFORMED),
        ((32, bytes([8])), "Cluster size must be", "cluster_bits", ProblemKind.MALFORMED),
        ((33, bytes([5])), "L2 table size must be", "l2_bits", ProblemKind.MALFORMED),
        ((33, bytes([14])), "L2 table size must be", "l2_bits", ProblemKind.MALFORMED),
        ((36, struct.pack(">I", 2)), "invalid encryption method", "crypt_method", None),
        ((24, struct.pack(">Q", 2**64 - 1)), "Image too large", "size", ProblemKind.LIMIT),
        ((24, struct.pack(">Q", 2**62)), "Image too large", "size", ProblemKind.LIMIT),
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
    path = patched(plain, tmp_path / "odd.qcow", patch)
    assert message in qemu_refusal(path, "qcow")
    info = inspect(path)
    problem = next(p for p in info.problems if p.field == field)
    assert problem.kind is (kind or ProblemKind.UNSUPPORTED)


def test_backing_name_too_long(tmp_path: Path, with_backing: Path) -> None:
    path = patched(with_backing, tmp_path / "long.qcow", (16, struct.pack(">I", 1024)))
    assert "Backing file name too long" in qemu_refusal(path, "qcow")
    info = inspect(path)
    # qemu refuses, but the name is still there for the policy to see.
    assert info.backing_file is not None and info.backing_file.startswith("plain.qcow")
    assert any(p.kind is ProblemKind.LIMIT for p in info.problems)


def test_l1_table_past_end_of_file(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "far.qcow", (40, struct.pack(">Q", 1 << 40)))
    # qemu opens it: it reads zeros past the end of the file.
    assert qemu_info(path, "qcow")["virtual-size"] == 1 << 20
    info = inspect(path)
    (l1,) = info.tables
    assert l1.offset == 1 << 40
    assert [p.kind for p in info.problems] == [ProblemKind.TRUNCATED]


@pytest.mark.parametrize("version", [0, 2, 3])
def test_other_versions(tmp_path: Path, plain: Path, version: int) -> None:
    path = patched(plain, tmp_path / "v.qcow", (4, struct.pack(">I", version)))
    assert "qcow" in qemu_refusal(path, "qcow")
    info = inspect(path)
    assert info.variant == f"v{version}" and info.virtual_size is None
    assert [p.kind for p in info.problems] == [ProblemKind.UNSUPPORTED]


def test_probe(tmp_path: Path, plain: Path) -> None:
    assert qcow.probe(ImageReader.from_bytes(plain.read_bytes())) == 100
    qcow2_image = qemu_create(tmp_path / "v3.qcow2", "qcow2", "1M")
    assert qcow.probe(ImageReader.from_bytes(qcow2_image.read_bytes())) == 0
    assert qcow.probe(ImageReader.from_bytes(b"QFI\xfb\0\0\0\x01")) == 100
    assert qcow.probe(ImageReader.from_bytes(b"QFI")) == 0


def _outcome(data: bytes) -> ImageInfo | ImageError:
    try:
        return qcow.inspect(ImageReader.from_bytes(data))
    except ImageError as error:
        return error


@pytest.mark.parametrize("length", [0, 4, 47, 48, 50, 55, 56, 64, 512])
def test_truncated_image(with_backing: Path, length: int) -> None:
    outcome = _outcome(with_backing.read_bytes()[:length])
    if length < 48:
        assert isinstance(outcome, ImageError)
    else:
        assert isinstance(outcome, ImageInfo)
        assert outcome.virtual_size == 1 << 20
        assert outcome.truncated == (length < 72)  # the name, then the L1 table, run past EOF


FIELDS = [(4, 4), (8, 8), (16, 4), (24, 8), (32, 1), (33, 1), (36, 4), (40, 8)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(FIELDS),
    value=st.one_of(st.integers(0, 64), st.sampled_from([2**32 - 1, 2**63, 2**64 - 1])),
    flips=st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), max_size=4),
)
def test_mutated_header_only_yields_facts_or_image_errors(
    with_backing: Path, field: tuple[int, int], value: int, flips: list[tuple[int, int]]
) -> None:
    offset, width = field
    data = bytearray(with_backing.read_bytes())
    data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
    for at, byte in flips:
        data[at] = byte
    assert isinstance(_outcome(bytes(data)), ImageInfo | ImageError)
