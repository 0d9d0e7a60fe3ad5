"""`fetch`: copy an image from a stream to a file, inspecting and verifying it in the same pass.

Cinder's `image_utils.fetch` downloads an image to a temporary file, then checks it; here the
copy, the inspection (`StreamInspector`) and the signature hash (`SignatureVerifier`) share one
read of the source. The bytes go to a temporary file next to `dest_path` that is renamed over it
only when everything passed, so a failure (a rejection, early or at the end; a bad signature; a
full disk; an interrupted read) leaves no partial file. A full disk (ENOSPC, EDQUOT) becomes
`FetchNoSpace`, which names the directory.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

from attrs import frozen

from imgguard.errors import ImgguardError
from imgguard.model import Policy, Verdict
from imgguard.signature import CertificateSource, SignatureResult, verifier_for
from imgguard.stream import StreamInspector, StreamRejected

LOG = logging.getLogger(__name__)
MiB = 1 << 20


class FetchError(ImgguardError):
    """The copy failed; nothing was left at the destination."""


class FetchNoSpace(FetchError):
    """The filesystem holding `directory` filled up (or its quota did) during the copy."""

    def __init__(self, message: str, *, directory: str, free_bytes: int | None) -> None:
        self.directory = directory
        self.free_bytes = free_bytes
        super().__init__(message)


@frozen
class FetchResult:
    path: str
    bytes: int
    seconds: float
    verdict: Verdict | None
    signature: SignatureResult | None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MiB / self.seconds if self.seconds > 0 else 0.0


def fetch(
    source: BinaryIO | Iterable[bytes],
    dest_path: str | os.PathLike[str],
    *,
    policy: Policy | None = None,
    inspect: bool = True,
    expected_format: str | None = None,
    allowed_formats: Iterable[str] | None = None,
    target_size: int | None = None,
    convert_to: str | None = None,
    signature_properties: Mapping[str, Any] | None = None,
    certificate: CertificateSource | None = None,
    require_signature: bool = False,
    now: datetime.datetime | None = None,
    chunk_size: int = MiB,
    fsync: bool = True,
    overwrite: bool = True,
) -> FetchResult:
    """Copy `source` (a readable binary stream or an iterable of chunks) to `dest_path`.

    With `inspect` the image is judged as it streams (`policy`, `expected_format`,
    `allowed_formats`, `target_size`, `convert_to` as for `StreamInspector`): a rejection stops
    the copy at once with `StreamRejected`. With `signature_properties` (Glance's
    img_signature* properties) the bytes are verified against `certificate` (see
    `imgguard.signature`); `require_signature` refuses an unsigned image. Raises
    `FetchNoSpace` on a full disk, `FetchError` when the destination exists and not
    `overwrite`, and the `SignatureError`s; in every case no file is left behind.
    """
    destination = os.path.abspath(os.fspath(dest_path))
    directory = os.path.dirname(destination)
    if not overwrite and os.path.lexists(destination):
        raise FetchError(f"{destination} exists")
    # Signature metadata and the certificate are checked before a byte is copied.
    verifier = (
        verifier_for(signature_properties or {}, certificate, required=require_signature, now=now)
        if signature_properties is not None or require_signature
        else None
    )
    inspector = (
        StreamInspector(
            policy,
            expected_format=expected_format,
            allowed_formats=allowed_formats,
            target_size=target_size,
            convert_to=convert_to,
            name=destination,
        )
        if inspect
        else None
    )
    fd, temp_path = _temporary(directory, os.path.basename(destination))
    started = time.monotonic()
    copied = 0
    try:
        for chunk in _chunks(source, chunk_size):
            if inspector is not None:
                early = inspector.feed(chunk)
                if early is not None and not early.ok:
                    raise StreamRejected(early, inspector.bytes_seen)
            if verifier is not None:
                verifier.update(chunk)
            _write_all(fd, chunk, directory)
            copied += len(chunk)
        verdict = inspector.finish() if inspector is not None else None
        if verdict is not None and not verdict.ok:
            raise StreamRejected(verdict, copied)
        signature = verifier.verify() if verifier is not None else None
        if fsync:
            _fsync(fd, directory)
        os.close(fd)
        fd = -1
        os.replace(temp_path, destination)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink(temp_path)
        LOG.info("fetch to %s failed after %d bytes; nothing was kept", destination, copied)
        raise
    seconds = time.monotonic() - started
    result = FetchResult(destination, copied, seconds, verdict, signature)
    LOG.info(
        "fetched %.2f MiB to %s in %.2f s: %.2f MiB/s%s%s",
        copied / MiB,
        destination,
        seconds,
        result.mb_per_s,
        f", verdict {verdict.status}" if verdict is not None else "",
        ", signature verified" if signature is not None and signature.verified else "",
    )
    return result


def _chunks(source: BinaryIO | Iterable[bytes], chunk_size: int) -> Iterable[bytes]:
    read = getattr(source, "read", None)
    if read is None:
        yield from (bytes(chunk) for chunk in source if chunk)
        return
    while data := read(chunk_size):
        yield bytes(data)


def _temporary(directory: str, base: str) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
    except OSError as error:
        _raise_no_space(error, directory)
        raise FetchError(
            f"cannot create a temporary file in {directory}: {error.strerror or error}"
        ) from error


def _write_all(fd: int, data: bytes, directory: str) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as error:
            _raise_no_space(error, directory)
            raise
        view = view[written:]


def _fsync(fd: int, directory: str) -> None:
    try:
        os.fsync(fd)
    except OSError as error:
        _raise_no_space(error, directory)
        raise


def _raise_no_space(error: OSError, directory: str) -> None:
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return
    try:
        stats = os.statvfs(directory)
        free: int | None = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    what = "no space left" if error.errno == errno.ENOSPC else "disk quota exceeded"
    raise FetchNoSpace(
        f"{what} on the filesystem holding {directory} while fetching"
        + (f" ({free} bytes free)" if free is not None else ""),
        directory=directory,
        free_bytes=free,
    ) from error


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


__all__ = ["FetchError", "FetchNoSpace", "FetchResult", "fetch"]
