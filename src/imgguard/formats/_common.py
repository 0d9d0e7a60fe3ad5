"""Small pieces several format modules share: how qemu reads a header, a name, a refusal."""

from __future__ import annotations

from imgguard.errors import TruncatedImage
from imgguard.model import Problem, ProblemKind
from imgguard.reader import ImageReader

PROBE_BUFFER_SIZE = 2048


class Problems(list[Problem]):
    """The `Problem`s one `inspect()` finds, in the order it finds them."""

    def add(self, kind: ProblemKind, message: str, field: str, offset: int | None) -> None:
        self.append(Problem(kind=kind, message=message, field=field, offset=offset))


def qemu_length(reader: ImageReader) -> int:
    """The file's length as qemu 7.2's block layer sees it (`bdrv_getlength()`): rounded up to
    whole 512-byte sectors (`total_sectors = DIV_ROUND_UP(length, 512)`). A raw disk's virtual
    size, and where drivers look for what sits at the end of the file."""
    return -(-reader.size // 512) * 512


def probe_buffer(reader: ImageReader) -> bytes:
    # qemu probes a 2048-byte buffer read with zero fill past the end of the file
    # (find_image_format() allows reads beyond EOF), so short files compare against zeros.
    head = reader.head[:PROBE_BUFFER_SIZE]
    return head + bytes(PROBE_BUFFER_SIZE - len(head))


def fixed_header(reader: ImageReader, size: int, format_name: str) -> bytes:
    """The first `size` bytes of the file; a shorter file is `TruncatedImage`."""
    if reader.size < size:
        raise TruncatedImage(
            f"the {format_name} header needs {size} bytes, the file has {reader.size}",
            field="header",
            offset=0,
        )
    return reader.head[:size]


def zero_filled_header(reader: ImageReader, size: int, problems: list[Problem]) -> bytes:
    """The first `size` bytes as qemu reads them: a short file is reported and padded."""
    raw = reader.head[:size]
    if len(raw) < size:
        # bdrv_pread() past the end of the file returns zeros, so qemu opens such a stub.
        problems.append(
            Problem(
                ProblemKind.TRUNCATED,
                f"the {size}-byte header is cut short at {len(raw)} bytes; qemu reads "
                "the missing bytes as zeros",
                field="header",
                offset=len(raw),
            )
        )
        raw += bytes(size - len(raw))
    return raw


def refused(message: str, field: str, offset: int | None) -> Problem:
    return Problem(
        ProblemKind.MALFORMED, f"qemu refuses to open the image: {message}", field, offset
    )


def c_string(raw: bytes) -> str:
    """A name as qemu sees it: a C string, cut at the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")


def uuid_text(raw: bytes) -> str:
    """`str(uuid.UUID(bytes=raw))` (RFC 4122 byte order) at a fifth of the cost."""
    if len(raw) != 16:
        raise ValueError(f"a UUID is 16 bytes, not {len(raw)}")
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def uuid_text_le(raw: bytes) -> str:
    """`str(uuid.UUID(bytes_le=raw))`: a Microsoft GUID or VirtualBox RTUUID, whose first three
    fields are little-endian."""
    if len(raw) != 16:
        raise ValueError(f"a UUID is 16 bytes, not {len(raw)}")
    return uuid_text(raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:])
