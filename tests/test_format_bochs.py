"""bochs: qemu-img cannot create Bochs images, so they are built here with the module's struct."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import info_or_image_error, qemu_info
from imgguard.errors import MalformedImage
from imgguard.formats import bochs
from imgguard.model import ImageInfo, ProblemKind
from imgguard.reader import ImageReader, open_image


def build(
    *,
    version: int = bochs.HEADER_VERSION,
    header: int = 512,
    catalog: int = 16,
    bitmap: int = 128,
    extent: int = 65536,
    disk: int = 1 << 20,
    subtype: bytes = b"Growing",
    with_catalog: bool = True,
) -> bytes:
    """A Bochs growing image with every extent unallocated (catalog entries 0xffffffff)."""
    fields: dict[str, Any] = {
        "magic": bochs.HEADER_MAGIC.ljust(32, b"\0"),
        "type": bochs.REDOLOG_TYPE.ljust(16, b"\0"),
        "subtype": subtype.ljust(16, b"\0"),
        "version": version,
        "header": header,
        "catalog": catalog,
        "bitmap": bitmap,
        "extent": extent,
        "extra": {"reserved": 0, "disk": disk},
    }
    data = bochs.BOCHS_HEADER.build(fields).ljust(512, b"\0")
    return data + (b"\xff" * 4 * catalog if with_catalog else b"")


def inspect_bytes(data: bytes) -> ImageInfo:
    return bochs.inspect(ImageReader.from_bytes(data))


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"version": bochs.HEADER_V1},
        {"catalog": 1, "extent": 512, "disk": 512},
        {"catalog": 0, "disk": 0},
        {"catalog": 2048, "extent": 4096, "disk": 8 << 20},
        {"catalog": 1024, "extent": 1 << 23, "disk": 8 << 30},  # the largest extent qemu takes
        {"disk": (1 << 20) + 100},  # qemu rounds the disk size down to sectors
        {
            "catalog": 8,
            "disk": 512 << 10,
            "with_catalog": False,
        },  # catalog past EOF reads as zeros in qemu
    ],
    ids=lambda params: ",".join(f"{k}={v}" for k, v in params.items()) or "default",
)
def test_built_images_match_qemu_info(tmp_path: Path, params: dict[str, Any]) -> None:
    path = tmp_path / "disk.bochs"
    path.write_bytes(build(**params))

    with open_image(path) as (reader, _stat):
        score = bochs.probe(reader)
        info = bochs.inspect(reader)
    expected = qemu_info(path, "bochs")

    assert score == 100
    assert info.format == expected["format"] == "bochs"
    assert info.virtual_size == expected["virtual-size"]
    assert info.version == params.get("version", bochs.HEADER_VERSION)
    assert info.tables[0].name == "catalog"
    assert info.tables[0].length == params.get("catalog", 16) * 4
    assert not [p for p in info.problems if p.kind is ProblemKind.MALFORMED]


def test_probe_is_qemus_own_answer(tmp_path: Path) -> None:
    path = tmp_path / "probe.bochs"
    path.write_bytes(build())
    assert qemu_info(path)["format"] == "bochs"

    assert bochs.probe(ImageReader.from_bytes(build(subtype=b"Undoable"))) == 0
    assert bochs.probe(ImageReader.from_bytes(build(version=0x30000))) == 0
    # strcmp(): the magic must end with a NUL inside its field.
    data = bytearray(build())
    data[22] = ord("!")
    assert bochs.probe(ImageReader.from_bytes(bytes(data))) == 0
    with pytest.raises(MalformedImage):
        inspect_bytes(bytes(data))


@pytest.mark.parametrize(
    ("params", "field", "qemu_error"),
    [
        ({"catalog": 15}, "catalog", "Catalog size is too small"),
        ({"catalog": 0x100001, "with_catalog": False}, "catalog", "Catalog size is too large"),
        ({"extent": 0}, "extent", "at least 512"),
        ({"extent": 3000}, "extent", "not a power of two"),
        ({"extent": 16 << 20}, "extent", "too large"),
    ],
)
def test_headers_qemu_refuses_are_malformed_problems(
    tmp_path: Path, params: dict[str, Any], field: str, qemu_error: str
) -> None:
    path = tmp_path / "bad.bochs"
    path.write_bytes(build(**params))

    info = inspect_bytes(path.read_bytes())

    assert (ProblemKind.MALFORMED, field) in [(p.kind, p.field) for p in info.problems]
    with pytest.raises(AssertionError, match=qemu_error):
        qemu_info(path, "bochs")


def test_catalog_past_eof_is_truncated() -> None:
    info = inspect_bytes(build(catalog=0x100000, with_catalog=False))

    assert info.truncated
    assert info.tables[0].length == 4 << 20


@pytest.mark.parametrize("cut", [0, 1, 22, 64, 80, 90, 100, 511, 512, 540])
def test_truncations_give_info_or_image_error(cut: int) -> None:
    info_or_image_error(inspect_bytes, build()[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(64, 127), st.integers(0, 255)), max_size=12),
    st.sampled_from([bochs.HEADER_VERSION, bochs.HEADER_V1]),
    st.integers(0, 600),
)
def test_mutations_give_info_or_image_error(
    edits: list[tuple[int, int]], version: int, cut: int
) -> None:
    data = bytearray(build(version=version))
    for offset, value in edits:
        data[offset] = value
    info_or_image_error(inspect_bytes, bytes(data[:cut]))
