"""`imgguard convert SRC DST -O FORMAT`: check an image, then convert it with qemu-img.

`register(subparsers)` adds the subcommand to imgguard's parser and sets `func`, which takes the
parsed arguments and returns the exit status: 0 converted, 1 rejected or failed (nothing new at
DST), 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import attrs

from imgguard.backend.errors import (
    ConversionFailed,
    ImageRejected,
    QemuImgFailed,
    QemuImgNotFound,
    SandboxUnavailable,
)
from imgguard.backend.limits import DEFAULT_LIMITS, Limits
from imgguard.backend.qemu import CACHE_MODES, OUTPUT_FORMATS, CipherSpec, convert
from imgguard.errors import ConfigError, ImageError
from imgguard.model import Policy, Severity
from imgguard.policy import load_policy, load_pyproject_policy

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_MiB = 1 << 20


def register(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add `convert` to `subparsers` (from `ArgumentParser.add_subparsers`); returns its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "convert",
        help="check an image, then convert it with qemu-img (nothing is written if it fails)",
        description=(
            "Inspect and judge SRC; if it passes, convert it with qemu-img into a temporary "
            "file beside DST, verify the output and rename it over DST. On any failure DST is "
            "left as it was."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="the image to convert")
    parser.add_argument("dst", metavar="DST", help="where to write the converted image")
    parser.add_argument(
        "-O",
        dest="out_format",
        metavar="FORMAT",
        required=True,
        help=f"output format ({', '.join(sorted(OUTPUT_FORMATS))}; Glance's vhd means vpc)",
    )
    parser.add_argument(
        "-o",
        dest="out_subformat",
        metavar="SUBFORMAT",
        help="output subformat: vmdk streamOptimized|monolithicSparse, vpc/vhdx fixed|dynamic "
        "(`subformat=X` works too)",
    )
    parser.add_argument(
        "-c", dest="compress", action="store_true", help="compress (qcow2, vmdk streamOptimized)"
    )
    parser.add_argument(
        "-t", dest="cache_mode", metavar="CACHE", choices=sorted(CACHE_MODES), help="cache mode"
    )
    parser.add_argument("--policy", metavar="FILE", help="TOML policy file")
    parser.add_argument(
        "--fail-on",
        metavar="SEVERITY",
        help="reject at or above this severity (info, low, medium, high, critical)",
    )
    parser.add_argument(
        "--claimed-format", metavar="FORMAT", help="the format the uploader declared"
    )
    parser.add_argument(
        "--target-size", metavar="GIB", type=int, help="size in GiB of the target volume"
    )
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="encrypt the output (luks, or qcow2 with LUKS) with the passphrase in FILE",
    )
    parser.add_argument(
        "--src-passphrase-file",
        metavar="FILE",
        help="the passphrase of an encrypted (LUKS) source, in FILE",
    )
    parser.add_argument(
        "--iter-time",
        metavar="MS",
        type=int,
        help="PBKDF2 time for the output's LUKS key slot (qemu's default: 2000 ms)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        help="wall-clock limit for qemu-img (default: 600 s plus 120 s per GiB)",
    )
    parser.add_argument(
        "--no-sandbox",
        dest="sandbox",
        action="store_false",
        help="run qemu-img without its sandbox (namespaces via bubblewrap or unshare), with the "
        "host's full view: only where namespaces cannot be created",
    )
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run `imgguard convert` for parsed `args`; returns the exit status."""
    out = sys.stdout
    err = sys.stderr
    try:
        policy = _policy(args)
        limits = _limits(args.timeout)
        subformat = args.out_subformat
        if subformat is not None and subformat.startswith("subformat="):
            subformat = subformat.removeprefix("subformat=")
        bar = _ProgressBar(err) if err.isatty() else None
        try:
            result = convert(
                args.src,
                args.dst,
                args.out_format,
                policy=policy,
                claimed_format=args.claimed_format,
                target_size=args.target_size,
                out_subformat=subformat,
                compress=args.compress,
                cache_mode=args.cache_mode,
                src_passphrase_file=args.src_passphrase_file,
                passphrase_file=args.passphrase_file,
                cipher_spec=CipherSpec(iter_time_ms=args.iter_time) if args.iter_time else None,
                progress=bar.update if bar else None,
                limits=limits,
                sandbox=getattr(args, "sandbox", True),
            )
        finally:
            if bar is not None:
                bar.close()
    except ConfigError as error:
        print(f"imgguard: configuration error: {error}", file=err)
        return EXIT_USAGE
    except ImageRejected as rejected:
        print(f"imgguard: {args.src}: rejected, not converted", file=err)
        for reason in rejected.reasons:
            print(f"  {reason}", file=err)
        return EXIT_FAILED
    except (QemuImgNotFound, SandboxUnavailable) as error:
        print(f"imgguard: {error}", file=err)
        return EXIT_FAILED
    except (ConversionFailed, QemuImgFailed) as failure:
        print(f"imgguard: {args.src}: conversion failed: {failure}", file=err)
        if failure.stderr:
            for line in failure.stderr.splitlines()[-10:]:
                print(f"  qemu-img: {line}", file=err)
        print(f"imgguard: {args.dst} was left as it was", file=err)
        return EXIT_FAILED
    except ImageError as error:
        print(f"imgguard: {args.src}: {error}", file=err)
        return EXIT_FAILED
    except OSError as error:
        print(f"imgguard: {error}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nimgguard: interrupted; {args.dst} was left as it was", file=err)
        return EXIT_INTERRUPTED
    variant = f"/{result.output.variant}" if result.output.variant else ""
    source_info = result.verdict.info
    source_format = source_info.format if source_info else "?"
    print(
        f"{args.src} ({source_format}) -> {args.dst} ({result.output.format}{variant}): "
        f"{result.output_bytes / _MiB:.1f} MiB written in {result.seconds:.2f} s, "
        f"{result.mb_per_s:.1f} MiB/s",
        file=out,
    )
    return EXIT_OK


def _policy(args: argparse.Namespace) -> Policy:
    """Command line over --policy FILE over [tool.imgguard] in the current directory."""
    policy = load_pyproject_policy(Path.cwd())
    if args.policy:
        policy = load_policy(args.policy, base=policy)
    if args.fail_on:
        try:
            policy = attrs.evolve(policy, fail_on=Severity.parse(args.fail_on))
        except ValueError as error:
            raise ConfigError(str(error), key="--fail-on") from None
    return policy


def _limits(timeout: float | None) -> Limits:
    if timeout is None:
        return DEFAULT_LIMITS
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ConfigError("must be a number of seconds > 0", key="--timeout")
    return attrs.evolve(DEFAULT_LIMITS, timeout=timeout, timeout_per_gib=0)


class _ProgressBar:
    """`[#########...........]  45.0%` on one terminal line, redrawn as qemu-img reports."""

    WIDTH = 40

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False

    def update(self, percent: float) -> None:
        filled = min(self.WIDTH, int(self.WIDTH * percent / 100))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\rconverting [{bar}] {percent:5.1f}%")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


__all__ = ["register", "run_convert"]
