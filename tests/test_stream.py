"""StreamInspector: the verdict of a stream equals check() of the same bytes as a file."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgguard
from conftest import qemu_create, raw_with_data, run_qemu_img
from imgguard import Policy, Status, StreamInspector, StreamRejected, Verdict, check
from imgguard.stream import InspectedStream, inspect_stream

ROOT = Path(__file__).resolve().parent.parent
DEMO = sorted(path for path in (ROOT / "corpus" / "demo").rglob("*") if path.is_file())
CHUNK_SIZES = (1, 17, 512, 64 * 1024, 16 << 20)


def verdict_key(verdict: Verdict) -> tuple[Any, ...]:
    """What must agree between a stream and a file: status, findings and facts (not the path,
    nor the allocated size, which only a file on disk has)."""
    info = None
    if verdict.info is not None:
        info = attrs.evolve(verdict.info, path=None, actual_size=None)
    return (verdict.status, verdict.findings, verdict.waived, info)


def stream_verdict(data: bytes, chunk: int, **options: Any) -> tuple[Verdict, StreamInspector]:
    inspector = StreamInspector(**options)
    feed = inspector.feed
    for start in range(0, len(data), chunk):
        feed(data[start : start + chunk])
    return inspector.finish(), inspector


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small set of images made by the real qemu-img, benign and hostile."""
    tmp = tmp_path_factory.mktemp("qemu-set")
    data = raw_with_data(tmp / "data.raw", 1 << 20)
    images = [
        qemu_create(tmp / "plain.qcow2", "qcow2", "1G"),
        qemu_create(tmp / "v2.qcow2", "qcow2", "64M", ["compat=0.10"]),
        qemu_create(tmp / "sparse.vmdk", "vmdk", "1G"),
        qemu_create(tmp / "stream.vmdk", "vmdk", "1G", ["subformat=streamOptimized"]),
        qemu_create(tmp / "dynamic.vhd", "vpc", "1G"),
        qemu_create(tmp / "fixed.vhd", "vpc", "1M", ["subformat=fixed"]),
        qemu_create(tmp / "dynamic.vhdx", "vhdx", "1G"),
        qemu_create(tmp / "dynamic.vdi", "vdi", "1G"),
        qemu_create(tmp / "image.qed", "qed", "1G"),
        qemu_create(tmp / "image.parallels", "parallels", "64M"),
        qemu_create(
            tmp / "backed.qcow2", "qcow2", "1G", [f"backing_file={data}", "backing_fmt=raw"]
        ),
    ]
    for fmt in ("qcow2", "vmdk", "vpc", "vdi"):
        out = tmp / f"data.{fmt}"
        run_qemu_img("convert", "-q", "-f", "raw", "-O", fmt, str(data), str(out))
        images.append(out)
    return images


@pytest.mark.parametrize("chunk", CHUNK_SIZES, ids=lambda size: f"chunk{size}")
def test_demo_corpus_stream_verdict_equals_file_verdict(chunk: int) -> None:
    assert DEMO
    for path in DEMO:
        expected = check(path)
        verdict, _ = stream_verdict(path.read_bytes(), chunk, name=str(path))
        assert verdict_key(verdict) == verdict_key(expected), path


@pytest.mark.parametrize("chunk", CHUNK_SIZES, ids=lambda size: f"chunk{size}")
def test_qemu_img_images_stream_verdict_equals_file_verdict(
    qemu_images: list[Path], chunk: int
) -> None:
    for path in qemu_images:
        data = path.read_bytes()
        expected = check(path)
        verdict, _ = stream_verdict(data, chunk, name=str(path))
        assert verdict_key(verdict) == verdict_key(expected), path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(DEMO) - 1),
    cuts=st.lists(st.integers(min_value=1, max_value=1 << 17), min_size=1, max_size=40),
)
def test_random_chunkings_give_the_file_verdict(index: int, cuts: list[int]) -> None:
    path = DEMO[index]
    data = path.read_bytes()
    inspector = StreamInspector(name=str(path))
    position = 0
    step = 0
    while position < len(data):
        size = cuts[step % len(cuts)]
        inspector.feed(data[position : position + size])
        position += size
        step += 1
    assert verdict_key(inspector.finish()) == verdict_key(check(path))


def test_early_rejection_is_a_subset_of_the_final_verdict(qemu_images: list[Path]) -> None:
    for path in [*DEMO, *qemu_images]:
        data = path.read_bytes()
        inspector = StreamInspector(name=str(path))
        for start in range(0, len(data), 4096):
            if inspector.feed(data[start : start + 4096]) is not None:
                break
        if not inspector.early:
            continue
        early = inspector.verdict
        assert early is not None and early.status is Status.REJECT
        final = check(path)
        assert final.status is Status.REJECT, path
        assert {f.rule for f in early.findings} <= {f.rule for f in final.findings}, path


# --- aborting an upload -------------------------------------------------------------------------


