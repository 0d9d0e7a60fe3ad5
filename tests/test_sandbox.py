"""The sandbox around qemu-img, with inspection bypassed: the low-level runner is called directly
on images that name a host file or a network target, and nothing reaches qemu-img inside the
sandbox, while the same command without it does leak (so each test can fail).

The second layer (`json:` with `"backing": null`) is tested the same way, without the sandbox.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import QEMU_IMG, qemu_convert, qemu_create, raw_with_data, run_qemu_img
from imgguard import backend
from imgguard.backend import SandboxUnavailable, command, sandbox
from imgguard.backend.errors import QemuImgFailed
from imgguard.backend.limits import INFO_LIMITS, Limits
from imgguard.backend.process import run
from imgguard.backend.qemu import find_qemu_img, source_spec
from imgguard.backend.sandbox import SOURCE_PATH, TARGET_PATH, Sandbox
from imgguard.errors import ConfigError

MiB = 1 << 20
MARKER = b"IMGGUARD-SANDBOX-CANARY-7f3c9a1e-MUST-NOT-LEAK:"
RUN_LIMITS = Limits(cpu_seconds=30, address_space=1 << 30, timeout=30)


def available(mechanism: str) -> Sandbox:
    assert QEMU_IMG is not None
    try:
        return sandbox.prepare(mechanism, find_qemu_img())
    except SandboxUnavailable as error:
        pytest.skip(f"{mechanism} cannot build a sandbox here: {error}")


@pytest.fixture(params=["bwrap", "unshare"])
def mechanism(request: pytest.FixtureRequest) -> str:
    available(request.param)
    return str(request.param)


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A host file full of a unique marker: no output may ever hold it."""
    path = tmp_path / "canary.raw"
    path.write_bytes(MARKER * (1 * MiB // len(MARKER) + 1))
    with path.open("r+b") as file:
        file.truncate(1 * MiB)
    return path


class CanaryServer:
    """A TCP server on 127.0.0.1 that records every connection and closes it; it stops by
    itself after `lifetime` seconds."""

    def __init__(self, lifetime: float = 60.0) -> None:
        self.connections: list[tuple[str, int]] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.deadline = time.monotonic() + lifetime
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while not self.stopping.is_set() and time.monotonic() < self.deadline:
                try:
                    connection, address = self.listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                self.connections.append(address)
                connection.close()
        finally:
            self.listener.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[CanaryServer]:
    canary_server = CanaryServer()
    yield canary_server
    canary_server.stop()


# --- hostile images (made with qemu-img itself; inspection would reject every one) -------------


def backing_file(tmp_path: Path, canary: Path) -> tuple[Path, str]:
    image = qemu_create(
        tmp_path / "overlay.qcow2", "qcow2", "1M", [f"backing_file={canary}", "backing_fmt=raw"]
    )
    return image, "qcow2"


def relative_backing_file(tmp_path: Path, canary: Path) -> tuple[Path, str]:
    image = qemu_create(
        tmp_path / "rel.qcow2", "qcow2", "1M", [f"backing_file={canary.name}", "backing_fmt=raw"]
    )
    return image, "qcow2"


def data_file(tmp_path: Path, canary: Path) -> tuple[Path, str]:
    data = tmp_path / "data-file.raw"
    image = qemu_create(
        tmp_path / "external.qcow2", "qcow2", "1M", [f"data_file={data}", "data_file_raw=on"]
    )
    data.unlink()
    data.symlink_to(canary)
    return image, "qcow2"


def vmdk_extent(tmp_path: Path, canary: Path) -> tuple[Path, str]:
    descriptor = tmp_path / "flat.vmdk"
    descriptor.write_text(
        textwrap.dedent(
            f"""\
            # Disk DescriptorFile
            version=1
            CID=fffffffe
            parentCID=ffffffff
            createType="monolithicFlat"
            RW 2048 FLAT "{canary}" 0
            """
        ),
        encoding="utf-8",
    )
    return descriptor, "vmdk"


def vmdk_parent(tmp_path: Path, canary: Path) -> tuple[Path, str]:
    """A sparse VMDK whose parentFileNameHint names a VMDK holding the canary's bytes."""
    parent = qemu_convert(canary, tmp_path / "parent.vmdk", "vmdk")
    child = qemu_create(
        tmp_path / "child.vmdk", "vmdk", "1M", [f"backing_file={parent}", "backing_fmt=vmdk"]
    )
    assert b"parentFileNameHint" in child.read_bytes()[: 1 << 16]
    return child, "vmdk"


FILE_CASES = {
    "backing-file": backing_file,
    "relative-backing-file": relative_backing_file,
    "data-file": data_file,
    "vmdk-extent": vmdk_extent,
    "vmdk-parentFileNameHint": vmdk_parent,
}


def network_image(tmp_path: Path, kind: str, port: int) -> Path:
    """A qcow2 whose backing file is a network target on the canary server."""
    target = {
        "nbd": f"nbd:127.0.0.1:{port}",
        "json": (
            'json:{"file":{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1",'
            f'"port":"{port}"}},"export":"disk"}}}}'
        ),
        "http": f"http://127.0.0.1:{port}/disk.raw",
    }[kind]
    image = tmp_path / f"{kind}.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", target, "-F", "raw", str(image), "1M")
    return image


def curl_module() -> bool:
    return any(Path(d).glob("block-curl.so") for d in ("/usr/lib/x86_64-linux-gnu/qemu",))


# --- the runner, as the backend would call it but with a naive command line --------------------


def naive_convert(box: Sandbox, image: Path, fmt: str, output: Path) -> str | None:
    """`qemu-img convert -f FMT IMAGE OUT` (a command that follows everything) through the
    low-level runner; returns qemu-img's error, or None when it exited 0."""
    assert QEMU_IMG is not None
    output.write_bytes(b"")
    argv = [
        find_qemu_img(),
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        box.bind(str(image), SOURCE_PATH),
        box.bind(str(output), TARGET_PATH, writable=True),
    ]
    try:
        run(argv, limits=RUN_LIMITS, operation="convert", sandbox=box)
    except QemuImgFailed as failure:
        return failure.stderr or str(failure)
    return None


def leaked(output: Path) -> bool:
    return output.exists() and MARKER in output.read_bytes()


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_named_host_file_is_not_visible_in_the_sandbox(
    tmp_path: Path, canary: Path, mechanism: str, case: str
) -> None:
    image, fmt = FILE_CASES[case](tmp_path, canary)
    inside = tmp_path / "inside.raw"
    error = naive_convert(available(mechanism), image, fmt, inside)
    assert not leaked(inside)
    assert error is not None and ("No such file" in error or "Could not open" in error), error
    # The same command with the host's view reads the canary: the test can fail.
    outside = tmp_path / "outside.raw"
    assert naive_convert(Sandbox("none"), image, fmt, outside) is None
    assert leaked(outside)


@pytest.mark.parametrize("kind", ["nbd", "json", "http"])
def test_a_network_target_is_not_reachable_from_the_sandbox(
    tmp_path: Path, server: CanaryServer, mechanism: str, kind: str
) -> None:
    if kind == "http" and not curl_module():
        pytest.skip("qemu's curl block module is not installed: http: would fail anyway")
    image = network_image(tmp_path, kind, server.port)
    assert naive_convert(available(mechanism), image, "qcow2", tmp_path / "in.raw") is not None
    time.sleep(0.2)
    assert server.connections == []
    # With the host's view qemu-img connects to the canary server.
    naive_convert(Sandbox("none"), image, "qcow2", tmp_path / "out.raw")
    deadline = time.monotonic() + 5
    while not server.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connections


# --- the second layer: json: with "backing": null, even without the sandbox --------------------


def pinned_convert(box: Sandbox, image: Path, fmt: str, output: Path) -> str | None:
    output.write_bytes(b"")
    flags, name = source_spec(fmt, box.bind(str(image), SOURCE_PATH))
    argv = [find_qemu_img(), "convert", *flags, "-O", "raw", name]
    argv.append(box.bind(str(output), TARGET_PATH, writable=True))
    try:
        run(argv, limits=RUN_LIMITS, operation="convert", sandbox=box)
    except QemuImgFailed as failure:
        return failure.stderr
    return None


@pytest.mark.parametrize(
    "case", ["backing-file", "relative-backing-file", "vmdk-parentFileNameHint"]
)
def test_backing_null_opens_no_backing_file_even_without_the_sandbox(
    tmp_path: Path, canary: Path, case: str
) -> None:
    image, fmt = FILE_CASES[case](tmp_path, canary)
    output = tmp_path / "pinned.raw"
    assert pinned_convert(Sandbox("none"), image, fmt, output) is None
    assert output.stat().st_size == 1 * MiB and not leaked(output)


@pytest.mark.parametrize("kind", ["nbd", "json"])
def test_backing_null_connects_nowhere_even_without_the_sandbox(
    tmp_path: Path, server: CanaryServer, kind: str
) -> None:
    image = network_image(tmp_path, kind, server.port)
    assert pinned_convert(Sandbox("none"), image, "qcow2", tmp_path / "o.raw") is None
    time.sleep(0.2)
    assert server.connections == []


# --- what qemu-img sees in there --------------------------------------------------------------

VIEW_SCRIPT = r"""
echo "pid $$"
for path in /etc/passwd /etc/hostname /home /root /run /sys /proc /var /work /dev/shm /dev/pts \
        /usr/lib/x86_64-linux-gnu/qemu/block-curl.so /usr/lib64/qemu/block-curl.so "$CANARY"; do
    [ -e "$path" ] && echo "visible $path"
done
for entry in /dev/*; do echo "device $entry"; done
( echo x > /images/source ) 2>/dev/null && echo "wrote source"
( echo x > /usr/bin/imgguard-probe ) 2>/dev/null && echo "wrote usr"
( echo x > /usr/lib/imgguard-probe ) 2>/dev/null && echo "wrote lib"
echo ok > /images/target && echo "wrote target"
echo ok > /tmp/scratch && echo "wrote tmp"
echo "cpu $(ulimit -t) as $(ulimit -v)"
echo ready
read -r _
"""


def test_what_a_program_sees_inside(tmp_path: Path, canary: Path, mechanism: str) -> None:
    shell = shutil.which("dash") or shutil.which("sh")
    assert shell is not None
    shell = os.path.realpath(shell)
    box = Sandbox(mechanism, shutil.which(mechanism))
    box.bind(str(canary), SOURCE_PATH)
    target = tmp_path / "target"
    target.write_bytes(b"")
    box.bind(str(target), TARGET_PATH, writable=True)
    argv = box.wrap([shell, "-c", VIEW_SCRIPT], Limits(cpu_seconds=7, address_space=1 << 30))
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**box.environment(), "CANARY": str(canary)},
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        lines = []
        while (line := process.stdout.readline()) not in ("", "ready\n"):
            lines.append(line.rstrip("\n"))
        # There is no /proc inside: look at the sandboxed shell from the host's.
        inside = [pid for pid in _our_descendants() if _comm(pid) == os.path.basename(shell)]
        assert len(inside) == 1, inside
        status = Path(f"/proc/{inside[0]}/status").read_text().splitlines()
        interfaces = [
            line.split(":")[0].strip()
            for line in Path(f"/proc/{inside[0]}/net/dev").read_text().splitlines()
            if ":" in line
        ]
        process.stdin.write("\n")
        process.stdin.flush()
        _, errors = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, errors
    assert "pid 2" in lines  # process 1 is the sandbox's init
    assert [line for line in lines if line.startswith("visible")] == []
    assert sorted(line for line in lines if line.startswith("device")) == [
        f"device {device}" for device in sorted(sandbox.DEVICES)
    ]
    assert "CapEff:\t0000000000000000" in status and "CapPrm:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert next(line for line in status if line.startswith("NSpid:")).split()[-1] == "2"
    assert interfaces == ["lo"]
    assert "wrote source" not in lines and "wrote usr" not in lines
    assert "wrote lib" not in lines
    assert "wrote target" in lines and "wrote tmp" in lines
    assert f"cpu 7 as {(1 << 30) // 1024}" in lines
    assert target.read_text() == "ok\n"
    assert not (tmp_path / "scratch").exists()


