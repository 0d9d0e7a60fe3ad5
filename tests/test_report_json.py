"""The JSON report is exactly `json.dumps(document, indent=2)`, however it is written."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import imgguard
from imgguard import __version__
from imgguard.model import Finding, ImageInfo, Reference, ReferenceKind, Severity, Status, Verdict
from imgguard.report.json import render, summary, verdict_to_dict

DEMO = Path(__file__).resolve().parent.parent / "corpus" / "demo"

# Any text a path, a reference target or a message can hold: controls, quotes, backslashes,
# non-ASCII, lone surrogates from undecodable file names.
_text = st.text(
    st.characters(blacklist_categories=(), min_codepoint=0, max_codepoint=0x10FFFF), max_size=30
)
_maybe_text = st.none() | _text
_maybe_int = st.none() | st.integers(-(2**70), 2**70)

_findings = st.builds(
    Finding,
    rule=st.sampled_from(["IG101", "IG201", "IG503"]),
    name=_text,
    severity=st.sampled_from(list(Severity)),
    message=_text,
    cwe=st.none() | st.integers(0, 2000),
    field=_maybe_text,
    offset=_maybe_int,
)
_infos = st.builds(
    ImageInfo,
    format=_text,
    path=_maybe_text,
    variant=_maybe_text,
    virtual_size=_maybe_int,
    actual_size=_maybe_int,
    matches=st.lists(_text, max_size=3).map(tuple),
    backing_file=_maybe_text,
    data_file=_maybe_text,
    references=st.lists(
        st.builds(
            Reference,
            kind=st.sampled_from(list(ReferenceKind)),
            target=_text,
            field=_text,
            offset=_maybe_int,
        ),
        max_size=2,
    ).map(tuple),
    encrypted=st.booleans(),
)
_verdicts = st.builds(
    Verdict,
    status=st.sampled_from(list(Status)),
    info=st.none() | _infos,
    findings=st.lists(_findings, max_size=3).map(tuple),
    path=_maybe_text,
)


def _expected(verdicts: list[Verdict]) -> str:
    document = {
        "imgguard": __version__,
        "results": [verdict_to_dict(verdict) for verdict in verdicts],
        "summary": summary(verdicts),
    }
    return json.dumps(document, indent=2) + "\n"


@settings(max_examples=150, deadline=None)
@given(st.lists(_verdicts, max_size=4))
def test_render_is_json_dumps_with_indent(verdicts: list[Verdict]) -> None:
    assert render(verdicts) == _expected(verdicts)


def test_render_of_the_demo_corpus_is_json_dumps_with_indent() -> None:
    verdicts = [imgguard.check(path) for path in sorted(DEMO.rglob("*")) if path.is_file()]
    assert len(verdicts) >= 10
    text = render(verdicts)
    assert text == _expected(verdicts)
    assert json.loads(text)["summary"] == summary(verdicts)
