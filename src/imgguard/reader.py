"""The one place imgguard reads image bytes.

Formats ask for regions by offset and length; every request is checked against the file size
and a fixed cap before anything is read, so a length taken from a header can never make
imgguard read (or allocate) more than the cap. Reads are counted, which is what the byte budget
tests and the benchmark measure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import struct as _struct
from collections.abc import Iterator
from typing import Any, BinaryIO

import construct

from imgguard.errors import (
    ImageError,
    LimitExceeded,
    MalformedImage,
    NotARegularFile,
    TruncatedImage,
    UnreadableImage,
)

# qemu's prober looks at the first 2048 bytes (BLOCK_PROBE_BUF_SIZE); every header imgguard
# parses fits in 4 KiB, so one read serves the probes and most headers.
HEAD_SIZE = 4096
# Footers: a VHD footer is 512 bytes, a streamOptimized VMDK's footer and end-of-stream marker
# take the last 1536 bytes, a dmg koly trailer 512.
TAIL_SIZE = 1536
# No single region a format asks for may be larger than this, whatever a header says.
MAX_REGION = 1 << 20


class ImageReader:
    """Bounded, counted, cached reads of one image file."""

    def __init__(
        self, file: BinaryIO | None, *, size: int, name: str | None = None, fd: int | None = None
    ) -> None:
        """Read from `file`, or with `os.pread` from `fd` (one system call per read, no file
        object) when `file` is None."""
        if file is None and fd is None:
            raise ValueError("ImageReader needs a file or a file descriptor")
        self._file = file
        self._fd = fd if file is None else None
        self.size = size
        self.name = name
        self.bytes_read = 0
        self.reads = 0
        self._cache: list[tuple[int, bytes]] = []
        self._head: bytes | None = None
        self._tail: bytes | None = None

    @classmethod
    def from_bytes(cls, data: bytes, name: str | None = None) -> ImageReader:
        import io

        return cls(io.BytesIO(data), size=len(data), name=name)

    @classmethod
    def from_file(cls, file: BinaryIO, name: str | None = None) -> ImageReader:
        try:
            size = os.fstat(file.fileno()).st_size
        except (AttributeError, OSError, ValueError):
            try:
                size = file.seek(0, os.SEEK_END)
            except OSError as error:
                raise UnreadableImage(f"cannot seek in {name or 'stream'}: {error}") from error
        return cls(file, size=size, name=name or getattr(file, "name", None))

    # cached_property, not property: every prober asks for the head, and after the first read
    # it is a plain instance attribute.
    @functools.cached_property
    def head(self) -> bytes:
        """The first HEAD_SIZE bytes (fewer for a smaller file)."""
        self._head = self._pread(0, min(self.size, HEAD_SIZE))
        return self._head

    @functools.cached_property
    def tail(self) -> bytes:
        """The last TAIL_SIZE bytes (the whole file when it is smaller)."""
        start = max(0, self.size - TAIL_SIZE)
        if start < len(self.head):
            self._tail = self.head[start:] + self._pread(len(self.head), self.size - len(self.head))
        else:
            self._tail = self._pread(start, self.size - start)
        return self._tail

    def read(self, offset: int, length: int, *, field: str, cap: int = MAX_REGION) -> bytes:
        """Exactly `length` bytes at `offset`, or an `ImageError` naming `field`."""
        if offset < 0:
            raise MalformedImage(f"negative offset {offset}", field=field)
        if length < 0:
            raise MalformedImage(f"negative length {length}", field=field, offset=offset)
        if length > min(cap, MAX_REGION):
            raise LimitExceeded(
                f"{length} bytes requested, over the cap of {min(cap, MAX_REGION)}",
                field=field,
                offset=offset,
            )
        if offset + length > self.size:
            raise TruncatedImage(
                f"needs {length} bytes at offset {offset} but the file ends at {self.size}",
                field=field,
                offset=offset,
            )
        cached = self._cached(offset, length)
        if cached is not None:
            return cached
        data = self._pread(offset, length)
        if len(data) != length:
            raise TruncatedImage("file shrank while being read", field=field, offset=offset)
        if length <= 64 * 1024:
            self._cache.append((offset, data))
        return data

    def read_available(self, offset: int, length: int, *, field: str) -> bytes:
        """Up to `length` bytes at `offset`, fewer where the file ends first."""
        if offset >= self.size:
            return b""
        return self.read(offset, min(length, self.size - offset), field=field)

    def _cached(self, offset: int, length: int) -> bytes | None:
        end = offset + length
        if self._head is not None and end <= len(self._head):
            return self._head[offset:end]
        if self._tail is not None:
            tail_start = self.size - len(self._tail)
            if offset >= tail_start:
                return self._tail[offset - tail_start : end - tail_start]
        for start, data in self._cache:
            if start <= offset and end <= start + len(data):
                return data[offset - start : end - start]
        return None

    def _pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            if self._fd is not None:
                data = os.pread(self._fd, length, offset)
            else:
                assert self._file is not None
                self._file.seek(offset)
                data = self._file.read(length)
        except OSError as error:
            raise UnreadableImage(
                f"read of {length} bytes failed: {error.strerror or error}", offset=offset
            ) from error
        self.bytes_read += len(data)
        self.reads += 1
        return data


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str]) -> Iterator[tuple[ImageReader, os.stat_result]]:
    """Open a regular file for inspection without following a symlink or blocking on a FIFO."""
    name = os.fspath(path)
    try:
        link_stat = os.lstat(name)
    except OSError as error:
        raise UnreadableImage(f"cannot stat {name}: {error.strerror or error}") from error
    _require_regular(link_stat, name)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags)
    except OSError as error:
        raise UnreadableImage(f"cannot open {name}: {error.strerror or error}") from error
    try:
        file_stat = os.fstat(fd)
        # The path may have been swapped for something else between lstat and open.
        _require_regular(file_stat, name)
        # pread on the descriptor: one system call per read and no file object to build.
        yield ImageReader(None, size=file_stat.st_size, name=name, fd=fd), file_stat
    finally:
        os.close(fd)


def _require_regular(st: os.stat_result, name: str) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    kinds = {
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISBLK: "a block device",
        stat.S_ISCHR: "a character device",
    }
    kind = next((label for test, label in kinds.items() if test(mode)), "not a regular file")
    raise NotARegularFile(f"{name} is {kind}; imgguard inspects regular files only")


def parse_struct(struct: construct.Construct, data: bytes, *, offset: int, what: str) -> Any:
    """Parse `data` (read from `offset`) with a construct definition, as an `ImageError` on failure.

    construct reports the failing field as a path (`(parsing) -> header -> magic`); that becomes the
    error's field so messages say where in the spec the bytes went wrong.

    A compiled struct (`Struct(...).compile()`) is only safe on input of at least its full size:
    its `Bytes(n)` takes what is there, and a short integer raises `struct.error`. So a compiled
    struct of fixed size gets a length check first, and one whose size depends on the data is
    parsed by its interpreted definition instead.
    """
    if isinstance(struct, construct.Compiled):
        size = _compiled_size(struct)
        if size is None:
            struct = struct.defersubcon
        elif len(data) < size:
            raise TruncatedImage(
                f"{what} is cut short: {len(data)} of its {size} bytes", field=what, offset=offset
            )
    try:
        return struct.parse(data)
    except ImageError:
        raise
    except (construct.StreamError, _struct.error) as error:
        raise TruncatedImage(
            f"{what} is cut short", field=_construct_field(error, what), offset=offset
        ) from error
    except construct.ConstructError as error:
        raise MalformedImage(
            f"{what}: {_construct_message(error)}",
            field=_construct_field(error, what),
            offset=offset,
        ) from error


@functools.cache
def _compiled_size(struct: construct.Compiled) -> int | None:
    """The fixed size of a compiled struct, or None when it depends on the bytes."""
    try:
        size: int = struct.sizeof()
    except construct.SizeofError:
        return None
    return size


def _construct_field(error: construct.ConstructError, what: str) -> str:
    path = getattr(error, "path", None) or ""
    parts = [part.strip() for part in str(path).split("->") if part.strip()]
    parts = [part for part in parts if not part.startswith("(")]
    return ".".join([what, *parts]) if parts else what


def _construct_message(error: construct.ConstructError) -> str:
    message = str(error)
    # construct prefixes its message with the path, which is already in `field`.
    if "\n" in message:
        message = message.split("\n", 1)[1]
    return message.strip()