def _our_descendants() -> list[int]:
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _child_of_us(int(pid))]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# --- the backend with the sandbox on (the default), forced, and off ----------------------------


def test_convert_reports_the_sandbox(tmp_path: Path, mechanism: str) -> None:
    source = qemu_convert(raw_with_data(tmp_path / "d.raw", 2 * MiB), tmp_path / "d.qcow2", "qcow2")
    result = backend.convert(source, tmp_path / "o.vmdk", "vmdk", sandbox=mechanism)
    assert result.sandbox == mechanism
    assert result.command[-2:] == (
        'json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"/images/source"}}',
        TARGET_PATH,
    )
    run_qemu_img(
        "compare", "-q", "-f", "qcow2", "-F", "vmdk", str(source), str(tmp_path / "o.vmdk")
    )
    assert backend.convert(source, tmp_path / "p.raw", "raw").sandbox in sandbox.MECHANISMS
    assert backend.convert(source, tmp_path / "q.raw", "raw", sandbox=False).sandbox == "none"
    info = backend.qemu_info(source, sandbox=mechanism)
    assert info.sandbox == mechanism and info.filename == str(source)
    assert info.format == "qcow2" and info.virtual_size == 2 * MiB
    resized = backend.resize(source, 1, sandbox=mechanism)
    assert resized.virtual_size == 1 << 30
    assert backend.qemu_img_version(sandbox=mechanism) >= (2, 10, 0)


