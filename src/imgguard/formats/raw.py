"""raw: qemu's fallback when no other prober claims the bytes (`block/raw-format.c`)."""

from __future__ import annotations

from imgguard.formats._common import qemu_length
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo
from imgguard.reader import ImageReader

NAME = "raw"


def probe(reader: ImageReader) -> int:
    # raw_probe() answers 1 for anything, so that every other driver wins over it.
    return 1


def inspect(reader: ImageReader) -> ImageInfo:
    # qemu-img reports a raw file of 1000 bytes as 1024: whole sectors.
    return ImageInfo(format=NAME, virtual_size=qemu_length(reader))


DRIVER = FormatDriver(name=NAME, probe=probe, inspect=inspect)
