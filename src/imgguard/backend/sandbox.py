"""A sandbox for qemu-img: it sees its own program and libraries, the source, the target, no more.

Every qemu-img process the backend starts runs, by default, in new mount, network, PID, IPC and
UTS namespaces whose root is an empty tmpfs holding only:

* qemu-img itself, the system library directories its libraries (`ldd`) live in -- bound whole,
  read-only (`/usr/lib/x86_64-linux-gnu`, `/usr/lib64`: one mount instead of one per library,
  see `LIBRARY_DIRECTORY`) --, any library outside those file by file, `/etc/ld.so.cache`, and
  qemu's `block-dmg-*` modules with their libraries when installed. qemu's module directory
  inside a bound library directory is hidden under an empty read-only tmpfs with only the dmg
  modules bound back in: the network protocol modules (curl, iscsi, nfs, rbd, ssh, gluster)
  stay out;
* the source image, read-only, at `SOURCE_PATH` -- bound from the descriptor imgguard opened
  and checked (`Sandbox.bind_fd`), so that renaming another file over the path after the check
  changes nothing qemu-img sees --; the output file imgguard created, read-write, at
  `TARGET_PATH` (only that file); passphrase files, read-only, under `/secrets`;
* /dev/null, /dev/zero and /dev/urandom (`DEVICES`) and a private /tmp; no /proc at all (qemu-img
  runs without it: it only reads /proc/self/status for libnuma and /proc/self/exe for its module
  directory, and falls back on both), no /sys, /etc (but ld.so.cache), /home, /root, /run, /var;

with no network interface but a loopback that is down, and no capabilities. It is built by
bubblewrap (`bwrap`) where that works, otherwise by util-linux `unshare` plus `UNSHARE_INIT`, a
few lines of Python that bind the same files into a new tmpfs root, `pivot_root` into it, drop
every capability and run qemu-img as the second process of the namespace. Where neither can
create namespaces, `prepare` raises `SandboxUnavailable` unless the caller said `sandbox=False`.
"""

from __future__ import annotations

import glob
import marshal
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
# The devices qemu-img opens (strace: /dev/null for its OFD-lock probe, /dev/urandom), and
# /dev/zero; bound one by one instead of bwrap's `--dev` (a tmpfs, devpts, shm and a dozen nodes).
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
# A directory the dynamic loader searches by default (after realpath): bound whole, read-only.
# Anything else a library lives in (an LD_LIBRARY_PATH entry, /opt/...) is bound file by file.
LIBRARY_DIRECTORY = re.compile(
    r"^(?:/usr)?/lib(?:32|64|x32)?(?:/[A-Za-z0-9_]+-linux-[A-Za-z0-9_]+)?$"
)
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-fA-F]+\)")
# Exit status and stderr prefix of UNSHARE_INIT when it cannot build the sandbox.
SETUP_FAILED = 125
SETUP_PREFIX = "imgguard-sandbox: "

