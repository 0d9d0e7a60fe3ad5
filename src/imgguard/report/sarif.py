"""The SARIF 2.1.0 report, for code-scanning dashboards and CI (OASIS SARIF v2.1.0, errata 01).

One run: the tool's driver lists every rule in `rules.RULES` (so a dashboard can show rules that
found nothing), each result names its rule by id and index, its level comes from the finding's
severity, and its location is the image file, with the byte range of the offending field where
the finding knows it (`region.byteOffset`/`byteLength`, SARIF 3.30.13-14).

Paths are written relative to the scan's working directory under the `SCANROOT` base id
(SARIF 3.4.4), which `originalUriBaseIds` resolves, so the report does not depend on where the
images were mounted. Nothing time-dependent is written: the same scan gives the same bytes.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgguard import rules
from imgguard.model import Finding, Severity, Verdict
from imgguard.report._run import Run

SCHEMA_URI = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)
URI_BASE_ID = "SCANROOT"

# SARIF levels (3.27.10): critical and high stop a pipeline, medium warns, the rest inform.
LEVELS = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}
# GitHub code scanning orders security alerts by this CVSS-like score (a string, 0.0-10.0).
SECURITY_SEVERITY = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
    Severity.INFO: "0.0",
}


def level(severity: Severity) -> str:
    return LEVELS[severity]


def rule_descriptor(spec: rules.Rule) -> dict[str, Any]:
    cwe = f"CWE-{spec.cwe}" if spec.cwe is not None else None
    tags = ["security", *([cwe] if cwe else [])]
    facts = f"Default severity: {spec.severity}." + (f" Weakness: {cwe}." if cwe else "")
    waiver = f'To accept it, add "{spec.id}" to the policy\'s waivers.'
    help_markdown = f"**{spec.id} {spec.name}**: {spec.summary}\n\n{facts}\n\n{waiver}"
    if cwe:
        help_markdown = help_markdown.replace(
            f"Weakness: {cwe}.",
            f"Weakness: [{cwe}](https://cwe.mitre.org/data/definitions/{spec.cwe}.html).",
        )
    return {
        "id": spec.id,
        "name": spec.name,
        "shortDescription": {"text": spec.summary},
        "fullDescription": {"text": f"{spec.summary} {facts}"},
        "help": {"text": f"{spec.summary} {facts} {waiver}", "markdown": help_markdown},
        "defaultConfiguration": {"level": level(spec.severity)},
        "properties": {
            "tags": tags,
            "precision": "high",
            "security-severity": SECURITY_SEVERITY[spec.severity],
        },
    }


def artifact_uri(path: str, working_directory: str) -> str:
    """`path` as a relative URI reference (percent-encoded, forward slashes) from the working
    directory; `..` segments where the image lies outside it."""
    if os.path.isabs(path):
        path = os.path.relpath(path, working_directory)
    return urllib.parse.quote(Path(path).as_posix(), safe="/-._~")


def _location(verdict: Verdict, finding: Finding, working_directory: str) -> dict[str, Any]:
    physical: dict[str, Any] = {
        "artifactLocation": {
            "uri": artifact_uri(verdict.path or "", working_directory),
            "uriBaseId": URI_BASE_ID,
        }
    }
    if finding.offset is not None:
        region: dict[str, Any] = {"byteOffset": finding.offset}
        if finding.length is not None:
            region["byteLength"] = finding.length
        physical["region"] = region
    return {"physicalLocation": physical}


def _result(
    verdict: Verdict,
    finding: Finding,
    rule_index: dict[str, int],
    working_directory: str,
    *,
    waived: bool,
) -> dict[str, Any]:
    properties: dict[str, Any] = {"severity": str(finding.severity), "verdict": str(verdict.status)}
    if finding.field is not None:
        properties["field"] = finding.field
    if verdict.info is not None:
        properties["format"] = verdict.info.format
    result: dict[str, Any] = {"ruleId": finding.rule}
    if finding.rule in rule_index:
        result["ruleIndex"] = rule_index[finding.rule]
    result["level"] = level(finding.severity)
    result["message"] = {"text": finding.message}
    result["locations"] = [_location(verdict, finding, working_directory)]
    result["properties"] = properties
    if waived:
        result["suppressions"] = [
            {"kind": "external", "justification": "waived by the imgguard policy"}
        ]
    return result


def render(verdicts: Sequence[Verdict], run: Run | None = None) -> str:
    from imgguard import __version__

    run = run or Run()
    working_directory = run.working_directory or os.getcwd()
    rule_index = {rule_id: index for index, rule_id in enumerate(rules.RULES)}
    results = []
    for verdict in verdicts:
        for finding in verdict.findings:
            results.append(_result(verdict, finding, rule_index, working_directory, waived=False))
        for finding in verdict.waived:
            results.append(_result(verdict, finding, rule_index, working_directory, waived=True))
    invocation: dict[str, Any] = {
        "executionSuccessful": not run.interrupted,
        "exitCode": run.exit_code,
        "workingDirectory": {"uri": Path(working_directory).as_uri() + "/"},
    }
    if run.interrupted:
        planned = run.planned if run.planned is not None else len(verdicts)
        invocation["toolExecutionNotifications"] = [
            {
                "level": "error",
                "message": {
                    "text": f"interrupted after {len(verdicts)} of {planned} images; "
                    "the results are partial"
                },
            }
        ]
    document = {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "imgguard",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "rules": [rule_descriptor(spec) for spec in rules.RULES.values()],
                    }
                },
                "invocations": [invocation],
                "originalUriBaseIds": {
                    URI_BASE_ID: {"uri": Path(working_directory).as_uri().rstrip("/") + "/"}
                },
                "results": results,
            }
        ],
    }
    return json.dumps(document, indent=2) + "\n"
