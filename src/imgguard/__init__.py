"""imgguard: inspect VM disk images without executing anything, and judge them by a policy.

>>> import imgguard
>>> verdict = imgguard.check("upload.img", claimed_format="qcow2")
>>> verdict.ok, verdict.info.format, [f.rule for f in verdict.findings]
"""

from __future__ import annotations

from imgguard.backend import (
    ConversionFailed,
    ConversionResult,
    ConversionTimeout,
    ImageRejected,
    NoSpaceLeft,
    QemuImgNotFound,
    convert,
    qemu_img_version,
    qemu_info,
    resize,
)
from imgguard.errors import (
    ConfigError,
    ImageError,
    ImgguardError,
    LimitExceeded,
    MalformedImage,
    NotARegularFile,
    TruncatedImage,
    UnreadableImage,
)
from imgguard.inspection import inspect, inspect_bytes
from imgguard.model import (
    Encryption,
    Extent,
    Feature,
    Finding,
    ImageInfo,
    KeySlot,
    Policy,
    Problem,
    Reference,
    ReferenceKind,
    Severity,
    Status,
    Table,
    Verdict,
)
from imgguard.policy import DEFAULT_POLICY, check, load_policy

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_POLICY",
    "ConfigError",
    "ConversionFailed",
    "ConversionResult",
    "ConversionTimeout",
    "Encryption",
    "Extent",
    "Feature",
    "Finding",
    "ImageError",
    "ImageInfo",
    "ImageRejected",
    "ImgguardError",
    "KeySlot",
    "LimitExceeded",
    "MalformedImage",
    "NoSpaceLeft",
    "NotARegularFile",
    "Policy",
    "Problem",
    "QemuImgNotFound",
    "Reference",
    "ReferenceKind",
    "Severity",
    "Status",
    "Table",
    "TruncatedImage",
    "UnreadableImage",
    "Verdict",
    "__version__",
    "check",
    "convert",
    "inspect",
    "inspect_bytes",
    "load_policy",
    "qemu_img_version",
    "qemu_info",
    "resize",
]
