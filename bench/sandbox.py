"""What the sandbox around qemu-img costs: one small convert, with and without it.

    python bench/sandbox.py [--rounds 200]

Each round runs the same `qemu-img convert` of a 1 MiB qcow2 (to raw) through the backend's
runner (`imgguard.backend.process.run`) once per mode, in an order shuffled per round so machine
noise hits all modes alike: `bare` (qemu-img alone: no limits, no sandbox), `none` (the default
limits wrapper, no sandbox), bubblewrap, and util-linux unshare (each where it works). The source
is passed as the backend passes it: an open descriptor (`Sandbox.bind_fd`). Then
`backend.convert` end to end (inspection, atomic output, re-inspection) with the default sandbox
and with sandbox=False. Prints medians and the overhead per call; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from imgguard import backend
from imgguard.backend import sandbox
from imgguard.backend.limits import DEFAULT_LIMITS, NO_LIMITS
from imgguard.backend.process import run
from imgguard.backend.qemu import find_qemu_img, source_spec
from imgguard.backend.sandbox import SOURCE_PATH, TARGET_PATH, Sandbox

MiB = 1 << 20


def make_source(directory: Path) -> Path:
    raw = directory / "small.raw"
    with raw.open("wb") as file:
        file.truncate(1 * MiB)
        file.write(b"imgguard-bench" * 1000)
    source = directory / "small.qcow2"
    subprocess.run(
        [find_qemu_img(), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(source)],
        check=True,
    )
    return source


def runner(mode: str, source: Path, output: Path) -> Callable[[], None]:
    unconfined = mode in ("bare", "none")
    box = Sandbox("none") if unconfined else sandbox.prepare(mode, find_qemu_img())
    limits = NO_LIMITS if mode == "bare" else DEFAULT_LIMITS.for_size(1 * MiB)

    def once() -> None:
        run_box = Sandbox(box.mechanism, box.tool)
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            flags, name = source_spec("qcow2", run_box.bind_fd(fd, SOURCE_PATH))
            argv = [find_qemu_img(), "convert", *flags, "-O", "raw", name]
            argv.append(run_box.bind(str(output), TARGET_PATH, writable=True))
            run(argv, limits=limits, operation="convert", sandbox=run_box)
        finally:
            os.close(fd)

    return once


def measure(cases: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for function in cases.values():  # warm up: probes, ldd, page cache
        function()
    for _ in range(rounds):
        order = list(cases)
        random.shuffle(order)
        for name in order:
            started = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - started)
    return times


def report(title: str, times: dict[str, list[float]], baseline: str) -> None:
    print(title)
    base = statistics.median(times[baseline])
    for name, values in times.items():
        median = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4)
        extra = "" if name == baseline else f"  overhead {1000 * (median - base):+6.2f} ms"
        if name not in (baseline, "bare") and "bare" in times:
            extra += f" ({1000 * (median - statistics.median(times['bare'])):+6.2f} ms vs bare)"
        print(
            f"  {name:<10} median {1000 * median:7.2f} ms  "
            f"(q1 {1000 * quartiles[0]:.2f}, q3 {1000 * quartiles[2]:.2f}){extra}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgguard-bench-sandbox-") as tmp:
        directory = Path(tmp)
        source = make_source(directory)
        cases: dict[str, Callable[[], None]] = {}
        for mode in ("bare", "none", *sandbox.MECHANISMS):
            output = directory / f"out-{mode}.raw"
            output.write_bytes(b"")
            try:
                cases[mode] = runner(mode, source, output)
            except backend.SandboxUnavailable as error:
                print(f"{mode}: unavailable ({error})")
        report(
            f"qemu-img convert, 1 MiB qcow2 -> raw, through the runner ({args.rounds} rounds)",
            measure(cases, args.rounds),
            "none",
        )

        def end_to_end(mode: bool) -> Callable[[], None]:
            return lambda: (
                backend.convert(source, directory / "e2e.raw", "raw", sandbox=mode),
                None,
            )[1]

        report(
            f"backend.convert end to end ({args.rounds} rounds)",
            measure({"none": end_to_end(False), "default": end_to_end(True)}, args.rounds),
            "none",
        )


if __name__ == "__main__":
    main()
