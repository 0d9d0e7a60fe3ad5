"""`python -m imgguard`: scan, check, inspect, rules and convert.

The report goes to stdout (or `-o FILE`), progress and logs to stderr. Exit status: 0 when every
image passes, 1 when any image is rejected or could not be inspected, 2 on a usage or
configuration error, 128 + the signal number when a scan is interrupted (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import stat
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import attrs

from imgguard import __version__, config, rules
from imgguard.backend import command as convert_command
from imgguard.errors import ConfigError, ImageError
from imgguard.model import Policy, Status, Verdict
from imgguard.policy import check
from imgguard.report import RENDERERS, Run
from imgguard.report.text import printable

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2

DEFAULT_TIMEOUT = 60.0
# Images queued to each worker at a time: a worker goes straight on to its next image instead
# of waiting a round trip for the scan to hand it one (the per-image timeout still applies to
# each image, from the moment the worker starts it).
SCAN_PREFETCH = 16

T = TypeVar("T")
R = TypeVar("R")


# Verdicts cross from the worker processes to the scan; ImageInfo.header and
# Policy.severity_overrides are read-only mapping proxies, which do not pickle by themselves.
def _mapping_proxy(mapping: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(mapping)


def _reduce_mapping_proxy(
    proxy: types.MappingProxyType[Any, Any],
) -> tuple[Callable[[dict[Any, Any]], types.MappingProxyType[Any, Any]], tuple[dict[Any, Any]]]:
    return _mapping_proxy, (dict(proxy),)


ForkingPickler.register(types.MappingProxyType, _reduce_mapping_proxy)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _policy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "policy",
        "command line > IMGGUARD_* environment variables > --policy FILE > "
        "[tool.imgguard] in ./pyproject.toml > defaults",
    )
    group.add_argument("--policy", metavar="FILE", help="TOML policy file")
    group.add_argument(
        "--fail-on",
        metavar="SEVERITY",
        help="reject at or above this severity (info, low, medium, high, critical)",
    )
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="assignments",
        help="set a policy key, e.g. max-virtual-size=1T or waivers=IG304,IG201 (repeatable)",
    )
    group.add_argument(
        "--claimed-format", metavar="FORMAT", help="the format the uploader declared"
    )
    group.add_argument(
        "--target-size", metavar="GIB", type=int, help="size in GiB of the target volume"
    )


def _run_options(parser: argparse.ArgumentParser, *, formats: Sequence[str]) -> None:
    parser.add_argument(
        "--format", choices=formats, default="text", dest="report", help="report format (text)"
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        help=f"give up on one image after this long (default {DEFAULT_TIMEOUT:g}; "
        "env IMGGUARD_TIMEOUT)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar, even on a terminal"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log each image's verdict on stderr"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgguard", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"imgguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    scan_cmd = commands.add_parser("scan", help="inspect and judge files and directory trees")
    scan_cmd.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files and directories (walked; symlinks are reported, never followed)",
    )
    _run_options(scan_cmd, formats=sorted(RENDERERS))
    scan_cmd.add_argument(
        "-j",
        "--jobs",
        metavar="N",
        type=_positive_int,
        help="images inspected at once (default: the CPU count; env IMGGUARD_JOBS)",
    )
    _policy_options(scan_cmd)

    inspect_cmd = commands.add_parser("inspect", help="everything inspection finds in one image")
    inspect_cmd.add_argument("path", metavar="PATH")
    inspect_cmd.add_argument("--format", choices=["text", "json"], default="text", dest="report")

    check_cmd = commands.add_parser("check", help="judge one image; exit 0 pass, 1 reject")
    check_cmd.add_argument("path", metavar="PATH")
    _run_options(check_cmd, formats=sorted(RENDERERS))
    _policy_options(check_cmd)

    rules_cmd = commands.add_parser("rules", help="list the rule ids and what they catch")
    rules_cmd.add_argument("--format", choices=["text", "json"], default="text", dest="report")

    # `convert` (imgguard.backend.command) sets `func` to its runner.
    convert_command.register(commands)
    from imgguard.service_cli import register_verify

    register_verify(commands)
    return parser


# --- what to scan ----------------------------------------------------------------------------


@attrs.frozen
class Target:
    """One path to judge. `problem` says why it cannot be (a directory that cannot be listed)."""

    path: str
    problem: str | None = None


def iter_targets(paths: Sequence[str]) -> Iterator[Target]:
    """Every entry below the given paths: each argument in order, the entries below a directory
    sorted. Symlinks are listed (check() reports them), never followed; so are devices, FIFOs
    and sockets, which are never opened."""
    seen: set[str] = set()
    for given in paths:
        # "link/" would make lstat resolve the link; the link itself is what was named.
        top = given.rstrip("/") or given
        try:
            top_stat = os.lstat(top)
        except OSError:
            found: list[Target] = [Target(top)]  # check() says why it cannot be read
        else:
            found = _walk(top) if stat.S_ISDIR(top_stat.st_mode) else [Target(top)]
        for target in found:
            if target.path not in seen:
                seen.add(target.path)
                yield target


def _walk(top: str) -> list[Target]:
    found: list[Target] = []

    def unlistable(error: OSError) -> None:
        name = error.filename if isinstance(error.filename, str) else top
        found.append(Target(name, f"cannot list directory: {error.strerror or error}"))

    for directory, subdirectories, files in os.walk(top, onerror=unlistable, followlinks=False):
        subdirectories.sort()
        # os.walk puts symlinks to directories among the directories; they are entries to
        # report, and os.walk does not descend into them.
        found.extend(
            Target(os.path.join(directory, name))
            for name in subdirectories
            if os.path.islink(os.path.join(directory, name))
        )
        found.extend(Target(os.path.join(directory, name)) for name in files)
    return sorted(found, key=lambda target: target.path)


# --- judging one image -----------------------------------------------------------------------


@attrs.frozen
class Judge:
    """check() with the policy and the request, in a form a worker process can be sent."""

    policy: Policy
    claimed_format: str | None = None
    target_size: int | None = None

    def __call__(self, target: Target) -> Verdict:
        if target.problem is not None:
            return self.error(target, target.problem)
        return check(
            target.path,
            self.policy,
            claimed_format=self.claimed_format,
            target_size=self.target_size,
        )

    def error(self, target: Target, message: str) -> Verdict:
        """An `error` verdict for an image that could not be read (IG702)."""
        return self._error_verdict("IG702", target, message)

    def failed(self, target: Target, message: str) -> Verdict:
        """An `error` verdict for an image whose worker crashed or timed out (IG703)."""
        return self._error_verdict("IG703", target, message)

    def _error_verdict(self, rule_id: str, target: Target, message: str) -> Verdict:
        spec = rules.RULES[rule_id]
        severity = self.policy.severity_overrides.get(spec.id, spec.severity)
        finding = rules.make_finding(spec, rules.Hit(message), severity)
        return Verdict(
            Status.ERROR, None, (finding,), fail_on=self.policy.fail_on, path=target.path
        )


# --- the worker pool -------------------------------------------------------------------------


def _worker_loop(connection: Connection, work: Callable[[Any], Any]) -> None:
    """A worker process: judge what the scan sends until it sends None or goes away."""
    # Ctrl-C goes to the whole process group; the scan decides what happens, not each worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, item = message
        try:
            reply = (index, True, work(item))
        except Exception as error:  # a bug in one parser must not end the scan
            reply = (index, False, f"inspection failed: {type(error).__name__}: {error}")
        try:
            connection.send(reply)
        except OSError:  # the scan is gone
            return
        except Exception as error:  # the result did not pickle
            connection.send((index, False, f"inspection result could not be returned: {error}"))


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


@attrs.define
class _Worker:
    process: BaseProcess
    connection: Connection
    # Items sent and not answered yet, in the order the worker takes them; the first one is
    # the one it is working on, and `deadline` is that one's.
    tasks: collections.deque[int] = attrs.Factory(collections.deque)
    deadline: float = 0.0


# What `Pool._receive` returns while a worker is alive and has not answered yet.
_NO_REPLY_YET: tuple[bool, Any] = (False, "no reply yet")


class Pool(Generic[T, R]):
    """Run `work` on each item in worker processes, `jobs` at a time.

    Unlike concurrent.futures, one item that crashes its worker (a segfault, os._exit, the OOM
    killer) or runs past `timeout` costs only that item: the worker is replaced and `failure`
    turns the item into a result. Results come back in the items' order.

    `prefetch` items are queued to each worker at a time, so that it goes on to the next one
    without waiting for the scan to read its answer (a worker answers each item as it finishes
    it, so the item it is stuck on is always known). The default of 1 hands an item out only
    once the one before it is answered and its `on_result` has run.
    """

    def __init__(
        self,
        work: Callable[[T], R],
        failure: Callable[[T, str], R],
        *,
        jobs: int,
        timeout: float | None,
        on_result: Callable[[int, T, R], None] | None = None,
        prefetch: int = 1,
    ) -> None:
        self.work = work
        self.failure = failure
        self.jobs = jobs
        self.timeout = timeout
        self.prefetch = max(1, prefetch)
        self.on_result = on_result
        # fork() copies the locks other threads hold, so workers are forked from the scan
        # itself only while it has no other thread; with one (rich's progress bar refreshes from
        # a thread) they come from forkserver's clean single-threaded server instead. Both keep
        # the worker start cheap next to spawn, which imports everything again per worker.
        methods = multiprocessing.get_all_start_methods()
        self._context: ForkContext | ForkServerContext | SpawnContext
        if "fork" in methods and threading.active_count() == 1:
            self._context = multiprocessing.get_context("fork")
        elif "forkserver" in methods:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(["imgguard.cli"])
        else:  # pragma: no cover - Windows
            self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_loop, args=(theirs, self.work), name="imgguard-worker", daemon=True
        )
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        self._workers.append(worker)
        return worker

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        if worker.process.is_alive():  # pragma: no cover - a worker that ignored SIGKILL
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
        self._workers.remove(worker)

    def run(self, items: Sequence[T]) -> list[R]:
        """Every item's result, in the items' order.

        A KeyboardInterrupt stops the workers at once and raises `PartialResults` with the
        results that were finished, still in the items' order.
        """
        results: dict[int, R] = {}
        pending = collections.deque(range(len(items)))

        def finish(index: int, result: R) -> None:
            results[index] = result
            if self.on_result is not None:
                self.on_result(index, items[index], result)

        def assign(worker: _Worker) -> None:
            while pending and len(worker.tasks) < self.prefetch:
                index = pending.popleft()
                try:
                    worker.connection.send((index, items[index]))
                except (OSError, ValueError) as error:
                    finish(index, self.failure(items[index], f"worker unavailable: {error}"))
                    continue
                if not worker.tasks:
                    worker.deadline = time.monotonic() + (self.timeout or 0.0)
                worker.tasks.append(index)

        try:
            for _ in range(min(self.jobs, len(items))):
                assign(self._start())
            while busy := [worker for worker in self._workers if worker.tasks]:
                wait_for = None
                if self.timeout is not None:
                    wait_for = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                handles: list[Any] = [w.connection for w in busy]
                handles += [w.process.sentinel for w in busy]
                ready = multiprocessing.connection.wait(handles, timeout=wait_for)
                now = time.monotonic()
                for worker in busy:
                    if worker.connection in ready or worker.process.sentinel in ready:
                        # Every answer that is there, then top the worker's queue up again.
                        died = False
                        while worker.tasks:
                            reply = self._receive(worker, worker.tasks[0])
                            if reply is None:
                                died = True
                                break
                            if reply is _NO_REPLY_YET:
                                break
                            index = worker.tasks.popleft()
                            ok, payload = reply
                            finish(index, payload if ok else self.failure(items[index], payload))
                            worker.deadline = time.monotonic() + (self.timeout or 0.0)
                        if not died and (not worker.tasks or worker.process.is_alive()):
                            assign(worker)
                            continue
                        if not worker.tasks:
                            self._retire(worker, kill=True)
                            if pending:
                                assign(self._start())
                            continue
                        index = worker.tasks.popleft()
                        self._retire(worker, kill=True)
                        why = f"the inspecting process {_describe_exit(worker.process.exitcode)}"
                    elif self.timeout is not None and now >= worker.deadline:
                        index = worker.tasks.popleft()
                        self._retire(worker, kill=True)
                        why = f"inspection timed out after {self.timeout:g} s"
                    else:
                        continue
                    # The items queued behind the failed one were not started: hand them out
                    # again, first.
                    pending.extendleft(reversed(worker.tasks))
                    worker.tasks.clear()
                    finish(index, self.failure(items[index], why))
                    if pending:
                        assign(self._start())
        except KeyboardInterrupt as interrupt:
            self.close(kill=True)
            finished = [results[index] for index in sorted(results)]
            raise PartialResults(finished, interrupt) from None
        except BaseException:
            self.close(kill=True)
            raise
        self.close(kill=False)
        return [results[index] for index in range(len(items))]

    @staticmethod
    def _receive(worker: _Worker, index: int) -> tuple[bool, Any] | None:
        """(True, result) or (False, why it failed) from the worker, None when it died, or
        `_NO_REPLY_YET` when it is alive and still working on `index`."""
        try:
            if not worker.connection.poll():
                return _NO_REPLY_YET if worker.process.is_alive() else None
            replied_index, ok, payload = worker.connection.recv()
        except (EOFError, OSError):
            return None
        if replied_index != index:  # pragma: no cover - the worker answers in order
            return (False, f"worker answered for item {replied_index}, not {index}")
        return (bool(ok), payload)

    def close(self, *, kill: bool) -> None:
        for worker in list(self._workers):
            if not kill:
                with contextlib.suppress(OSError, ValueError):
                    worker.connection.send(None)
            self._retire(worker, kill=kill)


class PartialResults(Exception):
    """The scan was interrupted; `results` are those that finished, in the items' order."""

    def __init__(self, results: list[Any], interrupt: KeyboardInterrupt) -> None:
        super().__init__(f"{len(results)} results")
        self.results = results
        self.signum = _signal_of(interrupt)


