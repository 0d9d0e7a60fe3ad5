"""compressed: a gzip, zstd, xz or bzip2 container (Glance's `container_format=compressed`).

qemu has no prober for compressed files: `raw_probe()` claims them with score 1, and qemu-img
would read (and convert) the compressed bytes as a raw disk. imgguard recognises the magic and
reports the container as a fact of a raw image: `header["container"]` names it and
`variant` is `compressed`. `imgguard.check` then looks inside gzip (see `imgguard.compressed`).

Not a raw layout: when a qemu format also claims the bytes (a fixed VHD whose footer follows a
gzip stream, VDI's signature at offset 64), the container is listed in `matches` and the image
is a polyglot.
"""

from __future__ import annotations

from imgguard.compressed import CONTAINER_MAGICS, container_of
from imgguard.formats._common import qemu_length
from imgguard.formats._driver import FormatDriver
from imgguard.model import ImageInfo
from imgguard.reader import ImageReader

NAME = "compressed"


def probe(reader: ImageReader) -> int:
    # qemu has no prober for compressed files; raw_probe() claims them with 1.
    return 0


def recognise(reader: ImageReader) -> bool:
    return container_of(reader.head[:16]) is not None


def inspect(reader: ImageReader) -> ImageInfo:
    kind = container_of(reader.head[:16])
    header: dict[str, object] = {"container": kind, "compressed_size": reader.size}
    head = reader.head
    if kind == "gzip" and len(head) >= 10:
        # RFC 1952 member header: FLG, MTIME (little-endian), XFL, OS.
        header["gzip_flags"] = head[3]
        header["gzip_mtime"] = int.from_bytes(head[4:8], "little")
        header["gzip_os"] = head[9]
    return ImageInfo(format="raw", variant=NAME, virtual_size=qemu_length(reader), header=header)


DRIVER = FormatDriver(
    name=NAME,
    probe=probe,
    inspect=inspect,
    recognise=recognise,
    # The first two bytes of each container's magic.
    recognise_signatures=((0, tuple(sorted({magic[:2] for magic in CONTAINER_MAGICS}))),),
)
