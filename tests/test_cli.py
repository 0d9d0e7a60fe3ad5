"""The real CLI, run as a subprocess: report formats, exit codes, jobs, special files.

Images are made by the real qemu-img; the CLI runs as `python -m imgguard` with `src` on the path.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import qemu_create
from imgguard import rules

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
JSON_RESULT_KEYS = {
    "path",
    "format",
    "variant",
    "virtual_size",
    "actual_size",
    "matches",
    "backing_file",
    "data_file",
    "references",
    "encrypted",
    "verdict",
    "findings",
}


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGGUARD_")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
    )
    env.update(extra or {})
    return env


def run_cli(
    *args: str | Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgguard", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cli_env(env),
        preexec_fn=preexec_fn,
        timeout=60,
        check=False,
    )


def scan_json(*args: str | Path, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    result = run_cli("scan", "--format", "json", *args, **kwargs)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(entry["path"]).name: entry for entry in document["results"]}


def rule_ids(entry: dict[str, Any]) -> list[str]:
    return [finding["rule"] for finding in entry["findings"]]


def _drop_read_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    capability bounding set, so that root, after exec, is refused a mode-000 file like anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unreadable_setup() -> Callable[[], None] | None:
    """What makes a mode-000 file unreadable to the CLI: nothing for an ordinary user; for root
    (tests run as root here, and chmod 000 does not stop root) a child without the two DAC
    override capabilities. Skips where neither is possible."""
    if os.geteuid() != 0:
        return None
    probe = subprocess.run(
        [sys.executable, "-c", "pass"], preexec_fn=_drop_read_override, check=False
    )
    if probe.returncode != 0:  # pragma: no cover - a kernel or sandbox without prctl
        pytest.skip("cannot drop CAP_DAC_OVERRIDE to make a file unreadable to root")
    return _drop_read_override


# --- the image store the tests scan ----------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good.qcow2 and disk.raw pass; child.qcow2 (a backing file) and cut.qcow2 (truncated)
    are rejected; sub/ holds a symlink, a FIFO and an unreadable file."""
    root = tmp_path_factory.mktemp("store")
    qemu_create(root / "good.qcow2", "qcow2", "64M")
    with (root / "disk.raw").open("wb") as file:
        file.truncate(1 << 20)
    qemu_create(root / "base.img", "raw", "16M")
    qemu_create(root / "child.qcow2", "qcow2", "16M", ["backing_file=base.img", "backing_fmt=raw"])
    header = (root / "good.qcow2").read_bytes()[:200]
    (root / "cut.qcow2").write_bytes(header)
    return root


