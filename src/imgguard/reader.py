"""The one place imgguard reads image bytes.

Formats ask for regions by offset and length; every request is checked against the file size
and a fixed cap before anything is read, so a length taken from a header can never make
imgguard read (or allocate) more than the cap. Reads are counted, which is what the byte budget
tests and the benchmark measure.
"""

from __future__ import annotations

import contextlib
import functools
import keyword
import os
import stat
import struct as _struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Generic, NoReturn, TypeVar, overload

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


_T = TypeVar("_T")


class _ReadOnce(Generic[_T]):
    """`functools.cached_property` without its lock.

    Python 3.11's cached_property takes an RLock on the first access of every instance (~1.5 us
    each for `head` and `tail`, on every image); an ImageReader belongs to one thread, so the
    value is computed and stored in the instance dict, where later lookups find it first.
    """

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _ReadOnce[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object, owner: type | None = None) -> _T | _ReadOnce[_T]:
        if instance is None:
            return self
        value = self._compute(instance)
        instance.__dict__[self._name] = value
        return value


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
        if not name:
            # A file object's name may be bytes (open(b"path")) or the descriptor's number
            # (open(fd)); only a path is a name.
            attribute = getattr(file, "name", None)
            name = os.fsdecode(attribute) if isinstance(attribute, (str, bytes)) else None
        return cls(file, size=size, name=name)

    # Computed once, not a property: every prober asks for the head, and after the first read
    # it is a plain instance attribute.
    @_ReadOnce
    def head(self) -> bytes:
        """The first HEAD_SIZE bytes (fewer for a smaller file)."""
        self._head = self._pread(0, min(self.size, HEAD_SIZE))
        return self._head

    @_ReadOnce
    def tail(self) -> bytes:
        """The last TAIL_SIZE bytes (the whole file when it is smaller)."""
        start = max(0, self.size - TAIL_SIZE)
        if start < len(self.head):
            self._tail = self.head[start:] + self._pread(len(self.head), self.size - len(self.head))
        else:
            self._tail = self._pread(start, self.size - start)
        return self._tail

    def read_ends(self) -> None:
        """Read the head and the tail now, as every inspection of a whole file does first: the
        reads (and counts) of `head` then `tail`, in one step instead of two attribute lookups
        and their calls."""
        fd = self._fd
        if fd is None or "head" in self.__dict__ or "tail" in self.__dict__:
            self.head, self.tail  # noqa: B018 - computed and kept by _ReadOnce
            return
        size = self.size
        pread = os.pread
        head = tail = b""
        offset = 0
        try:
            if size > 0:
                head = pread(fd, size if size < HEAD_SIZE else HEAD_SIZE, 0)
                self.reads += 1
                self.bytes_read += len(head)
            start = size - TAIL_SIZE if size > TAIL_SIZE else 0
            rest: bytes | None = None  # what the tail needed beyond the head, when it was read
            if start < len(head):
                offset = len(head)
                if size > offset:
                    rest = pread(fd, size - offset, offset)
                tail = head[start:] + (rest or b"")
            elif size > start:
                offset = start
                rest = tail = pread(fd, size - start, start)
        except OSError as error:
            raise UnreadableImage(
                f"read failed: {error.strerror or error}", offset=offset
            ) from error
        if rest is not None:
            self.reads += 1
            self.bytes_read += len(rest)
        self._head = self.__dict__["head"] = head
        self._tail = self.__dict__["tail"] = tail

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

    def peek(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`, fewer or none where the file ends: a recogniser's
        look at a signature outside the head (no field to blame, nothing kept for later).
        Counted like every read; `length` is at most HEAD_SIZE."""
        if offset < 0 or not 0 <= length <= HEAD_SIZE:
            raise ValueError(f"peek({offset}, {length}): a small region inside the file")
        size = self.size
        end = offset + length if offset + length < size else size
        if end <= offset:
            return b""
        head = self._head
        if head is not None and end <= len(head):
            return head[offset:end]
        tail = self._tail
        if tail is not None and offset >= size - len(tail):
            return tail[offset - size + len(tail) : end - size + len(tail)]
        fd = self._fd
        if fd is None:
            return self._pread(offset, end - offset)
        # _pread() inline: a recogniser's peek is on every image's path.
        try:
            data = os.pread(fd, end - offset, offset)
        except OSError as error:
            raise UnreadableImage(
                f"read of {end - offset} bytes failed: {error.strerror or error}", offset=offset
            ) from error
        self.bytes_read += len(data)
        self.reads += 1
        return data

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


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str]) -> Iterator[tuple[ImageReader, os.stat_result]]:
    """Open a regular file for inspection without following a symlink or blocking on a FIFO."""
    name = os.fspath(path)
    fd, file_stat = open_regular(name)
    try:
        # pread on the descriptor: one system call per read and no file object to build.
        yield ImageReader(None, size=file_stat.st_size, name=name, fd=fd), file_stat
    finally:
        os.close(fd)


def open_regular(name: str, *, fstat: bool = True) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file `name` and its fstat; the caller closes it.

    `open_image` without the context manager. The lstat refuses a symlink, device, FIFO or
    socket before anything is opened (opening a device node has effects of its own);
    O_NOFOLLOW and O_NONBLOCK keep a path swapped for a symlink or a FIFO after it from being
    followed or blocking. The fstat then checks the descriptor itself: where the descriptor
    outlives the call (the backend hands it to qemu-img), its size and type must be those of
    the file opened. `fstat=False` (the detector's `inspect(path)`, which reads and closes the
    descriptor at once) returns the lstat instead and saves a system call: a file swapped in
    between is inspected with the first one's size, which gives a verdict on the swapped-in
    bytes no less stale than a swap just after the check would.
    """
    try:
        link_stat = os.lstat(name)
    except OSError as error:
        raise UnreadableImage(f"cannot stat {name}: {error.strerror or error}") from error
    if not _S_ISREG(link_stat.st_mode):
        _refuse(link_stat, name)
    try:
        fd = os.open(name, _OPEN_FLAGS)
    except OSError as error:
        raise UnreadableImage(f"cannot open {name}: {error.strerror or error}") from error
    if not fstat:
        return fd, link_stat
    try:
        file_stat = os.fstat(fd)
        # The path may have been swapped for something else between lstat and open.
        if not _S_ISREG(file_stat.st_mode):
            _refuse(file_stat, name)
    except BaseException:
        os.close(fd)
        raise
    return fd, file_stat


_S_ISREG = stat.S_ISREG


def _refuse(st: os.stat_result, name: str) -> NoReturn:
    mode = st.st_mode
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
        else:
            fast = _unpacker(struct)
            if fast is not None:
                parsed = fast(data)
                if parsed is not None:
                    return parsed
                # A Const or OneOf did not match: construct's own parse raises the error.
    else:
        # An interpreted definition of fixed size gets the same unpacker; input shorter than
        # the size, or a Const or OneOf that does not match, goes to construct for its error.
        fast = _unpacker(struct)
        if fast is not None and len(data) >= (_fixed_size(struct) or 0):
            parsed = fast(data)
            if parsed is not None:
                return parsed
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
    return _fixed_size(struct)


@functools.cache
def _fixed_size(struct: construct.Construct) -> int | None:
    """The fixed size of a definition, or None when it depends on the bytes."""
    try:
        size: int = struct.sizeof()
    except construct.SizeofError:
        return None
    return size


# --- construct definitions unpacked with the struct module -----------------------------------
#
# construct's compiled parser still costs ~0.5 us per field (a BytesIO read, a struct.unpack and
# two Container stores each). A fixed-size compiled struct made only of plain fields (integers,
# Bytes(n), Const, OneOf, Enum, nested Structs and Arrays of a fixed count) is unpacked instead
# with one `struct.Struct` per run of same-endian fields, whose format string is DERIVED from the
# construct definition, and the same Containers and ListContainers are built from the tuple.
# Anything else in a definition, and any Const or OneOf that does not match, goes to construct,
# which stays the single definition of every format and the source of every error message.


class _Unsupported(Exception):
    """The definition has a construct the unpacker does not derive; construct parses it."""


class _Derivation:
    def __init__(self) -> None:
        self.runs: list[tuple[str, int]] = []  # (format string, size): consecutive runs
        self.codes: list[str] = []
        self.order = ""
        self.size = 0
        self.count = 0  # values in the unpacked tuple so far
        self.checks: list[str] = []
        self.namespace: dict[str, Any] = {
            "Container": construct.Container,
            "ListContainer": construct.ListContainer,
            "EnumInteger": construct.EnumInteger,
        }

    def constant(self, value: Any) -> str:
        name = f"_k{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def field(self, order: str, code: str, size: int) -> str:
        if order != self.order and size > 1:
            if self.order and self.codes:
                self.flush()
            self.order = order
        self.codes.append(code)
        self.size += size
        self.count += 1
        return f"v[{self.count - 1}]"

    def pad(self, size: int) -> None:
        """Bytes skipped without a value (construct's Padding does not look at them)."""
        self.codes.append(f"{size}x")
        self.size += size

    def flush(self) -> None:
        if self.codes:
            run_size = self.size - sum(size for _, size in self.runs)
            self.runs.append(((self.order or ">") + "".join(self.codes), run_size))
            self.codes = []

    def expression(self, con: construct.Construct) -> str:
        if isinstance(con, construct.Renamed):
            return self.expression(con.subcon)
        if isinstance(con, construct.FormatField):
            fmt = con.fmtstr
            if len(fmt) != 2 or fmt[0] not in "<>=":
                raise _Unsupported(fmt)
            order = ">" if fmt[0] == "=" and con.length == 1 else fmt[0]
            if order == "=":
                raise _Unsupported(fmt)
            return self.field(order, fmt[1], con.length)
        if type(con) is construct.Bytes and isinstance(con.length, int):
            return self.field(self.order, f"{con.length}s", con.length)
        if isinstance(con, construct.Const):
            value = self.expression(con.subcon)
            self.checks.append(f"{value} == {self.constant(con.value)}")
            return value
        if isinstance(con, construct.Enum):
            value = self.expression(con.subcon)
            mapping = self.constant(con.decmapping)
            return f"({mapping}[{value}] if {value} in {mapping} else EnumInteger({value}))"
        if isinstance(con, construct.ExprValidator) and _is_one_of(con):
            value = self.expression(con.subcon)
            # OneOf's test is `obj in valids`; it does not look at the context.
            self.checks.append(f"{self.constant(con._validate)}({value}, None, None)")
            return value
        if type(con) is construct.Struct:
            items = []
            for sub in con.subcons:
                value = self.expression(sub)
                if sub.name is not None:
                    items.append((sub.name, value))
            names = [name for name, _ in items]
            if len(set(names)) == len(names) and all(
                name.isidentifier() and not keyword.iskeyword(name) for name in names
            ):
                # Keyword arguments: no tuple per field (a third cheaper than pairs).
                return f"Container({', '.join(f'{name}={value}' for name, value in items)})"
            pairs = ", ".join(f"({name!r}, {value})" for name, value in items)
            return f"Container([{pairs}])"
        if (
            type(con) is construct.Padded
            and con.subcon is construct.Pass
            and isinstance(con.length, int)
            and con.length >= 0
        ):
            # Padding(n): Padded(n, Pass) parses to None and skips n bytes unchecked.
            self.pad(con.length)
            return "None"
        if type(con) is construct.Array and isinstance(con.count, int) and not con.discard:
            elements = [self.expression(con.subcon) for _ in range(con.count)]
            return f"ListContainer([{', '.join(elements)}])"
        raise _Unsupported(type(con).__name__)


def _is_one_of(con: construct.ExprValidator) -> bool:
    """An ExprValidator made by `OneOf` (its test is `obj in valids`, context unused)."""
    cells = getattr(con._validate, "__closure__", None) or ()
    return any(
        getattr(cell.cell_contents, "__qualname__", "").startswith("OneOf.") for cell in cells
    )


@functools.cache
def _unpacker(struct: construct.Construct) -> Callable[[bytes], Any] | None:
    """A function that unpacks `struct` (compiled or not) from bytes of at least its size, or
    returns None when a Const or OneOf does not hold; None when the definition has anything
    else in it."""
    derivation = _Derivation()
    definition = struct.defersubcon if isinstance(struct, construct.Compiled) else struct
    try:
        result = derivation.expression(definition)
    except _Unsupported:
        return None
    derivation.flush()
    if derivation.size != _fixed_size(struct):
        return None
    parts = []
    offset = 0
    for index, (fmt, size) in enumerate(derivation.runs):
        derivation.namespace[f"_s{index}"] = _struct.Struct(fmt).unpack_from
        parts.append(f"_s{index}(data, {offset})")
        offset += size
    lines = ["def unpack(data):", f"    v = {' + '.join(parts) or '()'}"]
    if derivation.checks:
        lines.append(f"    if not ({' and '.join(derivation.checks)}):")
        lines.append("        return None")
    lines.append(f"    return {result}")
    exec("\n".join(lines), derivation.namespace)
    unpack: Callable[[bytes], Any] = derivation.namespace["unpack"]
    return unpack


@functools.cache
def fields_unpacker(struct: construct.Construct) -> Callable[[bytes, int], tuple[Any, ...]]:
    """`struct.Struct(fmt).unpack_from` for a definition of plain integer fields only, with the
    format derived from the definition: the values in field order, from any offset of a buffer.

    For a small record read many times out of a buffer already in hand (qcow2's header
    extension headers in the head) without slicing it out and building a Container. The caller
    checks that the buffer holds the record; a definition with anything but integer fields in
    one byte order (a Const, an Enum, Bytes, padding) is refused with a ValueError.
    """
    derivation = _Derivation()
    definition = struct.defersubcon if isinstance(struct, construct.Compiled) else struct
    if type(definition) is not construct.Struct:
        raise ValueError("fields_unpacker() needs a Struct")
    for sub in definition.subcons:
        con = sub.subcon if isinstance(sub, construct.Renamed) else sub
        if not isinstance(con, construct.FormatField):
            raise ValueError(f"fields_unpacker(): {sub.name} is not a plain integer field")
        try:
            derivation.expression(con)
        except _Unsupported as error:
            raise ValueError(f"fields_unpacker(): {sub.name}: {error}") from error
    derivation.flush()
    if len(derivation.runs) != 1:
        raise ValueError("fields_unpacker() needs fields of one byte order")
    unpack_from: Callable[[bytes, int], tuple[Any, ...]] = _struct.Struct(
        derivation.runs[0][0]
    ).unpack_from
    return unpack_from


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
