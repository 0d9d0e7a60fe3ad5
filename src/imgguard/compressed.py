"""Compressed containers: recognise gzip, zstd, xz and bzip2, and decompress gzip within caps.

Glance's `container_format=compressed` holds an image inside a compressed archive, and Cinder
decompresses it before `qemu-img convert`. qemu-img itself has no prober for any of these: it
would read a gzip file as a raw disk. imgguard reports the container as a fact
(`ImageInfo.header["container"]`), looks inside gzip by streaming decompression through
`imgguard.stream.StreamInspector` (`check()` judges the image inside), and treats a container
it cannot look inside (zstd, xz, bzip2) as unjudged.

Decompression is bounded: output is produced in chunks of at most `chunk` bytes (zlib's
`max_length`), never held whole, and stops with `DecompressionFailed` as soon as the output is
over `max_output` bytes or over `max_ratio` times the input once past `ratio_floor` bytes (a
decompression bomb), so memory stays at zlib's 32 KiB window plus one chunk whatever the input.
The ratio is to the input up to the end of the `RATIO_BLOCK` being read (at the end, to the
whole input), so whether a stream is a bomb does not depend on how it was cut into `feed()`s.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator

from imgguard.errors import ImgguardError

GZIP_MAGIC = b"\x1f\x8b\x08"  # ID1 ID2 and CM=8 (deflate), the only method RFC 1952 defines
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
BZIP2_BLOCK_MAGIC = b"\x31\x41\x59\x26\x53\x59"  # pi, the first block's magic
BZIP2_EOS_MAGIC = b"\x17\x72\x45\x38\x50\x90"  # sqrt(pi), an empty stream's end marker

CONTAINERS = ("gzip", "zstd", "xz", "bzip2")
# Containers imgguard can look inside.
INSPECTABLE = frozenset({"gzip"})

# Output is handed on in pieces of this size; zlib never returns more per call.
CHUNK = 64 * 1024
# deflate cannot expand more than 1032:1, so only output of nothing but repeated bytes comes
# close to this ratio; it applies once the output is past RATIO_FLOOR bytes.
MAX_RATIO = 1024
RATIO_FLOOR = 1 << 30
# The ratio is to the input up to the next multiple of this many bytes (see `feed`).
RATIO_BLOCK = 64 * 1024
# An absolute cap when the caller gives none: 2 TiB (the default policy's max_virtual_size)
# plus room for a format's metadata.
MAX_OUTPUT = (2 << 40) + (1 << 30)


# Every container's magic, at least the start of it (bzip2's block size digit follows "BZh").
CONTAINER_MAGICS = (GZIP_MAGIC, ZSTD_MAGIC, XZ_MAGIC, BZIP2_MAGIC)


def container_of(head: bytes) -> str | None:
    """The compressed container whose magic `head` (the first bytes of a file) starts with."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if (
        head.startswith(BZIP2_MAGIC)
        and head[3:4] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9")
        and head[4:10] in (BZIP2_BLOCK_MAGIC, BZIP2_EOS_MAGIC)
    ):
        return "bzip2"
    return None


class DecompressionFailed(ImgguardError):
    """The container could not be decompressed: `kind` is "bomb" (over a cap) or "corrupt"."""

    def __init__(self, message: str, *, kind: str, output_bytes: int, input_bytes: int) -> None:
        self.kind = kind
        self.output_bytes = output_bytes
        self.input_bytes = input_bytes
        super().__init__(message)


