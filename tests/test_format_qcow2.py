"""qcow2: real images from qemu-img 7.2 across its options, and crafted oddities beside them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    patched,
    qemu_convert,
    qemu_create,
    qemu_info,
    qemu_refusal,
    raw_with_data,
    run_qemu_img,
)
from imgguard.errors import ImageError
from imgguard.formats import qcow2
from imgguard.model import FeatureKind, ImageInfo, ProblemKind, ReferenceKind
from imgguard.reader import ImageReader, open_image


def inspect(path: Path) -> ImageInfo:
    return qcow2.inspect(ImageReader.from_bytes(path.read_bytes()))


def problem_kinds(info: ImageInfo) -> set[ProblemKind]:
    return {problem.kind for problem in info.problems}


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow2")


@pytest.fixture(scope="module")
def plain(workdir: Path) -> Path:
    return qemu_create(workdir / "plain.qcow2", "qcow2", "1M")


@pytest.fixture(scope="module")
def small_clusters(workdir: Path) -> Path:
    return qemu_create(workdir / "small.qcow2", "qcow2", "1M", ["cluster_size=512"])


@pytest.fixture(scope="module")
def with_backing(workdir: Path, plain: Path) -> Path:
    """A v3 image with a backing file, a backing format and the feature name table."""
    return qemu_create(
        workdir / "overlay.qcow2", "qcow2", "1M", ["backing_file=plain.qcow2", "backing_fmt=qcow2"]
    )


# --- real images across qemu-img's options -------------------------------------------------

CREATE_CASES = [
    pytest.param([], "1M", "v3", id="default"),
    pytest.param(["compat=0.10"], "1M", "v2", id="compat-0.10"),
    pytest.param(["compat=1.1"], "1M", "v3", id="compat-1.1"),
    pytest.param(["cluster_size=512"], "1M", "v3", id="cluster-512"),
    pytest.param(["cluster_size=4096"], "1M", "v3", id="cluster-4k"),
    pytest.param(["cluster_size=65536"], "1M", "v3", id="cluster-64k"),
    pytest.param(["cluster_size=2M"], "4M", "v3", id="cluster-2M"),
    pytest.param(["compat=0.10", "cluster_size=2M"], "4M", "v2", id="v2-cluster-2M"),
    pytest.param(["lazy_refcounts=on"], "1M", "v3", id="lazy-refcounts"),
    pytest.param(["extended_l2=on"], "1M", "v3", id="extended-l2"),
    pytest.param(["extended_l2=on", "cluster_size=16k"], "1M", "v3", id="extended-l2-16k"),
    pytest.param(["compression_type=zstd"], "1M", "v3", id="zstd"),
    pytest.param(["refcount_bits=1"], "1M", "v3", id="refcount-1"),
    pytest.param(["refcount_bits=16"], "1M", "v3", id="refcount-16"),
    pytest.param(["refcount_bits=64"], "1M", "v3", id="refcount-64"),
    pytest.param(["preallocation=metadata"], "2M", "v3", id="prealloc-metadata"),
    pytest.param(["preallocation=falloc"], "2M", "v3", id="prealloc-falloc"),
    pytest.param(["preallocation=full"], "1M", "v3", id="prealloc-full"),
    pytest.param([], "16T", "v3", id="16T-sparse"),
    pytest.param(["cluster_size=512"], "1G", "v3", id="1G-512-byte-clusters"),
    pytest.param([], 1000, "v3", id="size-not-sector-aligned"),
    pytest.param([], 0, "v3", id="empty"),
]


@pytest.mark.parametrize(("options", "size", "variant"), CREATE_CASES)
def test_created_image_matches_qemu_img_info(
    tmp_path: Path, options: list[str], size: str | int, variant: str
) -> None:
    path = qemu_create(tmp_path / "image.qcow2", "qcow2", size, options)
    expected = qemu_info(path, "qcow2")
    specific = expected["format-specific"]["data"]

    info = inspect(path)

    assert info.format == expected["format"] == "qcow2"
    assert info.variant == variant
    assert info.version == (2 if specific["compat"] == "0.10" else 3)
    assert info.virtual_size == expected["virtual-size"]
    assert info.cluster_size == expected["cluster-size"]
    assert info.header["refcount_bits"] == specific["refcount-bits"]
    assert ("lazy_refcounts" in info.feature_names) == specific.get("lazy-refcounts", False)
    assert ("extended_l2" in info.feature_names) == specific.get("extended-l2", False)
    assert info.header.get("compression_type", "zlib") == specific.get("compression-type", "zlib")
    assert info.backing_file is None and info.data_file is None and info.references == ()
    assert not info.encrypted
    # A clean image from qemu-img: no oddities, every table inside the file.
    assert info.problems == ()
    assert {"refcount_table", "l1_table"} <= {t.name for t in info.tables} or size == 0
    for table in info.tables:
        assert table.offset + table.length <= path.stat().st_size
        assert table.offset % info.cluster_size == 0


def test_l1_table_length_is_what_qemu_allocates(tmp_path: Path) -> None:
    # 16 TiB in 64 KiB clusters: one L1 entry maps 8192 clusters (512 MiB) -> 32768 entries.
    path = qemu_create(tmp_path / "big.qcow2", "qcow2", "16T")
    info = inspect(path)
    l1 = next(table for table in info.tables if table.name == "l1_table")
    assert info.header["l1_size"] == 32768
    assert l1.length == 32768 * 8
    refcount = next(table for table in info.tables if table.name == "refcount_table")
    assert refcount.length == info.header["refcount_table_clusters"] * 65536


def test_image_with_guest_data(tmp_path: Path) -> None:
    raw = raw_with_data(tmp_path / "disk.raw", 8 << 20)
    path = qemu_convert(raw, tmp_path / "disk.qcow2", "qcow2", ["cluster_size=4096"])
    expected = qemu_info(path, "qcow2")

    info = inspect(path)

    assert info.virtual_size == expected["virtual-size"] == 8 << 20
    assert info.cluster_size == 4096
    assert info.problems == ()
    # The guest data really is in the file: four 4 KiB data clusters besides the metadata.
    assert path.stat().st_size >= 4 * 4096 + 3 * 4096


def test_open_image_reads_only_the_header_region(plain: Path) -> None:
    with open_image(plain) as (reader, _):
        info = qcow2.inspect(reader)
        assert reader.bytes_read <= 4096
    assert info.virtual_size == 1 << 20


# --- backing files, data files -------------------------------------------------------------


@pytest.mark.parametrize(
    ("backing_format", "absolute"),
    [("qcow2", False), ("qcow2", True), ("raw", False), ("raw", True)],
)
def test_backing_file(tmp_path: Path, backing_format: str, absolute: bool) -> None:
    base = qemu_create(tmp_path / f"base.{backing_format}", backing_format, "2M")
    name = str(base) if absolute else base.name
    path = qemu_create(
        tmp_path / "overlay.qcow2",
        "qcow2",
        "2M",
        [f"backing_file={name}", f"backing_fmt={backing_format}"],
    )
    expected = qemu_info(path, "qcow2")

    info = inspect(path)

    assert info.backing_file == expected["backing-filename"] == name
    assert info.backing_format == expected["backing-filename-format"] == backing_format
    assert info.virtual_size == expected["virtual-size"]
    (reference,) = info.references
    assert reference.kind is ReferenceKind.BACKING_FILE
    assert reference.target == name
    assert reference.field == "backing_file_offset"
    assert reference.offset == info.header["backing_file_offset"]
    assert info.problems == ()


def test_v2_backing_file(tmp_path: Path) -> None:
    qemu_create(tmp_path / "base.qcow2", "qcow2", "1M")
    path = qemu_create(
        tmp_path / "v2.qcow2",
        "qcow2",
        "1M",
        ["compat=0.10", "backing_file=base.qcow2", "backing_fmt=qcow2"],
    )
    expected = qemu_info(path, "qcow2")
    info = inspect(path)
    assert info.variant == "v2"
    assert info.backing_file == expected["backing-filename"] == "base.qcow2"
    assert info.backing_format == expected["backing-filename-format"] == "qcow2"


def test_backing_file_without_format(tmp_path: Path, with_backing: Path) -> None:
    # qemu-img 7.2 will not create this any more ("backing format must be specified"), but
    # older ones did: end the extensions where the backing format extension starts.
    data = with_backing.read_bytes()
    at = data.index(u32(0xE2792ACA))
    path = patched(with_backing, tmp_path / "noformat.qcow2", (at, u32(0)))
    expected = qemu_info(path, "qcow2")

    info = inspect(path)

    assert "backing-filename-format" not in expected
    assert info.backing_file == expected["backing-filename"] == "plain.qcow2"
    assert info.backing_format is None


@pytest.mark.parametrize("raw_data", [False, True])
def test_external_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw_data: bool
) -> None:
    monkeypatch.chdir(tmp_path)  # qemu-img creates a relative data file in its working directory
    options = ["data_file=guest-data.raw"] + (["data_file_raw=on"] if raw_data else [])
    path = qemu_create(tmp_path / "meta.qcow2", "qcow2", "1M", options)
    expected = qemu_info(path, "qcow2")["format-specific"]["data"]

    info = inspect(path)

    assert info.data_file == expected["data-file"] == "guest-data.raw"
    assert ("raw_external_data" in info.feature_names) == expected["data-file-raw"] == raw_data
    feature = next(f for f in info.features if f.name == "external_data_file")
    assert feature.kind is FeatureKind.INCOMPATIBLE and feature.bit == 2 and feature.known
    (reference,) = info.references
    assert reference.kind is ReferenceKind.DATA_FILE
    assert reference.target == "guest-data.raw"
    assert reference.field == "external_data_file_name"
    assert info.problems == ()


def test_data_file_name_without_the_feature_bit_is_still_a_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = qemu_create(tmp_path / "meta.qcow2", "qcow2", "1M", ["data_file=elsewhere.raw"])
    path = patched(source, tmp_path / "nobit.qcow2", (72, u64(0)))
    # qemu-img info still shows the name, although qemu keeps the data in the image file.
    assert qemu_info(path, "qcow2")["format-specific"]["data"]["data-file"] == "elsewhere.raw"

    info = inspect(path)

    assert info.data_file == "elsewhere.raw"
    assert [r.kind for r in info.references] == [ReferenceKind.DATA_FILE]
    assert "external_data_file" not in info.feature_names
    assert ProblemKind.INCONSISTENT in problem_kinds(info)


def test_data_file_bit_without_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = qemu_create(tmp_path / "meta.qcow2", "qcow2", "1M", ["data_file=elsewhere.raw"])
    at = source.read_bytes().index(u32(0x44415441))
    path = patched(source, tmp_path / "noname.qcow2", (at, u32(0)))
    # qemu-img info opens it (it reads no guest data); reading the data needs a data-file option.
    assert "data-file" not in qemu_info(path, "qcow2")["format-specific"]["data"]

    info = inspect(path)

    assert "external_data_file" in info.feature_names
    assert info.data_file is None
    assert info.references == ()
    assert any(p.field == "incompatible_features" for p in info.problems)


def test_backing_file_with_raw_external_data(tmp_path: Path, with_backing: Path) -> None:
    # The spec calls the pair incompatible; qemu-img 7.2 refuses to create it.
    path = patched(with_backing, tmp_path / "both.qcow2", (88, u64(0b10)))
    info = inspect(path)
    assert info.backing_file == "plain.qcow2"
    assert any("incompatible" in p.message for p in info.problems)


# --- bitmaps, snapshots, encryption --------------------------------------------------------


def test_bitmaps_and_snapshots(tmp_path: Path) -> None:
    path = qemu_create(tmp_path / "bitmaps.qcow2", "qcow2", "1M")
    run_qemu_img("bitmap", "--add", str(path), "b0")
    run_qemu_img("bitmap", "--add", str(path), "b1")
    for name in ("s1", "s2", "s3"):
        run_qemu_img("snapshot", "-c", name, str(path))
    expected = qemu_info(path, "qcow2")

    info = inspect(path)

    assert "bitmaps" in info.feature_names
    assert info.header["nb_bitmaps"] == len(expected["format-specific"]["data"]["bitmaps"]) == 2
    assert info.header["nb_snapshots"] == len(expected["snapshots"]) == 3
    tables = {table.name: table for table in info.tables}
    assert tables["bitmap_directory"].length == info.header["bitmap_directory_size"] > 0
    # Each snapshot entry is at least 40 bytes; the exact length needs a walk.
    assert tables["snapshot_table"].length == 3 * 40
    assert tables["snapshot_table"].offset == info.header["snapshots_offset"]
    assert info.problems == ()


def test_bitmaps_extension_ignored_without_the_autoclear_bit(tmp_path: Path) -> None:
    source = qemu_create(tmp_path / "bitmaps.qcow2", "qcow2", "1M")
    run_qemu_img("bitmap", "--add", str(source), "b0")
    path = patched(source, tmp_path / "cleared.qcow2", (88, u64(0)))
    # A program without bitmap support cleared the bit: qemu warns and ignores the bitmaps.
    assert "bitmaps" not in qemu_info(path, "qcow2")["format-specific"]["data"]
    info = inspect(path)
    assert "bitmap_directory" not in {table.name for table in info.tables}
    # The spec's own mechanism, not an inconsistency: a fact, no problem.
    assert info.header["bitmaps_ignored"] and info.problems == ()


def test_luks_encryption(tmp_path: Path) -> None:
    path = qemu_create(
        tmp_path / "luks.qcow2",
        "qcow2",
        "1M",
        ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10"],
        secret=True,
    )
    expected = qemu_info(path, "qcow2")

    info = inspect(path)

    assert info.encrypted is expected["encrypted"] is True
    assert info.encryption is not None
    assert info.encryption.method == expected["format-specific"]["data"]["encrypt"]["format"]
    assert any(slot.active for slot in info.encryption.key_slots)
    crypto = next(table for table in info.tables if table.name == "crypto_header")
    assert crypto.offset == info.header["crypto_header_offset"]
    assert not crypto.loaded_at_open
    assert info.virtual_size == expected["virtual-size"]
    assert info.problems == ()


def test_luks_header_missing_where_the_extension_points(tmp_path: Path) -> None:
    source = qemu_create(
        tmp_path / "luks.qcow2",
        "qcow2",
        "1M",
        ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10"],
        secret=True,
    )
    crypto_offset = inspect(source).header["crypto_header_offset"]
    path = patched(source, tmp_path / "wiped.qcow2", (crypto_offset, b"\0" * 8))

    info = inspect(path)

    assert info.encrypted
    assert info.encryption is not None and info.encryption.method == "luks"
    assert ProblemKind.MALFORMED in problem_kinds(info)


def test_legacy_aes_encryption(tmp_path: Path) -> None:
    # qemu-img 7.2 still creates (and opens) AES-CBC qcow2; system emulators refuse it.
    path = qemu_create(
        tmp_path / "aes.qcow2",
        "qcow2",
        "1M",
        ["encrypt.format=aes", "encrypt.key-secret=sec0"],
        secret=True,
    )
    expected = qemu_info(path, "qcow2")

    info = inspect(path)

    assert info.header["crypt_method"] == 1
    assert info.encrypted is expected["encrypted"] is True
    assert info.encryption is not None
    assert info.encryption.method == expected["format-specific"]["data"]["encrypt"]["format"]
    assert info.encryption.method == "aes"


def test_crafted_aes_flag_on_a_plain_image(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "aes.qcow2", (32, u32(1)))
    assert qemu_info(path, "qcow2")["encrypted"] is True
    info = inspect(path)
    assert info.encrypted and info.encryption is not None and info.encryption.method == "aes"


def test_luks_method_without_encryption_header(tmp_path: Path, plain: Path) -> None:
    # qemu-img 7.2 crashes on this one; imgguard reports it.
    path = patched(plain, tmp_path / "luks-nohdr.qcow2", (32, u32(2)))
    info = inspect(path)
    assert info.encrypted
    assert any(p.kind is ProblemKind.MALFORMED and p.field == "crypt_method" for p in info.problems)


def test_unknown_encryption_method(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "crypt5.qcow2", (32, u32(5)))
    assert "Unsupported encryption method 5" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    assert info.encrypted
    assert any(
        p.kind is ProblemKind.UNSUPPORTED and p.field == "crypt_method" for p in info.problems
    )


# --- crafted oddities ----------------------------------------------------------------------


def test_backing_name_is_a_c_string(tmp_path: Path, with_backing: Path) -> None:
    # "plain.qcow2\0hidden": qemu stops at the NUL, and so does imgguard.
    offset = inspect(with_backing).header["backing_file_offset"]
    path = patched(
        with_backing, tmp_path / "nul.qcow2", (16, u32(18)), (offset, b"plain.qcow2\0hidden")
    )
    expected = qemu_info(path, "qcow2")
    info = inspect(path)
    assert info.backing_file == expected["backing-filename"] == "plain.qcow2"


def test_backing_name_that_is_not_utf8(tmp_path: Path, with_backing: Path) -> None:
    offset = inspect(with_backing).header["backing_file_offset"]
    path = patched(with_backing, tmp_path / "latin1.qcow2", (16, u32(7)), (offset, b"pl\xe9in.q"))
    info = inspect(path)
    assert info.backing_file is not None
    assert info.backing_file.encode("utf-8", errors="surrogateescape") == b"pl\xe9in.q"


def test_backing_name_inside_the_header(tmp_path: Path, plain: Path) -> None:
    # The name starts at byte 4 (the version field, "\0\0\0\3"): an empty C string, and the
    # extension area ends before it begins.
    path = patched(plain, tmp_path / "inheader.qcow2", (8, u64(4)), (16, u32(8)))
    assert "backing-filename" not in qemu_info(path, "qcow2")
    info = inspect(path)
    assert info.backing_file is None
    assert "feature_table_entries" not in info.header  # qemu does not read the extensions
    assert {p.kind for p in info.problems} == {ProblemKind.INCONSISTENT}


def test_backing_name_crossing_the_first_cluster(tmp_path: Path, small_clusters: Path) -> None:
    path = patched(
        small_clusters, tmp_path / "cross.qcow2", (8, u64(500)), (16, u32(20)), (500, b"x" * 20)
    )
    assert "Backing file name too long" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    # qemu refuses, but the name is still reported for the policy to see.
    assert info.backing_file == "x" * 20
    assert any(
        p.kind is ProblemKind.LIMIT and p.field == "backing_file_size" for p in info.problems
    )


def test_backing_offset_past_the_first_cluster(tmp_path: Path, plain: Path) -> None:
    data = plain.read_bytes()
    path = patched(plain, tmp_path / "far.qcow2", (8, u64(len(data))), (16, u32(8)))
    with path.open("ab") as file:
        file.write(b"far.img\0")
    assert "Invalid backing file offset" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    assert info.backing_file == "far.img"
    assert any(p.field == "backing_file_offset" for p in info.problems)


def test_backing_name_past_end_of_file(tmp_path: Path, small_clusters: Path) -> None:
    data = small_clusters.read_bytes()[:400]
    path = tmp_path / "short.qcow2"
    path.write_bytes(data)
    path = patched(path, path, (8, u64(390)), (16, u32(20)), (390, b"0123456789"))
    info = inspect(path)
    # qemu reads zeros past the end: the name is what the file holds.
    assert info.backing_file == "0123456789"
    assert ProblemKind.TRUNCATED in problem_kinds(info)


def test_tables_past_end_of_file_are_reported(tmp_path: Path, plain: Path) -> None:
    path = tmp_path / "cut.qcow2"
    path.write_bytes(plain.read_bytes()[:0x20000])
    # qemu opens it: it reads zeros past the end of the file.
    assert qemu_info(path, "qcow2")["virtual-size"] == 1 << 20

    info = inspect(path)

    assert info.virtual_size == 1 << 20
    l1 = next(table for table in info.tables if table.name == "l1_table")
    assert l1.offset + l1.length > path.stat().st_size
    assert any(
        p.kind is ProblemKind.TRUNCATED and p.field == "l1_table_offset" for p in info.problems
    )


def test_header_length_below_104(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "short-header.qcow2", (100, u32(96)))
    assert "header too short" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    assert any(p.field == "header_length" for p in info.problems)


@pytest.mark.parametrize(
    ("offset", "value", "name", "kind"),
    [
        (72, 1 << 7, "incompatible_bit_7", FeatureKind.INCOMPATIBLE),
        (80, 1 << 3, "compatible_bit_3", FeatureKind.COMPATIBLE),
        (88, 1 << 5, "autoclear_bit_5", FeatureKind.AUTOCLEAR),
    ],
)
def test_unknown_feature_bits(
    tmp_path: Path, plain: Path, offset: int, value: int, name: str, kind: FeatureKind
) -> None:
    path = patched(plain, tmp_path / "bits.qcow2", (offset, u64(value)))
    info = inspect(path)
    (feature,) = info.features
    assert (feature.name, feature.kind, feature.known) == (name, kind, False)
    if kind is FeatureKind.INCOMPATIBLE:
        assert "Unsupported qcow2 feature" in qemu_refusal(path, "qcow2")
        assert problem_kinds(info) == {ProblemKind.UNSUPPORTED}
    else:
        qemu_info(path, "qcow2")  # qemu ignores (or clears) these
        assert info.problems == ()


def test_corrupt_and_dirty_bits_are_features(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "corrupt.qcow2", (72, u64(0b11)))
    assert qemu_info(path, "qcow2")["format-specific"]["data"]["corrupt"] is True
    info = inspect(path)
    assert set(info.feature_names) == {"dirty", "corrupt"}


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unsupported_versions(tmp_path: Path, plain: Path, version: int) -> None:
    path = patched(plain, tmp_path / "version.qcow2", (4, u32(version)))
    info = inspect(path)
    assert info.variant == f"v{version}"
    assert any(p.kind is ProblemKind.UNSUPPORTED and p.field == "version" for p in info.problems)
    if version > 3:
        assert "Unsupported qcow2 version" in qemu_refusal(path, "qcow2")
        assert info.virtual_size == 1 << 20  # facts read as v3


@pytest.mark.parametrize("cluster_bits", [8, 22, 0xFFFFFFFF])
def test_cluster_bits_out_of_range(tmp_path: Path, plain: Path, cluster_bits: int) -> None:
    path = patched(plain, tmp_path / "bits.qcow2", (20, u32(cluster_bits)))
    assert "Unsupported cluster size" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    assert info.cluster_size is None
    assert any(p.field == "cluster_bits" for p in info.problems)


def test_oversized_tables(tmp_path: Path, plain: Path) -> None:
    path = patched(
        plain,
        tmp_path / "huge.qcow2",
        (36, u32(0xFFFFFFFF)),  # l1_size
        (56, u32(0xFFFFFFFF)),  # refcount_table_clusters
        (60, u32(0xFFFFFFFF)),  # nb_snapshots
        (64, u64(0x50000)),  # snapshots_offset
    )
    assert "too large" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    limits = {p.field for p in info.problems if p.kind is ProblemKind.LIMIT}
    assert limits == {"l1_size", "refcount_table_clusters", "nb_snapshots"}
    tables = {table.name: table for table in info.tables}
    assert tables["l1_table"].length == 0xFFFFFFFF * 8
    assert tables["refcount_table"].length == 0xFFFFFFFF * 65536


def test_l1_table_too_small_for_the_size(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "bigger.qcow2", (24, u64(1 << 40)))
    assert "L1 table is too small" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    assert any(p.field == "l1_size" for p in info.problems)


def test_misaligned_table_offset(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "misaligned.qcow2", (40, u64(0x30008)), (48, u64(0x10008)))
    assert "offset invalid" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    fields = {p.field for p in info.problems if p.kind is ProblemKind.MALFORMED}
    assert fields == {"l1_table_offset", "refcount_table_offset"}


def test_extension_running_past_its_area(tmp_path: Path, plain: Path) -> None:
    path = patched(plain, tmp_path / "ext.qcow2", (112 + 4, u32(0x100000)))
    assert "Header extension too large" in qemu_refusal(path, "qcow2")
    info = inspect(path)
    assert any(p.field == "header_extension.len" for p in info.problems)


def test_unknown_extensions_are_listed(tmp_path: Path, plain: Path) -> None:
    path = patched(
        plain,
        tmp_path / "ext.qcow2",
        (112, u32(0x12345678) + u32(3) + b"abc\0\0\0\0\0" + u64(0)),  # then an end marker
    )
    qemu_info(path, "qcow2")  # qemu keeps unknown extensions
    assert inspect(path).header["unknown_extensions"] == (0x12345678,)


def test_extension_count_is_capped(tmp_path: Path, plain: Path) -> None:
    # 8000 empty unknown extensions fill the first 64 KiB cluster.
    records = (u32(0x0BADF00D) + u32(0)) * 8000
    path = patched(plain, tmp_path / "many.qcow2", (112, records))
    info = inspect(path)
    assert any(p.kind is ProblemKind.LIMIT for p in info.problems)
    assert len(info.header["unknown_extensions"]) == qcow2.MAX_EXTENSIONS


# --- probe ---------------------------------------------------------------------------------


def test_probe(tmp_path: Path, plain: Path) -> None:
    assert qcow2.probe(ImageReader.from_bytes(plain.read_bytes())) == 100
    qcow1 = qemu_create(tmp_path / "v1.qcow", "qcow", "1M")
    assert qcow2.probe(ImageReader.from_bytes(qcow1.read_bytes())) == 0
    assert qcow2.probe(ImageReader.from_bytes(b"QFI\xfb\0\0\0\x02")) == 100
    assert qcow2.probe(ImageReader.from_bytes(b"QFI\xfb")) == 0
    assert qcow2.probe(ImageReader.from_bytes(b"")) == 0
    assert qcow2.probe(ImageReader.from_bytes(b"\0" * 4096)) == 0


# --- robustness ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rich_image(workdir: Path, plain: Path) -> bytes:
    """Backing file, backing format, data file, feature table, bitmaps: every extension kind."""
    path = qemu_create(
        workdir / "rich.qcow2",
        "qcow2",
        "1M",
        ["backing_file=plain.qcow2", "backing_fmt=qcow2", f"data_file={workdir / 'rich.data'}"],
    )
    run_qemu_img("bitmap", "--add", str(path), "b0")
    return path.read_bytes()


def _outcome(data: bytes) -> ImageInfo | ImageError:
    try:
        return qcow2.inspect(ImageReader.from_bytes(data))
    except ImageError as error:
        return error


@pytest.mark.parametrize("length", [0, 8, 71, 72, 100, 104, 111, 112, 200, 0x230, 4096, 0x10000])
def test_truncated_image(rich_image: bytes, length: int) -> None:
    outcome = _outcome(rich_image[:length])
    if length < 72:
        assert isinstance(outcome, ImageError)
    else:
        assert isinstance(outcome, ImageInfo)
        assert outcome.virtual_size == 1 << 20


HEADER_FIELDS = [(4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8)]
HEADER_FIELDS += [(48, 8), (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4)]
HEADER_FIELDS += [(100, 4), (104, 1)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(HEADER_FIELDS),
    value=st.one_of(
        st.integers(0, 8), st.integers(0, 1 << 21), st.sampled_from([2**32 - 1, 2**63, 2**64 - 1])
    ),
    flips=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=6),
)
def test_mutated_header_only_yields_facts_or_image_errors(
    rich_image: bytes, field: tuple[int, int], value: int, flips: list[tuple[int, int]]
) -> None:
    offset, width = field
    data = bytearray(rich_image[:0x20000])
    data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
    for at, byte in flips:
        data[at] = byte
    assert isinstance(_outcome(bytes(data)), ImageInfo | ImageError)
