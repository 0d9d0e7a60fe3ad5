"""The JSON report: the documented contract (README, "JSON report")."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from imgguard.model import Finding, Verdict
from imgguard.report._run import Run, counts


def finding_to_dict(finding: Finding) -> dict[str, Any]:
    return {
        "rule": finding.rule,
        "name": finding.name,
        "severity": str(finding.severity),
        "message": finding.message,
        "cwe": finding.cwe,
        "field": finding.field,
        "offset": finding.offset,
    }


def verdict_to_dict(verdict: Verdict) -> dict[str, Any]:
    info = verdict.info
    return {
        "path": verdict.path,
        "format": info.format if info else None,
        "variant": info.variant if info else None,
        "virtual_size": info.virtual_size if info else None,
        "actual_size": info.actual_size if info else None,
        "matches": list(info.matches) if info else [],
        "backing_file": info.backing_file if info else None,
        "data_file": info.data_file if info else None,
        "references": [
            {"kind": str(reference.kind), "target": reference.target}
            for reference in (info.references if info else ())
        ],
        "encrypted": info.encrypted if info else False,
        "verdict": str(verdict.status),
        "findings": [finding_to_dict(finding) for finding in verdict.findings],
    }


def summary(verdicts: Sequence[Verdict]) -> dict[str, int]:
    return counts([str(verdict.status) for verdict in verdicts])


def render(verdicts: Sequence[Verdict], run: Run | None = None) -> str:
    """The contract's document. An interrupted scan lists the images it finished; the keys stay
    exactly the documented ones (the exit status says it was interrupted).

    The text is exactly `json.dumps(document, indent=2)`, but written result by result: with an
    indent, json falls back to its pure-Python encoder (~40 us a result, the largest cost of a
    scan's own process), while each result's values here go through the C string encoder.
    """
    from imgguard import __version__

    if not verdicts:
        return (
            json.dumps(
                {"imgguard": __version__, "results": [], "summary": summary(verdicts)}, indent=2
            )
            + "\n"
        )
    results = ",\n".join(_result_text(verdict_to_dict(verdict)) for verdict in verdicts)
    summary_text = json.dumps(summary(verdicts), indent=2).replace("\n", "\n  ")
    return (
        f'{{\n  "imgguard": {_value(__version__)},\n  "results": [\n{results}\n  ],\n'
        f'  "summary": {summary_text}\n}}\n'
    )


# One result, as json.dumps(indent=2) writes it four spaces in (inside "results").
_encode_string = json.encoder.encode_basestring_ascii


def _value(value: Any) -> str:
    if isinstance(value, str):
        return _encode_string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    return json.dumps(value)


def _object_text(mapping: dict[str, Any], indent: str) -> str:
    if not mapping:
        return "{}"
    inner = indent + "  "
    items = ",\n".join(
        f"{inner}{_encode_string(key)}: {_item_text(value, inner)}"
        for key, value in mapping.items()
    )
    return f"{{\n{items}\n{indent}}}"


def _item_text(value: Any, indent: str) -> str:
    if isinstance(value, dict):
        return _object_text(value, indent)
    if isinstance(value, list):
        if not value:
            return "[]"
        inner = indent + "  "
        items = ",\n".join(f"{inner}{_item_text(item, inner)}" for item in value)
        return f"[\n{items}\n{indent}]"
    return _value(value)


def _result_text(result: dict[str, Any]) -> str:
    return "    " + _object_text(result, "    ")
