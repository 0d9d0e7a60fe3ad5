"""Any bytes give an ImageInfo or an ImageError: truncations and mutations of real images."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgguard
from conftest import qemu_convert, qemu_create, raw_with_data
from imgguard import ImageError, ImageInfo, check

SEEDS = [
    ("qcow2", ("compat=1.1",)),
    ("qcow2", ("compat=0.10",)),
    ("qcow", ()),
    ("qed", ()),
    ("vmdk", ("subformat=monolithicSparse",)),
    ("vmdk", ("subformat=streamOptimized",)),
    ("vpc", ("subformat=dynamic",)),
    ("vpc", ("subformat=fixed",)),
    ("vhdx", ()),
    ("vdi", ()),
    ("parallels", ()),
]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    directory = tmp_path_factory.mktemp("seeds")
    guest = raw_with_data(directory / "guest.raw", 2 << 20)
    images = []
    for index, (fmt, options) in enumerate(SEEDS):
        target = directory / f"seed{index}.{fmt}"
        if fmt == "vpc" and "subformat=fixed" in options:
            qemu_create(target, fmt, "1M", options)
        else:
            qemu_convert(guest, target, fmt, options)
        images.append(target.read_bytes())
    return images


def _inspect_any(data: bytes) -> None:
    try:
        info = imgguard.inspect_bytes(data)
    except ImageError:
        return
    assert isinstance(info, ImageInfo)
    check(info)  # the rules must take whatever inspection reports


def test_every_truncation_point_of_every_header(seeds: list[bytes]) -> None:
    for data in seeds:
        for cut in [*range(0, 600, 7), 4096, 65536, 200_000, len(data) - 512, len(data) - 1]:
            _inspect_any(data[: max(cut, 0)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_headers(seeds: list[bytes], data: st.DataObject) -> None:
    image = bytearray(data.draw(st.sampled_from(seeds)))
    # Mutate where the headers are: the first 4 KiB, the VHDX headers and the last 1536 bytes.
    regions = [(0, 4096), (64 << 10, 64 << 10 + 4096), (max(0, len(image) - 1536), len(image))]
    for _ in range(data.draw(st.integers(1, 8))):
        start, end = data.draw(st.sampled_from(regions))
        end = min(end, len(image))
        if start >= end:
            continue
        offset = data.draw(st.integers(start, end - 1))
        value = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]) | st.integers(0, 255))
        image[offset] = value
    _inspect_any(bytes(image))
