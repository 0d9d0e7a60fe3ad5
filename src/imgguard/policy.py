"""`check()`: inspection plus the rules, and policies loaded from TOML."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from imgguard import rules
from imgguard.errors import ConfigError, ImageError, NotARegularFile
from imgguard.inspection import ImageSource, inspect
from imgguard.model import ImageInfo, Policy, Severity, Status, Verdict
from imgguard.rules import Hit, Request

DEFAULT_POLICY = Policy()
# Requests without a claimed format, target size or conversion, by id() of their policy (the
# Request holds the policy, so a live entry's id is not reused; a stale one is checked).
_plain_requests: dict[int, Request] = {}


def check(
    image: ImageSource | ImageInfo,
    policy: Policy = DEFAULT_POLICY,
    claimed_format: str | None = None,
    target_size: int | None = None,
    *,
    convert_to: str | None = None,
) -> Verdict:
    """Inspect `image` (a path, a binary file or an `ImageInfo`) and judge it by `policy`.

    `claimed_format` is what the uploader declared (Glance or qemu names), `target_size` the size
    in GiB of the volume it will be written to, `convert_to` the format it will be converted to.
    Never raises for bad image bytes: a file that cannot be read gives a verdict of `error`.
    """
    if claimed_format is None and target_size is None and convert_to is None:
        # The common call: the Request of a policy alone, made once per policy object.
        request = _plain_requests.get(id(policy))
        if request is None or request.policy is not policy:
            request = Request(policy)
            if len(_plain_requests) >= 64:
                _plain_requests.clear()
            _plain_requests[id(policy)] = request
    else:
        request = Request(policy, claimed_format, target_size, convert_to)
    if isinstance(image, ImageInfo):
        info, path = image, None
    else:
        path = _name_of(image)
        try:
            info = inspect(image)
        except NotARegularFile as error:
            return _verdict_without_info("IG701", error, request, path, Status.REJECT)
        except ImageError as error:
            return _verdict_without_info("IG702", error, request, path, Status.ERROR)
        if info.format == "raw" and info.header.get("container") == "gzip":
            # A gzip container: judge the image inside, streamed through the decompressor.
            from imgguard.stream import check_container

            return check_container(
                image, policy, claimed_format, target_size, convert_to=convert_to
            )
    kept, waived = rules.evaluate(info, request)
    fail_on = policy.fail_on
    status = Status.PASS
    for finding in kept:
        if finding.severity >= fail_on:
            status = Status.REJECT
            break
    # Positional: Verdict(status, info, findings, waived, fail_on, path).
    return Verdict(
        status,
        info,
        tuple(kept) if kept else (),
        tuple(waived) if waived else (),
        fail_on,
        info.path or path,
    )


def _verdict_without_info(
    rule_id: str, error: ImageError, request: Request, path: str | None, status: Status
) -> Verdict:
    spec = rules.RULES[rule_id]
    severity = request.policy.severity_overrides.get(rule_id, spec.severity)
    finding = rules.make_finding(spec, Hit(str(error), error.field, error.offset), severity)
    if rule_id in request.policy.waivers and status is Status.REJECT:
        return Verdict(Status.PASS, None, (), (finding,), request.policy.fail_on, path)
    return Verdict(status, None, (finding,), (), request.policy.fail_on, path)


def _name_of(image: ImageSource) -> str | None:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    name = getattr(image, "name", None)
    return name if isinstance(name, str) else None


# --- loading policies ------------------------------------------------------------------------

_SIZE_SUFFIXES = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
    "P": 1 << 50,
}
_FIELDS = {field.name: field for field in attrs.fields(Policy)}
_SIZE_KEYS = {"max_virtual_size", "max_metadata_bytes", "max_key_material_bytes"}
_INT_KEYS = {"max_snapshots", "max_kdf_iterations"}
_BOOL_KEYS = {"allow_encrypted", "allow_conversion", "allow_compressed"}
_NAME_SET_KEYS = {"allowed_formats", "allowed_vmdk_create_types", "waivers"}
# Spellings a TOML author may reach for, mapped to the field they mean.
_ALIASES = {"waive": "waivers", "severity": "severity_overrides"}


def parse_size(value: object, *, key: str) -> int:
    """A byte count: an integer, or a string such as "2T", "512M", "1.5G"."""
    if isinstance(value, bool):
        raise ConfigError("expected a size, got a boolean", key=key)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError("a size cannot be negative", key=key)
        return value
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        number, suffix = text, ""
        if text and text[-1] in _SIZE_SUFFIXES:
            number, suffix = text[:-1], text[-1]
        try:
            parsed = float(number)
        except ValueError:
            raise ConfigError(
                f"not a size: {value!r} (use bytes or 512M, 2G, 1T)", key=key
            ) from None
        if parsed < 0 or parsed != parsed:
            raise ConfigError(f"not a size: {value!r}", key=key)
        return int(parsed * _SIZE_SUFFIXES[suffix])
    raise ConfigError(f"expected a size, got {type(value).__name__}", key=key)


def policy_from_mapping(
    values: Mapping[str, Any], *, base: Policy = DEFAULT_POLICY, source: str = "policy"
) -> Policy:
    """A policy from a mapping of TOML-style keys (dashes or underscores), over `base`."""
    changes: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        key = _ALIASES.get(key, key)
        where = f"{source}: {raw_key}"
        if key not in _FIELDS:
            known = ", ".join(sorted(name.replace("_", "-") for name in _FIELDS))
            raise ConfigError(f"unknown key (known keys: {known})", key=where)
        changes[key] = _convert(key, value, where)
    try:
        return attrs.evolve(base, **changes)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error), key=source) from error


def _convert(key: str, value: Any, where: str) -> Any:
    if key in _SIZE_KEYS:
        return parse_size(value, key=where)
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError("expected a whole number >= 0", key=where)
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError("expected true or false", key=where)
        return value
    if key in _NAME_SET_KEYS:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError("expected a list of strings", key=where)
        if key == "waivers":
            _require_rule_ids(value, where)
        return frozenset(value)
    if key == "fail_on":
        return _severity(value, where)
    if key == "severity_overrides":
        if not isinstance(value, Mapping):
            raise ConfigError("expected a table of rule id = severity", key=where)
        _require_rule_ids(list(value), where)
        return {rule_id: _severity(sev, f"{where}.{rule_id}") for rule_id, sev in value.items()}
    raise ConfigError("cannot be set from configuration", key=where)


def _severity(value: Any, where: str) -> Severity:
    try:
        return Severity.parse(value)
    except (ValueError, AttributeError, TypeError) as error:
        raise ConfigError(str(error), key=where) from None


def _require_rule_ids(names: list[str], where: str) -> None:
    unknown = [name for name in names if name not in rules.RULES]
    if unknown:
        raise ConfigError(f"unknown rule id(s) {', '.join(unknown)}", key=where)


def load_policy(path: str | os.PathLike[str], *, base: Policy = DEFAULT_POLICY) -> Policy:
    """A policy from a TOML file: keys at the top level, or under `[tool.imgguard]`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror or error}", key=source) from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", key=source) from error
    section = document.get("tool", {}).get("imgguard") if "tool" in document else document
    if not isinstance(section, Mapping):
        raise ConfigError("no [tool.imgguard] table", key=source)
    return policy_from_mapping(section, base=base, source=source)


def load_pyproject_policy(
    directory: str | os.PathLike[str], *, base: Policy = DEFAULT_POLICY
) -> Policy:
    """`[tool.imgguard]` from `directory`/pyproject.toml, or `base` when there is none.

    Callers pass the directory imgguard is run from, never one inside the tree being scanned,
    where an uploader could plant a permissive policy.
    """
    pyproject = Path(directory) / "pyproject.toml"
    if not pyproject.is_file():
        return base
    try:
        document = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read: {error}", key=str(pyproject)) from error
    section = document.get("tool", {}).get("imgguard")
    if section is None:
        return base
    if not isinstance(section, Mapping):
        raise ConfigError("[tool.imgguard] must be a table", key=str(pyproject))
    return policy_from_mapping(section, base=base, source=f"{pyproject} [tool.imgguard]")