def test_encrypted_conversion_sees_its_passphrase_files(tmp_path: Path, mechanism: str) -> None:
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    passphrase = tmp_path / "pass,phrase"
    passphrase.write_text("sandboxed-secret")
    destination = tmp_path / "out.luks"
    for attempt in range(5):
        try:
            result = backend.convert(
                source,
                destination,
                "luks",
                passphrase_file=passphrase,
                cipher_spec=backend.CipherSpec(iter_time_ms=10),
                sandbox=mechanism,
            )
            break
        except backend.ConversionFailed as failure:
            if "Unable to get accurate CPU usage" not in failure.stderr or attempt == 4:
                raise
    assert result.sandbox == mechanism and result.output.encrypted
    assert "secret,id=imgguard-dst-key,format=raw,file=/secrets/target-key" in result.command
    run_qemu_img(
        "compare",
        "-q",
        "--object",
        "secret,id=s,data=sandboxed-secret",
        "--image-opts",
        f"driver=raw,file.filename={source}",
        f"driver=luks,key-secret=s,file.filename={destination}",
    )


def test_kill_and_timeout_reach_qemu_img_in_the_sandbox(tmp_path: Path, mechanism: str) -> None:
    big = tmp_path / "big.raw"
    with big.open("wb") as file:
        for _ in range(32):
            file.write(os.urandom(MiB))
    destination = tmp_path / "out.vmdk"
    with pytest.raises(backend.ConversionTimeout) as caught:
        backend.convert(
            big,
            destination,
            "vmdk",
            out_subformat="streamOptimized",
            limits=Limits(timeout=0.3),
            sandbox=mechanism,
        )
    assert caught.value.signal is not None
    assert not destination.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["big.raw"]
    assert not any(
        Path(f"/proc/{pid}/comm").read_text().strip() == "qemu-img"
        for pid in os.listdir("/proc")
        if pid.isdigit() and Path(f"/proc/{pid}/comm").exists() and _child_of_us(int(pid))
    )


