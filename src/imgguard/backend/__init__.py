"""The qemu-img backend: convert, resize and query images that passed `check()`.

Nothing here lets qemu-img probe a format or follow a file name the image chose; see
docs/backend.md for the command lines.
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

__all__ = [
    "CACHE_MODES",
    "DEFAULT_LIMITS",
    "INFO_LIMITS",
    "MINIMUM_QEMU_IMG_VERSION",
    "NO_LIMITS",
    "OUTPUT_FORMATS",
    "SUBFORMATS",
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
    "check_qemu_img_version",
    "convert",
    "find_qemu_img",
    "qemu_img_version",
    "qemu_info",
    "resize",
]
