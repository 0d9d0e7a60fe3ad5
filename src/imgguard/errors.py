"""The exceptions imgguard raises.

Three kinds are kept apart, as pycdlib does: bad image data (`ImageError` and its subclasses),
bad caller input or configuration (`ConfigError`), and everything else, which is a bug.
"""

from __future__ import annotations


class ImgguardError(Exception):
    """Base of every exception imgguard raises on purpose."""


class ImageError(ImgguardError, ValueError):
    """The image's bytes cannot be inspected; says what is wrong and where.

    `field` names the on-disk field (as the format's spec names it) and `offset` is the byte
    offset in the file where the problem was found, when known.
    """

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None):
        self.message = message
        self.field = field
        self.offset = offset
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.field is not None:
            where.append(f"field {self.field}")
        if self.offset is not None:
            where.append(f"offset {self.offset:#x}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class TruncatedImage(ImageError):
    """A region the format says is there lies (partly) past the end of the file."""


class MalformedImage(ImageError):
    """A header field holds a value the format does not allow."""


class LimitExceeded(ImageError):
    """A size or count read from the image is over imgguard's fixed cap for reading it."""


class NotARegularFile(ImageError):
    """The path is a symlink, directory, device, FIFO or socket; imgguard does not open those."""


class UnreadableImage(ImageError):
    """The operating system refused to open or read the file (the `OSError` is the cause)."""


class ConfigError(ImgguardError, ValueError):
    """A policy, option or configuration value given by the caller is invalid."""

    def __init__(self, message: str, *, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
