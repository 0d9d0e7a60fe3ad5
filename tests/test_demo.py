"""The demo corpus the README scans says what its builder promises, image by image."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import imgguard

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "corpus" / "demo"


def _expected() -> dict[str, tuple[str, frozenset[str]]]:
    spec = importlib.util.spec_from_file_location("make_demo", ROOT / "scripts/make_demo_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected: dict[str, tuple[str, frozenset[str]]] = module.EXPECTED
    return expected


EXPECTED = _expected()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_demo_image_verdict(name: str) -> None:
    status, rules = EXPECTED[name]
    verdict = imgguard.check(DEMO / name)
    assert str(verdict.status) == status, [(f.rule, f.message) for f in verdict.findings]
    assert rules <= {finding.rule for finding in verdict.findings}


def test_demo_corpus_has_exactly_the_listed_images() -> None:
    present = {str(path.relative_to(DEMO)) for path in DEMO.rglob("*") if path.is_file()}
    assert present == set(EXPECTED)


def test_demo_corpus_rebuilds_identically_in_kind(tmp_path: Path) -> None:
    """The committed corpus is what the script makes today (formats and verdicts, not bytes)."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_demo_corpus.py"), "--out", str(tmp_path)],
        check=True,
    )
    for name, (status, _) in EXPECTED.items():
        fresh, committed = imgguard.check(tmp_path / name), imgguard.check(DEMO / name)
        assert fresh.info is not None and committed.info is not None
        assert (fresh.info.format, fresh.info.variant) == (
            committed.info.format,
            committed.info.variant,
        )
        assert str(fresh.status) == status
