"""Shared plumbing of the atheris harnesses in this directory.

Every harness feeds the fuzzer's bytes to imgguard and treats any exception other than
`imgguard.ImageError` as a crash (atheris reports an uncaught exception as one). Two more
invariants are checked on every input, because a service relies on them as much as on the
exception type:

* bounded reads: inspection never reads more than `READ_BUDGET` bytes of the file;
* bounded work: an input that makes inspection take longer than `SLOW_SECONDS` is reported
  (libFuzzer's own `-timeout` catches hangs; this catches quadratic behaviour much earlier).

Inputs are files, with one extension: an input that starts with `SPARSE_MAGIC` describes a
sparse file (size, then `(offset, length, data)` chunks, zeros elsewhere). Formats whose
metadata lives megabytes into the file (VHDX's metadata region and BAT, a qed L1 table) can
then be seeded and mutated without megabyte-sized inputs; see `encode_sparse()`.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import time
from collections.abc import Callable, Iterable

SPARSE_MAGIC = b"IGSPARSE"
_SIZE = struct.Struct("<Q")
_CHUNK = struct.Struct("<II")
# A sparse input may describe a file of at most this size (qemu's own limit is far larger; the
# parsers must cope with any size, but the harness allocates nothing proportional to it).
MAX_SPARSE_SIZE = (1 << 63) - 1
MAX_CHUNKS = 64

# imgguard reads a 4 KiB head, a 1536-byte tail and a few capped regions: a well-behaved
# inspection of any file stays far below this (`tests/test_properties.py` has the per-format
# budgets).
READ_BUDGET = 8 << 20
SLOW_SECONDS = float(os.environ.get("IMGGUARD_FUZZ_SLOW_SECONDS", "2.0"))


class SparseFile(io.RawIOBase):
    """A read-only file of `size` bytes: `chunks` of data at their offsets, zeros elsewhere."""

    def __init__(self, size: int, chunks: Iterable[tuple[int, bytes]]) -> None:
        super().__init__()
        self.size = size
        self.chunks = sorted((off, data) for off, data in chunks if data and off < size)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, length: int = -1) -> bytes:
        start = self.position
        end = self.size if length is None or length < 0 else min(self.size, start + length)
        if end <= start:
            return b""
        out = bytearray(end - start)
        for off, data in self.chunks:
            lo, hi = max(off, start), min(off + len(data), end)
            if lo < hi:
                out[lo - start : hi - start] = data[lo - off : hi - off]
        self.position = end
        return bytes(out)


def decode_sparse(data: bytes) -> tuple[int, list[tuple[int, bytes]]] | None:
    """The (size, chunks) an input describes, or None when it is a plain file."""
    if not data.startswith(SPARSE_MAGIC) or len(data) < len(SPARSE_MAGIC) + _SIZE.size:
        return None
    pos = len(SPARSE_MAGIC)
    (size,) = _SIZE.unpack_from(data, pos)
    size = min(size, MAX_SPARSE_SIZE)
    pos += _SIZE.size
    chunks = []
    while pos + _CHUNK.size <= len(data) and len(chunks) < MAX_CHUNKS:
        offset, length = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        chunks.append((offset, data[pos : pos + length]))
        pos += length
    return size, chunks


def encode_sparse(image: bytes, *, block: int = 4096) -> bytes:
    """`image` as a sparse input: its non-zero `block`-sized runs as chunks."""
    chunks: list[tuple[int, bytes]] = []
    for offset in range(0, len(image), block):
        piece = image[offset : offset + block]
        if not any(piece):
            continue
        if chunks and chunks[-1][0] + len(chunks[-1][1]) == offset:
            chunks[-1] = (chunks[-1][0], chunks[-1][1] + piece)
        else:
            chunks.append((offset, piece))
    out = bytearray(SPARSE_MAGIC + _SIZE.pack(len(image)))
    for offset, piece in chunks:
        out += _CHUNK.pack(offset, len(piece)) + piece
    return bytes(out)


def reader_for(data: bytes):  # type: ignore[no-untyped-def]
    """An `ImageReader` over the file an input describes."""
    from imgguard.reader import ImageReader

    sparse = decode_sparse(data)
    if sparse is None:
        return ImageReader.from_bytes(data, name="fuzz-input")
    size, chunks = sparse
    return ImageReader(SparseFile(size, chunks), size=size, name="fuzz-input")  # type: ignore[arg-type]


class Budget:
    """Checks the read and time budgets of one inspection."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def done(self, reader, what: str) -> None:  # type: ignore[no-untyped-def]
        if reader.bytes_read > READ_BUDGET:
            raise AssertionError(
                f"{what} read {reader.bytes_read} bytes, over the budget of {READ_BUDGET}"
            )
        elapsed = time.perf_counter() - self.start
        if elapsed > SLOW_SECONDS:
            raise AssertionError(f"{what} took {elapsed:.3f} s, over {SLOW_SECONDS} s")


def run_drivers(data: bytes, names: tuple[str, ...]) -> None:
    """Probe, recognise and inspect `data` with each named format driver directly."""
    from imgguard import ImageError, formats
    from imgguard.model import ImageInfo

    for name in names:
        driver = formats.by_name(name)
        reader = reader_for(data)
        budget = Budget()
        score = driver.probe(reader)
        if not 0 <= score <= 100:
            raise AssertionError(f"{name} probe scored {score}")
        driver.recognise(reader)
        try:
            info = driver.inspect(reader)
        except ImageError:
            pass
        else:
            if not isinstance(info, ImageInfo):
                raise AssertionError(f"{name} inspect returned {type(info).__name__}")
            hash(info)  # frozen attrs: every field must be hashable, as services cache them
        budget.done(reader, name)


def main(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