def _signal_of(interrupt: KeyboardInterrupt) -> int:
    """SIGINT, or the signal `_raise_interrupt` turned into this KeyboardInterrupt."""
    if interrupt.args and isinstance(interrupt.args[0], int):
        return interrupt.args[0]
    return int(signal.SIGINT)


# --- progress and logs -----------------------------------------------------------------------


class Progress(Protocol):
    def log(self, message: str) -> None: ...

    def advance(self, description: str) -> None: ...

    def stop(self) -> None: ...


class _PlainProgress:
    """No bar (stderr is not a terminal, or --no-progress): logs go straight to stderr."""

    def log(self, message: str) -> None:
        print(f"imgguard: {printable(message)}", file=sys.stderr, flush=True)

    def advance(self, description: str) -> None:
        pass

    def stop(self) -> None:
        pass


class _RichProgress:
    """A rich progress bar on stderr; logs print above it."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self._console = Console(file=sys.stderr)
        self._bar = RichBar(
            TextColumn("[bold]scanning"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}", markup=False),
            console=self._console,
            transient=True,
        )
        self._task = self._bar.add_task("", total=total)
        self._bar.start()

    def log(self, message: str) -> None:
        self._console.print(f"imgguard: {printable(message)}", markup=False, highlight=False)

    def advance(self, description: str) -> None:
        self._bar.update(self._task, advance=1, description=printable(description))

    def stop(self) -> None:
        self._bar.stop()


def make_progress(total: int, *, enabled: bool) -> Progress:
    if enabled and total > 0 and sys.stderr.isatty():
        return _RichProgress(total)
    return _PlainProgress()


# --- scan and check --------------------------------------------------------------------------


def _policy_sources(args: argparse.Namespace) -> config.PolicySources:
    return config.PolicySources(
        policy_file=args.policy, fail_on=args.fail_on, assignments=tuple(args.assignments)
    )


def resolve_policy(
    args: argparse.Namespace, scanned: Sequence[str] = (), notes: list[str] | None = None
) -> Policy:
    """The policy for this run (see `imgguard.config` for the order of precedence)."""
    return config.resolve_policy(
        _policy_sources(args), environ=os.environ, cwd=os.getcwd(), scanned=scanned, notes=notes
    )


def exit_status(verdicts: Sequence[Verdict]) -> int:
    return EXIT_OK if all(verdict.ok for verdict in verdicts) else EXIT_FINDINGS


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(signum)


def judge_all(args: argparse.Namespace, paths: Sequence[str], *, jobs: int, walk: bool) -> int:
    """Judge every image under `paths` (each path itself unless `walk`), write the report, and
    return the exit status."""
    notes: list[str] = []
    policy = resolve_policy(args, scanned=paths, notes=notes)
    timeout = args.timeout or config.env_number(os.environ, "IMGGUARD_TIMEOUT", float)
    judge = Judge(policy, args.claimed_format, args.target_size)
    for note in notes:
        print(f"imgguard: {note}", file=sys.stderr)

    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    targets: list[Target] = []
    progress: Progress = _PlainProgress()
    interrupted_by: int | None = None
    verdicts: list[Verdict] = []
    try:
        try:
            targets = list(iter_targets(paths)) if walk else [Target(path) for path in paths]
            progress = make_progress(len(targets), enabled=not args.no_progress)
            done = 0

            def on_result(index: int, target: Target, verdict: Verdict) -> None:
                nonlocal done
                done += 1
                progress.advance(target.path)
                if args.verbose:
                    worst = verdict.worst
                    why = f" ({worst.rule} {worst.message})" if worst and not verdict.ok else ""
                    progress.log(f"[{done}/{len(targets)}] {target.path}: {verdict.status}{why}")

            pool: Pool[Target, Verdict] = Pool(
                judge,
                judge.failed,
                jobs=jobs,
                timeout=timeout or DEFAULT_TIMEOUT,
                on_result=on_result,
                prefetch=SCAN_PREFETCH,
            )
            verdicts = pool.run(targets)
        except PartialResults as partial:
            verdicts = partial.results
            interrupted_by = partial.signum
        except KeyboardInterrupt as interrupt:
            interrupted_by = _signal_of(interrupt)
        finally:
            progress.stop()
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    if interrupted_by is not None:
        status = 128 + int(interrupted_by)
        print(
            f"imgguard: interrupted after {len(verdicts)} of {len(targets)} images",
            file=sys.stderr,
        )
    else:
        status = exit_status(verdicts)
    run = Run(
        exit_code=status,
        planned=len(targets),
        interrupted=interrupted_by is not None,
        working_directory=os.getcwd(),
    )
    report = RENDERERS[args.report](verdicts, run)
    _emit(report, args.output)
    if args.output:
        from imgguard.report.text import summary_line

        print(f"imgguard: {summary_line(verdicts, run)}", file=sys.stderr)
    return status


def scan(args: argparse.Namespace) -> int:
    if args.paths == ["-"]:
        from imgguard.service_cli import scan_stdin

        return scan_stdin(args)
    jobs = args.jobs or config.env_number(os.environ, "IMGGUARD_JOBS", int) or os.cpu_count() or 1
    return judge_all(args, args.paths, jobs=jobs, walk=True)


def check_one(args: argparse.Namespace) -> int:
    # The same worker as scan, so that a parser that hangs or crashes on this image cannot hang
    # or crash the caller: the image gets an error verdict instead.
    return judge_all(args, [args.path], jobs=1, walk=False)


# --- inspect and rules -----------------------------------------------------------------------


def inspect_one(args: argparse.Namespace) -> int:
    from imgguard.inspection import inspect

    try:
        info = inspect(args.path)
    except ImageError as error:
        print(f"imgguard: {printable(f'{args.path}: {error}')}", file=sys.stderr)
        return EXIT_FINDINGS
    if args.report == "json":
        document = attrs.asdict(info, value_serializer=_serialise)
        document["feature_names"] = list(info.feature_names)
        document["truncated"] = info.truncated
        sys.stdout.write(json.dumps(document, indent=2, default=_json_default) + "\n")
        return EXIT_OK
    lines = []
    for name, value in attrs.asdict(info, recurse=False).items():
        if value in ((), None, {}) and name not in ("backing_file", "data_file"):
            continue
        lines.append(f"{name:15} {_plain(value)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def _serialise(instance: object, attribute: object, value: object) -> object:
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _plain(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(_plain(item) for item in value) or "-"
    if attrs.has(type(value)):
        fields = {a.name: getattr(value, a.name) for a in attrs.fields(type(value))}  # type: ignore[arg-type]
        return "(" + ", ".join(f"{k}={_plain(v)}" for k, v in fields.items() if v is not None) + ")"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_plain_scalar(v)}" for k, v in value.items())
    return _plain_scalar(value)


def _plain_scalar(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    # Names and strings from the image (backing file, createType, creator): never raw control
    # characters on the terminal.
    return printable(str(value))


def list_rules(args: argparse.Namespace) -> int:
    if args.report == "json":
        document = [
            {
                "id": spec.id,
                "name": spec.name,
                "severity": str(spec.severity),
                "cwe": spec.cwe,
                "summary": spec.summary,
            }
            for spec in rules.RULES.values()
        ]
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return EXIT_OK
    lines = []
    for spec in rules.RULES.values():
        cwe = f"CWE-{spec.cwe}" if spec.cwe else "-"
        lines.append(f"{spec.id}  {spec.name:20} {spec.severity!s:8} {cwe:8} {spec.summary}")
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def _emit(report: str, output: str | None) -> None:
    if output:
        try:
            Path(output).write_text(report, encoding="utf-8")
        except OSError as error:
            message = f"cannot write the report: {error.strerror or error}"
            raise ConfigError(message, key=output) from error
    else:
        sys.stdout.write(report)
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "scan":
            return scan(args)
        if args.command == "check":
            return check_one(args)
        if args.command == "inspect":
            return inspect_one(args)
        if args.command in ("convert", "verify"):
            status: int = args.func(args)
            return status
        return list_rules(args)
    except ConfigError as error:
        print(f"imgguard: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`imgguard scan ... | head`); say nothing more on a closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FINDINGS


__all__ = ["Judge", "Pool", "Target", "build_parser", "iter_targets", "main"]
