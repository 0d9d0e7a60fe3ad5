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
    exactly the documented ones (the exit status says it was interrupted)."""
    from imgguard import __version__

    document = {
        "imgguard": __version__,
        "results": [verdict_to_dict(verdict) for verdict in verdicts],
        "summary": summary(verdicts),
    }
    return json.dumps(document, indent=2) + "\n"
