"""`imgguard convert`: the subcommand `imgguard.backend.command.register` adds."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from conftest import qemu_convert, qemu_create, raw_with_data, run_qemu_img
from imgguard.backend import command

MiB = 1 << 20


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imgguard")
    commands = parser.add_subparsers(dest="command", required=True)
    command.register(commands)
    return parser.parse_args(list(argv))


def run(*argv: str) -> int:
    args = parse(*argv)
    status: int = args.func(args)
    return status


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return qemu_convert(raw_with_data(tmp_path / "d.raw", 2 * MiB), tmp_path / "d.qcow2", "qcow2")


def test_register_adds_convert_with_func() -> None:
    args = parse("convert", "a", "b", "-O", "vmdk", "-o", "streamOptimized", "-c", "-t", "none")
    assert args.func is command.run_convert
    assert (args.src, args.dst, args.out_format, args.out_subformat) == (
        "a",
        "b",
        "vmdk",
        "streamOptimized",
    )
    assert args.compress and args.cache_mode == "none"


def test_convert_succeeds(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    destination = tmp_path / "out.vmdk"
    status = run(
        "convert", str(source), str(destination), "-O", "vmdk", "-o", "subformat=streamOptimized"
    )
    assert status == 0
    out, err = capsys.readouterr()
    assert "(qcow2) ->" in out and "vmdk/streamOptimized" in out and "MiB/s" in out
    assert err == ""
    run_qemu_img("compare", "-q", "-f", "qcow2", "-F", "vmdk", str(source), str(destination))


def test_progress_bar_on_a_terminal(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert run("convert", str(source), str(tmp_path / "out.raw"), "-O", "raw") == 0
    text = terminal.getvalue()
    assert "\rconverting [" in text and "100.0%" in text and text.endswith("\n")


def test_rejected_source_exits_1_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = raw_with_data(tmp_path / "base.raw", 1 * MiB)
    overlay = qemu_create(
        tmp_path / "overlay.qcow2", "qcow2", "1M", [f"backing_file={base}", "backing_fmt=raw"]
    )
    destination = tmp_path / "out.raw"
    assert run("convert", str(overlay), str(destination), "-O", "raw") == 1
    err = capsys.readouterr().err
    assert "rejected, not converted" in err and "IG101" in err
    assert not destination.exists()


def test_claimed_format_and_target_size(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = tmp_path / "out.raw"
    assert (
        run("convert", str(source), str(destination), "-O", "raw", "--claimed-format", "raw") == 1
    )
    assert "IG202" in capsys.readouterr().err
    big = qemu_create(tmp_path / "big.qcow2", "qcow2", "3G")
    assert run("convert", str(big), str(destination), "-O", "raw", "--target-size", "2") == 1
    assert "IG502" in capsys.readouterr().err
    assert not destination.exists()


def test_policy_file(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed-formats = ["raw"]\n', encoding="utf-8")
    destination = tmp_path / "out.raw"
    assert run("convert", str(source), str(destination), "-O", "raw", "--policy", str(policy)) == 1
    assert "IG203" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("allowed-formats = [", encoding="utf-8")
    assert run("convert", str(source), str(destination), "-O", "raw", "--policy", str(broken)) == 2


def test_usage_errors_exit_2(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = tmp_path / "out"
    assert run("convert", str(source), str(destination), "-O", "qed") == 2
    assert "configuration error" in capsys.readouterr().err
    assert run("convert", str(source), str(destination), "-O", "raw", "--timeout", "-1") == 2
    assert run("convert", str(source), str(destination), "-O", "raw", "-c") == 2
    assert not destination.exists()


def test_luks_with_passphrase_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = raw_with_data(tmp_path / "plain.raw", 1 * MiB)
    passphrase = tmp_path / "key"
    passphrase.write_text("cli-passphrase", encoding="utf-8")
    destination = tmp_path / "out.qcow2"
    args = ["convert", str(plain), str(destination), "-O", "qcow2", "--iter-time", "10"]
    for _attempt in range(5):  # qemu's key-slot timing fails now and then at 10 ms
        status = run(*args, "--passphrase-file", str(passphrase))
        if status == 0 or "Unable to get accurate CPU usage" not in capsys.readouterr().err:
            break
    assert status == 0
    run_qemu_img(
        "compare",
        "-q",
        "--object",
        "secret,id=s,data=cli-passphrase",
        "--image-opts",
        f"driver=raw,file.filename={plain}",
        f"driver=qcow2,encrypt.key-secret=s,file.filename={destination}",
    )
    # Re-reading it needs the source passphrase and an encrypted-images policy.
    again = tmp_path / "again.qcow2"
    assert run("convert", str(destination), str(again), "-O", "qcow2") == 1
    assert "IG401" in capsys.readouterr().err


def test_failure_reports_qemu_stderr(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = tmp_path / "out.raw"
    destination.write_bytes(b"previous")
    assert run("convert", str(source), str(destination), "-O", "vmdk", "--timeout", "0.000001") == 1
    err = capsys.readouterr().err
    assert "conversion failed" in err and "left as it was" in err
    assert destination.read_bytes() == b"previous"


def test_through_imgguard_main(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imgguard.cli import main

    destination = tmp_path / "out.vhdx"
    assert main(["convert", str(source), str(destination), "-O", "vhdx"]) == 0
    assert "vhdx" in capsys.readouterr().out
    run_qemu_img("compare", "-q", "-f", "qcow2", "-F", "vhdx", str(source), str(destination))
