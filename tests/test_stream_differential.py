"""Differential tests of the streaming path against `check()` of the same bytes on disk.

The promise (docs/services.md): for any bytes, `StreamInspector` (any chunking), `fetch` and
`scan -` give the verdict `check(path)` gives (status, format, rule ids), or `error` with IG704
for a region the stream did not keep; never a pass where the file check rejects. Each test here
is a violation found by feeding qemu-img-made, attack, mutated and gzip-wrapped images in
chunks of 1, 7, 4096 and 1 MiB bytes and random splits; it says what happened before the fix.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

import pytest

from conftest import run_qemu_img
from imgguard import Policy, Status, StreamInspector, Verdict, check
from imgguard.compressed import GzipDecompressor

ALLOW = Policy(allow_compressed=True)
CHUNKS = (1, 7, 4096, 1 << 20)


def key(verdict: Verdict) -> tuple[Any, ...]:
    fmt = verdict.info.format if verdict.info is not None else None
    return (verdict.status, fmt, sorted({finding.rule for finding in verdict.findings}))


def streamed(data: bytes, chunk: int, policy: Policy | None = None, **options: Any) -> Verdict:
    inspector = StreamInspector(policy, **options)
    for start in range(0, len(data), chunk):
        inspector.feed(data[start : start + chunk])
    return inspector.finish()


def qcow2_of_random_data(tmp_path: Path, size: int = 1 << 20) -> Path:
    raw = tmp_path / "data.raw"
    raw.write_bytes(random.Random(5).randbytes(size))
    image = tmp_path / "data.qcow2"
    run_qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    return image


# --- multi-member gzip: the next member was decompressed again and again -------------------------


def test_multi_member_gzip_decompresses_each_member_once(tmp_path: Path) -> None:
    """`cat a.gz b.gz` (and bgzip, pigz -i) make a gzip file of several members; gzip -d reads
    it as the concatenation. When a member's output filled a 64 KiB piece while input was left,
    CPython's zlib keeps the input after the member's end in `unconsumed_tail` as well as in
    `unused_data`: the decompressor took both, so the next member came out twice, or (when
    that repeated) forever until the ratio cap called it a bomb. Was: a 1 MiB qcow2 made by
    qemu-img split into two members was `reject` IG803 ("decompresses to 1073807360 bytes
    from ..., a ratio over 1024:1") for check() and 1 MiB reads, `pass` for 1-byte feeds."""
    image = qcow2_of_random_data(tmp_path)
    data = image.read_bytes()
    half = len(data) // 2
    two = gzip.compress(data[:half], mtime=0) + gzip.compress(data[half:], mtime=0)
    decompressor = GzipDecompressor()
    out = b"".join(decompressor.feed(two))
    decompressor.finish()
    assert out == data and decompressor.members == 2
    path = tmp_path / "data.qcow2.gz"
    path.write_bytes(two)
    expected = (Status.PASS, "qcow2", ["IG802"])
    assert key(check(path, ALLOW)) == expected
    plain = check(image, ALLOW)
    assert key(plain) == (Status.PASS, "qcow2", [])
    for chunk in CHUNKS:
        assert key(streamed(two, chunk, ALLOW)) == expected, chunk


def test_multi_member_gzip_of_zeros_is_not_a_bomb(tmp_path: Path) -> None:
    """Near miss: members of highly compressible data, each well under the ratio cap."""
    member = gzip.compress(bytes(4 << 20), mtime=0)
    data = member * 3
    decompressor = GzipDecompressor()
    total = sum(len(piece) for piece in decompressor.feed(data))
    decompressor.finish()
    assert total == 12 << 20 and decompressor.members == 3
    path = tmp_path / "zeros.raw.gz"
    path.write_bytes(data)
    assert key(check(path, ALLOW)) == (Status.PASS, "raw", ["IG802"])


@pytest.mark.parametrize("chunk", CHUNKS)
def test_gzip_member_then_truncated_member_is_corrupt(tmp_path: Path, chunk: int) -> None:
    image = qcow2_of_random_data(tmp_path, 256 << 10)
    data = image.read_bytes()
    second = gzip.compress(data, mtime=0)
    blob = gzip.compress(data, mtime=0) + second[: len(second) // 2]
    path = tmp_path / "cut.gz"
    path.write_bytes(blob)
    expected = check(path, ALLOW)
    assert expected.status is Status.REJECT and "IG803" in key(expected)[2]
    assert key(streamed(blob, chunk, ALLOW)) == key(expected)
