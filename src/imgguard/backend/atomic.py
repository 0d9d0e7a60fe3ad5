"""All or nothing at the destination: a temporary file beside it, renamed over it on success.

The temporary file is created (mode 0600, O_EXCL) in the destination's own directory, so that
the final `rename` stays on one filesystem and is atomic. On success it is fsynced, renamed over
the destination, and the directory is fsynced so that the rename itself survives a crash. On
any failure the temporary file is removed and the destination is as it was: absent, or with its
previous content.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from types import TracebackType

from attrs import frozen

from imgguard.errors import ConfigError

TEMP_SUFFIX = ".imgguard-tmp"


@frozen
class Filesystem:
    """Where a directory lives: its mount point, the filesystem type and the space left."""

    mount_point: str
    type: str | None
    free_bytes: int | None


def check_destination(destination: str) -> None:
    """Refuse a destination that is anything but a regular file or a name not yet taken.

    A block device (a volume's /dev path), a directory or a symlink would be replaced by the
    rename rather than written: imgguard writes files only.
    """
    try:
        st = os.lstat(destination)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(
                "the destination exists and is not a regular file (imgguard writes a new file "
                "and renames it into place; it does not write devices or follow symlinks)",
                key=destination,
            )
    directory = os.path.dirname(destination) or "."
    if not os.path.isdir(directory):
        raise ConfigError("the destination's directory does not exist", key=destination)


class AtomicOutput:
    """`with AtomicOutput(dst) as out:` write `out.temp_path`, then `out.commit()`."""

    def __init__(self, destination: str) -> None:
        self.destination = os.path.abspath(destination)
        check_destination(self.destination)
        self.directory = os.path.dirname(self.destination)
        base = os.path.basename(self.destination)
        fd, self.temp_path = tempfile.mkstemp(
            prefix=f".{base}.", suffix=TEMP_SUFFIX, dir=self.directory
        )
        os.close(fd)
        self.committed = False

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.committed:
            self.discard()

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)

    def sync(self) -> None:
        """fsync the temporary file (qemu-img convert's default cache mode does not)."""
        fd = os.open(self.temp_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        """Rename the (synced) temporary file over the destination and fsync the directory."""
        check_destination(self.destination)
        os.replace(self.temp_path, self.destination)
        self.committed = True
        fsync_directory(self.directory)


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def filesystem_of(directory: str) -> Filesystem:
    """The mount point, type and free space of the filesystem that holds `directory`."""
    path = os.path.realpath(directory)
    try:
        device = os.stat(path).st_dev
        while path != "/":
            parent = os.path.dirname(path)
            if os.stat(parent).st_dev != device:
                break
            path = parent
    except OSError:
        pass
    free: int | None
    try:
        vfs = os.statvfs(directory)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        free = None
    return Filesystem(path, _mount_type(path), free)


def _mount_type(mount_point: str) -> str | None:
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if "-" not in fields:
                    continue
                separator = fields.index("-")
                where = fields[4].encode().decode("unicode_escape")
                if where == mount_point and separator + 1 < len(fields):
                    found = fields[separator + 1]  # the last mount on that point wins
    except OSError:
        return None
    return found


__all__ = [
    "TEMP_SUFFIX",
    "AtomicOutput",
    "Filesystem",
    "check_destination",
    "filesystem_of",
    "fsync_directory",
]
