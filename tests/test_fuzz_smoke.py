"""A short, bounded run of every atheris harness in fuzz/: a robustness regression turns CI red.

Each harness starts from its committed seeds (corpus/<harness>/, read only) and runs a fixed
number of mutated inputs; any exception other than `ImageError`, a read or time budget blown
(fuzz/_common.py) or the RSS cap is a libFuzzer crash and a non-zero exit. The long runs are
`fuzz/run.sh` (docs/fuzzing.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parent.parent
HARNESSES = sorted(path.stem for path in (ROOT / "fuzz").glob("fuzz_*.py"))
RUNS = 1500


def test_every_family_has_a_harness() -> None:
    assert HARNESSES == [
        "fuzz_inspect_check",
        "fuzz_misc",
        "fuzz_qcow",
        "fuzz_raw_layouts",
        "fuzz_vhd",
        "fuzz_vmdk",
    ]


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_without_a_crash(harness: str, tmp_path: Path) -> None:
    seeds = ROOT / "corpus" / harness
    assert any(seeds.iterdir()), f"no seeds in {seeds}; run python fuzz/make_seeds.py"
    work = tmp_path / "corpus"
    work.mkdir()
    command = [
        sys.executable,
        str(ROOT / "fuzz" / f"{harness}.py"),
        str(work),  # new inputs go here, never into the committed seeds
        str(seeds),
        f"-dict={ROOT / 'fuzz' / 'imgguard.dict'}",
        f"-runs={RUNS}",
        "-max_total_time=6",
        "-rss_limit_mb=1024",
        "-timeout=10",
        "-seed=1",
        f"-artifact_prefix={tmp_path}/",
    ]
    result = subprocess.run(
        command, cwd=ROOT / "fuzz", capture_output=True, text=True, check=False, timeout=120
    )
    log = result.stdout + result.stderr
    crashes = sorted(path.name for path in tmp_path.glob("crash-*"))
    assert result.returncode == 0 and not crashes, f"{harness} crashed ({crashes}):\n{log[-4000:]}"
    assert "Done" in log, log[-2000:]