def _child_of_us(pid: int) -> bool:
    try:
        for _ in range(16):
            text = Path(f"/proc/{pid}/stat").read_text()
            pid = int(text.rsplit(")", 1)[1].split()[1])
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
    except (OSError, ValueError):
        return False
    return False


# --- failing closed ---------------------------------------------------------------------------


@pytest.fixture
def only_qemu_img_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holds qemu-img (and ldd) but neither bwrap nor unshare."""
    assert QEMU_IMG is not None
    bindir = tmp_path.parent / f"{tmp_path.name}-path"
    bindir.mkdir()
    (bindir / "qemu-img").symlink_to(QEMU_IMG)
    ldd = shutil.which("ldd")
    assert ldd is not None
    (bindir / "ldd").symlink_to(ldd)
    monkeypatch.setenv("PATH", str(bindir))
    return bindir


def test_no_sandbox_tool_fails_closed(tmp_path: Path, only_qemu_img_on_path: Path) -> None:
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    destination = tmp_path / "out.qcow2"
    with pytest.raises(SandboxUnavailable) as caught:
        backend.convert(source, destination, "qcow2")
    message = str(caught.value)
    assert "bwrap: not installed" in message and "unshare: not installed" in message
    assert "sandbox=False" in message and "--no-sandbox" in message
    assert not destination.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d.raw"]
    with pytest.raises(SandboxUnavailable):
        backend.qemu_info(source)
    with pytest.raises(SandboxUnavailable):
        backend.resize(source, 1)
    # Opting out runs qemu-img with the host's view, and says so.
    result = backend.convert(source, destination, "qcow2", sandbox=False)
    assert result.sandbox == "none" and destination.exists()
    assert backend.qemu_info(source, sandbox=False).sandbox == "none"


def test_tools_that_cannot_create_namespaces_fail_closed(
    tmp_path: Path, only_qemu_img_on_path: Path
) -> None:
    for tool in ("bwrap", "unshare"):
        fake = only_qemu_img_on_path / tool
        fake.write_text(
            f"#!/bin/sh\necho '{tool}: Creating new namespace failed: Operation not permitted'"
            " >&2\nexit 1\n"
        )
        fake.chmod(0o755)
    sandbox.forget_probes()
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    with pytest.raises(SandboxUnavailable) as caught:
        backend.convert(source, tmp_path / "out.raw", "raw")
    assert len(caught.value.reasons) == 2
    assert all("Operation not permitted" in reason for reason in caught.value.reasons)
    with pytest.raises(SandboxUnavailable, match="bwrap: bwrap: Creating new namespace"):
        backend.convert(source, tmp_path / "out.raw", "raw", sandbox="bwrap")
    sandbox.forget_probes()


def test_cli_no_sandbox(
    tmp_path: Path, only_qemu_img_on_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="imgguard")
    command.register(parser.add_subparsers(dest="command", required=True))
    source = raw_with_data(tmp_path / "d.raw", 1 * MiB)
    args = parser.parse_args(["convert", str(source), str(tmp_path / "o.qcow2"), "-O", "qcow2"])
    assert args.sandbox is True
    assert args.func(args) == 1
    assert "--no-sandbox" in capsys.readouterr().err
    args = parser.parse_args(
        ["convert", str(source), str(tmp_path / "o.qcow2"), "-O", "qcow2", "--no-sandbox"]
    )
    assert args.sandbox is False and args.func(args) == 0


def test_sandbox_argument_is_checked() -> None:
    with pytest.raises(ConfigError):
        sandbox.mechanisms_for("docker")
    assert sandbox.mechanisms_for(True) == ("bwrap", "unshare")
    assert sandbox.mechanisms_for("auto") == ("bwrap", "unshare")
    assert sandbox.mechanisms_for(False) == () == sandbox.mechanisms_for("none")
    assert sandbox.decode_status(137) == -9 and sandbox.decode_status(1) == 1
    assert sandbox.decode_status(0) == 0


def test_limits_still_apply_in_the_sandbox(tmp_path: Path, mechanism: str) -> None:
    source = qemu_convert(raw_with_data(tmp_path / "d.raw", 4 * MiB), tmp_path / "d.qcow2", "qcow2")
    with pytest.raises(backend.ConversionFailed) as caught:
        backend.convert(
            source,
            tmp_path / "o.raw",
            "raw",
            limits=Limits(address_space=16 * MiB),
            sandbox=mechanism,
        )
    assert caught.value.limit == "address-space"
    assert INFO_LIMITS.address_space == 1 << 30
