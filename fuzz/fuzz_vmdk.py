"""atheris harness: VMDK (sparse, streamOptimized, COWD, descriptor files), each driver called
directly.

Run: fuzz/run.sh fuzz_vmdk   (docs/fuzzing.md has the libFuzzer options)
Any exception other than imgguard.ImageError is a crash; see fuzz/_common.py for the other
invariants checked on every input.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["imgguard"]):
    import imgguard.formats
    import imgguard.inspection
    import imgguard.policy

    # Format modules are imported on first use: import them here so they are instrumented.
    imgguard.formats.drivers()
    imgguard.formats.layout_drivers()
    import imgguard.formats.luks

import _common

FORMATS = ("vmdk",)


def test_one_input(data: bytes) -> None:
    _common.run_drivers(data, FORMATS)


if __name__ == "__main__":
    _common.main(test_one_input)
