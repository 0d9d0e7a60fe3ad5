"""The qemu-img backend: convert, resize and query images that passed `check()`.

Nothing here lets qemu-img probe a format or follow a file name the image chose, and qemu-img
runs in a sandbox (namespaces: no network, no host files but its own, the source and the
target) unless the caller opts out; see docs/backend.md for the command lines.
"""

from __future__ import annotations

from imgguard.backend.errors import (
    BackendError,
    ConversionFailed,
    ConversionTimeout,
    ImageRejected,
    NoSpaceLeft,
    QemuImgFailed,
    QemuImgNotFound,
    QemuImgTimeout,
    SandboxUnavailable,
)
from imgguard.backend.limits import DEFAULT_LIMITS, INFO_LIMITS, NO_LIMITS, Limits
from imgguard.backend.qemu import (
    CACHE_MODES,
    MINIMUM_QEMU_IMG_VERSION,
    OUTPUT_FORMATS,
    SUBFORMATS,
    CipherSpec,
    ConversionResult,
    QemuImageInfo,
    check_qemu_img_version,
    convert,
    find_qemu_img,
    qemu_img_version,
    qemu_info,
    resize,
)
from imgguard.backend.sandbox import SOURCE_PATH, TARGET_PATH, SandboxMode

__all__ = [
    "CACHE_MODES",
    "DEFAULT_LIMITS",
    "INFO_LIMITS",
    "MINIMUM_QEMU_IMG_VERSION",
    "NO_LIMITS",
    "OUTPUT_FORMATS",
    "SOURCE_PATH",
    "SUBFORMATS",
    "TARGET_PATH",
    "BackendError",
    "CipherSpec",
    "ConversionFailed",
    "ConversionResult",
    "ConversionTimeout",
    "ImageRejected",
    "Limits",
    "NoSpaceLeft",
    "QemuImageInfo",
    "QemuImgFailed",
    "QemuImgNotFound",
    "QemuImgTimeout",
    "SandboxMode",
    "SandboxUnavailable",
    "check_qemu_img_version",
    "convert",
    "find_qemu_img",
    "qemu_img_version",
    "qemu_info",
    "resize",
]
