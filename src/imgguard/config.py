"""Where the CLI's policy comes from, in order of precedence.

    command line  >  IMGGUARD_* environment variables  >  --policy FILE
                  >  [tool.imgguard] in the current directory's pyproject.toml  >  defaults

Each layer is applied over the one below it, key by key, with `policy.policy_from_mapping`, so
every layer accepts the same keys and a bad value is a `ConfigError` naming where it came from
(`IMGGUARD_FAIL_ON`, `--set max-virtual-size`, `policy.toml: waivers`).

Configuration is never read from inside the tree being scanned: an uploader who can write a
`pyproject.toml` or a policy file there must not be able to relax the policy that judges them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from imgguard.errors import ConfigError
from imgguard.model import Policy
from imgguard.policy import DEFAULT_POLICY, load_policy, load_pyproject_policy, policy_from_mapping

ENV_PREFIX = "IMGGUARD_"

_POLICY_KEYS = {field.name for field in attrs.fields(Policy)}
# Policy keys whose value is a list of names: comma-separated in a variable or `--set`.
_LIST_KEYS = {"allowed_formats", "allowed_vmdk_create_types", "waivers"}
_BOOL_KEYS = {"allow_encrypted", "allow_conversion", "allow_compressed"}
_INT_KEYS = {"max_snapshots", "max_kdf_iterations"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# IMGGUARD_* variables that are settings of the scan, not of the policy.
SCAN_SETTINGS = {"IMGGUARD_JOBS", "IMGGUARD_TIMEOUT"}


def parse_text_value(key: str, text: str, *, where: str) -> Any:
    """A policy value written as text (an environment variable, `--set KEY=VALUE`) as TOML would
    give it: lists are comma-separated, booleans true/false/yes/no/1/0, severity overrides
    `IG304=high,IG201=medium`; sizes and severities stay strings for `policy_from_mapping`."""
    text = text.strip()
    if key in _LIST_KEYS:
        return [item.strip() for item in text.split(",") if item.strip()]
    if key in _BOOL_KEYS:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"expected true or false, got {text!r}", key=where)
    if key in _INT_KEYS:
        try:
            return int(text, 0)
        except ValueError:
            raise ConfigError(f"expected a whole number, got {text!r}", key=where) from None
    if key == "severity_overrides":
        overrides: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            rule_id, equals, severity = item.partition("=")
            if not equals:
                raise ConfigError(f"expected RULE=SEVERITY, got {item!r}", key=where)
            overrides[rule_id.strip()] = severity.strip()
        return overrides
    return text


def policy_key(name: str) -> str | None:
    """The policy field a spelling (`fail-on`, `FAIL_ON`, `waive`) names, or None."""
    key = name.strip().lower().replace("-", "_")
    key = {"waive": "waivers", "severity": "severity_overrides"}.get(key, key)
    return key if key in _POLICY_KEYS else None


def env_policy_values(environ: Mapping[str, str]) -> list[tuple[str, str, Any]]:
    """(variable, policy key, value) for every IMGGUARD_* variable that names a policy key.

    A variable with the prefix that names neither a policy key nor a scan setting is an error:
    a misspelt `IMGGUARD_FAIL_ONN` must not leave the operator believing it took effect.
    """
    found = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in SCAN_SETTINGS:
            continue
        key = policy_key(variable.removeprefix(ENV_PREFIX))
        if key is None:
            known = ", ".join(
                sorted([*(ENV_PREFIX + k.upper() for k in _POLICY_KEYS), *SCAN_SETTINGS])
            )
            raise ConfigError(f"unknown setting (known: {known})", key=variable)
        found.append((variable, key, parse_text_value(key, environ[variable], where=variable)))
    return found


def parse_assignment(assignment: str) -> tuple[str, str, Any]:
    """`--set KEY=VALUE` as (where, policy key, value)."""
    name, equals, text = assignment.partition("=")
    where = f"--set {name.strip()}"
    if not equals:
        raise ConfigError("expected KEY=VALUE", key=where)
    key = policy_key(name)
    if key is None:
        known = ", ".join(sorted(k.replace("_", "-") for k in _POLICY_KEYS))
        raise ConfigError(f"unknown policy key (known keys: {known})", key=where)
    return where, key, parse_text_value(key, text, where=where)


def inside(path: str | os.PathLike[str], trees: Iterable[str | os.PathLike[str]]) -> bool:
    """Whether `path` is one of `trees` or lies below one (after resolving symlinks)."""
    resolved = Path(os.path.realpath(path))
    for tree in trees:
        top = Path(os.path.realpath(tree))
        if resolved == top or top in resolved.parents:
            return True
    return False


@attrs.frozen
class PolicySources:
    """What the command line said about the policy; the rest comes from the environment."""

    policy_file: str | None = None
    fail_on: str | None = None
    assignments: tuple[str, ...] = ()


def resolve_policy(
    sources: PolicySources,
    *,
    environ: Mapping[str, str],
    cwd: str | os.PathLike[str],
    scanned: Iterable[str | os.PathLike[str]] = (),
    notes: list[str] | None = None,
) -> Policy:
    """The effective policy: defaults, then pyproject.toml, the policy file, the environment and
    the command line, each over the one before.

    `scanned` are the directories being scanned: a pyproject.toml or policy file inside one of
    them is never read (the pyproject is skipped with a note, a named policy file is an error).
    """
    scanned = [tree for tree in scanned if os.path.isdir(tree) and not os.path.islink(tree)]
    policy = DEFAULT_POLICY
    if inside(cwd, scanned):
        if notes is not None and os.path.isfile(os.path.join(cwd, "pyproject.toml")):
            notes.append(
                "not reading pyproject.toml: the current directory is inside the scanned tree"
            )
    else:
        policy = load_pyproject_policy(cwd, base=policy)
    if sources.policy_file is not None:
        if inside(sources.policy_file, scanned):
            raise ConfigError(
                "the policy file is inside the tree being scanned; keep it outside",
                key=sources.policy_file,
            )
        policy = load_policy(sources.policy_file, base=policy)
    for variable, key, value in env_policy_values(environ):
        policy = policy_from_mapping({key: value}, base=policy, source=variable)
    for assignment in sources.assignments:
        where, key, value = parse_assignment(assignment)
        policy = policy_from_mapping({key: value}, base=policy, source=where)
    if sources.fail_on is not None:
        policy = policy_from_mapping({"fail_on": sources.fail_on}, base=policy, source="--fail-on")
    return policy


def env_number(environ: Mapping[str, str], variable: str, kind: type[int] | type[float]) -> Any:
    """A positive number from a scan-setting variable, or None when it is not set."""
    text = environ.get(variable)
    if text is None or not text.strip():
        return None
    try:
        value = kind(text.strip())
    except ValueError:
        raise ConfigError(f"expected a {kind.__name__} > 0, got {text!r}", key=variable) from None
    if value <= 0:
        raise ConfigError(f"expected a {kind.__name__} > 0, got {text!r}", key=variable)
    return value


__all__ = [
    "ENV_PREFIX",
    "PolicySources",
    "env_number",
    "env_policy_values",
    "inside",
    "parse_assignment",
    "parse_text_value",
    "policy_key",
    "resolve_policy",
]
