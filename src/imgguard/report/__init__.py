"""Report formats for `scan`: each module renders a list of verdicts to text."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from imgguard.model import Verdict
from imgguard.report import json, text

Renderer = Callable[[Sequence[Verdict]], str]

RENDERERS: dict[str, Renderer] = {"text": text.render, "json": json.render}

__all__ = ["RENDERERS", "Renderer"]
