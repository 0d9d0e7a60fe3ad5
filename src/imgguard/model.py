"""What inspection finds, as frozen attrs classes.

Everything here is a fact about the bytes; verdicts live in `imgguard.policy`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
from attrs import field, frozen


class ReferenceKind(enum.StrEnum):
    """What kind of name a reference is, in the words of the format that holds it."""

    BACKING_FILE = "backing-file"
    DATA_FILE = "data-file"
    EXTENT = "extent"
    PARENT_HINT = "parent-hint"
    PARENT_LOCATOR = "parent-locator"
    PARENT_UUID = "parent-uuid"


@frozen
class Reference:
    """A name in the image that points outside the file. imgguard reports it and never opens it."""

    kind: ReferenceKind
    target: str
    field: str
    offset: int | None = None


@frozen
class Extent:
    """One VMDK extent line (or the implicit extent of a sparse file with no descriptor)."""

    access: str
    size_sectors: int
    type: str
    filename: str | None
    offset: int = 0
    partition_uuid: str | None = None


class FeatureKind(enum.StrEnum):
    INCOMPATIBLE = "incompatible"
    COMPATIBLE = "compatible"
    AUTOCLEAR = "autoclear"


@frozen
class Feature:
    """One set feature bit. `known` is false for bits the format's spec did not define."""

    name: str
    kind: FeatureKind
    bit: int
    known: bool = True


@frozen
class Table:
    """A metadata table that a reader of the format must load to open the image.

    `loaded_at_open` is true for tables qemu allocates whole when it opens the image (qcow2 L1 and
    refcount tables, VHD BAT, VDI block map, ...): their length is memory qemu-img will allocate.
    `in_file` is false for memory qemu allocates at open that is not a region of the file (the
    in-memory dirty bitmaps of a qcow2); `offset` is then where the file describes it.
    """

    name: str
    offset: int
    length: int
    loaded_at_open: bool = True
    in_file: bool = True


@frozen
class KeySlot:
    index: int
    active: bool
    iterations: int | None = None
    key_material_offset: int | None = None
    key_material_length: int | None = None
    stripes: int | None = None
    kdf: str | None = None
    memory_kib: int | None = None


@frozen
class Encryption:
    """How the image is encrypted; `method` is qemu's name (`luks`, `aes`)."""

    method: str
    format: str | None = None
    cipher_name: str | None = None
    cipher_mode: str | None = None
    hash_spec: str | None = None
    key_bytes: int | None = None
    payload_offset: int | None = None
    key_slots: tuple[KeySlot, ...] = ()
    # PBKDF2 iterations of the master key digest (LUKS1 mk_digest_iterations, the largest of a
    # LUKS2 header's pbkdf2 digests): run once more for every active key slot tried.
    digest_iterations: int | None = None


class ProblemKind(enum.StrEnum):
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    UNSUPPORTED = "unsupported"
    INCONSISTENT = "inconsistent"
    LIMIT = "limit"


@frozen
class Problem:
    """Something wrong in the image's metadata, found where `field` lives at `offset`."""

    kind: ProblemKind
    message: str
    field: str | None = None
    offset: int | None = None


def _freeze_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@frozen
class ImageInfo:
    """Everything inspection found in one image.

    `format` is the image's true format, named as qemu names its drivers; `qemu_format` is what
    qemu's own prober would pick when no `-f` is given (they differ for a fixed VHD, which qemu
    probes as `raw`). `matches` lists every format the bytes could also be read as.
    """

    format: str
    path: str | None = None
    variant: str | None = None
    virtual_size: int | None = None
    actual_size: int | None = None
    file_size: int = 0
    qemu_format: str | None = None
    matches: tuple[str, ...] = ()
    version: int | None = None
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    extents: tuple[Extent, ...] = ()
    references: tuple[Reference, ...] = ()
    encrypted: bool = False
    encryption: Encryption | None = None
    cluster_size: int | None = None
    features: tuple[Feature, ...] = ()
    tables: tuple[Table, ...] = ()
    problems: tuple[Problem, ...] = ()
    header: Mapping[str, Any] = field(factory=dict, converter=_freeze_mapping, hash=False)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(feature.name for feature in self.features)

    @property
    def truncated(self) -> bool:
        return any(problem.kind is ProblemKind.TRUNCATED for problem in self.problems)

    def with_problems(self, *problems: Problem) -> ImageInfo:
        return attrs.evolve(self, problems=self.problems + problems)


