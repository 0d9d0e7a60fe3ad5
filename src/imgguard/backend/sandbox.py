"""A sandbox for qemu-img: it sees its own program and libraries, the source, the target, no more.

Every qemu-img process the backend starts runs, by default, in new mount, network, PID, IPC and
UTS namespaces whose root is an empty tmpfs holding only:

* qemu-img, the libraries `ldd` lists for it (and the dynamic loader), `/etc/ld.so.cache`, and
  qemu's `block-dmg-*` modules with their libraries when installed (block modules are
  `dlopen`ed, so ldd does not list them; the network ones -- curl, iscsi, nfs, rbd, ssh,
  gluster -- are deliberately left out), all read-only;
* the source image, read-only, at `SOURCE_PATH`; the output file imgguard created, read-write,
  at `TARGET_PATH` (only that file, not the directory it is in); passphrase files, read-only,
  under `/secrets`;
* a fresh /proc for the new PID namespace, a minimal /dev, a private /tmp;

with no network interface but a loopback that is down, and no capabilities. It is built by
bubblewrap (`bwrap`) where that works, otherwise by util-linux `unshare` plus `UNSHARE_INIT`, a
few lines of Python that bind the same files into a new tmpfs root, `pivot_root` into it, drop
every capability and run qemu-img as the second process of the namespace. Where neither can
create namespaces, `prepare` raises `SandboxUnavailable` unless the caller said `sandbox=False`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence

from attrs import define, field, frozen

from imgguard.backend.errors import SandboxUnavailable
from imgguard.backend.limits import Limits
from imgguard.errors import ConfigError

# Where the files qemu-img works on appear inside the sandbox.
SOURCE_PATH = "/images/source"
TARGET_PATH = "/images/target"
SECRETS_DIR = "/secrets"

MECHANISMS = ("bwrap", "unshare")
NONE = "none"

# The environment qemu-img gets in a sandbox (see process.child_environment for the last two).
_BASE_ENVIRONMENT = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LC_ALL": "C",
    "MALLOC_ARENA_MAX": "2",
}
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-fA-F]+\)")
# Exit status and stderr prefix of UNSHARE_INIT when it cannot build the sandbox.
SETUP_FAILED = 125
SETUP_PREFIX = "imgguard-sandbox: "

# Run inside `unshare --mount --net --pid --ipc --uts --fork` (so as process 1 of the new PID
# namespace) as `python -I -S -c UNSHARE_INIT SPEC`: builds the root described by the JSON SPEC
# on a tmpfs, pivots into it, then forks; the child sets the limits, drops every capability and
# execs the command, while process 1 waits for it and exits with its status (128 + the signal
# number when a signal killed it, as bwrap does). Sources are opened with O_PATH first and bound
# through /proc/self/fd, so that the tmpfs mounted over /tmp cannot hide one that lives there.
UNSHARE_INIT = r"""
import ctypes, json, os, resource, stat, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
KEPT = ((1, 1), (2, 2), (4, 4), (8, 8), (1024, 1024), (2048, 2048), (4096, 1 << 21))
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203,
              "ppc64": 203, "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218}
def check(result, what):
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, what + ": " + os.strerror(number))
def encode(text):
    return None if text is None else os.fsencode(text)
def mount(source, target, fstype, flags, data=None):
    check(libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags),
                     encode(data)), "mount " + target)
try:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    fds = [os.open(host, os.O_PATH | os.O_CLOEXEC) for host, _, _ in spec["binds"]]
    root = "/tmp"
    mount("imgguard", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for name in ("proc", "tmp", "dev"):
        os.mkdir(root + "/" + name, 0o755)
    for fd, (host, inside, mode) in zip(fds, spec["binds"]):
        target = root + inside
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        mount("/proc/self/fd/%d" % fd, target, None, MS_BIND)
        host_flags = os.fstatvfs(fd).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID
        flags |= sum(ms for st, ms in KEPT if host_flags & st)
        flags |= {"ro": MS_RDONLY | MS_NODEV, "rw": MS_NODEV | MS_NOEXEC, "dev": MS_NOEXEC}[mode]
        mount(None, target, None, flags)
        os.close(fd)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for target, link in spec["symlinks"]:
        os.symlink(target, root + link)
    os.chdir(root)
    check(libc.syscall(PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "umount the old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    check(libc.sethostname(b"imgguard", 8), "sethostname")
except Exception as error:
    sys.stderr.write("imgguard-sandbox: cannot build the sandbox: %s\n" % (error,))
    os._exit(125)
argv = spec["argv"]
child = os.fork()
if child == 0:
    try:
        cpu, memory = spec["cpu"], spec["as"]
        if cpu >= 0:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        if memory >= 0:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)
        libc.prctl(47, 4, 0, 0, 0)
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
        os.execve(argv[0], argv, spec["env"])
    except BaseException as error:
        sys.stderr.write("imgguard-sandbox: cannot run %s: %s\n" % (argv[0], error))
        os._exit(125)
while True:
    pid, status = os.waitpid(-1, 0)
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
"""


@frozen
class Binding:
    """`host` appears at `inside` in the sandbox, read-only unless `writable`."""

    host: str
    inside: str
    writable: bool = False


@frozen
class ProgramView:
    """What a program needs to run: its files (read-only) and the top-level symlinks of a
    merged-/usr system (`/lib -> usr/lib`), so that paths through them resolve."""

    program: str
    files: tuple[Binding, ...]
    symlinks: tuple[tuple[str, str], ...]


_lock = threading.Lock()
_views: dict[tuple[str, int, int, int], ProgramView] = {}
_probes: dict[tuple[str, ...], str | None] = {}


def program_view(program: str) -> ProgramView:
    """The files `program` (an absolute path) loads, found with ldd; cached per file version."""
    st = os.stat(program)
    key = (program, st.st_dev, st.st_ino, st.st_mtime_ns)
    with _lock:
        cached = _views.get(key)
    if cached is not None:
        return cached
    paths = [program, *_libraries(program)]
    for module in _block_modules(paths):
        paths += [module, *_libraries(module)]
    if os.path.isfile("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    files: dict[str, Binding] = {}
    for path in paths:
        inside = _real_directory_path(path)
        files.setdefault(inside, Binding(path, inside))
    symlinks = tuple(
        (os.readlink(top), top)
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
        if os.path.islink(top)
    )
    view = ProgramView(_real_directory_path(program), tuple(files.values()), symlinks)
    with _lock:
        _views[key] = view
    return view


def _real_directory_path(path: str) -> str:
    """`path` with its directory resolved (`/lib64/ld.so` -> `/usr/lib64/ld.so`), its last
    component kept: a library is bound under the name the loader asks for."""
    directory, name = os.path.split(path)
    return os.path.join(os.path.realpath(directory), name)


def _libraries(path: str) -> list[str]:
    """The shared objects `ldd` lists for `path` (none for a static program)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable(
            "ldd is not installed, so the libraries qemu-img needs cannot be found",
            ("ldd: not installed",),
        )
    result = subprocess.run(
        [ldd, path],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
    )
    missing = [line.strip() for line in result.stdout.splitlines() if "not found" in line]
    if missing:
        raise SandboxUnavailable(
            f"{path} needs libraries that are not installed: {'; '.join(missing)}",
            tuple(f"ldd: {line}" for line in missing),
        )
    return [match.group(1) for match in map(_LDD_PATH.search, result.stdout.splitlines()) if match]


def _block_modules(paths: Sequence[str]) -> list[str]:
    """qemu's dmg block modules (bz2, lzfse), which imgguard's accepted formats may need.

    They sit in `<libdir>/qemu` (Debian: /usr/lib/x86_64-linux-gnu/qemu), next to the network
    protocol modules, which stay out of the sandbox.
    """
    directories = {os.path.join(os.path.dirname(os.path.realpath(p)), "qemu") for p in paths[1:]}
    directories.update(("/usr/lib64/qemu", "/usr/lib/qemu"))
    found = []
    for directory in sorted(directories):
        found += sorted(glob.glob(os.path.join(glob.escape(directory), "block-dmg-*.so")))
    return found


@define
class Sandbox:
    """One run's sandbox: the mechanism and the image files to bind.

    `bind` returns the path to name in the qemu-img command line: the path inside the sandbox,
    or the host path itself when `mechanism` is `"none"`.
    """

    mechanism: str
    tool: str | None = None
    bindings: list[Binding] = field(factory=list)

    @property
    def active(self) -> bool:
        return self.mechanism != NONE

    def bind(self, host: str, inside: str, *, writable: bool = False) -> str:
        if not self.active:
            return host
        if not os.path.isabs(inside) or inside in {b.inside for b in self.bindings}:
            raise ConfigError(f"cannot bind {host!r} at {inside!r}", key="sandbox")
        self.bindings.append(Binding(host, inside, writable))
        return inside

    def environment(self) -> dict[str, str]:
        environment = dict(_BASE_ENVIRONMENT)
        if os.environ.get("LD_LIBRARY_PATH"):
            environment["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        return environment

    def wrap(self, command: Sequence[str], limits: Limits) -> list[str]:
        """The full argv that runs `command` (the program's absolute path first) in here."""
        if not self.active:
            return limits.wrap(list(command))
        assert self.tool is not None
        view = program_view(command[0])
        command = [view.program, *command[1:]]
        if self.mechanism == "bwrap":
            return limits.wrap(self._bwrap(view, command))
        return self._unshare(view, command, limits)

    def _bwrap(self, view: ProgramView, command: list[str]) -> list[str]:
        assert self.tool is not None
        argv = [
            self.tool,
            "--die-with-parent",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "imgguard",
        ]
        if os.geteuid() == 0:
            argv += ["--cap-drop", "ALL"]
        for target, link in view.symlinks:
            argv += ["--symlink", target, link]
        for binding in view.files:
            argv += ["--ro-bind", binding.host, binding.inside]
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for binding in self.bindings:
            argv += ["--bind" if binding.writable else "--ro-bind", binding.host, binding.inside]
        return [*argv, "--remount-ro", "/", "--chdir", "/", "--", *command]

    def _unshare(self, view: ProgramView, command: list[str], limits: Limits) -> list[str]:
        assert self.tool is not None
        cpu, memory = limits.rlimit_values()
        binds = [[b.host, b.inside, "ro"] for b in view.files]
        binds += [[device, device, "dev"] for device in _DEVICES if os.path.exists(device)]
        binds += [[b.host, b.inside, "rw" if b.writable else "ro"] for b in self.bindings]
        spec = {
            "binds": binds,
            "symlinks": [list(pair) for pair in view.symlinks],
            "argv": command,
            "env": self.environment(),
            "cpu": cpu,
            "as": memory,
        }
        argv = []
        setpriv = _setpriv_with_pdeathsig()
        if setpriv is not None:
            argv += [setpriv, "--pdeathsig", "KILL", "--"]
        argv += [
            self.tool,
            "--mount",
            "--net",
            "--pid",
            "--ipc",
            "--uts",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
        ]
        if os.geteuid() != 0:
            argv += ["--user", "--map-root-user"]
        return [*argv, "--", sys.executable, "-I", "-S", "-c", UNSHARE_INIT, json.dumps(spec)]


def decode_status(status: int) -> int:
    """A sandbox's exit status as qemu-img's own: 128 + N (bwrap's and UNSHARE_INIT's report of
    a qemu-img killed by signal N) becomes -N, as `subprocess` gives it for a direct child."""
    if 128 < status < 128 + 65:
        return -(status - 128)
    return status


def _setpriv_with_pdeathsig() -> str | None:
    """util-linux setpriv when it has --pdeathsig (2.33+): SIGKILLs unshare if imgguard dies."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    key = ("setpriv", setpriv)
    with _lock:
        if key in _probes:
            return _probes[key]
    result = subprocess.run(
        [setpriv, "--help"], capture_output=True, text=True, check=False, timeout=30
    )
    found = setpriv if "--pdeathsig" in result.stdout else None
    with _lock:
        _probes[key] = found
    return found


SandboxMode = bool | str


def mechanisms_for(mode: SandboxMode) -> tuple[str, ...]:
    """The mechanisms to try, in order, for a `sandbox=` argument; () means no sandbox."""
    if mode is True or mode == "auto":
        return MECHANISMS
    if mode is False or mode == NONE:
        return ()
    if isinstance(mode, str) and mode in MECHANISMS:
        return (mode,)
    raise ConfigError(
        f"must be True, False, 'auto', 'bwrap', 'unshare' or 'none', not {mode!r}", key="sandbox"
    )


def prepare(mode: SandboxMode, program: str) -> Sandbox:
    """A `Sandbox` for running `program` under `mode`, the first mechanism that works here.

    Each mechanism is tried once per process (and program version): it must run
    `program --version` in a sandbox built as for a real run. Raises `SandboxUnavailable`
    naming every reason when none works, unless `mode` is False/'none'.
    """
    wanted = mechanisms_for(mode)
    if not wanted:
        return Sandbox(NONE)
    reasons = []
    for mechanism in wanted:
        tool = shutil.which(mechanism)
        if tool is None:
            package = "bubblewrap" if mechanism == "bwrap" else "util-linux"
            reasons.append(f"{mechanism}: not installed (package {package})")
            continue
        failure = _probe(mechanism, tool, program)
        if failure is None:
            return Sandbox(mechanism, tool)
        reasons.append(f"{mechanism}: {failure}")
    raise SandboxUnavailable(
        "qemu-img cannot run in a sandbox here ("
        + "; ".join(reasons)
        + "). Install bubblewrap, or run where namespaces can be created (as root, or with "
        "unprivileged user namespaces enabled; in a container, with a seccomp profile that "
        "allows unshare/clone of namespaces), or pass sandbox=False (--no-sandbox) to run "
        "qemu-img with the host's full view",
        reasons,
    )


def _probe(mechanism: str, tool: str, program: str) -> str | None:
    """None when `program --version` runs in a `mechanism` sandbox, else why not (cached)."""
    try:
        st = os.stat(program)
    except OSError as error:
        return f"cannot stat {program}: {error.strerror}"
    key = (mechanism, tool, program, str(st.st_ino), str(st.st_mtime_ns), str(os.geteuid()))
    with _lock:
        if key in _probes:
            return _probes[key]
    sandbox = Sandbox(mechanism, tool)
    try:
        argv = sandbox.wrap([program, "--version"], Limits(cpu_seconds=None, address_space=None))
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            timeout=60,
            env=sandbox.environment(),
        )
    except SandboxUnavailable as error:
        failure: str | None = str(error)
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = f"cannot run it: {error}"
    else:
        if result.returncode == 0 and b"version" in result.stdout:
            failure = None
        else:
            lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
            failure = (lines[-1] if lines else "") or f"exit status {result.returncode}"
    with _lock:
        _probes[key] = failure
    return failure


def forget_probes() -> None:
    """Drop the cached probe results and program views (for tests, and after installing tools)."""
    with _lock:
        _probes.clear()
        _views.clear()


__all__ = [
    "MECHANISMS",
    "SECRETS_DIR",
    "SOURCE_PATH",
    "TARGET_PATH",
    "UNSHARE_INIT",
    "Binding",
    "ProgramView",
    "Sandbox",
    "SandboxMode",
    "decode_status",
    "forget_probes",
    "mechanisms_for",
    "prepare",
    "program_view",
]
