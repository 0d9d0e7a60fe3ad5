"""atheris harness: the whole path a service runs, `inspect` then `check`.

Run: fuzz/run.sh fuzz_inspect_check   (docs/fuzzing.md has the libFuzzer options)
Any exception other than imgguard.ImageError is a crash. Beyond that, `check()` must be
deterministic, an image with a reference never passes the default policy, and the JSON report
(and, for a fixed 1/64 sample of inputs, the SARIF report) renders for whatever inspection found.
"""

from __future__ import annotations

import json
import zlib

import atheris

with atheris.instrument_imports(include=["imgguard"]):
    import imgguard.formats
    import imgguard.inspection
    import imgguard.policy
    import imgguard.report.json
    import imgguard.report.sarif

    imgguard.formats.drivers()
    imgguard.formats.layout_drivers()
    import imgguard.formats.luks

import _common

from imgguard import ImageError, Status


def test_one_input(data: bytes) -> None:
    reader = _common.reader_for(data)
    budget = _common.Budget()
    try:
        info = imgguard.inspection.inspect_reader(reader)
    except ImageError:
        budget.done(reader, "inspect")
        return
    budget.done(reader, "inspect")
    verdict = imgguard.policy.check(info)
    if verdict.status not in (Status.PASS, Status.REJECT):
        raise AssertionError(f"check() of an inspected image gave {verdict.status}")
    again = imgguard.policy.check(info)
    if again != verdict:
        raise AssertionError("check() is not deterministic")
    if info.references and verdict.ok:
        raise AssertionError(f"references {info.references} passed the default policy")
    json.loads(imgguard.report.json.render([verdict]))
    if zlib.crc32(data) % 64 == 0:
        # SARIF rendering costs ~2.5 ms, 10x an inspection: a fixed 1/64 sample of the inputs.
        json.loads(imgguard.report.sarif.render([verdict]))


if __name__ == "__main__":
    _common.main(test_one_input)
