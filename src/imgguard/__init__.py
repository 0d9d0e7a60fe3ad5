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
from imgguard.compressed import DecompressionFailed
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
from imgguard.fetch import FetchError, FetchNoSpace, FetchResult, fetch
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
from imgguard.signature import (
    CertificateInvalid,
    SignatureError,
    SignatureMetadataIncomplete,
    SignatureMetadataInvalid,
    SignatureMismatch,
    SignatureRequired,
    SignatureResult,
    SignatureUnsupported,
    SignatureVerifier,
    verify_signature,
)
from imgguard.stream import InspectedStream, StreamInspector, StreamRejected, inspect_stream

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_POLICY",
    "CertificateInvalid",
    "ConfigError",
    "ConversionFailed",
    "ConversionResult",
    "ConversionTimeout",
    "DecompressionFailed",
    "Encryption",
    "Extent",
    "Feature",
    "FetchError",
    "FetchNoSpace",
    "FetchResult",
    "Finding",
    "ImageError",
    "ImageInfo",
    "ImageRejected",
    "ImgguardError",
    "InspectedStream",
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
    "SignatureError",
    "SignatureMetadataIncomplete",
    "SignatureMetadataInvalid",
    "SignatureMismatch",
    "SignatureRequired",
    "SignatureResult",
    "SignatureUnsupported",
    "SignatureVerifier",
    "Status",
    "StreamInspector",
    "StreamRejected",
    "Table",
    "TruncatedImage",
    "UnreadableImage",
    "Verdict",
    "__version__",
    "check",
    "convert",
    "fetch",
    "inspect",
    "inspect_bytes",
    "inspect_stream",
    "load_policy",
    "qemu_img_version",
    "qemu_info",
    "resize",
    "verify_signature",
]
