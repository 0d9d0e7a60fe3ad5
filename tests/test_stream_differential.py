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
import zlib
from pathlib import Path
from typing import Any

import pytest

from conftest import run_qemu_img
from imgguard import Policy, Status, StreamInspector, Verdict, check
from imgguard.compressed import DecompressionFailed, GzipDecompressor

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


# --- the ratio cap: judged on how the input was cut into feeds ---------------------------------


def zeros_then_noise(zeros: int, noise: int) -> bytes:
    """gzip of `zeros` zero bytes (about 1029:1) then `noise` incompressible bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(zeros >> 20)]
    parts.append(compressor.compress(random.Random(1).randbytes(noise)))
    parts.append(compressor.flush())
    return b"".join(parts)


def bomb_message(data: bytes, chunk: int, **caps: Any) -> str | None:
    decompressor = GzipDecompressor(**caps)
    try:
        for start in range(0, len(data), chunk):
            for _ in decompressor.feed(data[start : start + chunk]):
                pass
        decompressor.finish()
    except DecompressionFailed as failure:
        assert failure.kind == "bomb"
        return str(failure)
    return None


def test_ratio_cap_does_not_depend_on_the_chunking() -> None:
    """The ratio was output over the input *fed so far*: one big feed counted input zlib had
    not reached yet. 20 MiB of zeros then 200 KiB of noise (92:1 overall, over 100:1 for the
    first 64 KiB) was a bomb for 4 KiB feeds and not for one feed of the whole stream."""
    data = zeros_then_noise(20 << 20, 200 << 10)
    caps = {"max_ratio": 100, "ratio_floor": 1 << 20}
    for chunk in (7, 4096, 1 << 20, len(data)):
        message = bomb_message(data, chunk, **caps)
        assert message is not None and "a ratio over 100:1" in message, chunk
    # Near miss: the same stream is no bomb under a cap its prefixes stay under.
    assert bomb_message(data, len(data), max_ratio=400, ratio_floor=1 << 20) is None
    assert bomb_message(data, 4096, max_ratio=400, ratio_floor=1 << 20) is None


def test_gzip_bomb_fed_in_one_big_chunk_is_not_a_pass(tmp_path: Path) -> None:
    """1200 MiB of zeros then 400 KiB of noise: 1.6 MB of gzip. check() reads 1 MiB at a time
    and calls it a bomb (1078816424 bytes from the first 1 MiB); a service feeding the upload
    in 2 MiB chunks (or `InspectedStream.read()` of it whole) got `pass`."""
    data = zeros_then_noise(1200 << 20, 400 << 10)
    path = tmp_path / "bomb.raw.gz"
    path.write_bytes(data)
    expected = check(path, ALLOW)
    assert key(expected) == (Status.REJECT, "raw", ["IG802", "IG803"])
    assert "ratio over 1024:1" in " ".join(finding.message for finding in expected.findings)
    for chunk in (2 << 20, len(data)):
        assert key(streamed(data, chunk, ALLOW)) == key(expected), chunk