@pytest.fixture(scope="module")
def special(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree with a symlink, a FIFO, an unreadable file and a truncated qcow2."""
    root = tmp_path_factory.mktemp("special")
    outside = tmp_path_factory.mktemp("outside")
    qemu_create(outside / "target.qcow2", "qcow2", "1G")
    (root / "link.qcow2").symlink_to(outside / "target.qcow2")
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "pipe")
    secret = qemu_create(root / "secret.qcow2", "qcow2", "1G")
    secret.chmod(0)
    full = qemu_create(root / "full.qcow2", "qcow2", "1G")
    (root / "cut.qcow2").write_bytes(full.read_bytes()[:72])
    full.unlink()
    return root


# --- report formats --------------------------------------------------------------------------


def test_text_report_is_a_table_with_a_summary(store: Path) -> None:
    result = run_cli("scan", store)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "PATH",
        "FORMAT",
        "VIRTUAL SIZE",
        "VERDICT",
        "TOP FINDING",
    ]
    rows = {Path(line.split()[0]).name: line for line in lines[1:] if line.strip()}
    assert "qcow2/v3" in rows["good.qcow2"] and "64.0 MiB" in rows["good.qcow2"]
    assert "PASS" in rows["good.qcow2"]
    assert "raw" in rows["disk.raw"] and "1.0 MiB" in rows["disk.raw"]
    assert "REJECT" in rows["child.qcow2"] and "IG101 high:" in rows["child.qcow2"]
    assert "qcow2" in rows["cut.qcow2"] and "REJECT" in rows["cut.qcow2"]
    assert "(+" in rows["cut.qcow2"]  # the worst finding, and how many more
    assert lines[-1] == "5 scanned: 3 pass, 2 reject, 0 error"
    # The table goes to stdout; stderr is a pipe here, so no progress bar and no logs.
    assert result.stderr == ""


def test_json_report_keeps_the_contract(store: Path) -> None:
    status, document = scan_json(store)
    assert status == 1
    assert set(document) == {"imgguard", "results", "summary"}
    assert document["summary"] == {"scanned": 5, "pass": 3, "reject": 2, "error": 0}
    paths = [entry["path"] for entry in document["results"]]
    assert paths == sorted(paths)
    for entry in document["results"]:
        assert set(entry) == JSON_RESULT_KEYS
    results = by_name(document)
    good = results["good.qcow2"]
    assert (good["format"], good["variant"], good["virtual_size"]) == ("qcow2", "v3", 64 << 20)
    assert (good["verdict"], good["findings"], good["matches"]) == ("pass", [], ["qcow2"])
    child = results["child.qcow2"]
    assert child["verdict"] == "reject"
    assert child["backing_file"] == "base.img"
    assert child["references"] == [{"kind": "backing-file", "target": "base.img"}]
    assert "IG101" in rule_ids(child)
    finding = next(f for f in child["findings"] if f["rule"] == "IG101")
    assert set(finding) == {"rule", "name", "severity", "message", "cwe", "field", "offset"}
    assert (finding["severity"], finding["cwe"]) == ("high", 73)
    cut = results["cut.qcow2"]
    assert (cut["format"], cut["verdict"]) == ("qcow2", "reject")
    assert "IG601" in rule_ids(cut)


def validate_sarif(document: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator_class(schema).validate(document)


def test_sarif_report_is_valid_and_complete(store: Path) -> None:
    result = run_cli("scan", "--format", "sarif", store)
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    validate_sarif(document)
    assert document["version"] == "2.1.0"
    (run,) = document["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "imgguard"
    assert [rule["id"] for rule in driver["rules"]] == list(rules.RULES)
    for descriptor, spec in zip(driver["rules"], rules.RULES.values(), strict=True):
        assert descriptor["name"] == spec.name
        assert descriptor["shortDescription"]["text"] == spec.summary
        assert spec.summary in descriptor["help"]["text"]
        assert "security" in descriptor["properties"]["tags"]
        if spec.cwe is not None:
            assert f"CWE-{spec.cwe}" in descriptor["properties"]["tags"]
        expected = {"critical": "error", "high": "error", "medium": "warning"}
        assert descriptor["defaultConfiguration"]["level"] == expected.get(
            str(spec.severity), "note"
        )
    assert run["invocations"] == [
        {
            "executionSuccessful": True,
            "exitCode": 1,
            "workingDirectory": {"uri": Path.cwd().as_uri() + "/"},
        }
    ]
    results = run["results"]
    for entry in results:
        assert driver["rules"][entry["ruleIndex"]]["id"] == entry["ruleId"]
        location = entry["locations"][0]["physicalLocation"]["artifactLocation"]
        assert not location["uri"].startswith(("/", "file:"))
        assert location["uriBaseId"] == "SCANROOT"
    base = run["originalUriBaseIds"]["SCANROOT"]["uri"]
    backing = next(r for r in results if r["ruleId"] == "IG101")
    uri = backing["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert os.path.normpath(Path(base.removeprefix("file://")) / uri) == str(store / "child.qcow2")
    assert backing["level"] == "error"
    assert backing["message"]["text"]
    # The backing file name's offset and length in the qcow2 header, as the finding has them.
    _, document_json = scan_json(store / "child.qcow2")
    finding = next(f for f in document_json["results"][0]["findings"] if f["rule"] == "IG101")
    if finding["offset"] is not None:
        region = backing["locations"][0]["physicalLocation"]["region"]
        assert region["byteOffset"] == finding["offset"]
    regions = [
        entry["locations"][0]["physicalLocation"].get("region")
        for entry in results
        if "region" in entry["locations"][0]["physicalLocation"]
    ]
    assert regions, "some finding in the store has a byte offset"
    assert all(isinstance(region["byteOffset"], int) for region in regions)


def test_sarif_levels_follow_severity(store: Path) -> None:
    overrides = "IG101=critical,IG601=medium"
    result = run_cli(
        "scan", "--format", "sarif", "--set", f"severity={overrides}", "--fail-on", "info", store
    )
    document = json.loads(result.stdout)
    validate_sarif(document)
    levels = {r["ruleId"]: r["level"] for r in document["runs"][0]["results"]}
    assert levels["IG101"] == "error"
    assert levels["IG601"] == "warning"
    waived = run_cli("scan", "--format", "sarif", "--set", "waivers=IG101", store / "child.qcow2")
    (entry,) = [
        r for r in json.loads(waived.stdout)["runs"][0]["results"] if r["ruleId"] == "IG101"
    ]
    assert entry["suppressions"][0]["kind"] == "external"
    assert waived.returncode == 0


def test_output_file_gets_the_report_and_stderr_the_summary(store: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.sarif"
    result = run_cli("scan", "--format", "sarif", "-o", report, store)
    assert result.returncode == 1
    assert result.stdout == ""
    validate_sarif(json.loads(report.read_text(encoding="utf-8")))
    assert "5 scanned: 3 pass, 2 reject, 0 error" in result.stderr
    unwritable = run_cli("scan", "-o", tmp_path / "missing" / "report.txt", store / "disk.raw")
    assert unwritable.returncode == 2
    assert "cannot write the report" in unwritable.stderr


# --- exit codes and configuration ------------------------------------------------------------


def test_exit_codes_pass_reject_usage(store: Path) -> None:
    assert run_cli("scan", store / "good.qcow2", store / "disk.raw").returncode == 0
    assert run_cli("scan", store / "child.qcow2").returncode == 1
    assert run_cli("check", store / "good.qcow2").returncode == 0
    assert run_cli("check", store / "cut.qcow2").returncode == 1
    for usage in (
        ["scan"],
        ["scan", "--jobs", "0", str(store)],
        ["scan", "--format", "xml", str(store)],
        ["scan", "--timeout", "-1", str(store)],
        ["check", "--target-size", "big", str(store / "good.qcow2")],
        ["frobnicate"],
        [],
    ):
        result = run_cli(*usage)
        assert result.returncode == 2, usage
        assert "usage:" in result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ([], {"IMGGUARD_FAIL_ON": "severe"}, "IMGGUARD_FAIL_ON"),
        ([], {"IMGGUARD_MAX_VIRTUAL_SIZE": "lots"}, "IMGGUARD_MAX_VIRTUAL_SIZE"),
        ([], {"IMGGUARD_ALLOW_ENCRYPTED": "perhaps"}, "IMGGUARD_ALLOW_ENCRYPTED"),
        ([], {"IMGGUARD_FAIL_ONN": "high"}, "IMGGUARD_FAIL_ONN"),
        ([], {"IMGGUARD_JOBS": "many"}, "IMGGUARD_JOBS"),
        (["--fail-on", "severe"], {}, "--fail-on"),
        (["--set", "waivers=IG999"], {}, "--set waivers"),
        (["--set", "colour=blue"], {}, "--set colour"),
        (["--policy", "/nonexistent/policy.toml"], {}, "/nonexistent/policy.toml"),
    ],
)
def test_bad_config_is_exit_2_naming_the_key(
    store: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_cli("scan", *args, store / "good.qcow2", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "configuration error" in result.stderr
    assert named in result.stderr


def test_bad_policy_file_and_pyproject_name_the_key(store: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('fail-on = "high"\nmax-virtual-size = "huge"\n', encoding="utf-8")
    result = run_cli("scan", "--policy", policy, store / "good.qcow2")
    assert result.returncode == 2
    assert f"{policy}: max-virtual-size" in result.stderr
    (tmp_path / "pyproject.toml").write_text(
        '[tool.imgguard]\nallowed-formats = "qcow2"\n', encoding="utf-8"
    )
    result = run_cli("scan", store / "good.qcow2", cwd=tmp_path)
    assert result.returncode == 2
    assert "allowed-formats" in result.stderr and "pyproject.toml" in result.stderr


def test_config_precedence(store: Path, tmp_path: Path) -> None:
    """defaults < pyproject.toml < --policy FILE < IMGGUARD_* < command line."""
    child = store / "child.qcow2"  # IG101, high: rejected by default
    assert run_cli("scan", child, cwd=tmp_path).returncode == 1
    (tmp_path / "pyproject.toml").write_text(
        '[tool.imgguard]\nfail-on = "critical"\n', encoding="utf-8"
    )
    assert run_cli("scan", child, cwd=tmp_path).returncode == 0
    policy = tmp_path / "strict.toml"
    policy.write_text('fail-on = "high"\n', encoding="utf-8")
    assert run_cli("scan", "--policy", policy, child, cwd=tmp_path).returncode == 1
    relaxed = {"IMGGUARD_FAIL_ON": "critical"}
    assert run_cli("scan", "--policy", policy, child, cwd=tmp_path, env=relaxed).returncode == 0
    strict_again = ["--fail-on", "high"]
    result = run_cli("scan", "--policy", policy, *strict_again, child, cwd=tmp_path, env=relaxed)
    assert result.returncode == 1
    waived = run_cli("scan", "--set", "waivers=IG101", child, cwd=tmp_path)
    assert waived.returncode == 0
    listed = {"IMGGUARD_WAIVERS": "IG101,IG304", "IMGGUARD_FAIL_ON": "high"}
    assert run_cli("scan", child, cwd=tmp_path, env=listed).returncode == 0


def test_config_is_never_read_from_the_scanned_tree(tmp_path: Path) -> None:
    tree = tmp_path / "uploads"
    tree.mkdir()
    qemu_create(tree / "base.img", "raw", "1M")
    qemu_create(tree / "evil.qcow2", "qcow2", "1M", ["backing_file=base.img", "backing_fmt=raw"])
    # An uploader's pyproject.toml that would waive everything it needs.
    (tree / "pyproject.toml").write_text(
        '[tool.imgguard]\nfail-on = "critical"\n', encoding="utf-8"
    )
    result = run_cli("scan", "--format", "json", ".", cwd=tree)
    assert result.returncode == 1
    assert "not reading pyproject.toml" in result.stderr
    assert by_name(json.loads(result.stdout))["evil.qcow2"]["verdict"] == "reject"
    inside = run_cli("scan", "--policy", tree / "pyproject.toml", tree)
    assert inside.returncode == 2
    assert "inside the tree being scanned" in inside.stderr


# --- parallel scans --------------------------------------------------------------------------


def test_jobs_2_gives_the_same_report_as_jobs_1(store: Path, special: Path) -> None:
    for report in ("json", "sarif", "text"):
        one = run_cli("scan", "--format", report, "--jobs", "1", store, special)
        two = run_cli("scan", "--format", report, "--jobs", "2", store, special)
        assert one.returncode == two.returncode == 1
        assert one.stdout == two.stdout, report
    env_jobs = run_cli("scan", "--format", "json", store, env={"IMGGUARD_JOBS": "2"})
    assert env_jobs.stdout == run_cli("scan", "--format", "json", "-j", "1", store).stdout


# --- what is never opened --------------------------------------------------------------------


def test_symlink_fifo_unreadable_and_truncated_are_each_reported(special: Path) -> None:
    preexec = unreadable_setup()
    status, document = scan_json("--jobs", "2", special, preexec_fn=preexec)
    assert status == 1
    results = by_name(document)
    # The symlinked directory is listed as an entry of its own and never walked into.
    assert sorted(results) == ["cut.qcow2", "link.qcow2", "linked-dir", "pipe", "secret.qcow2"]
    for name in ("link.qcow2", "linked-dir"):
        assert results[name]["verdict"] == "reject"
        assert rule_ids(results[name]) == ["IG701"]
        assert "symbolic link" in results[name]["findings"][0]["message"]
        assert results[name]["format"] is None
    assert results["pipe"]["verdict"] == "reject"
    assert rule_ids(results["pipe"]) == ["IG701"]
    assert "FIFO" in results["pipe"]["findings"][0]["message"]
    secret = results["secret.qcow2"]
    assert secret["verdict"] == "error"
    assert rule_ids(secret) == ["IG702"]
    assert "Permission denied" in secret["findings"][0]["message"]
    cut = results["cut.qcow2"]
    assert (cut["verdict"], cut["format"]) == ("reject", "qcow2")
    assert "IG601" in rule_ids(cut)
    assert document["summary"] == {"scanned": 5, "pass": 0, "reject": 4, "error": 1}


def test_a_path_that_is_gone_is_an_error_result(store: Path, tmp_path: Path) -> None:
    status, document = scan_json(store / "good.qcow2", tmp_path / "vanished.qcow2")
    assert status == 1
    gone = by_name(document)["vanished.qcow2"]
    assert gone["verdict"] == "error"
    assert rule_ids(gone) == ["IG702"]
    assert by_name(document)["good.qcow2"]["verdict"] == "pass"


# --- the other subcommands -------------------------------------------------------------------


def test_inspect_text_and_json(store: Path, special: Path) -> None:
    text = run_cli("inspect", store / "child.qcow2")
    assert text.returncode == 0, text.stderr
    fields = dict(re.split(r"\s+", line, maxsplit=1) for line in text.stdout.splitlines())
    assert fields["format"] == "qcow2"
    assert fields["backing_file"] == "base.img"
    assert fields["virtual_size"] == str(16 << 20)
    result = run_cli("inspect", "--format", "json", store / "child.qcow2")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["format"], document["backing_format"]) == ("qcow2", "raw")
    assert document["references"][0]["kind"] == "backing-file"
    assert document["cluster_size"] == 65536
    link = run_cli("inspect", special / "link.qcow2")
    assert link.returncode == 1
    assert "symbolic link" in link.stderr
    assert link.stdout == ""


def test_check_with_claimed_format_and_target_size(store: Path) -> None:
    good = store / "good.qcow2"  # 64 MiB
    result = run_cli("check", "--format", "json", "--claimed-format", "raw", good)
    assert result.returncode == 1
    (entry,) = json.loads(result.stdout)["results"]
    assert rule_ids(entry) == ["IG202"]
    assert run_cli("check", "--claimed-format", "qcow2", "--target-size", "1", good).returncode == 0
    iso_name = run_cli("check", "--claimed-format", "iso", store / "disk.raw")
    assert iso_name.returncode == 0, iso_name.stdout
    # A directory is not an image: check() does not walk it.
    directory = run_cli("check", "--format", "json", store)
    assert directory.returncode == 1
    assert rule_ids(json.loads(directory.stdout)["results"][0]) == ["IG701"]


def test_rules_lists_every_rule(store: Path) -> None:
    result = run_cli("rules")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(rules.RULES)
    assert "CWE-73" in lines[0] and rules.RULES["IG101"].summary in result.stdout
    listed = json.loads(run_cli("rules", "--format", "json").stdout)
    assert [entry["id"] for entry in listed] == list(rules.RULES)
    assert listed[0]["cwe"] == rules.RULES[listed[0]["id"]].cwe


def test_convert_is_a_subcommand(store: Path, tmp_path: Path) -> None:
    converted = run_cli("convert", store / "good.qcow2", tmp_path / "good.raw", "-O", "raw")
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "good.raw").stat().st_size == 64 << 20
    refused = run_cli("convert", store / "child.qcow2", tmp_path / "child.raw", "-O", "raw")
    assert refused.returncode == 1
    assert "IG101" in refused.stderr
    assert not (tmp_path / "child.raw").exists()


# --- terminals and interrupts ----------------------------------------------------------------


def test_progress_bar_only_on_a_terminal(store: Path) -> None:
    primary, secondary = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "imgguard", "scan", "--format", "json", str(store)],
            stdout=subprocess.PIPE,
            stderr=secondary,
            env=cli_env({"COLUMNS": "120", "TERM": "xterm"}),
        )
        os.close(secondary)
        stdout, _ = process.communicate(timeout=60)
        terminal = b""
        while select.select([primary], [], [], 0.2)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(primary)
    assert process.returncode == 1
    assert json.loads(stdout)["summary"]["scanned"] == 5  # the report is untouched
    assert b"scanning" in terminal
    quiet = run_cli("scan", "--no-progress", store)
    assert quiet.stderr == ""


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("many")
    for number in range(3000):
        (tree / f"{number:05}.img").write_bytes(b"\0" * 512)
    return tree


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigterm"],
)
def test_interrupt_stops_with_a_partial_report(
    many: Path, signum: signal.Signals, to_group: bool
) -> None:
    count = 3000
    process = subprocess.Popen(
        [sys.executable, "-m", "imgguard", "scan", "-v", "-j", "1", "--format", "json", str(many)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        start_new_session=True,
    )
    assert process.stderr is not None
    first = process.stderr.readline()
    assert b"[1/3000]" in first
    started = time.monotonic()
    if to_group:
        os.killpg(process.pid, signum)  # what a terminal's Ctrl-C does
    else:
        os.kill(process.pid, signum)  # what a CI runner cancelling a job does
    stdout, stderr = process.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert process.returncode == 128 + signum, stderr
    document = json.loads(stdout)
    scanned = document["summary"]["scanned"]
    assert 1 <= scanned < count
    assert document["summary"]["pass"] == scanned
    assert len(document["results"]) == scanned
    assert f"interrupted after {scanned} of {count} images" in stderr.decode()
    assert b"Traceback" not in stderr