# Run inside `unshare --mount --net --pid --ipc --uts --fork` (so as process 1 of the new PID
# namespace) as `python -I -S -c UNSHARE_INIT SPEC`: builds the root described by SPEC (a dict,
# `marshal`led and hex-encoded: unlike json, marshal is built in, and importing json costs ~6 ms)
# on a tmpfs, pivots into it, then forks; the child sets the limits, drops every capability and
# execs the command, while process 1 waits for it and exits with its status (128 + the signal
# number when a signal killed it, as bwrap does). Each bind is [host, inside, mode, fd]: sources
# are opened with O_PATH first and bound through /proc/self/fd, so that the tmpfs mounted over
# /tmp cannot hide one that lives there. An inherited descriptor `fd` (`Sandbox.bind_fd`) belongs
# to imgguard's mount namespace, from which the kernel refuses to bind: its file is opened again
# here by the name /proc gives it, and bound only if it is the same inode (as bwrap's
# --ro-bind-fd checks), so a source swapped after the check fails the run instead of being
# converted. Mode "tmpfs" mounts an empty tmpfs at `inside` (read-only once all is bound).
UNSHARE_INIT = r"""
import ctypes, marshal, os, resource, stat, sys
spec = marshal.loads(bytes.fromhex(sys.argv[1]))
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
def reopen(fd):
    # A descriptor opened in imgguard's mount namespace cannot be bound from this one: find
    # its file here by its name and bind that, if (and only if) it is the same file.
    st = os.fstat(fd)
    name = os.readlink("/proc/self/fd/%d" % fd)
    try:
        here = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        here = None
    if here is None or (os.fstat(here).st_dev, os.fstat(here).st_ino) != (st.st_dev, st.st_ino):
        raise OSError(116, "%s is no longer the file imgguard checked (it was moved, replaced or "
                      "removed)" % name)
    os.close(fd)
    return here
try:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    fds = [reopen(fd) if fd >= 0 else None if mode == "tmpfs" else
           os.open(host, os.O_PATH | os.O_CLOEXEC) for host, _, mode, fd in spec["binds"]]
    root = "/tmp"
    mount("imgguard", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.mkdir(root + "/tmp", 0o755)
    masks = []
    for fd, (host, inside, mode, _) in zip(fds, spec["binds"]):
        target = root + inside
        if mode == "tmpfs":
            mount("imgguard", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            masks.append(target)
            continue
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.makedirs(target, 0o755, exist_ok=True)
        elif not os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        mount("/proc/self/fd/%d" % fd, target, None, MS_BIND)
        host_flags = os.fstatvfs(fd).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID
        flags |= sum(ms for st, ms in KEPT if host_flags & st)
        flags |= {"ro": MS_RDONLY | MS_NODEV, "rw": MS_NODEV | MS_NOEXEC, "dev": MS_NOEXEC}[mode]
        mount(None, target, None, flags)
        os.close(fd)
    for target in masks:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
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
    """`host` appears at `inside` in the sandbox, read-only unless `writable`.

    With `fd` set, `host` is `/proc/self/fd/FD`: the file the descriptor (inherited by the
    sandbox) refers to is bound, whatever its path names by then.
    """

    host: str
    inside: str
    writable: bool = False
    fd: int | None = None


@frozen
class ProgramView:
    """What a program needs to run, bound in this order: whole library `directories`, the empty
    tmpfs `masks` that hide qemu's module directories inside them, then single `files` (all
    read-only); plus the top-level symlinks of a merged-/usr system (`/lib -> usr/lib`), so
    that paths through them resolve."""

    program: str
    files: tuple[Binding, ...]
    symlinks: tuple[tuple[str, str], ...]
    directories: tuple[Binding, ...] = ()
    masks: tuple[str, ...] = ()


_lock = threading.Lock()
_views: dict[tuple[str, int, int, int], ProgramView] = {}
_probes: dict[tuple[str, ...], str | None] = {}
_prefixes: dict[tuple[str, ProgramView, bool], tuple[str, ...]] = {}


def program_view(program: str) -> ProgramView:
    """The files `program` (an absolute path) loads, found with ldd; cached per file version.

    A library in a system library directory (`LIBRARY_DIRECTORY`) brings in the whole directory:
    one mount instead of one per file, which is most of the cost of building the sandbox. What
    that exposes is other shared libraries (not secrets) and qemu's own module directory, which
    is masked: only the dmg modules are bound back into it.
    """
    st = os.stat(program)
    key = (program, st.st_dev, st.st_ino, st.st_mtime_ns)
    with _lock:
        cached = _views.get(key)
    if cached is not None:
        return cached
    libraries = _libraries(program)
    modules = _block_modules([program, *libraries])
    for module in modules:
        libraries += _libraries(module)
    directories = _library_directories([*libraries, *modules])
    masks = [
        directory
        for directory in sorted(_module_directories([program, *libraries]))
        if os.path.isdir(directory) and _under(directory, directories)
    ]
    files: dict[str, Binding] = {}
    paths = [program, *modules, *libraries]
    paths += [os.path.realpath(path) for path in libraries]
    if os.path.isfile("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    for path in paths:
        inside = _real_directory_path(path)
        if path == program or not _under(inside, directories) or _under(inside, masks):
            files.setdefault(inside, Binding(path, inside))
    symlinks = tuple(
        (os.readlink(top), top)
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
        if os.path.islink(top)
    )
    view = ProgramView(
        _real_directory_path(program),
        tuple(files.values()),
        symlinks,
        tuple(Binding(directory, directory) for directory in directories),
        tuple(masks),
    )
    with _lock:
        _views[key] = view
    return view


def _library_directories(paths: Sequence[str]) -> list[str]:
    """The system library directories `paths` (and their link targets) live in, outermost only."""
    found = set()
    for path in paths:
        for candidate in (path, os.path.realpath(path)):
            directory = os.path.realpath(os.path.dirname(candidate))
            if LIBRARY_DIRECTORY.match(directory):
                found.add(directory)
    return [d for d in sorted(found) if not _under(d, [o for o in found if o != d])]


def _under(path: str, directories: Sequence[str]) -> bool:
    return any(path.startswith(directory + "/") for directory in directories)


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


def _module_directories(paths: Sequence[str]) -> set[str]:
    """Where qemu keeps its block modules: `<libdir>/qemu` (Debian: /usr/lib/x86_64-linux-gnu/qemu)
    next to the libraries of `paths[1:]`, /usr/lib64/qemu and /usr/lib/qemu."""
    directories = {os.path.join(os.path.dirname(os.path.realpath(p)), "qemu") for p in paths[1:]}
    directories.update(os.path.realpath(d) for d in ("/usr/lib64/qemu", "/usr/lib/qemu"))
    return directories


def _block_modules(paths: Sequence[str]) -> list[str]:
    """qemu's dmg block modules (bz2, lzfse), which imgguard's accepted formats may need.

    They sit in a module directory (`_module_directories`) next to the network protocol
    modules, which stay out of the sandbox.
    """
    found = []
    for directory in sorted(_module_directories(paths)):
        found += sorted(glob.glob(os.path.join(glob.escape(directory), "block-dmg-*.so")))
    return found


@define
class Sandbox:
    """One run's sandbox: the mechanism and the image files to bind.

    `bind` and `bind_fd` return the name to put in the qemu-img command line: the path inside
    the sandbox, or, when `mechanism` is `"none"`, the host path itself (`bind`) or
    `/dev/fd/FD` (`bind_fd`). `fds` are the descriptors the runner must pass to the child.
    """

    mechanism: str
    tool: str | None = None
    bindings: list[Binding] = field(factory=list)
    fds: list[int] = field(factory=list)

    @property
    def active(self) -> bool:
        return self.mechanism != NONE

    def bind(self, host: str, inside: str, *, writable: bool = False) -> str:
        if not self.active:
            return host
        self._reserve(host, inside)
        self.bindings.append(Binding(host, inside, writable))
        return inside

    def bind_fd(self, fd: int, inside: str, *, writable: bool = False) -> str:
        """Bind the file open as `fd` (the caller keeps it open until the run ends): qemu-img
        gets that very file, not whatever its path names when qemu-img starts."""
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise ConfigError(f"not a file descriptor: {fd!r}", key="sandbox")
        if not self.active:
            self.fds.append(fd)
            return f"/dev/fd/{fd}"
        host = f"/proc/self/fd/{fd}"
        self._reserve(host, inside)
        self.fds.append(fd)
        self.bindings.append(Binding(host, inside, writable, fd))
        return inside

    def _reserve(self, host: str, inside: str) -> None:
        if not os.path.isabs(inside) or inside in {b.inside for b in self.bindings}:
            raise ConfigError(f"cannot bind {host!r} at {inside!r}", key="sandbox")

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
        argv = list(_bwrap_prefix(self.tool, view))
        for binding in self.bindings:
            if binding.fd is not None:
                # bwrap resolves the descriptor's name, binds it and checks that the mount is
                # the descriptor's inode ("Race detected" otherwise): a swapped source fails.
                option = "--bind-fd" if binding.writable else "--ro-bind-fd"
                argv += [option, str(binding.fd), binding.inside]
            else:
                option = "--bind" if binding.writable else "--ro-bind"
                argv += [option, binding.host, binding.inside]
        return [*argv, "--remount-ro", "/", "--chdir", "/", "--", *command]

    def _unshare(self, view: ProgramView, command: list[str], limits: Limits) -> list[str]:
        assert self.tool is not None
        cpu, memory = limits.rlimit_values()
        binds: list[list[str | int]] = [[b.host, b.inside, "ro", -1] for b in view.directories]
        binds += [["", mask, "tmpfs", -1] for mask in view.masks]
        binds += [[b.host, b.inside, "ro", -1] for b in view.files]
        binds += [[device, device, "dev", -1] for device in DEVICES if os.path.exists(device)]
        binds += [
            [b.host, b.inside, "rw" if b.writable else "ro", -1 if b.fd is None else b.fd]
            for b in self.bindings
        ]
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
        encoded = marshal.dumps(spec).hex()
        return [*argv, "--", sys.executable, "-I", "-S", "-c", UNSHARE_INIT, encoded]


def _bwrap_prefix(tool: str, view: ProgramView) -> tuple[str, ...]:
    """The part of a bwrap command line that is the same for every run of one program:
    namespaces, the program's view, devices and /tmp (cached: it is built once per view)."""
    root = os.geteuid() == 0
    key = (tool, view, root)
    with _lock:
        cached = _prefixes.get(key)
    if cached is not None:
        return cached
    argv = [
        tool,
        "--die-with-parent",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "imgguard",
    ]
    if root:
        argv += ["--cap-drop", "ALL"]
    for target, link in view.symlinks:
        argv += ["--symlink", target, link]
    for binding in view.directories:
        argv += ["--ro-bind", binding.host, binding.inside]
    for mask in view.masks:
        argv += ["--tmpfs", mask]
    for binding in view.files:
        argv += ["--ro-bind", binding.host, binding.inside]
    for mask in view.masks:
        argv += ["--remount-ro", mask]
    for device in DEVICES:
        if os.path.exists(device):
            argv += ["--dev-bind", device, device]
    argv += ["--tmpfs", "/tmp"]
    prefix = tuple(argv)
    with _lock:
        _prefixes[key] = prefix
    return prefix


def _bwrap_binds_fds(tool: str) -> bool:
    """Whether this bwrap has `--ro-bind-fd`/`--bind-fd` (bubblewrap 0.8+), which the backend
    needs to bind the source it checked (cached)."""
    key = ("bwrap-bind-fd", tool)
    with _lock:
        if key in _probes:
            return _probes[key] is not None
    try:
        result = subprocess.run(
            [tool, "--help"], capture_output=True, text=True, check=False, timeout=30
        )
        found = "--ro-bind-fd" in result.stdout + result.stderr
    except (OSError, subprocess.TimeoutExpired):
        found = False
    with _lock:
        _probes[key] = tool if found else None
    return found


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
    failure: str | None
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
        failure = str(error)
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = f"cannot run it: {error}"
    else:
        if result.returncode == 0 and b"version" in result.stdout:
            failure = None
            if mechanism == "bwrap" and not _bwrap_binds_fds(tool):
                failure = "too old: no --ro-bind-fd (bubblewrap 0.8 or newer is needed)"
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
        _prefixes.clear()


__all__ = [
    "DEVICES",
    "LIBRARY_DIRECTORY",
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
