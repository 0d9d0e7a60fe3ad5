"""vpc (VHD): real qemu-img images across subformats and sizes, and hand-built ones for what
qemu-img cannot make (differencing disks, other creator applications)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import info_or_image_error, qemu_convert, qemu_create, qemu_info, raw_with_data
from imgguard.errors import ImageError
from imgguard.formats import vpc
from imgguard.model import ImageInfo, ProblemKind, ReferenceKind
from imgguard.reader import ImageReader, open_image

MiB = 1 << 20


def inspect_path(path: Path) -> tuple[ImageInfo, ImageReader]:
    with open_image(path) as (reader, _stat):
        return vpc.inspect(reader), reader


def inspect_bytes(data: bytes) -> ImageInfo:
    return vpc.inspect(ImageReader.from_bytes(data))


def with_checksum(block: bytes, offset: int) -> bytes:
    data = bytearray(block)
    data[offset : offset + 4] = bytes(4)
    data[offset : offset + 4] = (~sum(data) & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def edit_footer(data: bytes, footer_offset: int, **fields: object) -> bytes:
    """Change footer fields by name and fix the checksum (and the copy at the end)."""
    footer = vpc.FOOTER.parse(data[footer_offset : footer_offset + 512])
    footer.update(fields)
    raw = with_checksum(vpc.FOOTER.build(footer), vpc.CHECKSUM_OFFSET_FOOTER)
    out = bytearray(data)
    out[footer_offset : footer_offset + 512] = raw
    if footer_offset == 0 and data[-512:] == data[:512]:
        out[-512:] = raw
    return bytes(out)


# --- qemu-img images --------------------------------------------------------------------------

# (subformat, size, extra options): CHS-exact and not, force_size, the 2040 GiB maximum.
CREATED = [
    ("dynamic", "1M", ()),
    ("dynamic", "10M", ()),
    ("dynamic", "127M", ()),
    ("dynamic", "1G", ()),
    ("dynamic", 100000512, ()),
    ("dynamic", "2040G", ()),
    ("dynamic", "1M", ("force_size=on",)),
    ("dynamic", 100000512, ("force_size=on",)),
    ("dynamic", "2040G", ("force_size=on",)),
    ("fixed", "1M", ()),
    ("fixed", "10M", ()),
    ("fixed", 100000512, ()),
    ("fixed", "10M", ("force_size=on",)),
]


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("vpc")
    return {
        index: qemu_create(root / f"c{index}.vhd", "vpc", size, [f"subformat={sub}", *options])
        for index, (sub, size, options) in enumerate(CREATED)
    }


@pytest.mark.parametrize(
    "index",
    range(len(CREATED)),
    ids=lambda i: "-".join([CREATED[i][0], str(CREATED[i][1]), *CREATED[i][2]]),
)
def test_qemu_img_created_images_match_qemu_info(created: dict[int, Path], index: int) -> None:
    subformat, _size, options = CREATED[index]
    path = created[index]
    info, reader = inspect_path(path)
    qemu = qemu_info(path, "vpc")
    assert info.format == qemu["format"] == "vpc"
    assert info.variant == subformat
    assert info.virtual_size == qemu["virtual-size"]
    assert info.cluster_size == qemu.get("cluster-size")
    assert info.problems == ()
    assert info.references == ()
    # qemu-img 7.2 writes "qemu" (CHS sizing), or "qem2" (current_size) with force_size.
    assert info.header["creator_app"] == ("qem2" if options else "qemu")
    # Past 127 GiB qemu-img stores the maximum geometry, which makes current_size count.
    geometry = info.header["cyls"] * info.header["heads"] * info.header["secs_per_cyl"]
    max_geometry = geometry == vpc.VHD_MAX_GEOMETRY
    assert info.header["size_rule"] == ("current_size" if options or max_geometry else "chs")
    if subformat == "fixed":
        # The footer is only at the end: qemu's prober does not see it and says raw.
        assert vpc.probe(reader) == 0
        assert vpc.recognise(reader)
        assert qemu_info(path)["format"] == "raw"
        assert info.tables == ()
        assert info.header["footer_offset"] == path.stat().st_size - 512
    else:
        assert vpc.probe(reader) == 100
        assert not vpc.recognise(reader)
        bat = info.tables[0]
        assert (bat.name, bat.offset) == ("bat", info.header["table_offset"])
        assert bat.length == info.header["max_table_entries"] * 4
    assert reader.bytes_read <= 8192


def test_driver_declares_guest_data_at_start() -> None:
    assert vpc.DRIVER.data_at_start
    assert vpc.DRIVER.recognise is vpc.recognise


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_image_with_data(tmp_path: Path, subformat: str) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 24 * MiB)
    path = qemu_convert(raw, tmp_path / "disk.vhd", "vpc", [f"subformat={subformat}"])
    info, _ = inspect_path(path)
    assert info.virtual_size == qemu_info(path, "vpc")["virtual-size"]
    assert info.problems == ()
    if subformat == "dynamic":
        assert info.header["allocated_blocks"] == 4  # four spread-out writes, 2 MiB blocks


def test_truncated_dynamic_disk_is_refused_like_qemu(tmp_path: Path) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 24 * MiB)
    path = qemu_convert(raw, tmp_path / "disk.vhd", "vpc", ["subformat=dynamic"])
    data = path.read_bytes()
    cut = tmp_path / "cut.vhd"
    cut.write_bytes(data[: len(data) - 3 * MiB])
    info, _ = inspect_path(cut)
    assert info.truncated
    with pytest.raises(AssertionError, match="truncated"):
        qemu_info(cut, "vpc")


# --- creator application and size rules --------------------------------------------------------


@pytest.mark.parametrize(
    ("creator_app", "rule"),
    [
        (b"qemu", "chs"),
        (b"vpc ", "chs"),
        (b"win ", "current_size"),
        (b"qem2", "current_size"),
        (b"d2v ", "current_size"),
        (b"CTXS", "current_size"),
        (b"tap\0", "current_size"),
        # Unknown in qemu 7.2, so CHS (qemu 9.2 would trust current_size).
        (b"wa\0\0", "chs"),
        (b"tap ", "chs"),
    ],
)
def test_creator_app_decides_the_size_rule_as_in_qemu(
    tmp_path: Path, creator_app: bytes, rule: str
) -> None:
    path = qemu_create(tmp_path / "base.vhd", "vpc", "10M", ["subformat=dynamic"])
    edited = edit_footer(path.read_bytes(), 0, creator_app=creator_app, current_size=8 * MiB)
    path.write_bytes(edited)
    info = inspect_bytes(edited)
    assert info.header["size_rule"] == rule
    assert info.virtual_size == (8 * MiB if rule == "current_size" else 10514432)
    assert info.virtual_size == qemu_info(path, "vpc")["virtual-size"]


def test_max_chs_geometry_means_current_size(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "base.vhd", "vpc", "10M", ["subformat=dynamic"])
    edited = edit_footer(path.read_bytes(), 0, cyls=65535, heads=16, secs_per_cyl=255)
    path.write_bytes(edited)
    info = inspect_bytes(edited)
    assert info.virtual_size == 10514432 == qemu_info(path, "vpc")["virtual-size"]
    assert info.header["size_rule"] == "current_size"


def test_over_2040_gib_is_refused(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "base.vhd", "vpc", "10M", ["subformat=dynamic"])
    size = (vpc.VHD_MAX_SECTORS + 1) * 512
    edited = edit_footer(path.read_bytes(), 0, creator_app=b"win ", current_size=size)
    path.write_bytes(edited)
    info = inspect_bytes(edited)
    assert info.virtual_size == size
    assert any(p.kind is ProblemKind.LIMIT for p in info.problems)
    with pytest.raises(AssertionError, match="File too large"):
        qemu_info(path, "vpc")


# --- what qemu refuses or reinterprets ---------------------------------------------------------


def test_bad_footer_checksum_is_refused(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "d.vhd", "vpc", "1M", ["subformat=dynamic"])
    data = bytearray(path.read_bytes())
    data[64:68] = b"\x01\x02\x03\x04"
    path.write_bytes(data)
    info = inspect_bytes(bytes(data))
    assert [p.field for p in info.problems if p.kind is ProblemKind.MALFORMED] == [
        "footer.checksum"
    ]
    with pytest.raises(AssertionError, match="Incorrect header checksum"):
        qemu_info(path, "vpc")


def test_fixed_footer_at_end_must_say_fixed(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "f.vhd", "vpc", "1M", ["subformat=fixed"])
    data = path.read_bytes()
    edited = edit_footer(data, len(data) - 512, type=3)
    path.write_bytes(edited)
    assert not vpc.recognise(ImageReader.from_bytes(edited))
    with pytest.raises(ImageError):
        inspect_bytes(edited)
    with pytest.raises(AssertionError, match="invalid VPC image"):
        qemu_info(path, "vpc")


def test_unknown_type_at_offset_zero_opens_as_dynamic(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "d.vhd", "vpc", "1M", ["subformat=dynamic"])
    edited = edit_footer(path.read_bytes(), 0, type=9)
    path.write_bytes(edited)
    info = inspect_bytes(edited)
    assert info.variant == "dynamic"
    assert info.header["type"] == 9
    assert info.virtual_size == qemu_info(path, "vpc")["virtual-size"]
    assert any(p.field == "footer.type" for p in info.problems)


def test_missing_dynamic_header_is_refused(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "d.vhd", "vpc", "1M", ["subformat=dynamic"])
    edited = edit_footer(path.read_bytes(), 0, data_offset=1 << 40)
    path.write_bytes(edited)
    info = inspect_bytes(edited)
    assert any(p.field == "dynamic_header.cookie" for p in info.problems)
    with pytest.raises(AssertionError, match="Invalid header magic"):
        qemu_info(path, "vpc")


def test_not_a_vhd() -> None:
    with pytest.raises(ImageError):
        inspect_bytes(bytes(4096))
    with pytest.raises(ImageError):
        inspect_bytes(b"abc")
    assert vpc.probe(ImageReader.from_bytes(b"conectix")) == 100
    assert not vpc.recognise(ImageReader.from_bytes(bytes(4096)))


# --- differencing disks (qemu-img cannot create them) ------------------------------------------

PARENT_UUID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")


def build_differencing(parent_name: str, locators: list[tuple[bytes, bytes]]) -> bytes:
    """footer, dynamic header, BAT, locator data, footer copy: an 8 MiB differencing disk."""
    size = 8 * MiB
    data_start = 512 + 1024 + 512
    locator_blobs = b""
    entries = []
    for code, payload in locators:
        entries.append(
            dict(
                platform_code=code,
                platform_data_space=1,
                platform_data_length=len(payload),
                reserved=0,
                platform_data_offset=data_start + len(locator_blobs),
            )
        )
        locator_blobs += payload.ljust(512, b"\0")
    entries += [
        dict(
            platform_code=bytes(4),
            platform_data_space=0,
            platform_data_length=0,
            reserved=0,
            platform_data_offset=0,
        )
    ] * (8 - len(entries))
    dynamic = vpc.DYNAMIC_HEADER.build(
        dict(
            cookie=vpc.DYNAMIC_COOKIE,
            data_offset=2**64 - 1,
            table_offset=1536,
            header_version=0x10000,
            max_table_entries=4,
            block_size=2 * MiB,
            checksum=0,
            parent_uuid=PARENT_UUID.bytes,
            parent_timestamp=0,
            reserved=0,
            parent_unicode_name=parent_name.encode("utf-16-be").ljust(512, b"\0"),
            parent_locators=entries,
            reserved2=bytes(256),
        )
    )
    dynamic = with_checksum(dynamic, vpc.CHECKSUM_OFFSET_DYNAMIC)
    footer = vpc.FOOTER.build(
        dict(
            cookie=vpc.COOKIE,
            features=2,
            version=0x10000,
            data_offset=512,
            timestamp=0,
            creator_app=b"win ",
            creator_version=0x000A0000,
            creator_os=b"Wi2k",
            orig_size=size,
            current_size=size,
            cyls=963,
            heads=4,
            secs_per_cyl=17,
            type="differencing",
            checksum=0,
            uuid=uuid.uuid4().bytes,
            in_saved_state=0,
            reserved=bytes(427),
        )
    )
    footer = with_checksum(footer, vpc.CHECKSUM_OFFSET_FOOTER)
    bat = b"\xff" * 16 + bytes(512 - 16)
    return footer + dynamic + bat + locator_blobs + footer


def test_differencing_disk_references(tmp_path: Path) -> None:
    locators = [
        (b"W2ku", "C:\\vms\\base.vhd".encode("utf-16-le")),
        (b"W2ru", ".\\base.vhd".encode("utf-16-le")),
        (b"MacX", b"file://localhost/Users/me/base.vhd"),
    ]
    data = build_differencing("base.vhd", locators)
    path = tmp_path / "child.vhd"
    path.write_bytes(data)
    info = inspect_bytes(data)
    assert info.variant == "differencing"
    targets = [(r.kind, r.target) for r in info.references]
    assert targets == [
        (ReferenceKind.PARENT_HINT, "base.vhd"),
        (ReferenceKind.PARENT_UUID, str(PARENT_UUID)),
        (ReferenceKind.PARENT_LOCATOR, "C:\\vms\\base.vhd"),
        (ReferenceKind.PARENT_LOCATOR, ".\\base.vhd"),
        (ReferenceKind.PARENT_LOCATOR, "file://localhost/Users/me/base.vhd"),
    ]
    assert info.references[0].offset == 512 + vpc.PARENT_NAME_OFFSET
    assert info.references[2].offset == 2048
    assert info.references[2].field.endswith("[W2ku]")
    assert any(p.kind is ProblemKind.UNSUPPORTED for p in info.problems)
    # qemu 7.2 opens it as a plain dynamic disk: no backing file, same size.
    qemu = qemu_info(path, "vpc")
    assert "backing-filename" not in qemu
    assert info.virtual_size == qemu["virtual-size"] == 8 * MiB
    assert info.backing_file is None


def test_locator_data_past_the_end_is_a_problem() -> None:
    data = bytearray(build_differencing("p.vhd", [(b"W2ku", "x.vhd".encode("utf-16-le"))]))
    # Point the first locator far past the end of the file.
    entry = 512 + vpc.PARENT_LOCATORS_OFFSET
    data[entry + 16 : entry + 24] = (1 << 40).to_bytes(8, "big")
    info = inspect_bytes(bytes(data))
    assert [r.kind for r in info.references] == [
        ReferenceKind.PARENT_HINT,
        ReferenceKind.PARENT_UUID,
    ]
    assert any(p.kind is ProblemKind.TRUNCATED for p in info.problems)


# --- robustness --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("vpc-small")
    raw = raw_with_data(root / "d.raw", 4 * MiB)
    dynamic = qemu_convert(raw, root / "d.vhd", "vpc", ["subformat=dynamic"]).read_bytes()
    fixed = qemu_create(root / "f.vhd", "vpc", "1M", ["subformat=fixed"]).read_bytes()
    diff = build_differencing("base.vhd", [(b"W2ku", "C:\\b.vhd".encode("utf-16-le"))])
    return [dynamic, fixed, diff]


def test_truncation_yields_info_or_image_error(small_images: list[bytes]) -> None:
    for data in small_images:
        for cut in (0, 7, 8, 100, 511, 512, 513, 1024, 1535, 1536, 2047, 2048, len(data) - 1):
            info_or_image_error(inspect_bytes, data[:cut])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 2),
    edits=st.lists(st.tuples(st.integers(0, 2559), st.integers(0, 255)), min_size=1, max_size=8),
    from_end=st.booleans(),
)
def test_mutated_headers_yield_info_or_image_error(
    small_images: list[bytes], which: int, edits: list[tuple[int, int]], from_end: bool
) -> None:
    data = bytearray(small_images[which])
    for position, value in edits:
        index = len(data) - 1 - (position % 512) if from_end else position % len(data)
        data[index] = value
    info_or_image_error(inspect_bytes, bytes(data))
