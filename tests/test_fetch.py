"""fetch(): copy, inspect and verify in one pass; nothing partial left on failure."""

from __future__ import annotations

import base64
import datetime
import errno
import io
import logging
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import imgguard
from imgguard import FetchNoSpace, SignatureMismatch, StreamRejected, fetch

ROOT = Path(__file__).resolve().parent.parent
BENIGN = ROOT / "corpus" / "demo" / "benign" / "legacy.vhd"
ATTACK = ROOT / "corpus" / "demo" / "attacks" / "backing-etc-passwd.qcow2"


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_fetch_copies_and_judges(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / "image.vhd"
    with caplog.at_level(logging.INFO, logger="imgguard.fetch"):
        result = fetch(io.BytesIO(BENIGN.read_bytes()), dest, chunk_size=70_000)
    assert dest.read_bytes() == BENIGN.read_bytes()
    assert result.verdict is not None and result.verdict.ok
    assert result.bytes == BENIGN.stat().st_size
    assert leftovers(tmp_path) == ["image.vhd"]
    assert any("MiB/s" in record.getMessage() for record in caplog.records)
    assert imgguard.check(dest).findings == result.verdict.findings


def test_rejected_image_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "image.qcow2"
    with pytest.raises(StreamRejected) as caught:
        fetch(io.BytesIO(ATTACK.read_bytes()), dest, chunk_size=4096)
    assert [f.rule for f in caught.value.verdict.findings] == ["IG101"]
    assert leftovers(tmp_path) == []


def test_existing_destination_is_kept_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "image.qcow2"
    dest.write_bytes(b"previous")
    with pytest.raises(StreamRejected):
        fetch(io.BytesIO(ATTACK.read_bytes()), dest)
    assert dest.read_bytes() == b"previous"
    assert leftovers(tmp_path) == ["image.qcow2"]


def test_disk_full_names_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    written = 0

    def full_write(fd: int, data: bytes | memoryview) -> int:
        nonlocal written
        if written > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_write)
    with pytest.raises(FetchNoSpace) as caught:
        fetch(io.BytesIO(BENIGN.read_bytes()), tmp_path / "image.vhd", chunk_size=65536)
    assert caught.value.directory == str(tmp_path)
    assert str(tmp_path) in str(caught.value)
    monkeypatch.setattr(os, "write", real_write)
    assert leftovers(tmp_path) == []


def _signed(data: bytes) -> tuple[dict[str, str], x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    properties = {
        "img_signature": base64.b64encode(signature).decode(),
        "img_signature_hash_method": "SHA-256",
        "img_signature_key_type": "ECC_SECP384R1",
        "img_signature_certificate_uuid": "cert-1",
    }
    return properties, certificate


def test_fetch_verifies_the_signature_in_the_same_pass(tmp_path: Path) -> None:
    data = BENIGN.read_bytes()
    properties, certificate = _signed(data)
    result = fetch(
        io.BytesIO(data),
        tmp_path / "image.vhd",
        signature_properties=properties,
        certificate=certificate,
    )
    assert result.signature is not None and result.signature.verified
    tampered = bytearray(data)
    tampered[5000] ^= 0xFF
    with pytest.raises(SignatureMismatch):
        fetch(
            io.BytesIO(bytes(tampered)),
            tmp_path / "other.vhd",
            signature_properties=properties,
            certificate=certificate,
        )
    assert leftovers(tmp_path) == ["image.vhd"]


def test_fetch_from_an_iterable_without_inspection(tmp_path: Path) -> None:
    chunks = [b"a" * 1000, b"", b"b" * 10]
    result = fetch(iter(chunks), tmp_path / "blob", inspect=False)
    assert result.verdict is None and result.bytes == 1010
    assert (tmp_path / "blob").read_bytes() == b"a" * 1000 + b"b" * 10
