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
    """

    name: str
    offset: int
    length: int
    loaded_at_open: bool = True


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
