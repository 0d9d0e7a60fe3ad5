"""Glance image signatures: made here with cryptography, verified by imgguard."""

from __future__ import annotations

import base64
import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa
from cryptography.x509.oid import NameOID

from imgguard.signature import (
    PROPERTIES,
    CertificateInvalid,
    SignatureMetadataIncomplete,
    SignatureMetadataInvalid,
    SignatureMismatch,
    SignatureRequired,
    SignatureUnsupported,
    verify_signature,
)

HASHES = {
    "SHA-224": hashes.SHA224,
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
    "SHA-512": hashes.SHA512,
}
NOW = datetime.datetime.now(datetime.UTC)
IMAGE = b"QFI\xfb" + bytes(range(256)) * 400


def certificate_for(
    key: Any,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    digital_signature: bool | None = True,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgguard test signer")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=30))
    )
    if digital_signature is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=not digital_signature,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256())


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "RSA-PSS": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ECC_SECP384R1": ec.generate_private_key(ec.SECP384R1()),
        "ECC_SECP521R1": ec.generate_private_key(ec.SECP521R1()),
        "DSA": dsa.generate_private_key(key_size=2048),
    }


def sign(key: Any, data: bytes, hash_method: str) -> bytes:
    algorithm = HASHES[hash_method]()
    if isinstance(key, rsa.RSAPrivateKey):
        pss = padding.PSS(
            mgf=padding.MGF1(HASHES[hash_method]()), salt_length=padding.PSS.MAX_LENGTH
        )
        return key.sign(data, pss, algorithm)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(algorithm))
    return key.sign(data, algorithm)  # type: ignore[no-any-return]


def properties(signature: bytes, hash_method: str, key_type: str) -> dict[str, str]:
    return {
        "img_signature": base64.b64encode(signature).decode(),
        "img_signature_hash_method": hash_method,
        "img_signature_key_type": key_type,
        "img_signature_certificate_uuid": "5b4b6d6e-3f3a-4a43-9c3c-8b1d6c9d2e10",
    }


@pytest.mark.parametrize("hash_method", list(HASHES))
@pytest.mark.parametrize("key_type", ["RSA-PSS", "ECC_SECP384R1", "ECC_SECP521R1", "DSA"])
def test_every_key_type_and_hash_verifies(
    keys: dict[str, Any], key_type: str, hash_method: str, tmp_path: Path
) -> None:
    key = keys[key_type]
    props = properties(sign(key, IMAGE, hash_method), hash_method, key_type)
    certificate = certificate_for(key)
    image = tmp_path / "image"
    image.write_bytes(IMAGE)
    result = verify_signature(image, props, certificate)
    assert result.verified and result.signed
    assert result.bytes_hashed == len(IMAGE)
    assert result.key_type == key_type and result.hash_method == hash_method
    # PEM bytes and a get_certificate(uuid) callable work as well, on a stream.
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    asked: list[str] = []

    def get_certificate(uuid: str) -> bytes:
        asked.append(uuid)
        return pem

    import io

    assert verify_signature(io.BytesIO(IMAGE), props, get_certificate).verified
    assert asked == [props["img_signature_certificate_uuid"]]


@pytest.mark.parametrize("key_type", ["RSA-PSS", "ECC_SECP384R1", "DSA"])
def test_a_flipped_byte_fails(keys: dict[str, Any], key_type: str, tmp_path: Path) -> None:
    key = keys[key_type]
    props = properties(sign(key, IMAGE, "SHA-256"), "SHA-256", key_type)
    flipped = bytearray(IMAGE)
    flipped[1000] ^= 0x01
    image = tmp_path / "image"
    image.write_bytes(bytes(flipped))
    with pytest.raises(SignatureMismatch):
        verify_signature(image, props, certificate_for(key))


