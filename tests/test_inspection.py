"""Detection end to end: imgguard.inspect agrees with qemu-img on every image qemu-img makes."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import imgguard
from conftest import qemu_convert, qemu_info, raw_with_data
from imgguard import ImageError, NotARegularFile, UnreadableImage

MakeImage = Callable[..., Path]

# (format, options, size) across the option space qemu-img offers.
CREATED = [
    ("raw", (), "64M"),
    ("qcow2", ("compat=0.10",), "64M"),
    ("qcow2", ("compat=1.1", "cluster_size=512"), "64M"),
    ("qcow2", ("cluster_size=2M", "lazy_refcounts=on"), "1G"),
    ("qcow2", ("extended_l2=on", "compression_type=zstd"), "1G"),
    ("qcow2", ("preallocation=metadata",), "16M"),
    ("qcow", (), "64M"),
    ("qed", (), "64M"),
    ("vmdk", ("subformat=monolithicSparse",), "64M"),
    ("vmdk", ("subformat=streamOptimized",), "64M"),
    ("vmdk", ("compat6=on",), "64M"),
    ("vpc", ("subformat=dynamic",), "64M"),
    ("vpc", ("subformat=dynamic", "force_size=on"), "100000512"),
    ("vhdx", ("subformat=dynamic",), "64M"),
    ("vhdx", ("subformat=dynamic", "block_size=8M"), "1G"),
    ("vdi", (), "64M"),
    ("vdi", ("static=on",), "8M"),
    ("parallels", (), "64M"),
]


@pytest.mark.parametrize(("fmt", "options", "size"), CREATED)
def test_format_and_virtual_size_match_qemu_img(
    make_image: MakeImage, fmt: str, options: tuple[str, ...], size: str
) -> None:
    image = make_image(fmt, size, *options)
    qemu = qemu_info(image)
    info = imgguard.inspect(image)
    assert info.format == qemu["format"] == fmt
    assert info.qemu_format == fmt
    assert info.virtual_size == qemu["virtual-size"]
    assert info.matches == (fmt,)
    assert info.path == str(image)
    assert info.file_size == image.stat().st_size
    assert info.actual_size == qemu["actual-size"]


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "vdi", "qed", "parallels"])
def test_images_with_data(tmp_path: Path, fmt: str) -> None:
    image = qemu_convert(raw_with_data(tmp_path / "guest.raw", 8 << 20), tmp_path / "g", fmt)
    info = imgguard.inspect(image)
    assert (info.format, info.virtual_size) == (fmt, qemu_info(image)["virtual-size"])


def test_fixed_vhd_is_vpc_although_qemu_probes_raw(make_image: MakeImage) -> None:
    image = make_image("vpc", "64M", "subformat=fixed")
    assert qemu_info(image)["format"] == "raw"
    info = imgguard.inspect(image)
    assert (info.format, info.variant, info.qemu_format) == ("vpc", "fixed", "raw")
    assert info.virtual_size == qemu_info(image, "vpc")["virtual-size"]
    assert info.matches == ("vpc", "raw")


def test_luks(make_image: MakeImage) -> None:
    image = make_image("luks", "16M", "key-secret=sec0", "iter-time=10", secret=True)
    info = imgguard.inspect(image)
    assert (info.format, info.variant, info.encrypted) == ("luks", "luks1", True)
    assert info.virtual_size == 16 << 20


def test_iso_is_raw_iso9660(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("genisoimage") is None:
        pytest.skip("genisoimage is not installed")
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello")
    iso = tmp_path / "disc.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-o", str(iso), "-V", "DEMO", str(content)], check=True
    )
    info = imgguard.inspect(iso)
    assert (info.format, info.variant, info.matches) == ("raw", "iso9660", ("iso9660",))
    assert info.virtual_size == qemu_info(iso)["virtual-size"]


def test_truncated_header_keeps_the_format(make_image: MakeImage) -> None:
    data = make_image("qcow2", "64M").read_bytes()
    info = imgguard.inspect_bytes(data[:60])
    assert info.format == "qcow2"
    assert info.truncated


def test_empty_file_is_raw(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    info = imgguard.inspect(empty)
    assert (info.format, info.virtual_size, info.matches) == ("raw", 0, ("raw",))


def test_binary_file_objects(make_image: MakeImage) -> None:
    image = make_image("qcow2", "64M")
    with image.open("rb") as file:
        assert imgguard.inspect(file).format == "qcow2"
    assert imgguard.inspect(io.BytesIO(image.read_bytes())).virtual_size == 64 << 20


def test_reads_only_a_few_regions_of_a_huge_sparse_image(make_image: MakeImage) -> None:
    from imgguard.inspection import inspect_reader
    from imgguard.reader import open_image

    image = make_image("qcow2", "2T")
    with open_image(image) as (reader, _):
        inspect_reader(reader)
        assert reader.bytes_read <= 64 * 1024
        assert reader.reads <= 8


def test_not_regular_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFile, match="FIFO"):
        imgguard.inspect(fifo)
    link = tmp_path / "link"
    link.symlink_to("/etc/passwd")
    with pytest.raises(NotARegularFile, match="symbolic link"):
        imgguard.inspect(link)
    with pytest.raises(UnreadableImage):
        imgguard.inspect(tmp_path / "missing")
    assert issubclass(NotARegularFile, ImageError) and issubclass(ImageError, ValueError)
