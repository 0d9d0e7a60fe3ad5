"""Image signature verification with Glance's properties (and cursive's semantics).

Glance and Cinder verify a signed image with four image properties:

- `img_signature`: the signature, base64;
- `img_signature_hash_method`: `SHA-224`, `SHA-256`, `SHA-384` or `SHA-512`, the hash of the
  image's bytes that was signed;
- `img_signature_key_type`: `RSA-PSS` (MGF1 with the same hash, salt length the maximum, as
  cursive's `signature_utils`), `DSA`, or an ECDSA curve: `ECC_SECP384R1`, `ECC_SECP521R1`,
  `ECC_SECT571K1`, `ECC_SECT409K1`, `ECC_SECT571R1`, `ECC_SECT409R1`;
- `img_signature_certificate_uuid`: the key manager's id of the signing certificate.

As in Cinder's `verify_glance_image_signature`, an image with none of them is unsigned (nothing
to verify, unless the caller requires a signature) and an image with some but not all of them
is invalid (`SignatureMetadataIncomplete`, Cinder's `InvalidSignatureImage`). The certificate
must be within its validity dates now and, when it has a key usage extension, allow
`digitalSignature`; its public key must be of the key type (and curve) the properties name.

The image is hashed as it streams (`SignatureVerifier.update`), so verification costs one pass
and can share it with `StreamInspector` (see `imgguard.fetch`). Fetching the certificate from a
key manager stays with the caller: pass the certificate (an `x509.Certificate`, PEM or DER
bytes) or a callable `get_certificate(uuid)` returning one.

The binary curves (`ECC_SECT*`) are gone from cryptography since version 45 (and from OpenSSL
3 builds without ec2m): those key types fail with `SignatureUnsupported`, never by accident.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import os
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import cryptography
from attrs import frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa, utils

from imgguard.errors import ImgguardError

SIGNATURE = "img_signature"
HASH_METHOD = "img_signature_hash_method"
KEY_TYPE = "img_signature_key_type"
CERTIFICATE_UUID = "img_signature_certificate_uuid"
PROPERTIES = (SIGNATURE, HASH_METHOD, KEY_TYPE, CERTIFICATE_UUID)

HASH_METHODS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "SHA-224": hashes.SHA224,
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
    "SHA-512": hashes.SHA512,
}
# Glance's key type names; ECC ones map to the curve's name in cryptography / OpenSSL.
ECC_CURVES = {
    "ECC_SECT571K1": "sect571k1",
    "ECC_SECT409K1": "sect409k1",
    "ECC_SECT571R1": "sect571r1",
    "ECC_SECT409R1": "sect409r1",
    "ECC_SECP384R1": "secp384r1",
    "ECC_SECP521R1": "secp521r1",
}
KEY_TYPES = ("RSA-PSS", *ECC_CURVES, "DSA")

CertificateSource = x509.Certificate | bytes | str | Callable[[str], Any]


class SignatureError(ImgguardError):
    """Base of the signature verification errors."""


class SignatureMetadataIncomplete(SignatureError):
    """Some of the signature properties are set and some are missing (`missing` names them)."""

    def __init__(self, missing: tuple[str, ...]) -> None:
        self.missing = missing
        super().__init__(
            f"image signature metadata is incomplete: missing {', '.join(missing)} "
            "(an image has all four img_signature* properties or none)"
        )


class SignatureMetadataInvalid(SignatureError):
    """A signature property holds a value Glance does not allow (`property` names it)."""

    def __init__(self, message: str, *, property: str) -> None:
        self.property = property
        super().__init__(f"{property}: {message}")


class SignatureUnsupported(SignatureError):
    """A valid key type this installation cannot verify (binary curves)."""


class CertificateInvalid(SignatureError):
    """The signing certificate cannot be used: unparsable, outside its validity dates, without
    digitalSignature in its key usage, or holding another kind of key than the key type."""


class SignatureMismatch(SignatureError):
    """The signature does not verify for these bytes and this certificate (Cinder's
    `ImageSignatureVerificationException`)."""


class SignatureRequired(SignatureError):
    """The caller requires a signature and the image has none of the properties."""


@frozen
class SignatureMetadata:
    signature: bytes
    hash_method: str
    key_type: str
    certificate_uuid: str

    @classmethod
    def from_properties(cls, properties: Mapping[str, Any]) -> SignatureMetadata | None:
        """The metadata, None for an unsigned image, or a `SignatureError` for a bad one."""
        values = {name: properties.get(name) for name in PROPERTIES}
        present = [name for name, value in values.items() if value not in (None, "")]
        if not present:
            return None
        missing = tuple(name for name in PROPERTIES if name not in present)
        if missing:
            raise SignatureMetadataIncomplete(missing)
        hash_method = str(values[HASH_METHOD])
        if hash_method not in HASH_METHODS:
            raise SignatureMetadataInvalid(
                f"invalid signature hash method {hash_method!r} (one of {', '.join(HASH_METHODS)})",
                property=HASH_METHOD,
            )
        key_type = str(values[KEY_TYPE])
        if key_type not in KEY_TYPES:
            raise SignatureMetadataInvalid(
                f"invalid signature key type {key_type!r} (one of {', '.join(KEY_TYPES)})",
                property=KEY_TYPE,
            )
        encoded = values[SIGNATURE]
        try:
            if isinstance(encoded, str):
                encoded = encoded.encode("ascii")
            if not isinstance(encoded, (bytes, bytearray)):
                raise TypeError(f"a {type(encoded).__name__}, not text")
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError, TypeError, UnicodeEncodeError) as error:
            raise SignatureMetadataInvalid(
                "the signature is not properly encoded using base64", property=SIGNATURE
            ) from error
        if not signature:
            raise SignatureMetadataInvalid("the signature is empty", property=SIGNATURE)
        return cls(signature, hash_method, key_type, str(values[CERTIFICATE_UUID]))


@frozen
class SignatureResult:
    """How verification went. `verified` is false only for an unsigned image (`signed` false)."""

    signed: bool
    verified: bool
    hash_method: str | None = None
    key_type: str | None = None
    certificate_uuid: str | None = None
    certificate_subject: str | None = None
    digest: str | None = None  # hex, of the hash_method
    bytes_hashed: int = 0


def load_certificate(certificate: CertificateSource, uuid: str) -> x509.Certificate:
    """The certificate from an object, PEM/DER bytes, PEM text, or a `get_certificate(uuid)`."""
    if callable(certificate) and not isinstance(certificate, x509.Certificate):
        certificate = certificate(uuid)
    if isinstance(certificate, x509.Certificate):
        return certificate
    if isinstance(certificate, str):
        certificate = certificate.encode("ascii", "replace")
    if isinstance(certificate, (bytes, bytearray)):
        data = bytes(certificate)
        try:
            if b"-----BEGIN" in data:
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except (ValueError, UnsupportedAlgorithm) as error:
            raise CertificateInvalid(f"certificate {uuid} cannot be parsed: {error}") from error
    raise CertificateInvalid(
        f"certificate {uuid}: expected a certificate, PEM or DER bytes, got "
        f"{type(certificate).__name__}"
    )


def check_certificate(
    certificate: x509.Certificate, uuid: str, *, now: datetime.datetime | None = None
) -> None:
    """Validity dates and key usage (digitalSignature), as a `CertificateInvalid`."""
    moment = now or datetime.datetime.now(datetime.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    if moment < certificate.not_valid_before_utc:
        raise CertificateInvalid(
            f"certificate {uuid} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if moment > certificate.not_valid_after_utc:
        raise CertificateInvalid(
            f"certificate {uuid} expired at {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # no key usage extension: the key is not restricted (RFC 5280, 4.2.1.3)
    if not usage.digital_signature:
        raise CertificateInvalid(
            f"certificate {uuid} does not allow digitalSignature in its key usage"
        )


class SignatureVerifier:
    """Hash the image as it streams, then verify: `update(chunk)`... `verify()`."""

    def __init__(
        self,
        metadata: SignatureMetadata,
        certificate: CertificateSource,
        *,
        now: datetime.datetime | None = None,
    ) -> None:
        self.metadata = metadata
        if metadata.key_type in ECC_CURVES and ECC_CURVES[metadata.key_type].startswith("sect"):
            raise SignatureUnsupported(
                f"key type {metadata.key_type} needs the binary curve "
                f"{ECC_CURVES[metadata.key_type]}, which cryptography "
                f"{cryptography.__version__} does not support"
            )
        cert = load_certificate(certificate, metadata.certificate_uuid)
        check_certificate(cert, metadata.certificate_uuid, now=now)
        self.certificate = cert
        try:
            self._key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as error:
            raise CertificateInvalid(
                f"certificate {metadata.certificate_uuid}: unsupported public key: {error}"
            ) from error
        self._check_key_type()
        self._algorithm = HASH_METHODS[metadata.hash_method]()
        self._hash = hashes.Hash(self._algorithm)
        self.bytes_hashed = 0

    def _check_key_type(self) -> None:
        key_type = self.metadata.key_type
        key = self._key
        uuid = self.metadata.certificate_uuid
        if key_type == "RSA-PSS":
            expected: type = rsa.RSAPublicKey
        elif key_type == "DSA":
            expected = dsa.DSAPublicKey
        else:
            expected = ec.EllipticCurvePublicKey
        if not isinstance(key, expected):
            raise CertificateInvalid(
                f"certificate {uuid} holds a {type(key).__name__.lstrip('_')} key, not one "
                f"for key type {key_type}"
            )
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name != ECC_CURVES[key_type]:
            raise CertificateInvalid(
                f"certificate {uuid} holds a key on curve {key.curve.name}, not "
                f"{ECC_CURVES[key_type]} (key type {key_type})"
            )

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self.bytes_hashed += len(data)

    def verify(self) -> SignatureResult:
        """The result, or `SignatureMismatch`. Call once, after the last `update`."""
        digest = self._hash.finalize()
        prehashed = utils.Prehashed(self._algorithm)
        signature = self.metadata.signature
        key = self._key
        try:
            if isinstance(key, rsa.RSAPublicKey):
                pss = padding.PSS(
                    mgf=padding.MGF1(HASH_METHODS[self.metadata.hash_method]()),
                    salt_length=padding.PSS.MAX_LENGTH,
                )
                key.verify(signature, digest, pss, prehashed)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, digest, ec.ECDSA(prehashed))
            elif isinstance(key, dsa.DSAPublicKey):
                key.verify(signature, digest, prehashed)
            else:  # pragma: no cover - _check_key_type refused it
                raise CertificateInvalid("unsupported key")
        except InvalidSignature as error:
            raise SignatureMismatch(
                f"image signature verification failed ({self.metadata.key_type}, "
                f"{self.metadata.hash_method}, certificate {self.metadata.certificate_uuid})"
            ) from error
        return SignatureResult(
            signed=True,
            verified=True,
            hash_method=self.metadata.hash_method,
            key_type=self.metadata.key_type,
            certificate_uuid=self.metadata.certificate_uuid,
            certificate_subject=self.certificate.subject.rfc4514_string(),
            digest=digest.hex(),
            bytes_hashed=self.bytes_hashed,
        )


def verifier_for(
    properties: Mapping[str, Any],
    certificate: CertificateSource | None,
    *,
    required: bool = False,
    now: datetime.datetime | None = None,
) -> SignatureVerifier | None:
    """A verifier for an image's properties; None for an unsigned image (unless `required`)."""
    metadata = SignatureMetadata.from_properties(properties)
    if metadata is None:
        if required:
            raise SignatureRequired(
                "the image is not signed: none of the img_signature* properties is set"
            )
        return None
    if certificate is None:
        raise CertificateInvalid(f"no certificate given for {metadata.certificate_uuid}")
    return SignatureVerifier(metadata, certificate, now=now)


