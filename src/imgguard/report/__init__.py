"""Report formats for `scan` and `check`: one module per format, each behind `RENDERERS`.

A renderer takes the verdicts, in the order they are to be reported, and a `Run` that says how
the scan went (its exit status, whether it was interrupted), and returns the whole report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from imgguard.model import Verdict
from imgguard.report import json, sarif, text
from imgguard.report._run import Run


class Renderer(Protocol):
    def __call__(self, verdicts: Sequence[Verdict], run: Run | None = None) -> str: ...


RENDERERS: dict[str, Renderer] = {"text": text.render, "json": json.render, "sarif": sarif.render}

__all__ = ["RENDERERS", "Renderer", "Run"]
