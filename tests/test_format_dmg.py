"""dmg: qemu-img cannot create UDIF images, so minimal valid ones are built here from the
module's own structs (koly trailer, mish table, XML plist or resource fork)."""

from __future__ import annotations

import base64
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import info_or_image_error, qemu_info, run_qemu_img
from imgguard.errors import MalformedImage
from imgguard.formats import dmg
from imgguard.model import ImageInfo, ProblemKind
from imgguard.reader import ImageReader, open_image

RAW_DATA = b"imgguard-dmg-raw" * 128  # 4 sectors
ZLIB_DATA = b"imgguard-dmg-zlib" * 120 + bytes(8)  # 4 sectors
# (type, sectors, payload) -> the guest sees RAW_DATA, 8 zero sectors, ZLIB_DATA.
GUEST = RAW_DATA + bytes(8 * 512) + ZLIB_DATA


def mish_table(chunks: list[tuple[int, int, int, int, int]], *, sector_count: int) -> bytes:
    """A mish table: chunks are (type, sector_number, sector_count, offset, length)."""
    header = dmg.MISH.build(
        {
            "version": 1,
            "sector_number": 0,
            "sector_count": sector_count,
            "data_offset": 0,
            "buffers_needed": 0x208,
            "block_descriptors": 0,
            "reserved": bytes(24),
            "checksum_type": 0,
            "checksum_size": 0,
            "checksum": bytes(128),
            "chunk_count": len(chunks),
        }
    )
    entries = b"".join(
        dmg.MISH_CHUNK.build(
            {
                "type": kind,
                "comment": 0,
                "sector_number": sector,
                "sector_count": count,
                "compressed_offset": offset,
                "compressed_length": length,
            }
        )
        for kind, sector, count, offset, length in chunks
    )
    return header + entries


def plist(*tables: bytes, wrap: int = 52) -> bytes:
    """The XML property list hdiutil writes, one blkx entry per mish table."""
    entries = []
    for table in tables:
        encoded = base64.b64encode(table)
        lines = b"\n\t\t\t\t".join(encoded[i : i + wrap] for i in range(0, len(encoded), wrap))
        entries.append(
            b"\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\t\t\t\t"
            + lines
            + b"\n\t\t\t\t</data>\n\t\t\t\t<key>Name</key>\n\t\t\t\t<string>disk</string>\n"
            b"\t\t\t</dict>\n"
        )
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0">\n<dict>\n'
        b"\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n"
        + b"".join(entries)
        + b"\t\t</array>\n\t</dict>\n</dict>\n</plist>\n"
    )


def resource_fork(*tables: bytes) -> bytes:
    """A classic resource fork: 16-byte header, then length-prefixed resources."""
    body = b"".join(len(t).to_bytes(4, "big") + t for t in tables)
    return (16).to_bytes(4, "big") + bytes(4) + len(body).to_bytes(4, "big") + bytes(4) + body


def koly(**fields: Any) -> bytes:
    values: dict[str, Any] = {
        "version": 4,
        "header_size": 512,
        "flags": 1,
        "running_data_fork_offset": 0,
        "data_fork_offset": 0,
        "data_fork_length": 0,
        "rsrc_fork_offset": 0,
        "rsrc_fork_length": 0,
        "segment_number": 1,
        "segment_count": 1,
        "segment_id": bytes(16),
        "data_checksum_type": 0,
        "data_checksum_size": 0,
        "data_checksum": bytes(128),
        "xml_offset": 0,
        "xml_length": 0,
        "reserved1": bytes(120),
        "checksum_type": 0,
        "checksum_size": 0,
        "checksum": bytes(128),
        "image_variant": 1,
        "sector_count": 16,
        "reserved2": 0,
        "reserved3": 0,
        "reserved4": 0,
    }
    values.update(fields)
    return dmg.KOLY.build(values)


def default_chunks(data_fork_base: int = 0) -> tuple[bytes, list[tuple[int, int, int, int, int]]]:
    compressed = zlib.compress(ZLIB_DATA)
    fork = RAW_DATA + compressed
    chunks = [
        (dmg.UDRW, 0, 4, 0, len(RAW_DATA)),
        (dmg.UDZE, 4, 8, 0, 0),
        (dmg.UDZO, 12, 4, len(RAW_DATA), len(compressed)),
        (dmg.UDCM, 16, 0, 0, 0),
        (dmg.UDLE, 16, 0, 0, 0),
    ]
    return fork, chunks


