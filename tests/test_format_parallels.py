"""parallels: images made by qemu-img, hand-made header variants, and hostile bytes."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import info_or_image_error, qemu_convert, qemu_create, qemu_info, raw_with_data
from imgguard.errors import MalformedImage
from imgguard.formats import parallels
from imgguard.model import ImageInfo, ProblemKind
from imgguard.reader import ImageReader, open_image


def inspect_path(path: Path) -> ImageInfo:
    with open_image(path) as (reader, _stat):
        return parallels.inspect(reader)


def inspect_bytes(data: bytes) -> ImageInfo:
    return parallels.inspect(ImageReader.from_bytes(data))


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("parallels") / "small.parallels"
    qemu_create(path, "parallels", "10M", ["cluster_size=4096"])
    return path.read_bytes()


@pytest.mark.parametrize(
    ("size", "cluster_size"),
    [
        ("1M", None),
        ("10M", 512),
        ("10M", 4096),
        ("64M", 65536),
        ("1G", 1 << 20),
        ("100G", 1 << 20),
        ("1T", 1 << 20),
        ("5G", 4 << 20),
        (12345 * 512, None),
    ],
)
def test_qemu_created_images_match_qemu_info(
    tmp_path: Path, size: str | int, cluster_size: int | None
) -> None:
    options = [f"cluster_size={cluster_size}"] if cluster_size else []
    path = qemu_create(tmp_path / "disk.parallels", "parallels", size, options)
    info = inspect_path(path)
    expected = qemu_info(path, "parallels")

    assert parallels.probe(ImageReader.from_bytes(path.read_bytes())) == 100
    assert info.format == expected["format"] == "parallels"
    assert info.virtual_size == expected["virtual-size"]
    assert info.variant == "ploop"  # qemu-img writes the "WithouFreSpacExt" magic
    assert info.cluster_size == (cluster_size or 1 << 20)  # qemu's default is 1 MiB
    assert info.problems == ()
    bat = info.tables[0]
    assert (bat.name, bat.offset) == ("bat", 64)
    assert bat.length == info.header["bat_entries"] * 4
    assert info.header["bat_entries"] * info.header["tracks"] * 512 >= info.virtual_size


def test_image_with_data_matches_qemu_info(tmp_path: Path) -> None:
    source = raw_with_data(tmp_path / "source.raw", 8 << 20)
    path = qemu_convert(source, tmp_path / "data.parallels", "parallels", ["cluster_size=65536"])
    info = inspect_path(path)

    assert info.virtual_size == qemu_info(path, "parallels")["virtual-size"] == 8 << 20
    assert info.cluster_size == 65536
    assert info.problems == ()


def test_classic_magic_uses_only_the_low_half_of_nb_sectors(
    tmp_path: Path, small_image: bytes
) -> None:
    data = bytearray(small_image)
    data[:16] = b"WithoutFreeSpace"
    struct.pack_into("<Q", data, 36, (1 << 40) + 7)
    path = tmp_path / "classic.img"
    path.write_bytes(data)

    info = inspect_path(path)

    assert info.variant == "parallels"
    assert info.virtual_size == qemu_info(path, "parallels")["virtual-size"] == 7 * 512
    assert [p.field for p in info.problems] == ["nb_sectors"]


def test_valid_format_extension_is_accepted(tmp_path: Path, small_image: bytes) -> None:
    cluster = bytearray(4096)
    struct.pack_into("<Q", cluster, 0, parallels.PARALLELS_FORMAT_EXTENSION_MAGIC)
    cluster[8:24] = hashlib.md5(bytes(cluster[24:])).digest()
    data = bytearray(small_image) + cluster
    struct.pack_into("<Q", data, 56, len(small_image) // 512)
    path = tmp_path / "ext.img"
    path.write_bytes(data)

    info = inspect_path(path)

    assert info.virtual_size == qemu_info(path, "parallels")["virtual-size"]
    assert info.problems == ()
    assert ("format_extension", len(small_image), 4096) in [
        (t.name, t.offset, t.length) for t in info.tables
    ]


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "field"),
    [
        (28, "<I", 0, "tracks"),  # "Zero sectors per track"
        (28, "<I", (1 << 31) // 513 + 1, "tracks"),  # "Too big cluster"
        (32, "<I", (1 << 31) // 4 + 1, "bat_entries"),  # "Catalog too large"
        (56, "<Q", 8, "format_extension.magic"),  # extension cluster without its magic
        (36, "<Q", 1 << 62, "nb_sectors"),  # "Can't get image size"
        (36, "<Q", (1 << 54) - (1 << 21) + 1, "nb_sectors"),  # over BDRV_MAX_LENGTH
    ],
)
def test_headers_qemu_refuses_are_reported(
    tmp_path: Path, small_image: bytes, offset: int, fmt: str, value: int, field: str
) -> None:
    data = bytearray(small_image)
    struct.pack_into(fmt, data, offset, value)
    path = tmp_path / "bad.img"
    path.write_bytes(data)

    info = inspect_path(path)

    fatal = [p for p in info.problems if p.kind in (ProblemKind.MALFORMED, ProblemKind.LIMIT)]
    assert field in [p.field for p in fatal]
    with pytest.raises(AssertionError, match="qemu-img info"):
        qemu_info(path, "parallels")


def test_largest_size_qemu_accepts(tmp_path: Path, small_image: bytes) -> None:
    data = bytearray(small_image)
    struct.pack_into("<Q", data, 36, (1 << 54) - (1 << 21))
    path = tmp_path / "max.img"
    path.write_bytes(data)

    info = inspect_path(path)

    assert info.virtual_size == qemu_info(path, "parallels")["virtual-size"]
    assert not [p for p in info.problems if p.kind is ProblemKind.LIMIT]


def test_unclean_image_and_bat_past_eof_are_problems(small_image: bytes) -> None:
    data = bytearray(small_image)
    struct.pack_into("<I", data, 44, parallels.HEADER_INUSE_MAGIC)
    struct.pack_into("<I", data, 32, 1 << 20)

    info = inspect_bytes(bytes(data))

    kinds = {p.field: p.kind for p in info.problems}
    assert kinds["inuse"] is ProblemKind.INCONSISTENT
    assert kinds["bat_entries"] is ProblemKind.TRUNCATED
    assert info.tables[0].length == 4 << 20


def test_wrong_version_and_magic_are_errors(small_image: bytes) -> None:
    data = bytearray(small_image)
    struct.pack_into("<I", data, 16, 3)
    assert parallels.probe(ImageReader.from_bytes(bytes(data))) == 0
    with pytest.raises(MalformedImage) as error:
        inspect_bytes(bytes(data))
    assert error.value.field == "version"

    data = bytearray(small_image)
    data[0] = ord("X")
    assert parallels.probe(ImageReader.from_bytes(bytes(data))) == 0
    with pytest.raises(MalformedImage):
        inspect_bytes(bytes(data))


def test_stub_shorter_than_the_header_reads_as_qemu_does(
    tmp_path: Path, small_image: bytes
) -> None:
    path = tmp_path / "stub.img"
    path.write_bytes(small_image[:30])

    info = inspect_path(path)

    # qemu reads the missing bytes as zeros: nb_sectors 0.
    assert parallels.probe(ImageReader.from_bytes(small_image[:20])) == 100
    assert info.virtual_size == qemu_info(path, "parallels")["virtual-size"] == 0
    assert info.truncated


@pytest.mark.parametrize("cut", [0, 10, 20, 63, 64, 200, 4096, 12287])
def test_truncations_give_info_or_image_error(small_image: bytes, cut: int) -> None:
    info_or_image_error(inspect_bytes, small_image[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=127), st.integers(0, 255)), max_size=12),
    st.integers(min_value=0, max_value=13000),
)
def test_mutations_give_info_or_image_error(
    small_image: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(small_image)
    # Keep the magic mostly intact so the header parser is exercised.
    for offset, value in edits:
        data[offset if offset >= 16 else offset + 16] = value
    info_or_image_error(inspect_bytes, bytes(data[:cut] if cut < 64 else data))
