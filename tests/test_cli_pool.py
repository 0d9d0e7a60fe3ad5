"""The scan's worker pool: a crash, a hang or an exception costs one item, never the scan.

These drive `imgguard.cli.Pool` in-process with work functions that misbehave on purpose (a
parser cannot be made to segfault on demand); the CLI tests run the same pool as a subprocess.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import qemu_create
from imgguard.cli import Judge, PartialResults, Pool, Target, iter_targets
from imgguard.model import DEFAULT_ALLOWED_FORMATS, Policy, Status, Verdict


def misbehave(item: str) -> str:
    """Work that does what the item says."""
    if item == "segfault":
        faulthandler.disable()  # pytest's, inherited by the fork: no traceback on stderr
        os.kill(os.getpid(), signal.SIGSEGV)
    if item == "oom-killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if item == "exit":
        os._exit(3)
    if item == "hang":
        time.sleep(60)
    if item == "raise":
        raise RuntimeError("parser bug")
    if item.startswith("sleep"):
        time.sleep(float(item.removeprefix("sleep")))
    return f"done {item}"


def failed(item: str, why: str) -> str:
    return f"failed {item}: {why}"


def test_results_keep_the_items_order_whatever_finishes_first() -> None:
    items = ["sleep0.3", "sleep0", "sleep0.2", "sleep0", "sleep0.1", "sleep0"]
    seen: list[int] = []
    pool: Pool[str, str] = Pool(
        misbehave, failed, jobs=3, timeout=10, on_result=lambda i, item, result: seen.append(i)
    )
    assert pool.run(items) == [f"done {item}" for item in items]
    assert sorted(seen) == list(range(len(items)))
    assert seen != sorted(seen)  # they did finish out of order


def test_crash_timeout_and_exception_each_cost_one_item() -> None:
    items = ["a", "segfault", "b", "hang", "c", "exit", "raise", "d", "oom-killed", "e"]
    started = time.monotonic()
    results = Pool(misbehave, failed, jobs=2, timeout=1.0).run(items)
    assert time.monotonic() - started < 15
    assert results[0] == "done a"
    assert results[1] == "failed segfault: the inspecting process was killed by SIGSEGV"
    assert results[2] == "done b"
    assert results[3] == "failed hang: inspection timed out after 1 s"
    assert results[4] == "done c"
    assert results[5] == "failed exit: the inspecting process exited with status 3"
    assert results[6] == "failed raise: inspection failed: RuntimeError: parser bug"
    assert results[7] == "done d"
    assert results[8] == "failed oom-killed: the inspecting process was killed by SIGKILL"
    assert results[9] == "done e"


def test_interrupt_gives_the_finished_results() -> None:
    def interrupt_after_two(index: int, item: str, result: str) -> None:
        if index == 1:
            raise KeyboardInterrupt

    pool: Pool[str, str] = Pool(
        misbehave, failed, jobs=1, timeout=10, on_result=interrupt_after_two
    )
    with pytest.raises(PartialResults) as stopped:
        pool.run(["x", "y", "z", "w"])
    assert stopped.value.results == ["done x", "done y"]


def test_files_that_vanish_mid_scan_are_errors(tmp_path: Path) -> None:
    for name in ("a.qcow2", "b.qcow2", "c.qcow2"):
        qemu_create(tmp_path / name, "qcow2", "1M")
    targets = list(iter_targets([str(tmp_path)]))
    judge = Judge(Policy())

    def remove_the_rest(index: int, target: Target, verdict: Verdict) -> None:
        if index == 0:
            for later in targets[1:]:
                os.unlink(later.path)

    verdicts = Pool(judge, judge.error, jobs=1, timeout=10, on_result=remove_the_rest).run(targets)
    assert [verdict.status for verdict in verdicts] == [Status.PASS, Status.ERROR, Status.ERROR]
    for verdict in verdicts[1:]:
        assert [finding.rule for finding in verdict.findings] == ["IG702"]
        assert "No such file" in verdict.findings[0].message


def test_policy_with_mapping_proxies_reaches_the_workers(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "image.qcow2", "qcow2", "1M")
    policy = Policy(
        allowed_formats=DEFAULT_ALLOWED_FORMATS - {"qcow2"},
        severity_overrides={"IG203": "medium"},
    )
    judge = Judge(policy)
    (verdict,) = Pool(judge, judge.error, jobs=1, timeout=10).run([Target(str(image))])
    assert verdict.status is Status.PASS  # IG203 demoted below the threshold
    assert [(f.rule, str(f.severity)) for f in verdict.findings] == [("IG203", "medium")]
    assert verdict.info is not None and verdict.info.header  # the header mapping came back
