"""gzip containers: detected, judged inside by streaming decompression, bounded, converted."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tracemalloc
import zlib
from pathlib import Path

import pytest

import imgguard
from imgguard import Policy, Status, StreamInspector, check
from imgguard.compressed import DecompressionFailed, GzipDecompressor, container_of

ROOT = Path(__file__).resolve().parent.parent
BENIGN = ROOT / "corpus" / "demo" / "benign" / "cloud.qcow2"
ATTACK = ROOT / "corpus" / "demo" / "attacks" / "backing-etc-passwd.qcow2"
ALLOW = Policy(allow_compressed=True)


def gz(tmp_path: Path, source: Path) -> Path:
    out = tmp_path / (source.name + ".gz")
    out.write_bytes(gzip.compress(source.read_bytes()))
    return out


def rules_of(verdict: imgguard.Verdict) -> list[str]:
    return [finding.rule for finding in verdict.findings]


def test_inspect_reports_the_container(tmp_path: Path) -> None:
    info = imgguard.inspect(gz(tmp_path, BENIGN))
    assert info.format == "raw" and info.qemu_format == "raw"
    assert info.header["container"] == "gzip"
    assert info.matches == ("compressed", "raw")


def test_check_judges_the_image_inside(tmp_path: Path) -> None:
    path = gz(tmp_path, BENIGN)
    refused = check(path)
    assert refused.status is Status.REJECT and rules_of(refused) == ["IG802"]
    allowed = check(path, ALLOW, claimed_format="qcow2")
    assert allowed.ok, allowed.findings
    assert allowed.info is not None and allowed.info.format == "qcow2"
    assert allowed.info.header["container"] == "gzip"
    assert allowed.findings[0].severity == imgguard.Severity.INFO
    mismatch = check(path, ALLOW, claimed_format="raw")
    assert "IG202" in rules_of(mismatch)


def test_hostile_image_inside_gzip_is_rejected(tmp_path: Path) -> None:
    verdict = check(gz(tmp_path, ATTACK), ALLOW)
    assert verdict.status is Status.REJECT
    assert "IG101" in rules_of(verdict)
    # The inner findings are the file's own.
    inner = check(ATTACK, ALLOW)
    assert set(rules_of(inner)) <= set(rules_of(verdict))


def test_check_of_an_imageinfo_never_passes_an_uninspected_gzip(tmp_path: Path) -> None:
    info = imgguard.inspect(gz(tmp_path, BENIGN))
    verdict = check(info, ALLOW)
    assert verdict.status is Status.REJECT and rules_of(verdict) == ["IG802"]


@pytest.mark.parametrize("chunk", [1, 17, 4096, 1 << 20])
def test_stream_of_gzip_equals_check_of_the_file(tmp_path: Path, chunk: int) -> None:
    for source in (BENIGN, ATTACK):
        path = gz(tmp_path, source)
        data = path.read_bytes()
        inspector = StreamInspector(ALLOW)
        for start in range(0, len(data), chunk):
            inspector.feed(data[start : start + chunk])
        verdict = inspector.finish()
        expected = check(path, ALLOW)
        assert (verdict.status, verdict.findings) == (expected.status, expected.findings)


def test_gzip_upload_rejected_early_when_not_allowed(tmp_path: Path) -> None:
    data = gz(tmp_path, BENIGN).read_bytes()
    inspector = StreamInspector()
    inspector.feed(data[:16])
    assert inspector.verdict is not None and inspector.early
    assert rules_of(inspector.verdict) == ["IG802"]


def test_other_containers_are_reported_and_refused(tmp_path: Path) -> None:
    payload = BENIGN.read_bytes()
    samples = {
        "xz": lzma.compress(payload),
        "bzip2": bz2.compress(payload),
        "zstd": b"\x28\xb5\x2f\xfd" + bytes(64),
    }
    for kind, data in samples.items():
        assert container_of(data) == kind
        path = tmp_path / f"image.{kind}"
        path.write_bytes(data)
        assert imgguard.inspect(path).header["container"] == kind
        verdict = check(path, ALLOW)
        assert verdict.status is Status.REJECT and rules_of(verdict) == ["IG802"], kind
    assert container_of(b"QFI\xfb") is None


def _gzip_of_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(size >> 20)]
    parts.append(compressor.flush())
    return b"".join(parts)


def test_gzip_bomb_is_a_finding_within_the_memory_budget() -> None:
    bomb = _gzip_of_zeros(256 << 20)  # 256 MiB of zeros in ~250 KiB
    inspector = StreamInspector(ALLOW, max_decompressed=64 << 20)
    tracemalloc.start()
    try:
        for start in range(0, len(bomb), 1 << 16):
            inspector.feed(bomb[start : start + (1 << 16)])
        verdict = inspector.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert verdict.status is not Status.PASS
    assert "IG803" in rules_of(verdict)
    assert peak < inspector.memory_budget


def test_ratio_cap() -> None:
    bomb = _gzip_of_zeros(8 << 20)
    decompressor = GzipDecompressor(max_ratio=100, ratio_floor=1 << 20)
    with pytest.raises(DecompressionFailed) as caught:
        for _ in decompressor.feed(bomb):
            pass
    assert caught.value.kind == "bomb"


def test_multi_member_padding_and_garbage() -> None:
    payload = b"hello " * 1000
    two = gzip.compress(payload) + gzip.compress(payload) + bytes(10)
    decompressor = GzipDecompressor(chunk=100)
    out = b"".join(piece for i in range(len(two)) for piece in decompressor.feed(two[i : i + 1]))
    decompressor.finish()
    assert out == payload * 2 and decompressor.members == 2
    with pytest.raises(DecompressionFailed, match="trailing"):
        bad = GzipDecompressor()
        list(bad.feed(gzip.compress(payload) + b"junk"))
    truncated = GzipDecompressor()
    list(truncated.feed(gzip.compress(payload)[:-5]))
    with pytest.raises(DecompressionFailed, match="truncated"):
        truncated.finish()


def test_corrupt_gzip_is_never_a_pass(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(BENIGN.read_bytes())[:-20])
    verdict = check(path, ALLOW)
    assert verdict.status is not Status.PASS
    assert "IG803" in rules_of(verdict)
    waived = check(path, Policy(allow_compressed=True, waivers=frozenset({"IG803"})))
    assert waived.status is Status.ERROR


def test_convert_decompresses_first(tmp_path: Path) -> None:
    path = gz(tmp_path, BENIGN)
    out = tmp_path / "out.raw"
    result = imgguard.convert(path, out, "raw", policy=ALLOW, sandbox=False)
    assert result.verdict.info is not None and result.verdict.info.header["container"] == "gzip"
    assert out.stat().st_size == 1 << 20
    assert not list(tmp_path.glob(".imgguard-gunzip-*"))
    with pytest.raises(imgguard.ImageRejected):
        imgguard.convert(path, tmp_path / "refused.raw", "raw", sandbox=False)


def test_bytes_io_source(tmp_path: Path) -> None:
    data = gzip.compress(BENIGN.read_bytes())
    verdict = check(io.BytesIO(data), ALLOW)
    assert verdict.ok and verdict.info is not None and verdict.info.format == "qcow2"
