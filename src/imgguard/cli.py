"""`python -m imgguard`: scan, inspect, check and rules.

The report goes to stdout (or `-o FILE`), errors to stderr. Exit status: 0 when every image
passes, 1 when any image is rejected or could not be inspected, 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

from imgguard import __version__, rules
from imgguard.errors import ConfigError, ImageError
from imgguard.model import Policy, Severity, Status
from imgguard.policy import check, load_policy, load_pyproject_policy
from imgguard.report import RENDERERS

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _policy_options(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgguard", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"imgguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    scan = commands.add_parser("scan", help="inspect and judge files and directory trees")
    scan.add_argument("paths", nargs="+", metavar="PATH")
    scan.add_argument("--format", choices=sorted(RENDERERS), default="text", dest="report")
    scan.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    _policy_options(scan)

    inspect_cmd = commands.add_parser("inspect", help="everything inspection finds in one image")
    inspect_cmd.add_argument("path", metavar="PATH")
    inspect_cmd.add_argument("--format", choices=["text", "json"], default="text", dest="report")

    check_cmd = commands.add_parser("check", help="judge one image; exit 0 pass, 1 reject")
    check_cmd.add_argument("path", metavar="PATH")
    check_cmd.add_argument("--format", choices=sorted(RENDERERS), default="text", dest="report")
    _policy_options(check_cmd)

    commands.add_parser("rules", help="list the rule ids and what they catch")
    return parser


def resolve_policy(args: argparse.Namespace) -> Policy:
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


def iter_paths(paths: Sequence[str]) -> Iterator[str]:
    """Every entry below the given paths, in sorted order; symlinks are listed, never followed."""
    for top in paths:
        try:
            top_stat = os.lstat(top)
        except OSError:
            yield top  # check() reports why it cannot be read
            continue
        if not stat.S_ISDIR(top_stat.st_mode):
            yield top
            continue
        found: list[str] = []
        for directory, subdirectories, files in os.walk(top, followlinks=False):
            subdirectories.sort()
            for name in subdirectories:
                full = os.path.join(directory, name)
                if os.path.islink(full):
                    found.append(full)
            found.extend(os.path.join(directory, name) for name in files)
        yield from sorted(found)


def scan(args: argparse.Namespace) -> int:
    policy = resolve_policy(args)
    verdicts = [
        check(path, policy, claimed_format=args.claimed_format, target_size=args.target_size)
        for path in iter_paths(args.paths)
    ]
    _emit(RENDERERS[args.report](verdicts), args.output)
    return EXIT_OK if all(verdict.status is Status.PASS for verdict in verdicts) else EXIT_FINDINGS


def check_one(args: argparse.Namespace) -> int:
    policy = resolve_policy(args)
    verdict = check(
        args.path, policy, claimed_format=args.claimed_format, target_size=args.target_size
    )
    _emit(RENDERERS[args.report]([verdict]), None)
    return EXIT_OK if verdict.ok else EXIT_FINDINGS


def inspect_one(args: argparse.Namespace) -> int:
    from imgguard.inspection import inspect

    try:
        info = inspect(args.path)
    except ImageError as error:
        print(f"imgguard: {args.path}: {error}", file=sys.stderr)
        return EXIT_FINDINGS
    if args.report == "json":
        document = attrs.asdict(info, value_serializer=_serialise)
        print(json.dumps(document, indent=2))
        return EXIT_OK
    for name, value in attrs.asdict(info, recurse=False).items():
        if value in ((), None, {}) and name not in ("backing_file", "data_file"):
            continue
        print(f"{name:15} {_plain(value)}")
    return EXIT_OK


def _serialise(instance: object, attribute: object, value: object) -> object:
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


def _plain(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(_plain(item) for item in value) or "-"
    if attrs.has(type(value)):
        fields = {a.name: getattr(value, a.name) for a in attrs.fields(type(value))}  # type: ignore[arg-type]
        return "(" + ", ".join(f"{k}={_plain(v)}" for k, v in fields.items() if v is not None) + ")"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def list_rules() -> int:
    for spec in rules.RULES.values():
        cwe = f"CWE-{spec.cwe}" if spec.cwe else "-"
        print(f"{spec.id}  {spec.name:20} {spec.severity!s:8} {cwe:8} {spec.summary}")
    return EXIT_OK


def _emit(report: str, output: str | None) -> None:
    if output:
        Path(output).write_text(report, encoding="utf-8")
    else:
        sys.stdout.write(report)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "scan":
            return scan(args)
        if args.command == "check":
            return check_one(args)
        if args.command == "inspect":
            return inspect_one(args)
        return list_rules()
    except ConfigError as error:
        print(f"imgguard: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_FINDINGS


__all__ = ["main"]