def build(
    *,
    use_rsrc: bool = False,
    sector_count: int = 16,
    chunks: list[tuple[int, int, int, int, int]] | None = None,
    pad: int = 0,
    wrap: int = 52,
    split: bool = False,
    **koly_fields: Any,
) -> bytes:
    fork, default = default_chunks()
    chunks = default if chunks is None else chunks
    if split:
        tables = [
            mish_table(chunks[:2], sector_count=12),
            mish_table(chunks[2:], sector_count=4),
        ]
    else:
        tables = [mish_table(chunks, sector_count=sector_count)]
    fork += bytes(pad)
    if use_rsrc:
        meta = resource_fork(*tables)
        fields = {"rsrc_fork_offset": len(fork), "rsrc_fork_length": len(meta)}
    else:
        meta = plist(*tables, wrap=wrap)
        fields = {"xml_offset": len(fork), "xml_length": len(meta)}
    fields |= {"data_fork_length": len(fork), "sector_count": sector_count}
    fields |= koly_fields
    return fork + meta + koly(**fields)


def inspect_bytes(data: bytes, name: str | None = None) -> ImageInfo:
    return dmg.inspect(ImageReader.from_bytes(data, name=name))


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"use_rsrc": True},
        {"split": True},
        {"use_rsrc": True, "split": True},
        {"wrap": 1000},
        {"wrap": 7},  # line breaks inside base64 quads: glib skips them
        {"pad": 3},  # the trailer is not sector aligned
        {"pad": 700},
        {"sector_count": 1 << 40},  # qemu takes the trailer's size, not the chunks'
        {"sector_count": 0},
    ],
    ids=lambda params: ",".join(f"{k}={v}" for k, v in params.items()) or "default",
)
def test_built_images_match_qemu_info(tmp_path: Path, params: dict[str, Any]) -> None:
    path = tmp_path / "disk.dmg"
    path.write_bytes(build(**params))

    with open_image(path) as (reader, _stat):
        score = dmg.probe(reader)
        recognised = dmg.recognise(reader)
        info = dmg.inspect(reader)
    expected = qemu_info(path, "dmg")

    assert score == 2 and recognised
    assert info.format == expected["format"] == "dmg"
    assert info.virtual_size == expected["virtual-size"]
    assert info.variant == "udif"
    assert info.problems == ()
    assert info.header["n_chunks"] == 3  # raw, zero, zlib; comment and terminator skipped
    table = info.tables[0]
    assert table.name == ("resource_fork" if params.get("use_rsrc") else "plist")
    assert table.offset + table.length == info.header["koly_offset"]


def test_built_image_reads_back_through_qemu(tmp_path: Path) -> None:
    """The builder makes images qemu can read, so the tests above exercise real UDIF."""
    path = tmp_path / "disk.dmg"
    path.write_bytes(build())
    out = tmp_path / "out.raw"
    run_qemu_img("convert", "-f", "dmg", "-O", "raw", str(path), str(out))
    assert out.read_bytes() == GUEST


def test_probe_looks_only_at_the_name_as_qemu_does(tmp_path: Path) -> None:
    data = build()
    assert dmg.probe(ImageReader.from_bytes(data, name="/images/disk.dmg")) == 2
    assert dmg.probe(ImageReader.from_bytes(data, name=".dmg")) == 0  # needs len > 4
    assert dmg.probe(ImageReader.from_bytes(data, name="disk.img")) == 0
    assert dmg.probe(ImageReader.from_bytes(b"anything", name="x.dmg")) == 2
    assert dmg.recognise(ImageReader.from_bytes(data))
    assert not dmg.recognise(ImageReader.from_bytes(data[:-1]))
    assert dmg.DRIVER.data_at_start

    path = tmp_path / "disk.img"
    path.write_bytes(data)
    assert qemu_info(path)["format"] == "raw"  # without the suffix qemu does not see a dmg


@pytest.mark.parametrize(("distance", "found"), [(300, True), (600, False)])
def test_koly_is_found_where_qemu_finds_it(tmp_path: Path, distance: int, found: bool) -> None:
    # qemu searches 515 bytes starting 1023 bytes before the (512-rounded) end: a "koly" in the
    # 511 bytes before the trailer wins over the real one, one further away is not seen.
    fork, chunks = default_chunks()
    meta = plist(mish_table(chunks, sector_count=16))
    trailer = koly(xml_offset=len(fork), xml_length=len(meta))
    data = bytearray(fork + meta + bytes(1024) + trailer)
    decoy = len(data) - 512 - distance
    data[decoy : decoy + 4] = b"koly"
    path = tmp_path / "decoy.dmg"
    path.write_bytes(data)

    info = inspect_bytes(bytes(data))

    if found:
        assert info.header["koly_offset"] == decoy
        # The decoy's fields are zeros and plist bytes: qemu refuses the image.
        assert ProblemKind.MALFORMED in [p.kind for p in info.problems]
        with pytest.raises(AssertionError):
            qemu_info(path, "dmg")
    else:
        assert info.header["koly_offset"] == len(data) - 512
        assert info.virtual_size == qemu_info(path, "dmg")["virtual-size"]


