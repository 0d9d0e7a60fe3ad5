"""What the qemu backend raises.

Every class derives from `imgguard.ImgguardError`. A run of qemu-img that fails raises
`QemuImgFailed` (or, from `convert`, its subclass `ConversionFailed`), which carries the command
line, the exit status and qemu-img's own error message.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from imgguard.errors import ImgguardError
from imgguard.model import Verdict


class BackendError(ImgguardError):
    """Base of the errors of `imgguard.backend`."""


class QemuImgNotFound(BackendError):
    """There is no usable qemu-img program (or it is older than imgguard needs)."""

    PACKAGE_HINT = (
        "install the qemu-utils package (Debian/Ubuntu: apt-get install qemu-utils; "
        "Fedora/RHEL: dnf install qemu-img)"
    )

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or f"qemu-img was not found on PATH; {self.PACKAGE_HINT}")


class SandboxUnavailable(BackendError):
    """qemu-img cannot be run in a sandbox here: neither bubblewrap nor util-linux `unshare` can
    create the namespaces (or is installed), and the caller did not opt out with
    `sandbox=False` (`--no-sandbox`). `reasons` says, per tool, why it could not be used."""

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        self.reasons = tuple(reasons)
        super().__init__(message)


class ImageRejected(BackendError):
    """The source image did not pass `check()` (or names a file qemu-img would open).

    `verdict` is the full verdict of the source; `reasons` the messages that stopped it.
    """

    def __init__(self, verdict: Verdict, reasons: Sequence[str] = ()) -> None:
        self.verdict = verdict
        self.reasons = tuple(reasons) or tuple(
            f"{finding.rule} {finding.severity}: {finding.message}" for finding in verdict.rejecting
        )
        path = verdict.path or "image"
        detail = "; ".join(self.reasons) or f"status {verdict.status}"
        super().__init__(f"{path}: rejected: {detail}")


class QemuImgFailed(BackendError):
    """qemu-img ran and failed: it exited non-zero, was killed, hit a limit or timed out.

    `returncode` is the exit status, or minus the signal number when a signal ended it (as in
    `subprocess`); `limit` names the resource limit it hit (`cpu`, `address-space`) when that is
    what stopped it; `stderr` is qemu-img's error output (its last 64 KiB).
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        limit: str | None = None,
    ) -> None:
        self.command = tuple(command)
        self.returncode = returncode
        self.stderr = stderr
        self.limit = limit
        super().__init__(message)

    @property
    def signal(self) -> signal.Signals | None:
        """The signal that ended qemu-img, if one did."""
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode)
        except ValueError:
            return None


class QemuImgTimeout(QemuImgFailed):
    """qemu-img ran past its wall-clock timeout and its process group was killed."""

    def __init__(
        self,
        message: str,
        *,
        timeout: float,
        command: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        self.timeout = timeout
        super().__init__(message, command=command, returncode=returncode, stderr=stderr)


class ConversionFailed(QemuImgFailed):
    """`convert` failed; nothing new was left at the destination."""


class ConversionTimeout(ConversionFailed, QemuImgTimeout):
    """`convert` ran past its wall-clock timeout; nothing new was left at the destination."""


class NoSpaceLeft(ConversionFailed):
    """The filesystem holding the destination filled up during `convert`.

    `directory` is the destination's directory, `mount_point` and `filesystem` (its type) name
    the filesystem, `free_bytes` is what was free on it when the conversion gave up.
    """

    def __init__(
        self,
        message: str,
        *,
        directory: str,
        mount_point: str | None = None,
        filesystem: str | None = None,
        free_bytes: int | None = None,
        command: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        self.directory = directory
        self.mount_point = mount_point
        self.filesystem = filesystem
        self.free_bytes = free_bytes
        super().__init__(message, command=command, returncode=returncode, stderr=stderr)


__all__ = [
    "BackendError",
    "ConversionFailed",
    "ConversionTimeout",
    "ImageRejected",
    "NoSpaceLeft",
    "QemuImgFailed",
    "QemuImgNotFound",
    "QemuImgTimeout",
    "SandboxUnavailable",
]