def test_a_wrong_key_fails(keys: dict[str, Any], tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(IMAGE)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    props = properties(sign(keys["RSA-PSS"], IMAGE, "SHA-256"), "SHA-256", "RSA-PSS")
    with pytest.raises(SignatureMismatch):
        verify_signature(image, props, certificate_for(other))


def test_certificate_dates_and_key_usage(keys: dict[str, Any], tmp_path: Path) -> None:
    key = keys["ECC_SECP384R1"]
    image = tmp_path / "image"
    image.write_bytes(IMAGE)
    props = properties(sign(key, IMAGE, "SHA-384"), "SHA-384", "ECC_SECP384R1")
    expired = certificate_for(
        key, not_before=NOW - datetime.timedelta(days=60), not_after=NOW - datetime.timedelta(1)
    )
    with pytest.raises(CertificateInvalid, match="expired"):
        verify_signature(image, props, expired)
    future = certificate_for(key, not_before=NOW + datetime.timedelta(days=1))
    with pytest.raises(CertificateInvalid, match="not valid before"):
        verify_signature(image, props, future)
    no_signing = certificate_for(key, digital_signature=False)
    with pytest.raises(CertificateInvalid, match="digitalSignature"):
        verify_signature(image, props, no_signing)
    # No key usage extension at all: the key is not restricted.
    assert verify_signature(image, props, certificate_for(key, digital_signature=None)).verified
    # A fixed clock: the expired certificate was valid then.
    then = NOW - datetime.timedelta(days=30)
    assert verify_signature(image, props, expired, now=then).verified


def test_key_type_must_match_the_certificate(keys: dict[str, Any], tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(IMAGE)
    props = properties(sign(keys["RSA-PSS"], IMAGE, "SHA-256"), "SHA-256", "ECC_SECP384R1")
    with pytest.raises(CertificateInvalid, match="key type"):
        verify_signature(image, props, certificate_for(keys["RSA-PSS"]))
    props = properties(sign(keys["ECC_SECP521R1"], IMAGE, "SHA-256"), "SHA-256", "ECC_SECP384R1")
    with pytest.raises(CertificateInvalid, match="curve"):
        verify_signature(image, props, certificate_for(keys["ECC_SECP521R1"]))


@pytest.mark.parametrize(
    "key_type", ["ECC_SECT571K1", "ECC_SECT409K1", "ECC_SECT571R1", "ECC_SECT409R1"]
)
def test_binary_curves_are_unsupported_not_wrong(keys: dict[str, Any], key_type: str) -> None:
    props = properties(b"sig", "SHA-256", key_type)
    with pytest.raises(SignatureUnsupported, match="binary curve"):
        verify_signature(Path(__file__), props, certificate_for(keys["ECC_SECP384R1"]))


@pytest.mark.parametrize("missing", PROPERTIES)
def test_each_missing_property_is_incomplete_metadata(keys: dict[str, Any], missing: str) -> None:
    props = properties(sign(keys["RSA-PSS"], IMAGE, "SHA-256"), "SHA-256", "RSA-PSS")
    del props[missing]
    with pytest.raises(SignatureMetadataIncomplete) as caught:
        verify_signature(Path(__file__), props, certificate_for(keys["RSA-PSS"]))
    assert caught.value.missing == (missing,)


def test_no_metadata_is_unsigned_unless_required(keys: dict[str, Any]) -> None:
    result = verify_signature(Path(__file__), {"os_distro": "debian"}, None)
    assert not result.signed and not result.verified
    with pytest.raises(SignatureRequired):
        verify_signature(Path(__file__), {}, None, required=True)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("img_signature_hash_method", "MD5", "hash method"),
        ("img_signature_key_type", "RSA", "key type"),
        ("img_signature", "not base64!", "base64"),
    ],
)
def test_invalid_metadata(keys: dict[str, Any], name: str, value: str, match: str) -> None:
    props = properties(b"signature", "SHA-256", "RSA-PSS")
    props[name] = value
    with pytest.raises(SignatureMetadataInvalid, match=match):
        verify_signature(Path(__file__), props, certificate_for(keys["RSA-PSS"]))


def test_cli_verify(keys: dict[str, Any], tmp_path: Path) -> None:
    import json

    key = keys["RSA-PSS"]
    image = tmp_path / "image"
    image.write_bytes(IMAGE)
    cert = tmp_path / "cert.pem"
    cert.write_bytes(certificate_for(key).public_bytes(serialization.Encoding.PEM))
    props_file = tmp_path / "props.json"
    props_file.write_text(json.dumps(properties(sign(key, IMAGE, "SHA-512"), "SHA-512", "RSA-PSS")))
    command = [sys.executable, "-m", "imgguard", "verify", "--certificate", str(cert)]
    ok = subprocess.run(
        [*command, "--properties", str(props_file), str(image)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "signature verified" in ok.stdout
    image.write_bytes(IMAGE + b"x")
    bad = subprocess.run(
        [*command, "--properties", str(props_file), "-"],
        input=image.read_bytes(),
        capture_output=True,
    )
    assert bad.returncode == 1
    assert b"SignatureMismatch" in bad.stderr