@pytest.mark.parametrize(
    ("params", "field", "qemu_error"),
    [
        (
            {"chunks": [(dmg.UDRW, 0, dmg.DMG_SECTORCOUNTS_MAX + 1, 0, 512)]},
            "mish.sector_count",
            "larger than max",
        ),
        (
            {"chunks": [(dmg.UDZO, 0, 1, 0, dmg.DMG_LENGTHS_MAX + 1)]},
            "mish.compressed_length",
            "larger than max",
        ),
        (
            {"chunks": [(dmg.UDZE, 0, 1, 0, dmg.DMG_LENGTHS_MAX + 1)]},
            "mish.compressed_length",
            "larger than max",
        ),
        ({"data_fork_offset": 1 << 40}, "koly.data_fork_offset", "Invalid argument"),
        ({"xml_length": 0}, "koly.xml_length", "Invalid argument"),
        ({"xml_offset": 1 << 40}, "koly.xml_offset", "Invalid argument"),
        ({"sector_count": 1 << 63}, "koly.sector_count", "Invalid argument"),
        ({"sector_count": 1 << 60}, "koly.sector_count", "too large"),
    ],
)
def test_images_qemu_refuses_are_malformed_problems(
    tmp_path: Path, params: dict[str, Any], field: str, qemu_error: str
) -> None:
    path = tmp_path / "bad.dmg"
    path.write_bytes(build(**params))

    info = inspect_bytes(path.read_bytes())

    assert (ProblemKind.MALFORMED, field) in [(p.kind, p.field) for p in info.problems]
    with pytest.raises(AssertionError, match=qemu_error):
        qemu_info(path, "dmg")


def test_huge_sector_count_of_zero_chunks_is_accepted(tmp_path: Path) -> None:
    # qemu only caps sector counts of chunks it must decompress.
    path = tmp_path / "zeros.dmg"
    path.write_bytes(build(chunks=[(dmg.UDZE, 0, 1 << 40, 0, 0)], sector_count=1 << 40))

    info = inspect_bytes(path.read_bytes())

    assert info.virtual_size == qemu_info(path, "dmg")["virtual-size"] == 1 << 49
    assert info.problems == ()


def test_unclosed_data_element_is_refused(tmp_path: Path) -> None:
    data = build()
    data = data.replace(b"</data>", b"</dota>")
    path = tmp_path / "open.dmg"
    path.write_bytes(data)

    info = inspect_bytes(data)

    assert [p.field for p in info.problems] == ["plist"]
    with pytest.raises(AssertionError):
        qemu_info(path, "dmg")


def test_bzip2_chunks_are_skipped_like_qemu_without_the_module() -> None:
    chunks = [(dmg.UDBZ, 0, 1 << 30, 0, 1 << 30), (dmg.UDZE, 0, 16, 0, 0)]

    info = inspect_bytes(build(chunks=chunks))

    assert info.problems == ()
    assert info.header["skipped_chunk_types"] == {"bzip2": 1}


def test_big_plist_is_a_limit_problem(tmp_path: Path) -> None:
    fork, chunks = default_chunks()
    meta = plist(mish_table(chunks, sector_count=16)) + b" " * (2 << 20)
    data = fork + meta + koly(xml_offset=len(fork), xml_length=len(meta))

    info = inspect_bytes(data)

    assert [p.kind for p in info.problems] == [ProblemKind.LIMIT]
    assert info.virtual_size == 16 * 512


def test_glib_base64_quirks() -> None:
    assert dmg._glib_base64_decode(b"aGVs\nbG8=") == b"hello"
    assert dmg._glib_base64_decode(b"aGVsbG8") == b"hel"  # the partial quad is dropped
    assert dmg._glib_base64_decode(b"aG==aGVs") == b"hhel"  # "=" mid-stream
    assert dmg._glib_base64_decode(b"") == b""


def test_tiny_files_are_errors() -> None:
    with pytest.raises(MalformedImage):
        inspect_bytes(b"")
    with pytest.raises(MalformedImage):
        inspect_bytes(bytes(2000))


@pytest.mark.parametrize("cut", [1, 100, 511, 512, 1000, 2000, 3000, -600, -512, -300, -1])
def test_truncations_give_info_or_image_error(cut: int) -> None:
    info_or_image_error(inspect_bytes, build()[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 255)), max_size=12),
    st.booleans(),
    st.integers(0, 5000),
)
def test_mutations_give_info_or_image_error(
    edits: list[tuple[int, int]], use_rsrc: bool, cut: int
) -> None:
    data = bytearray(build(use_rsrc=use_rsrc))
    for offset, value in edits:
        data[-offset] = value
    info_or_image_error(inspect_bytes, bytes(data[: len(data) - cut]))
