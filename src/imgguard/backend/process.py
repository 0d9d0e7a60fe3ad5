"""Run one qemu-img command: limits, a process group of its own, a deadline, progress.

qemu-img starts in a new session (so it is the leader of its own process group and a Ctrl-C in
the terminal reaches only the parent), under the CPU and address-space limits, with stdin from
/dev/null. The parent reads stdout and stderr until both close, parsing `-p` progress lines on
the way, and kills the whole group with SIGKILL when the deadline passes, when the progress
callback raises, or on any other exception (KeyboardInterrupt included), before re-raising.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

from attrs import frozen

from imgguard.backend.errors import QemuImgFailed, QemuImgTimeout
from imgguard.backend.limits import Limits
from imgguard.backend.sandbox import NONE, Sandbox, decode_status
from imgguard.errors import ConfigError

ProgressCallback = Callable[[float], None]

# "    (12.34/100%)\r", as qemu-img's -p prints it (util/qemu-progress.c).
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_STDERR_KEEP = 64 << 10
_STDOUT_CAP = 16 << 20
_READ_SIZE = 64 << 10

# qemu-img's messages when the address-space limit stops an allocation (glib's g_malloc aborts,
# qemu_memalign and thread creation report ENOMEM/EAGAIN, the loader cannot map a library).
_OUT_OF_MEMORY = (
    "Cannot allocate memory",
    "failed to allocate",
    "qemu_thread_create: Resource temporarily unavailable",
    "error while loading shared libraries",
    "Out of memory",
    "out of memory",
)


@frozen
class Completed:
    """A qemu-img run that exited 0."""

    command: tuple[str, ...]
    stdout: bytes
    stderr: str
    seconds: float
    cpu_seconds: float
    max_rss_kib: int
    sandbox: str = NONE


def child_environment() -> dict[str, str]:
    """The environment qemu-img runs in.

    LC_ALL=C keeps its error messages (strerror texts such as "No space left on device") in
    English, which the backend matches. MALLOC_ARENA_MAX=2 stops glibc from reserving 64 MiB of
    address space for an arena per thread of qemu's I/O thread pool, which otherwise makes a
    vhdx or qcow2 conversion fail now and then under a 1 GiB address-space limit.
    """
    environment = dict(os.environ)
    environment["LC_ALL"] = "C"
    environment["MALLOC_ARENA_MAX"] = "2"
    return environment


def run(
    command: Sequence[str],
    *,
    limits: Limits,
    operation: str,
    progress: ProgressCallback | None = None,
    command_prefix: Sequence[str] = (),
    error: type[QemuImgFailed] = QemuImgFailed,
    timeout_error: type[QemuImgTimeout] = QemuImgTimeout,
    sandbox: Sandbox | None = None,
) -> Completed:
    """Run `command` (qemu-img's absolute path first) and return what it printed.

    With an active `sandbox` the command runs in it (its paths must be the ones `sandbox.bind`
    returned); without one, or with `Sandbox("none")`, it runs with the host's view. The
    descriptors of `sandbox.bind_fd` are passed to the child (and to `command_prefix`, which
    must keep them open: `cgexec`, `nice`, `ionice`, `taskset` do; `sudo` does not). Raises
    `error` when it exits non-zero or is killed, `timeout_error` when it runs past
    `limits.timeout`; the process group is dead and reaped when this returns or raises.
    """
    box = sandbox if sandbox is not None and sandbox.active else None
    if box is None:
        argv = [*command_prefix, *limits.wrap(list(command))]
        environment = child_environment()
    else:
        argv = [*command_prefix, *box.wrap(command, limits)]
        environment = box.environment()
    pass_fds = tuple(sandbox.fds) if sandbox is not None else ()
    shown = tuple(command)
    started = time.monotonic()
    deadline = None if limits.timeout is None else started + limits.timeout
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            pass_fds=pass_fds,
            env=environment,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot run {argv[0]!r}: {exc.strerror}", key="command") from exc
    stdout = bytearray()
    stderr = bytearray()
    timed_out = False
    try:
        timed_out = _pump(process, deadline, stdout, stderr, progress, capture=progress is None)
        if timed_out:
            _kill_group(process)
        status, cpu_seconds, max_rss = _reap(process, None if timed_out else deadline)
        if status is None:  # the deadline passed while it was closing its pipes
            timed_out = True
            _kill_group(process)
            status, cpu_seconds, max_rss = _reap(process, None)
        if timed_out and box is not None:
            _wait_for_group(process.pid)
    except BaseException:
        _kill_group(process)
        _reap(process, None)
        if box is not None:
            _wait_for_group(process.pid)
        raise
    finally:
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    seconds = time.monotonic() - started
    text = stderr.decode("utf-8", "replace").strip()
    if timed_out:
        raise timeout_error(
            f"qemu-img {operation} ran past its timeout of {limits.timeout:g} s and was killed",
            timeout=limits.timeout or 0.0,
            command=shown,
            returncode=status,
            stderr=text,
        )
    assert status is not None
    if box is not None:
        status = decode_status(status)
    if status != 0:
        limit = _limit_hit(status, text, cpu_seconds, limits)
        raise error(
            _failure_message(operation, status, text, limit),
            command=shown,
            returncode=status,
            stderr=text,
            limit=limit,
        )
    return Completed(
        shown,
        bytes(stdout),
        text,
        seconds,
        cpu_seconds,
        max_rss,
        box.mechanism if box is not None else NONE,
    )


def _pump(
    process: subprocess.Popen[bytes],
    deadline: float | None,
    stdout: bytearray,
    stderr: bytearray,
    progress: ProgressCallback | None,
    *,
    capture: bool,
) -> bool:
    """Read both pipes until they close; True when the deadline passed first."""
    assert process.stdout is not None and process.stderr is not None
    out_fd, err_fd = process.stdout.fileno(), process.stderr.fileno()
    pending = b""
    last: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(out_fd, selectors.EVENT_READ)
        selector.register(err_fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return True
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, _READ_SIZE)
                if not data:
                    selector.unregister(key.fd)
                elif key.fd == err_fd:
                    stderr += data
                    del stderr[: max(0, len(stderr) - _STDERR_KEEP)]
                elif capture:
                    stdout += data
                    if len(stdout) > _STDOUT_CAP:
                        raise QemuImgFailed(
                            f"qemu-img printed more than {_STDOUT_CAP} bytes on stdout"
                        )
                elif progress is not None:
                    pending += data
                    *lines, pending = re.split(rb"[\r\n]", pending)
                    for line in lines:
                        match = _PROGRESS.search(line)
                        if match:
                            percent = float(match.group(1))
                            if percent != last:
                                last = percent
                                progress(percent)
    return False


def _reap(
    process: subprocess.Popen[bytes], deadline: float | None
) -> tuple[int | None, float, int]:
    """Wait for the child (until `deadline`); its exit status, CPU seconds and max RSS (KiB).

    Uses wait4 rather than Popen.wait for the child's own resource usage (per child, which
    RUSAGE_CHILDREN of a threaded service is not). Returns a status of None at the deadline.
    """
    if process.returncode is not None:
        return process.returncode, 0.0, 0
    while True:
        flags = 0 if deadline is None else os.WNOHANG
        try:
            pid, status, usage = os.wait4(process.pid, flags)
        except ChildProcessError:  # reaped elsewhere (Popen's own bookkeeping)
            process.wait()
            return process.returncode, 0.0, 0
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss
        if deadline is not None and time.monotonic() >= deadline:
            return None, 0.0, 0
        time.sleep(0.005)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL qemu-img's process group. The leader is not reaped yet, so its id is not reused."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for_group(group: int, timeout: float = 5.0) -> None:
    """Wait until no process of `group` runs any more (zombies do not count).

    In a sandbox qemu-img is a grandchild: reaping the sandbox's first process does not wait
    for it, though the SIGKILL sent to the group reached it too.
    """
    deadline = time.monotonic() + timeout
    while _group_members(group) and time.monotonic() < deadline:
        time.sleep(0.002)


def _group_members(group: int) -> list[int]:
    """The live (not zombie) processes in process group `group`, from /proc."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def _limit_hit(status: int, stderr: str, cpu_seconds: float, limits: Limits) -> str | None:
    cpu_limit = limits.cpu_seconds
    if cpu_limit is not None and (
        status == -signal.SIGXCPU or (status == -signal.SIGKILL and cpu_seconds >= cpu_limit)
    ):
        return "cpu"
    if limits.address_space is not None and any(text in stderr for text in _OUT_OF_MEMORY):
        return "address-space"
    return None


def _failure_message(operation: str, status: int, stderr: str, limit: str | None) -> str:
    if status < 0:
        try:
            how = f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            how = f"was killed by signal {-status}"
    else:
        how = f"failed with exit status {status}"
    message = f"qemu-img {operation} {how}"
    if limit == "cpu":
        message += " (it used up its CPU time limit)"
    elif limit == "address-space":
        message += " (it ran out of its address-space limit)"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "warning:" not in line]
    if errors or lines:
        message += f": {(errors or lines)[-1]}"
    return message


__all__ = ["Completed", "ProgressCallback", "child_environment", "run"]
