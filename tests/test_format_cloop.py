"""cloop: qemu-img cannot create cloop images, so they are built here (zlib-compressed blocks)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from construct import Array, Int64ub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import info_or_image_error, qemu_info
from imgguard.errors import MalformedImage
from imgguard.formats import cloop
from imgguard.model import ImageInfo, ProblemKind
from imgguard.reader import ImageReader, open_image


def build(
    block_size: int = 65536,
    n_blocks: int = 4,
    *,
    offsets: list[int] | None = None,
    with_blocks: bool = True,
) -> bytes:
    """A cloop V2.0 image whose block i is `block_size` bytes of the value i, zlib-compressed."""
    blocks = (
        [zlib.compress(bytes([i % 256]) * block_size) for i in range(n_blocks)]
        if with_blocks
        else []
    )
    if offsets is None:
        offsets = [cloop.HEADER_SIZE + 8 * (n_blocks + 1)]
        for block in blocks:
            offsets.append(offsets[-1] + len(block))
    header = cloop.CLOOP_HEADER.build(
        {
            "preamble": cloop.MAGIC_VERSION_2_0.ljust(cloop.PREAMBLE_SIZE, b"\0"),
            "block_size": block_size,
            "n_blocks": n_blocks,
        }
    )
    return header + Array(len(offsets), Int64ub).build(offsets) + b"".join(blocks)


def inspect_bytes(data: bytes) -> ImageInfo:
    return cloop.inspect(ImageReader.from_bytes(data))


@pytest.mark.parametrize(
    ("block_size", "n_blocks"),
    [(512, 1), (4096, 3), (65536, 4), (256 * 1024, 2), (1 << 20, 1), (65536, 0)],
)
def test_built_images_match_qemu_info(tmp_path: Path, block_size: int, n_blocks: int) -> None:
    path = tmp_path / "disk.cloop"
    path.write_bytes(build(block_size, n_blocks))

    with open_image(path) as (reader, _stat):
        score = cloop.probe(reader)
        info = cloop.inspect(reader)
    expected = qemu_info(path, "cloop")

    assert score == 2
    assert qemu_info(path)["format"] == "cloop"  # qemu's prober agrees
    assert info.format == expected["format"] == "cloop"
    assert info.virtual_size == expected["virtual-size"] == block_size * n_blocks
    assert info.cluster_size == block_size
    assert info.problems == ()
    assert (info.tables[0].name, info.tables[0].offset) == ("offsets", 136)
    assert info.tables[0].length == (n_blocks + 1) * 8


def test_sector_count_wraps_at_32_bits_as_in_qemu(tmp_path: Path) -> None:
    # n_blocks * sectors_per_block is a uint32_t product in cloop_open().
    path = tmp_path / "wrap.cloop"
    path.write_bytes(build(64 << 20, (1 << 15) + 5, offsets=[0], with_blocks=False))

    info = inspect_bytes(path.read_bytes())

    # 2**32 + 5 * 2**17 sectors wrap to 5 blocks of 64 MiB.
    assert info.virtual_size == qemu_info(path, "cloop")["virtual-size"] == 5 * (64 << 20)
    assert "n_blocks" in [p.field for p in info.problems]


@pytest.mark.parametrize(
    ("block_size", "n_blocks", "offsets", "field", "qemu_error"),
    [
        (0, 0, [0], "block_size", "cannot be zero"),
        (1000, 0, [0], "block_size", "multiple of 512"),
        (128 << 20, 0, [0], "block_size", "64 MB or less"),
        (512, 1 << 29, [0], "n_blocks", "536870911 or less"),
        (512, 1 << 26, [0], "n_blocks", "too many offsets"),
        (65536, 2, [300, 200, 400], "offsets", "not monotonically increasing"),
        (65536, 2, [0, (128 << 20) + 1, (128 << 20) + 2], "offsets", "compressed block size"),
        # The missing third offset reads as 0 in qemu, below the second one.
        (65536, 2, [200, 300], "offsets", "not monotonically increasing at index 2"),
    ],
)
def test_headers_qemu_refuses_are_malformed_problems(
    tmp_path: Path,
    block_size: int,
    n_blocks: int,
    offsets: list[int],
    field: str,
    qemu_error: str,
) -> None:
    path = tmp_path / "bad.cloop"
    path.write_bytes(build(block_size, n_blocks, offsets=offsets, with_blocks=False))

    info = inspect_bytes(path.read_bytes())

    assert (ProblemKind.MALFORMED, field) in [(p.kind, p.field) for p in info.problems]
    with pytest.raises(AssertionError, match=qemu_error):
        qemu_info(path, "cloop")


def test_huge_offsets_table_is_checked_only_up_to_the_cap() -> None:
    reader = ImageReader.from_bytes(build(512, (1 << 26) - 1, offsets=[0], with_blocks=False))

    info = cloop.inspect(reader)

    assert ProblemKind.LIMIT in [p.kind for p in info.problems]
    assert info.tables[0].length == 1 << 29
    assert reader.bytes_read < 64 * 1024


def test_probe_needs_the_whole_preamble() -> None:
    data = build()
    length = len(cloop.MAGIC_VERSION_2_0)
    assert cloop.probe(ImageReader.from_bytes(data[:length])) == 2
    assert cloop.probe(ImageReader.from_bytes(data[: length - 1])) == 0
    with pytest.raises(MalformedImage):
        inspect_bytes(b"#!/bin/sh\n" + bytes(200))


@pytest.mark.parametrize("cut", [83, 100, 128, 130, 136, 140, 176, 200, 500])
def test_truncations_give_info_or_image_error(cut: int) -> None:
    info_or_image_error(inspect_bytes, build()[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(128, 200), st.integers(0, 255)), max_size=10),
    st.integers(83, 2000),
)
def test_mutations_give_info_or_image_error(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(build())
    for offset, value in edits:
        data[offset] = value
    info_or_image_error(inspect_bytes, bytes(data[:cut]))
