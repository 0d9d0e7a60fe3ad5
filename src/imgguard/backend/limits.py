"""Resource limits for qemu-img: CPU seconds, address space and a wall-clock timeout.

The CPU and address-space limits are set in the child, between fork and exec of qemu-img (or of
the sandbox around it, whose processes inherit them), by util-linux `prlimit` (a small C program
that sets its own limits and execs the command: well under a millisecond), or, where `prlimit`
is not installed, by a few lines of Python run with the same interpreter (`python -I -S -c
RLIMIT_EXEC`, the way Cinder runs `python -m oslo_concurrency.prlimit`; starting an interpreter
costs 5-15 ms). Never `preexec_fn`, which is unsafe in a threaded service; `posix_spawn` has no
way to set limits. The wall-clock timeout is enforced by the parent, which kills qemu-img's whole
process group when it runs out.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading

from attrs import field, frozen

from imgguard.errors import ConfigError
from imgguard.model import GiB

# Run as `python -I -S -c RLIMIT_EXEC CPU AS PROGRAM ARG...`: sets the limits (-1: leave as is)
# and execs PROGRAM. The hard CPU limit is one second above the soft one, so a program that
# ignores SIGXCPU is killed with SIGKILL. Core dumps are off: a qemu-img that aborts on a failed
# allocation must not leave a core file the size of its address space behind.
RLIMIT_EXEC = (
    "import os, resource, sys\n"
    "cpu, memory = int(sys.argv[1]), int(sys.argv[2])\n"
    "if cpu >= 0:\n"
    "    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))\n"
    "if memory >= 0:\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def _optional_positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise ConfigError(f"must be positive or None, not {value!r}", key="limits")
    return value


def _optional_bytes(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"address_space must be a positive byte count or None, not {value!r}")
    return value


def _not_negative(value: float) -> float:
    if not value >= 0:
        raise ConfigError(f"must be >= 0, not {value!r}", key="limits")
    return value


@frozen
class Limits:
    """What one qemu-img run may use. None means no limit.

    `cpu_seconds` and `timeout` grow by `cpu_seconds_per_gib` and `timeout_per_gib` for every
    GiB of the source's virtual size (rounded up), so that one policy fits a 1 GiB image and a
    1 TiB one; `for_size` works out the numbers for one image.
    """

    cpu_seconds: float | None = field(default=30, converter=_optional_positive)
    address_space: int | None = field(default=1 * GiB, converter=_optional_bytes)
    timeout: float | None = field(default=None, converter=_optional_positive)
    cpu_seconds_per_gib: float = field(default=0, converter=_not_negative)
    timeout_per_gib: float = field(default=0, converter=_not_negative)

    def for_size(self, virtual_size: int | None) -> Limits:
        """These limits for an image of `virtual_size` bytes, with the per-GiB parts folded in."""
        gib = math.ceil((virtual_size or 0) / GiB)
        cpu = self.cpu_seconds
        if cpu is not None:
            cpu += self.cpu_seconds_per_gib * gib
        timeout = self.timeout
        if timeout is not None:
            timeout += self.timeout_per_gib * gib
        return Limits(cpu_seconds=cpu, address_space=self.address_space, timeout=timeout)

    def rlimit_values(self) -> tuple[int, int]:
        """(RLIMIT_CPU seconds, RLIMIT_AS bytes) to set; -1 leaves one as it is."""
        cpu = -1 if self.cpu_seconds is None else max(1, math.ceil(self.cpu_seconds))
        memory = -1 if self.address_space is None else self.address_space
        return cpu, memory

    def wrap(self, command: list[str]) -> list[str]:
        """`command` (an absolute program path first) run under the CPU and memory limits, and
        without core dumps: `prlimit --cpu=S:S+1 --as=N:N --core=0 -- COMMAND` (see the module
        docstring), else `python -I -S -c RLIMIT_EXEC S N COMMAND`."""
        if self.cpu_seconds is None and self.address_space is None:
            return list(command)
        cpu, memory = self.rlimit_values()
        prlimit = find_prlimit()
        if prlimit is None:
            return [sys.executable, "-I", "-S", "-c", RLIMIT_EXEC, str(cpu), str(memory), *command]
        argv = [prlimit]
        if cpu >= 0:
            argv.append(f"--cpu={cpu}:{cpu + 1}")
        if memory >= 0:
            argv.append(f"--as={memory}:{memory}")
        return [*argv, "--core=0:0", "--", *command]


_prlimit_lock = threading.Lock()
_prlimit: dict[str, str | None] = {}


def find_prlimit() -> str | None:
    """util-linux `prlimit` on PATH (absolute), or None; looked up once per PATH value."""
    path = os.environ.get("PATH", os.defpath)
    with _prlimit_lock:
        if path in _prlimit:
            return _prlimit[path]
    found = shutil.which("prlimit", path=path)
    result = os.path.abspath(found) if found is not None else None
    with _prlimit_lock:
        _prlimit[path] = result
    return result


# Cinder's QEMU_IMG_LIMITS for `qemu-img info`: 30 CPU seconds and 1 GiB of address space, which
# stop a crafted header from making qemu-img spin or allocate without bound. Used for `info`,
# `resize` and `--version`, with a one-minute wall clock on top.
INFO_LIMITS = Limits(cpu_seconds=30, address_space=1 * GiB, timeout=60)

# For `convert`: the same 1 GiB of address space (qemu-img's buffers and tables do not grow with
# the image; the backend also caps glibc's malloc arenas so its thread pool fits), and a CPU and
# wall-clock budget that grows with the virtual size. Compressing random data to qcow2 costs
# about 13 CPU seconds per GiB on a current x86 core; 60 per GiB leaves room for slow machines.
DEFAULT_LIMITS = Limits(
    cpu_seconds=30,
    address_space=1 * GiB,
    timeout=600,
    cpu_seconds_per_gib=60,
    timeout_per_gib=120,
)

# No limits at all (for callers that put qemu-img in a cgroup of their own).
NO_LIMITS = Limits(cpu_seconds=None, address_space=None, timeout=None)

__all__ = ["DEFAULT_LIMITS", "INFO_LIMITS", "NO_LIMITS", "RLIMIT_EXEC", "Limits", "find_prlimit"]