def verify_signature(
    image: str | os.PathLike[str] | BinaryIO,
    properties: Mapping[str, Any],
    certificate: CertificateSource | None,
    *,
    required: bool = False,
    now: datetime.datetime | None = None,
    chunk_size: int = 1 << 20,
) -> SignatureResult:
    """Verify an image (a path or a readable stream) against its Glance signature properties.

    Returns `SignatureResult(signed=False, verified=False)` for an unsigned image (no property
    set) unless `required`; raises `SignatureMetadataIncomplete`, `SignatureMetadataInvalid`,
    `SignatureUnsupported`, `CertificateInvalid`, `SignatureMismatch` or `SignatureRequired`.
    """
    verifier = verifier_for(properties, certificate, required=required, now=now)
    if verifier is None:
        return SignatureResult(signed=False, verified=False)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            _hash_stream(file, verifier, chunk_size)
    else:
        _hash_stream(image, verifier, chunk_size)
    return verifier.verify()


def _hash_stream(stream: BinaryIO, verifier: SignatureVerifier, chunk_size: int) -> None:
    while data := stream.read(chunk_size):
        verifier.update(data)


__all__ = [
    "KEY_TYPES",
    "PROPERTIES",
    "CertificateInvalid",
    "SignatureError",
    "SignatureMetadata",
    "SignatureMetadataIncomplete",
    "SignatureMetadataInvalid",
    "SignatureMismatch",
    "SignatureRequired",
    "SignatureResult",
    "SignatureUnsupported",
    "SignatureVerifier",
    "check_certificate",
    "load_certificate",
    "verifier_for",
    "verify_signature",
]
