"""The rules: each turns facts in an `ImageInfo` into findings, with a stable id and a CWE.

Every rule is documented in docs/rules.md under its id; ids never change meaning and are never
reused. A rule function yields `Hit`s; `evaluate` turns them into findings with the rule's
severity (or the policy's override) and drops waived ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

from attrs import frozen

from imgguard.model import (
    FeatureKind,
    Finding,
    GiB,
    ImageInfo,
    Policy,
    ProblemKind,
    Reference,
    ReferenceKind,
    Severity,
    Table,
)


@frozen
class Request:
    """What the caller asked for, beside the policy."""

    policy: Policy
    claimed_format: str | None = None
    target_size_gib: int | None = None
    convert_to: str | None = None


@frozen
class Hit:
    message: str
    field: str | None = None
    offset: int | None = None
    length: int | None = None
    severity: Severity | None = None


RuleCheck = Callable[[ImageInfo, Request], Iterator[Hit]]


@frozen
class Rule:
    """A registered rule. `needs` names ImageInfo fields the rule reads facts from: when every one
    of them is empty (or false, or None) on an image, the rule cannot find anything there and
    `evaluate` does not run it. An empty `needs` means the rule always runs. `asks` likewise
    names `Request` fields: when every one of them is None, `evaluate` does not run the rule.
    A rule with `formats` runs only on images of those formats, one with `header_keys` only on
    images whose `header` has a true value (not None, 0 or empty) for one of those keys. A
    `passive` rule never finds anything in `evaluate` (its findings are made by `check()` or
    the stream inspector themselves), so `evaluate` does not run it."""

    id: str
    name: str
    severity: Severity
    cwe: int | None
    summary: str
    check: RuleCheck
    needs: tuple[str, ...] = ()
    asks: tuple[str, ...] = ()
    passive: bool = False
    formats: frozenset[str] | None = None
    header_keys: tuple[str, ...] = ()


RULES: dict[str, Rule] = {}
# What `evaluate` runs, worked out from RULES on first use and forgotten when a rule is
# registered: the function giving an image's presence key, and the rules to run per key.
_presence: list[Callable[[ImageInfo, Request], tuple[object, ...]]] = []
_run_plans: dict[tuple[object, ...], tuple[Rule, ...]] = {}


def rule(
    rule_id: str,
    name: str,
    severity: Severity,
    cwe: int | None,
    summary: str,
    *,
    needs: tuple[str, ...] = (),
    asks: tuple[str, ...] = (),
    passive: bool = False,
    formats: tuple[str, ...] | None = None,
    header_keys: tuple[str, ...] = (),
) -> Callable[[RuleCheck], RuleCheck]:
    def register(check: RuleCheck) -> RuleCheck:
        if rule_id in RULES:
            raise RuntimeError(f"rule id {rule_id} registered twice")
        RULES[rule_id] = Rule(
            rule_id,
            name,
            severity,
            cwe,
            summary,
            check,
            needs,
            asks,
            passive,
            None if formats is None else frozenset(formats),
            header_keys,
        )
        _presence.clear()
        _run_plans.clear()
        return check

    return register


# --- references that leave the file ----------------------------------------------------------

# qemu treats "proto:..." as a protocol name when a colon comes before any slash
# (path_has_protocol in block.c); "json:" opens any driver with any options.
_PROTOCOL = re.compile(r"^[^/]*:")
_RULE_OF_KIND = {
    ReferenceKind.BACKING_FILE: ("IG101", "a backing file"),
    ReferenceKind.DATA_FILE: ("IG102", "an external data file"),
    ReferenceKind.EXTENT: ("IG103", "an extent file"),
    ReferenceKind.PARENT_HINT: ("IG104", "a parent file"),
    ReferenceKind.PARENT_LOCATOR: ("IG104", "a parent locator"),
    ReferenceKind.PARENT_UUID: ("IG104", "a parent image"),
}


# The names qemu itself opens; VHD/VHDX parent locators and VDI parent UUIDs it never follows,
# and a locator's "C:\\dir\\parent.vhd" is a Windows path, not a protocol.
_OPENED_BY_QEMU = frozenset(
    {
        ReferenceKind.BACKING_FILE,
        ReferenceKind.DATA_FILE,
        ReferenceKind.EXTENT,
        ReferenceKind.PARENT_HINT,
    }
)


def is_protocol_name(target: str) -> bool:
    return bool(_PROTOCOL.match(target))


def _is_protocol_reference(reference: Reference) -> bool:
    return reference.kind in _OPENED_BY_QEMU and is_protocol_name(reference.target)


def _references(info: ImageInfo, rule_id: str) -> Iterator[tuple[Reference, str]]:
    for reference in info.references:
        mapped_id, label = _RULE_OF_KIND[reference.kind]
        if mapped_id == rule_id and not _is_protocol_reference(reference):
            yield reference, label


def _reference_hits(info: ImageInfo, rule_id: str) -> Iterator[Hit]:
    for reference, label in _references(info, rule_id):
        yield Hit(
            f"{info.format} image names {label} {reference.target!r}",
            field=reference.field,
            offset=reference.offset,
        )


@rule(
    "IG101",
    "backing-file",
    Severity.HIGH,
    73,
    "The image names a backing file that qemu-img would open and read.",
    needs=("references",),
)
def backing_file(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _reference_hits(info, "IG101")


@rule(
    "IG102",
    "external-data-file",
    Severity.HIGH,
    73,
    "The image keeps its data in an external file that qemu-img would open.",
    needs=("references", "features"),
)
def external_data_file(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _reference_hits(info, "IG102")
    if "external_data_file" in info.feature_names and info.data_file is None:
        yield Hit(
            "qcow2 incompatible feature 'external data file' is set without a file name; "
            "qemu-img would take the name from its command line",
            field="incompatible_features",
        )


@rule(
    "IG103",
    "extent-file",
    Severity.HIGH,
    73,
    "A VMDK descriptor names extent files that qemu-img would open.",
    needs=("references",),
)
def extent_file(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _reference_hits(info, "IG103")


@rule(
    "IG104",
    "parent-reference",
    Severity.HIGH,
    73,
    "The image is a differencing image: it names a parent (file name hint, locator or UUID).",
    needs=("references",),
)
def parent_reference(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _reference_hits(info, "IG104")


@rule(
    "IG105",
    "protocol-reference",
    Severity.CRITICAL,
    918,
    "A reference is a protocol or json: pseudo-filename (nbd:, http:, json:, ...).",
    needs=("references",),
)
def protocol_reference(info: ImageInfo, request: Request) -> Iterator[Hit]:
    for reference in info.references:
        if _is_protocol_reference(reference):
            yield Hit(
                f"{reference.kind} {reference.target!r} is a protocol name; qemu-img would "
                "connect to it or open it with driver options the image chose",
                field=reference.field,
                offset=reference.offset,
            )


# --- what the image is -----------------------------------------------------------------------

# A compressed container (formats/container.py) is a raw file to qemu as well; the image inside
# is judged by `check()` (IG802).
_RAW_LAYOUTS = frozenset({"iso9660", "gpt", "mbr", "compressed"})


@rule(
    "IG201",
    "format-confusion",
    Severity.HIGH,
    436,
    "The bytes are valid as more than one format (a polyglot).",
)
def format_confusion(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if len(info.matches) < 2:
        return  # one reading (or none): nothing to confuse
    # `raw` is qemu's fallback, not a format the bytes claim to be; raw layouts (ISO, GPT, MBR)
    # are one reading of a raw disk.
    readings = {name for name in info.matches if name != "raw"}
    if info.format == "raw":
        readings -= _RAW_LAYOUTS
        readings.add("raw")
    if len(readings) > 1:
        yield Hit(
            f"the bytes are valid as {', '.join(info.matches)}; "
            f"qemu-img would read them as {info.qemu_format}"
        )


# Glance's disk_format names that qemu knows by another name (Cinder's check_image_format).
GLANCE_TO_QEMU = {
    "vhd": "vpc",
    "iso": "raw",
    "ploop": "parallels",
    "ami": "raw",
    "aki": "raw",
    "ari": "raw",
    "img": "raw",
}


def qemu_format_name(claimed: str) -> str:
    name = claimed.strip().lower()
    return GLANCE_TO_QEMU.get(name, name)


@rule(
    "IG202",
    "format-mismatch",
    Severity.HIGH,
    436,
    "The format the uploader declared is not the format of the bytes.",
    asks=("claimed_format",),
)
def format_mismatch(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if request.claimed_format is None:
        return
    claimed = qemu_format_name(request.claimed_format)
    # A fixed VHD declared raw is read as raw by qemu too; accept either name for it.
    if claimed not in (info.format, info.qemu_format):
        yield Hit(f"declared {request.claimed_format!r} but the image is {info.format}")


@rule(
    "IG203",
    "format-not-allowed",
    Severity.HIGH,
    434,
    "The detected format is not in the policy's allowed formats.",
)
def format_not_allowed(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if info.format not in request.policy.allowed_formats:
        allowed = ", ".join(sorted(request.policy.allowed_formats))
        yield Hit(f"format {info.format} is not allowed (allowed: {allowed})")


@rule(
    "IG204",
    "vmdk-create-type",
    Severity.HIGH,
    434,
    "The VMDK createType is not in the policy's allowed createTypes.",
    formats=("vmdk",),
)
def vmdk_create_type(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if info.format != "vmdk":
        return
    allowed = request.policy.allowed_vmdk_create_types
    if info.variant not in allowed:
        yield Hit(
            f"VMDK createType {info.variant!r} is not allowed "
            f"(allowed: {', '.join(sorted(allowed))})",
            field="createType",
        )


@rule(
    "IG301",
    "unknown-feature",
    Severity.HIGH,
    20,
    "An incompatible feature bit imgguard does not know is set; qemu may read the image "
    "differently from this inspection.",
    needs=("features",),
)
def unknown_feature(info: ImageInfo, request: Request) -> Iterator[Hit]:
    for feature in info.features:
        if not feature.known and feature.kind is FeatureKind.INCOMPATIBLE:
            yield Hit(
                f"unknown incompatible feature bit {feature.bit} is set",
                field="incompatible_features",
            )


@rule(
    "IG302",
    "unsupported",
    Severity.HIGH,
    20,
    "A version or field value that qemu refuses or that imgguard cannot vouch for.",
    needs=("problems",),
)
def unsupported(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _problems(info, ProblemKind.UNSUPPORTED)


@rule("IG303", "corrupt", Severity.HIGH, 20, "The image marks itself corrupt.", needs=("features",))
def corrupt(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if "corrupt" in info.feature_names:
        yield Hit("the image's corrupt bit is set", field="incompatible_features")


@rule(
    "IG304",
    "dirty",
    Severity.LOW,
    None,
    "The image was not closed cleanly (dirty bit, VHDX log, parallels in-use).",
    needs=("features",),
)
def dirty(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if "dirty" in info.feature_names:
        yield Hit(
            "the image's dirty bit is set; qemu-img check would repair refcounts",
            field="incompatible_features",
        )


@rule(
    "IG401",
    "encrypted",
    Severity.HIGH,
    None,
    "The image is encrypted; its contents cannot be inspected.",
    needs=("encrypted",),
)
def encrypted(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if info.encrypted:
        method = info.encryption.method if info.encryption else "unknown"
        severity = Severity.INFO if request.policy.allow_encrypted else None
        yield Hit(f"the image is encrypted ({method})", severity=severity)


@rule(
    "IG402",
    "legacy-aes",
    Severity.HIGH,
    327,
    "qcow/qcow2 legacy AES-CBC encryption, which qemu deprecated as broken.",
    needs=("encryption",),
)
def legacy_aes(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if info.encryption is not None and info.encryption.method == "aes":
        yield Hit("legacy qcow AES encryption (crypt_method 1)", field="crypt_method")


# --- resource abuse --------------------------------------------------------------------------


@rule("IG501", "virtual-size", Severity.HIGH, 770, "The virtual size is over the policy's cap.")
def virtual_size(info: ImageInfo, request: Request) -> Iterator[Hit]:
    cap = request.policy.max_virtual_size
    size = qemu_virtual_size(info, request)
    if size is not None and size > cap:
        yield Hit(f"virtual size {size} is over the cap of {cap} bytes", field="virtual_size")


def qemu_virtual_size(info: ImageInfo, request: Request) -> int | None:
    """The largest virtual size qemu-img could give the image for this request.

    Where qemu's prober reads the bytes as raw but they are another format (a fixed VHD's footer,
    a dmg trailer, LUKS2), `qemu-img` without `-f`, or with the `-f raw` a `raw` declaration
    brings, takes the whole file as the disk: a 1 MiB fixed-VHD footer at the end of a sparse
    3 TiB file is a 3 TiB raw disk to qemu (virtual size rounded up to whole sectors). Only a
    declaration of the true format (`-f vpc`) makes the format's own size the one qemu uses.
    """
    size = info.virtual_size
    if info.format == "raw" or info.qemu_format != "raw":
        return size
    claimed = None if request.claimed_format is None else qemu_format_name(request.claimed_format)
    if claimed == info.format:
        return size
    whole_file = -(-info.file_size // 512) * 512
    return whole_file if size is None else max(size, whole_file)


@rule(
    "IG502",
    "target-size",
    Severity.HIGH,
    770,
    "The virtual size does not fit the target volume (Cinder's check_virtual_size).",
    asks=("target_size_gib",),
)
def target_size(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if request.target_size_gib is None:
        return
    size = qemu_virtual_size(info, request)
    if size is None:
        return
    # Cinder rounds the image up to whole GiB before comparing with the volume size.
    needed_gib = math.ceil(size / GiB)
    if needed_gib > request.target_size_gib:
        yield Hit(
            f"virtual size {size} needs {needed_gib} GiB; the target has "
            f"{request.target_size_gib} GiB",
            field="virtual_size",
        )


@rule(
    "IG503",
    "metadata-memory",
    Severity.HIGH,
    789,
    "Opening the image would make qemu-img allocate more memory for tables than the budget.",
    needs=("tables",),
)
def metadata_memory(info: ImageInfo, request: Request) -> Iterator[Hit]:
    budget = request.policy.max_metadata_bytes
    total = 0
    largest: Table | None = None
    for table in info.tables:
        if table.loaded_at_open:
            total += table.length
            if largest is None or table.length > largest.length:
                largest = table
    # Nothing loaded is within any budget (even a negative one, which has no largest table).
    if largest is not None and total > budget:
        yield Hit(
            f"tables qemu-img loads at open take {total} bytes (largest: {largest.name}, "
            f"{largest.length} bytes), over the budget of {budget}",
            field=largest.name,
            offset=largest.offset,
            length=largest.length,
        )


@rule(
    "IG504",
    "table-past-eof",
    Severity.HIGH,
    125,
    "A metadata table or descriptor lies past the end of the file.",
    needs=("tables",),
)
def table_past_eof(info: ImageInfo, request: Request) -> Iterator[Hit]:
    for table in info.tables:
        if table.in_file and table.offset + table.length > info.file_size:
            yield Hit(
                f"{table.name} at offset {table.offset} ({table.length} bytes) ends past "
                f"the end of the file ({info.file_size} bytes)",
                field=table.name,
                offset=table.offset,
                length=table.length,
            )


@rule(
    "IG505",
    "snapshot-count",
    Severity.HIGH,
    770,
    "The image claims more internal snapshots than the policy allows.",
    header_keys=("nb_snapshots",),
)
def snapshot_count(info: ImageInfo, request: Request) -> Iterator[Hit]:
    count = info.header.get("nb_snapshots")
    # No snapshots are never too many, whatever the cap.
    if isinstance(count, int) and count > 0 and count > request.policy.max_snapshots:
        yield Hit(
            f"{count} snapshots, over the cap of {request.policy.max_snapshots}",
            field="nb_snapshots",
        )


@rule(
    "IG506",
    "key-slot-cost",
    Severity.HIGH,
    400,
    "LUKS key slots whose KDF iterations or key material would burn CPU or memory.",
    needs=("encryption",),
)
def key_slot_cost(info: ImageInfo, request: Request) -> Iterator[Hit]:
    if info.encryption is None:
        return
    policy = request.policy
    digest = info.encryption.digest_iterations
    if (
        digest is not None
        and digest > policy.max_kdf_iterations
        and any(slot.active for slot in info.encryption.key_slots)
    ):
        # qemu (qcrypto_block_luks_load_key) runs the master key digest's PBKDF2 for every
        # active slot it tries, right or wrong passphrase: cheap slots do not make it cheap.
        yield Hit(
            f"the master key digest asks for {digest} PBKDF2 iterations per key slot tried, "
            f"over the cap of {policy.max_kdf_iterations}",
            field="mk_digest_iterations",
        )
    for slot in info.encryption.key_slots:
        if not slot.active:
            continue
        if slot.iterations is not None and slot.iterations > policy.max_kdf_iterations:
            yield Hit(
                f"key slot {slot.index} asks for {slot.iterations} KDF iterations, over "
                f"the cap of {policy.max_kdf_iterations}",
                field=f"key_slot[{slot.index}]",
            )
        material = slot.key_material_length
        if material is not None and material > policy.max_key_material_bytes:
            yield Hit(
                f"key slot {slot.index} has {material} bytes of key material, over the "
                f"cap of {policy.max_key_material_bytes}",
                field=f"key_slot[{slot.index}]",
                offset=slot.key_material_offset,
                length=material,
            )


# --- malformed input -------------------------------------------------------------------------


def _problems(info: ImageInfo, kind: ProblemKind) -> Iterator[Hit]:
    for problem in info.problems:
        if problem.kind is kind:
            yield Hit(problem.message, field=problem.field, offset=problem.offset)


@rule(
    "IG601",
    "truncated",
    Severity.HIGH,
    20,
    "The file ends before a region its header describes.",
    needs=("problems",),
)
def truncated(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _problems(info, ProblemKind.TRUNCATED)


@rule(
    "IG602",
    "malformed",
    Severity.HIGH,
    20,
    "A header field holds a value the format does not allow.",
    needs=("problems",),
)
def malformed(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _problems(info, ProblemKind.MALFORMED)


@rule(
    "IG603",
    "inconsistent",
    Severity.HIGH,
    20,
    "Two copies or two parts of the metadata disagree (header vs footer, header vs metadata).",
    needs=("problems",),
)
def inconsistent(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _problems(info, ProblemKind.INCONSISTENT)


@rule(
    "IG604",
    "over-limit",
    Severity.HIGH,
    770,
    "A size or count in the header is over what imgguard (or qemu) will read.",
    needs=("problems",),
)
def over_limit(info: ImageInfo, request: Request) -> Iterator[Hit]:
    yield from _problems(info, ProblemKind.LIMIT)


# --- the file and the request ----------------------------------------------------------------
# IG701 (not a regular file) and IG702 (unreadable) come from `imgguard.policy.check` itself,
# where inspection could not start; they are registered here so that reports list them.


@rule(
    "IG701",
    "not-regular-file",
    Severity.HIGH,
    59,
    "The path is a symlink, device, FIFO, socket or directory; imgguard does not open it.",
    passive=True,
)
def not_regular_file(info: ImageInfo, request: Request) -> Iterator[Hit]:
    return iter(())


@rule(
    "IG702",
    "unreadable",
    Severity.HIGH,
    None,
    "The file could not be opened or read.",
    passive=True,
)
def unreadable(info: ImageInfo, request: Request) -> Iterator[Hit]:
    return iter(())


@rule(
    "IG703",
    "inspection-failed",
    Severity.HIGH,
    None,
    "Inspection crashed, ran out of time or hit an internal error; the image was not judged.",
    passive=True,
)
def inspection_failed(info: ImageInfo, request: Request) -> Iterator[Hit]:
    return iter(())


@rule(
    "IG801",
    "conversion-disabled",
    Severity.HIGH,
    None,
    "The policy forbids conversion and the image is not already in the target format.",
    asks=("convert_to",),
)
def conversion_disabled(info: ImageInfo, request: Request) -> Iterator[Hit]:
    target = request.convert_to
    if request.policy.allow_conversion or target is None:
        return
    if qemu_format_name(target) != info.format:
        yield Hit(f"conversion from {info.format} to {target} is disabled by the policy")


@rule(
    "IG704",
    "stream-region-unavailable",
    Severity.HIGH,
    None,
    "Streaming inspection needs a region the stream inspector does not keep (past its head "
    "buffer and before its tail window); the image was not judged.",
    passive=True,
)
def stream_region_unavailable(info: ImageInfo, request: Request) -> Iterator[Hit]:
    # Reported by `imgguard.stream.StreamInspector` itself, as a verdict of `error`.
    return iter(())


@rule(
    "IG802",
    "compressed-container",
    Severity.HIGH,
    409,
    "The image is inside a compressed container (gzip, zstd, xz, bzip2); the policy's "
    "allow_compressed allows gzip, whose image check() judges too.",
    header_keys=("container",),
)
def compressed_container(info: ImageInfo, request: Request) -> Iterator[Hit]:
    container = info.header.get("container")
    if not container:
        return
    if container != "gzip":
        yield Hit(
            f"{container}-compressed container: imgguard looks inside gzip only, so the image "
            "in it is not judged",
            field="container",
        )
    elif info.header.get("inner_container"):
        yield Hit(
            f"a {info.header['inner_container']} container inside a gzip container",
            field="container",
        )
    elif not info.header.get("container_inspected"):
        yield Hit(
            "gzip container whose image was not inspected (check() a path or a stream to "
            "judge the image inside)",
            field="container",
        )
    else:
        severity = Severity.INFO if request.policy.allow_compressed else None
        yield Hit(
            f"{info.format} image inside a gzip container "
            f"({info.header.get('compressed_size')} bytes compressed)",
            field="container",
            severity=severity,
        )


@rule(
    "IG803",
    "decompression-failed",
    Severity.HIGH,
    409,
    "The compressed container could not be decompressed within the caps (a decompression bomb) "
    "or is corrupt; the image inside was not judged.",
    header_keys=("decompression_failed",),
)
def decompression_failed(info: ImageInfo, request: Request) -> Iterator[Hit]:
    message = info.header.get("decompression_failed")
    if message:
        yield Hit(str(message), field="container")


def evaluate(info: ImageInfo, request: Request) -> tuple[list[Finding], list[Finding]]:
    """All findings for `info`, split into (kept, waived)."""
    policy = request.policy
    kept: list[Finding] = []
    waived: list[Finding] = []
    for spec in _run_plan(info, request):
        for hit in spec.check(info, request):
            default = hit.severity if hit.severity is not None else spec.severity
            severity = policy.severity_overrides.get(spec.id, default)
            finding = make_finding(spec, hit, severity)
            (waived if spec.id in policy.waivers else kept).append(finding)
    if len(kept) > 1:
        kept.sort(key=lambda finding: (-finding.severity, finding.rule))
    return kept, waived


# The rules to run, in RULES order, per image format and combination of which `needs` fields
# of the image are non-empty, which `header_keys` its header has a true value for and which
# `asks` fields of the request are set: most images have no references, features, problems or
# encryption and most requests no claimed format, target size or conversion, so the ~30 rules
# come down to a handful without testing each rule's conditions per image.


def _conditions() -> tuple[list[str], list[str], list[str]]:
    needs = sorted({name for spec in RULES.values() for name in spec.needs})
    header_keys = sorted({key for spec in RULES.values() for key in spec.header_keys})
    asks = sorted({name for spec in RULES.values() for name in spec.asks})
    return needs, header_keys, asks


def _presence_function() -> Callable[[ImageInfo, Request], tuple[object, ...]]:
    """The image's key for `_run_plans`, as one generated expression (a third of the cost of
    attrgetter and map): (format, each `needs` field non-empty, each header key's value true,
    each `asks` field set)."""
    needs, header_keys, asks = _conditions()
    for name in (*needs, *asks):
        if not name.isidentifier():
            raise ValueError(f"rule condition {name!r} is not a field name")
    terms = ["info.format"]
    terms += [f"not not info.{name}" for name in needs]
    terms += [f"not not header.get({key!r})" for key in header_keys]
    terms += [f"request.{name} is not None" for name in asks]
    source = (
        "def presence(info, request):\n"
        "    header = info.header\n"
        f"    return ({', '.join(terms)},)\n"
    )
    namespace: dict[str, object] = {}
    exec(source, namespace)
    presence: Callable[[ImageInfo, Request], tuple[object, ...]] = namespace["presence"]  # type: ignore[assignment]
    return presence


def _rules_for(key: tuple[object, ...]) -> tuple[Rule, ...]:
    needs, header_keys, asks = _conditions()
    image_format, flags = key[0], key[1:]
    filled = {name for name, there in zip(needs, flags, strict=False) if there}
    flags = flags[len(needs) :]
    keys = {name for name, there in zip(header_keys, flags, strict=False) if there}
    flags = flags[len(header_keys) :]
    given = {name for name, there in zip(asks, flags, strict=True) if there}
    return tuple(
        spec
        for spec in RULES.values()
        if not spec.passive
        and (spec.formats is None or image_format in spec.formats)
        and (not spec.needs or not filled.isdisjoint(spec.needs))
        and (not spec.header_keys or not keys.isdisjoint(spec.header_keys))
        and (not spec.asks or not given.isdisjoint(spec.asks))
    )


def _run_plan(info: ImageInfo, request: Request) -> tuple[Rule, ...]:
    if not _presence:
        _presence.append(_presence_function())
    key = _presence[0](info, request)
    plan = _run_plans.get(key)
    if plan is None:
        plan = _run_plans[key] = _rules_for(key)
    return plan


def make_finding(spec: Rule, hit: Hit, severity: Severity | None = None) -> Finding:
    return Finding(
        rule=spec.id,
        name=spec.name,
        severity=severity if severity is not None else spec.severity,
        message=hit.message,
        cwe=spec.cwe,
        field=hit.field,
        offset=hit.offset,
        length=hit.length,
    )