class CountingStream(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._data.read(size)
        self.bytes_read += len(data)
        return data


def test_upload_of_backed_qcow2_is_aborted_after_its_metadata(tmp_path: Path) -> None:
    """A 16 MiB qcow2 that names a backing file: rejected once its header and tables are in."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(random.Random(8).randbytes(16 << 20))
    image = tmp_path / "backed.qcow2"
    run_qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    run_qemu_img("rebase", "-u", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(image))
    data = image.read_bytes()
    info = imgguard.inspect(image)
    # The regions the format needs: the header cluster and the tables it checks are in the file.
    needed = max(
        [table.offset + table.length for table in info.tables if table.loaded_at_open] + [34816]
    )
    for chunk in (1, 512, 64 * 1024):
        source = CountingStream(data)
        upload = InspectedStream(source, StreamInspector(expected_format="qcow2"))  # type: ignore[arg-type]
        with pytest.raises(StreamRejected) as caught:
            while upload.read(chunk):
                pass
        assert [f.rule for f in caught.value.verdict.findings] == ["IG101"]
        assert source.bytes_read <= needed + chunk - 1, (chunk, source.bytes_read, needed)
        assert source.bytes_read < len(data) // 10


def test_upload_of_a_format_not_allowed_is_aborted_after_the_probe(qemu_images: list[Path]) -> None:
    qed = next(path for path in qemu_images if path.suffix == ".qed")
    data = qed.read_bytes()
    source = CountingStream(data)
    upload = InspectedStream(source, StreamInspector())  # type: ignore[arg-type]
    with pytest.raises(StreamRejected) as caught:
        while upload.read(1):
            pass
    assert [f.rule for f in caught.value.verdict.findings] == ["IG203"]
    # qemu's probers read the first 2 KiB; the head is 4 KiB, and one byte more says the file
    # is longer than the head.
    assert source.bytes_read == 4097
    assert caught.value.verdict.info is not None
    assert caught.value.verdict.info.header["stream_ended"] is False


def test_declared_format_mismatch_rejects_early(qemu_images: list[Path]) -> None:
    vmdk = next(path for path in qemu_images if path.name == "sparse.vmdk")
    inspector = StreamInspector(expected_format="qcow2")
    data = vmdk.read_bytes()
    inspector.feed(data[:8192])
    assert inspector.verdict is not None and inspector.early
    assert "IG202" in [f.rule for f in inspector.verdict.findings]


def test_pass_waits_for_the_end(qemu_images: list[Path]) -> None:
    """A fixed VHD footer could still arrive: nothing passes before the end."""
    plain = next(path for path in qemu_images if path.name == "plain.qcow2")
    data = plain.read_bytes()
    inspector = StreamInspector()
    inspector.feed(data)
    assert inspector.verdict is None
    assert inspector.finish().ok


def test_a_footer_at_the_end_is_settled_at_the_end(qemu_images: list[Path]) -> None:
    fixed = next(path for path in qemu_images if path.name == "fixed.vhd")
    verdict = inspect_stream(io.BytesIO(fixed.read_bytes()), chunk_size=1000)
    assert verdict.info is not None and verdict.info.format == "vpc"
    assert verdict.info.variant == "fixed"


def test_region_past_the_head_buffer_is_a_finding_not_a_guess(qemu_images: list[Path]) -> None:
    vhdx = next(path for path in qemu_images if path.suffix == ".vhdx")
    assert check(vhdx).ok
    verdict, _ = stream_verdict(vhdx.read_bytes(), 1 << 20, head_limit=1 << 20)
    assert verdict.status is Status.ERROR
    assert [f.rule for f in verdict.findings] == ["IG704"]


def test_memory_is_bounded_whatever_the_length() -> None:
    inspector = StreamInspector()
    chunk = bytes(16 << 20)
    tracemalloc.start()
    try:
        for _ in range(6):  # 96 MiB
            inspector.feed(chunk)
        verdict = inspector.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert verdict.ok
    assert len(inspector._head) == inspector.head_limit
    assert len(inspector._tail) <= 2 * inspector.tail_limit
    assert peak < inspector.head_limit + 2 * inspector.tail_limit + (4 << 20)


def test_policy_options_and_allowed_formats() -> None:
    qcow2 = ROOT / "corpus" / "demo" / "benign" / "cloud.qcow2"
    verdict = inspect_stream(io.BytesIO(qcow2.read_bytes()), allowed_formats=["raw"])
    assert verdict.status is Status.REJECT
    assert [f.rule for f in verdict.findings] == ["IG203"]
    waived = inspect_stream(io.BytesIO(qcow2.read_bytes()), Policy(waivers=frozenset({"IG203"})))
    assert waived.ok


def test_feed_after_finish_is_an_error() -> None:
    inspector = StreamInspector()
    inspector.feed(b"x" * 10)
    inspector.finish()
    with pytest.raises(ValueError):
        inspector.feed(b"y")


def test_empty_stream_matches_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    verdict, _ = stream_verdict(b"", 1)
    assert verdict_key(verdict) == verdict_key(check(empty))


def test_cli_scan_reads_stdin_as_a_stream() -> None:
    attack = ROOT / "corpus" / "demo" / "attacks" / "backing-etc-passwd.qcow2"
    result = subprocess.run(
        [sys.executable, "-m", "imgguard", "scan", "-", "--format", "json"],
        input=attack.read_bytes(),
        capture_output=True,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert b"IG101" in result.stdout
    benign = ROOT / "corpus" / "demo" / "benign" / "cloud.qcow2"
    result = subprocess.run(
        [sys.executable, "-m", "imgguard", "scan", "-"],
        input=benign.read_bytes(),
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