class GzipDecompressor:
    """Incremental, bounded gzip decompression (RFC 1952, members concatenated as gzip(1) does).

    `feed(data)` yields the decompressed bytes in pieces of at most `chunk` bytes; `finish()`
    says whether the input ended cleanly. Zero bytes after the last member are padding (gzip(1)
    accepts them); anything else after it is refused.
    """

    def __init__(
        self,
        *,
        max_output: int = MAX_OUTPUT,
        max_ratio: float = MAX_RATIO,
        ratio_floor: int = RATIO_FLOOR,
        chunk: int = CHUNK,
    ) -> None:
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        self.max_output = max_output
        self.max_ratio = max_ratio
        self.ratio_floor = ratio_floor
        self.chunk = chunk
        self.input_bytes = 0
        self.output_bytes = 0
        self.members = 0
        self._inflate: zlib._Decompress | None = zlib.decompressobj(wbits=31)
        self._between = b""  # bytes after a member, before we know what follows

    def feed(self, data: bytes) -> Iterator[bytes]:
        # The input goes to zlib in pieces that end at multiples of RATIO_BLOCK of the whole
        # stream, and the output is held to the ratio of the input up to the end of the block
        # being read: the block's whole output reaches that bound whatever the chunking, so
        # the verdict does not depend on how the caller cut the stream (the ratio of whatever
        # had been fed passed a bomb fed in one 2 MiB chunk that 1 MiB reads refused). It also
        # keeps each zlib call's unconsumed_tail (copied per call) to one block.
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        start = 0
        while start < len(view):
            room = RATIO_BLOCK - self.input_bytes % RATIO_BLOCK
            piece = bytes(view[start : start + room])
            start += len(piece)
            yield from self._feed(piece)

    def _feed(self, data: bytes) -> Iterator[bytes]:
        self.input_bytes += len(data)
        pending = data
        while pending:
            if self._inflate is None:
                pending = self._after_member(pending)
                continue
            inflate = self._inflate
            try:
                out = inflate.decompress(pending, self.chunk)
            except zlib.error as error:
                raise self._failure(f"not a valid gzip stream: {error}", "corrupt") from error
            if out:
                yield self._count(out)
            if inflate.eof:
                # At a member's end the input left over is `unused_data`; CPython also leaves
                # it in `unconsumed_tail` when an earlier call hit max_length, so taking both
                # would decompress the next member twice (or forever: a false "bomb").
                self.members += 1
                pending = inflate.unused_data
                self._inflate = None
                continue
            pending = inflate.unconsumed_tail
            if not pending and len(out) == self.chunk:
                # The output filled the chunk: zlib may hold more without needing input.
                yield from self._drain(inflate)

    def _drain(self, inflate: zlib._Decompress) -> Iterator[bytes]:
        while True:
            try:
                out = inflate.decompress(b"", self.chunk)
            except zlib.error as error:
                raise self._failure(f"not a valid gzip stream: {error}", "corrupt") from error
            if out:
                yield self._count(out)
            if inflate.eof:
                self.members += 1
                self._inflate = None
                if inflate.unused_data:
                    self._between += inflate.unused_data
                return
            if len(out) < self.chunk:
                return

    def _after_member(self, data: bytes) -> bytes:
        """Bytes after a member: another member (returned to inflate), padding, or garbage."""
        pending = self._between + data
        self._between = b""
        stripped = pending.lstrip(b"\0")
        if not stripped:
            self._between = b"\0" if pending else b""
            return b""
        if stripped.startswith(GZIP_MAGIC) and len(pending) == len(stripped):
            self._inflate = zlib.decompressobj(wbits=31)
            return stripped
        cut_magic = len(stripped) < len(GZIP_MAGIC) and GZIP_MAGIC.startswith(stripped)
        if cut_magic and len(pending) == len(stripped):
            self._between = stripped  # a member's magic cut across two feeds
            return b""
        raise self._failure(
            f"{len(stripped)} bytes of trailing data after gzip member {self.members}", "corrupt"
        )

    def finish(self) -> None:
        """Raise `DecompressionFailed` unless the input ended after a complete member."""
        if self._inflate is not None:
            raise self._failure(
                "the gzip stream ends inside a member (truncated)"
                if self.input_bytes
                else "empty input",
                "corrupt",
            )
        if self._between.strip(b"\0"):
            raise self._failure("trailing data after the last gzip member", "corrupt")
        self._check_ratio(self.input_bytes)

    def _count(self, out: bytes) -> bytes:
        self.output_bytes += len(out)
        if self.output_bytes > self.max_output:
            raise self._failure(
                f"decompresses to more than {self.max_output} bytes "
                f"(from {self.input_bytes} compressed bytes)",
                "bomb",
            )
        self._check_ratio(-(-self.input_bytes // RATIO_BLOCK) * RATIO_BLOCK)
        return out

    def _check_ratio(self, input_bytes: int) -> None:
        """A bomb when the output is over the floor and `max_ratio` times `input_bytes`."""
        if self.output_bytes > self.ratio_floor and self.output_bytes > self.max_ratio * max(
            input_bytes, 1
        ):
            raise self._failure(
                f"decompresses to {self.output_bytes} bytes from {self.input_bytes}, a ratio "
                f"over {self.max_ratio:g}:1",
                "bomb",
            )

    def _failure(self, message: str, kind: str) -> DecompressionFailed:
        return DecompressionFailed(
            message, kind=kind, output_bytes=self.output_bytes, input_bytes=self.input_bytes
        )


def decompress_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    max_output: int = MAX_OUTPUT,
    max_ratio: float = MAX_RATIO,
    read_size: int = 1 << 20,
    fsync: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Decompress the gzip file `source` into `destination` (created, mode 0600); bytes written.

    `destination` must not exist. On any failure it is removed and the error raised
    (`DecompressionFailed` for a bomb or corrupt data, `OSError` for I/O, ENOSPC included).
    """
    decompressor = GzipDecompressor(max_output=max_output, max_ratio=max_ratio)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(destination, flags, 0o600)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb", closefd=False) as out:
            while data := src.read(read_size):
                for piece in decompressor.feed(data):
                    out.write(piece)
                if on_progress is not None:
                    on_progress(decompressor.output_bytes)
            decompressor.finish()
            out.flush()
            if fsync:
                os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(destination)
        raise
    os.close(fd)
    return decompressor.output_bytes


__all__ = [
    "CONTAINERS",
    "INSPECTABLE",
    "DecompressionFailed",
    "GzipDecompressor",
    "container_of",
    "decompress_file",
]