class Severity(enum.IntEnum):
    """How bad a finding is; a verdict rejects at or above the policy's `fail_on`."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | Severity) -> Severity:
        if isinstance(value, Severity):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[value.strip().upper()]
        except KeyError:
            names = ", ".join(str(member) for member in cls)
            raise ValueError(f"unknown severity {value!r} (one of {names})") from None


@frozen
class Finding:
    """One rule's judgement on one fact. `rule` is a stable id (`IG101`), `name` its slug."""

    rule: str
    name: str
    severity: Severity
    message: str
    cwe: int | None = None
    field: str | None = None
    offset: int | None = None
    length: int | None = None


class Status(enum.StrEnum):
    PASS = "pass"
    REJECT = "reject"
    ERROR = "error"


@frozen
class Verdict:
    """What the policy says of one image. `info` is None when the file could not be inspected."""

    status: Status
    info: ImageInfo | None
    findings: tuple[Finding, ...] = ()
    waived: tuple[Finding, ...] = ()
    fail_on: Severity = Severity.HIGH
    path: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.PASS

    @property
    def rejecting(self) -> tuple[Finding, ...]:
        """The findings at or above the threshold, worst first."""
        return tuple(f for f in self.findings if f.severity >= self.fail_on)

    @property
    def worst(self) -> Finding | None:
        return max(self.findings, key=lambda finding: finding.severity, default=None)


GiB = 1 << 30
TiB = 1 << 40

# Formats a service can take without surprises: qemu's maintained drivers for VM disks. qcow v1,
# qed, parallels, dmg, bochs and cloop are legacy drivers that have had their share of CVEs
# (CVE-2014-0142..0148 among them) and are rarely what a cloud user meant to upload.
DEFAULT_ALLOWED_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "luks"})
# Cinder's `vmdk_allowed_types` default: the two VMDK subformats that are one self-contained file.
DEFAULT_VMDK_CREATE_TYPES = frozenset({"monolithicSparse", "streamOptimized"})


def _frozen_names(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    return frozenset(value)


def _severity(value: str | int | Severity) -> Severity:
    return Severity.parse(value)


def _severity_map(value: Mapping[str, Any] | None) -> Mapping[str, Severity]:
    return MappingProxyType({rule: Severity.parse(sev) for rule, sev in (value or {}).items()})


@frozen
class Policy:
    """What a service accepts. Every knob has a safe default; `imgguard.policy` loads TOML."""

    allowed_formats: frozenset[str] = field(
        default=DEFAULT_ALLOWED_FORMATS, converter=_frozen_names
    )
    allowed_vmdk_create_types: frozenset[str] = field(
        default=DEFAULT_VMDK_CREATE_TYPES, converter=_frozen_names
    )
    max_virtual_size: int = 2 * TiB
    allow_encrypted: bool = False
    allow_conversion: bool = True
    allow_compressed: bool = False
    # What qemu-img may allocate for metadata tables to open one image (qcow2 L1 + refcount
    # table, VHD/VHDX BAT, VDI block map, ...). Cinder runs qemu-img under a 1 GiB address-space
    # limit; no legitimate image of up to max_virtual_size needs more than a few MiB.
    max_metadata_bytes: int = 64 << 20
    max_snapshots: int = 1000
    # LUKS1 PBKDF2 iterations qemu-img would run per key slot when given a secret; qemu's own
    # default iter-time of 2 s gives a few million on current CPUs.
    max_kdf_iterations: int = 20_000_000
    max_key_material_bytes: int = 1 << 20
    fail_on: Severity = field(default=Severity.HIGH, converter=_severity)
    severity_overrides: Mapping[str, Severity] = field(
        factory=dict, converter=_severity_map, hash=False
    )
    waivers: frozenset[str] = field(factory=frozenset, converter=_frozen_names)
