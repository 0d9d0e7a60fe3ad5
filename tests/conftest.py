"""Shared fixtures: real images made by the real qemu-img."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from imgguard.errors import ImageError
from imgguard.model import ImageInfo, Status, Verdict

QEMU_IMG = shutil.which("qemu-img")

if QEMU_IMG is None:  # pragma: no cover - CI installs qemu-utils first
    raise RuntimeError("qemu-img is required by the tests: apt-get install -y qemu-utils")

LUKS_SECRET = "imgguard-test-passphrase"


def run_qemu_img(*args: str, retries: int = 25) -> subprocess.CompletedProcess[str]:
    """Run qemu-img and fail the test with its stderr when it fails.

    qemu-img's LUKS key-slot timing fails now and then on a busy machine ("Unable to get
    accurate CPU usage": its PBKDF2 benchmark finished inside one tick of the thread CPU clock);
    that one error is retried instead of skipped.
    """
    for attempt in range(retries):
        result = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, check=False, timeout=120
        )
        if result.returncode == 0:
            return result
        if "Unable to get accurate CPU usage" not in result.stderr or attempt == retries - 1:
            raise AssertionError(f"qemu-img {' '.join(args)} failed: {result.stderr.strip()}")
        time.sleep(0.1)
    raise AssertionError("unreachable")


def qemu_create(
    path: Path,
    fmt: str,
    size: str | int,
    options: Sequence[str] = (),
    *,
    secret: bool = False,
) -> Path:
    """`qemu-img create -f FMT [-o OPT]... PATH SIZE`; `secret` adds a LUKS key secret."""
    args = ["create", "-q", "-f", fmt]
    if secret:
        args += ["--object", f"secret,id=sec0,data={LUKS_SECRET}"]
    for option in options:
        args += ["-o", option]
    path.unlink(missing_ok=True)
    run_qemu_img(*args, str(path), str(size))
    return path


def qemu_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """`qemu-img info --output=json`, probing the format unless `fmt` is given."""
    args = ["info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    info: dict[str, Any] = json.loads(run_qemu_img(*args, str(path)).stdout)
    return info


def raw_with_data(path: Path, size: int, *, pattern: bytes = b"imgguard-guest-data") -> Path:
    """A sparse raw disk of `size` bytes with `pattern` written at a few spread-out offsets."""
    with path.open("wb") as file:
        file.truncate(size)
        for offset in (0, size // 3, size // 2, size - 4096):
            file.seek(max(0, offset))
            file.write(pattern * 16)
    return path


def qemu_convert(
    source: Path, target: Path, out_fmt: str, options: Sequence[str] = (), *, in_fmt: str = "raw"
) -> Path:
    """`qemu-img convert -f IN -O OUT [-o OPT]... SOURCE TARGET`."""
    args = ["convert", "-q", "-f", in_fmt, "-O", out_fmt]
    for option in options:
        args += ["-o", option]
    target.unlink(missing_ok=True)
    run_qemu_img(*args, str(source), str(target))
    return target


def qemu_refusal(path: Path, fmt: str) -> str:
    """qemu-img info's error message; fails the test when qemu opens the image."""
    assert QEMU_IMG is not None
    result = subprocess.run(
        [QEMU_IMG, "info", "-U", "-f", fmt, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0, f"qemu-img opened {path}"
    return result.stderr


def patched(source: Path, target: Path, *patches: tuple[int, bytes]) -> Path:
    """A copy of `source` at `target` with each `(offset, bytes)` written over it."""
    data = bytearray(source.read_bytes())
    for offset, value in patches:
        data[offset : offset + len(value)] = value
    target.write_bytes(bytes(data))
    return target


def info_or_image_error(inspect_bytes: Callable[[bytes], ImageInfo], data: bytes) -> None:
    """Whatever the bytes, inspecting them gives an ImageInfo or raises an ImageError."""
    try:
        result = inspect_bytes(data)
    except ImageError:
        return
    assert isinstance(result, ImageInfo)


def rejecting_rules(verdict: Verdict) -> set[str]:
    return {finding.rule for finding in verdict.rejecting}


def assert_rejects(path: Path, *rule_ids: str) -> Verdict:
    """check() rejects the image, and with (at least) these rules."""
    from imgguard import check

    verdict = check(path)
    assert verdict.status is Status.REJECT, [(f.rule, f.message) for f in verdict.findings]
    assert set(rule_ids) <= rejecting_rules(verdict), sorted(rejecting_rules(verdict))
    return verdict


def assert_passes(path: Path) -> Verdict:
    from imgguard import check

    verdict = check(path)
    assert verdict.status is Status.PASS, [(f.rule, f.message) for f in verdict.findings]
    return verdict


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_image(fmt, size, *options, name=None, secret=False) -> Path."""
    counter = iter(range(10_000))

    def factory(
        fmt: str, size: str | int, *options: str, name: str | None = None, secret: bool = False
    ) -> Path:
        path = tmp_path / (name or f"image{next(counter)}.{fmt}")
        return qemu_create(path, fmt, size, options, secret=secret)

    return factory
