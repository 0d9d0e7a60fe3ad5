"""Property tests built on `imgguard.testing`: what a header says is what inspection reports,
and hostile edits of any header give an `ImageInfo` or an `ImageError`, cheaply.

Each property runs per format with a small, derandomized `max_examples`, so that the whole file
stays well under a minute and never flakes; `IMGGUARD_PROPERTY_SCALE=20` multiplies the examples
(and draws fresh random ones) for a longer local run.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgguard
from imgguard import ImageError, ImageInfo, Status, formats, testing
from imgguard.inspection import inspect_reader
from imgguard.reader import HEAD_SIZE, MAX_REGION, TAIL_SIZE, ImageReader, open_image

SCALE = int(os.environ.get("IMGGUARD_PROPERTY_SCALE", "1"))


def _settings(examples: int) -> Any:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=SCALE == 1,
        database=None,
    )


# The driver each generated format is read by (raw layouts are drivers of their own).
DRIVER_OF = {name: name for name in testing.FORMATS}

# What one driver's inspect() may read of any file, whatever its headers say: the 4 KiB head
# and the 1536-byte tail every probe shares, plus the regions the format module reads, each
# capped (reader.MAX_REGION is the hard cap of a single read).
BASE = HEAD_SIZE + TAIL_SIZE
KiB = 1 << 10
BUDGETS = {
    # header cluster extensions, backing name (<= 4 KiB), data file name, LUKS1 header
    "qcow2": BASE + 64 * KiB,
    "qcow": BASE + 8 * KiB,
    "qed": BASE + 8 * KiB,
    # a descriptor file is read whole up to 1 MiB - 1 (qemu's own limit)
    "vmdk": BASE + MAX_REGION + 64 * KiB,
    # dynamic header, a BAT of up to 64 KiB, 8 parent locators of up to 64 KiB each
    "vpc": BASE + 1024 + 64 * KiB + 8 * 64 * KiB,
    # two 4 KiB headers, the 64 KiB region table, metadata entries (64 KiB) and items, a
    # 64 KiB parent locator, the BAT scan (64 KiB), the log entry head
    "vhdx": BASE + 2 * 4 * KiB + 64 * KiB + 64 * KiB + 64 * KiB + 64 * KiB + 4 * KiB,
    "vdi": BASE,
    # LUKS1: the header; LUKS2: both binary headers and up to 1 MiB of JSON each
    "luks": BASE + 2 * (4 * KiB + MAX_REGION),
    # header, BAT check, a format extension cluster of up to 1 MiB
    "parallels": BASE + MAX_REGION + 64 * KiB,
    # koly, a resource fork or plist of up to 1 MiB
    "dmg": BASE + MAX_REGION + 4 * KiB,
    "bochs": BASE,
    # the offsets table, capped at 1 MiB
    "cloop": BASE + MAX_REGION,
    "raw": BASE,
    # 32 descriptors of 2 KiB, a boot catalog, the system area's partition table
    "iso9660": BASE + 32 * 2 * KiB + 64 * KiB,
    # primary and backup headers and entry arrays (128 KiB each), for 512 and 4096 sectors
    "gpt": BASE + 4 * (4 * KiB + 128 * KiB),
    # 128 extended boot records
    "mbr": BASE + 128 * 512,
}
# All probes and the chosen driver together, on any input.
TOTAL_BUDGET = 4 << 20


class _ZeroExtended(io.RawIOBase):
    """`data`, then zeros up to `size`: a large sparse file without the memory."""

    def __init__(self, data: bytes, size: int) -> None:
        super().__init__()
        self.data = data
        self.size = size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def read(self, length: int = -1) -> bytes:
        end = self.size if length < 0 else min(self.size, self.position + length)
        start = min(self.position, end)
        chunk = self.data[start:end]
        chunk += bytes(end - start - len(chunk))
        self.position = end
        return chunk


def _reader(data: bytes, pad: int = 0) -> ImageReader:
    if not pad:
        return ImageReader.from_bytes(data)
    size = len(data) + pad
    return ImageReader(_ZeroExtended(data, size), size=size)  # type: ignore[arg-type]


def _facts(info: ImageInfo) -> tuple[str, int | None, list[tuple[str, str]]]:
    refs = sorted((str(ref.kind), ref.target) for ref in info.references)
    return info.format, info.virtual_size, refs


# --- build -> parse symmetry ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", testing.FORMATS)
@_settings(25)
@given(data=st.data())
def test_generated_header_parses_to_the_generated_facts(fmt: str, data: st.DataObject) -> None:
    image = data.draw(testing.images([fmt]))
    info = imgguard.inspect_bytes(image.data)
    expected = sorted((str(kind), target) for kind, target in image.references)
    assert _facts(info) == (image.format, image.virtual_size, expected), info.problems
    if image.variant is not None:
        assert info.variant == image.variant
    # The first match is the format (a raw disk's layout names itself).
    assert info.matches[0] in (image.format, image.variant)


@pytest.mark.parametrize("fmt", testing.REFERENCE_FORMATS)
@_settings(25)
@given(data=st.data())
def test_a_planted_reference_is_reported_and_rejected(fmt: str, data: st.DataObject) -> None:
    image = data.draw(testing.images_with_reference([fmt]))
    info = imgguard.inspect_bytes(image.data)
    reported = {(ref.kind, ref.target) for ref in info.references}
    assert set(image.references) <= reported
    verdict = imgguard.check(info)
    assert verdict.status is Status.REJECT
    assert {f.rule for f in verdict.findings} & {"IG101", "IG102", "IG103", "IG104", "IG105"}


# --- robustness of inspect() and check() ------------------------------------------------------


@pytest.mark.parametrize("fmt", testing.FORMATS)
@_settings(40)
@given(data=st.data())
def test_mutations_give_an_image_info_or_an_image_error(fmt: str, data: st.DataObject) -> None:
    mutated = data.draw(testing.mutated(testing.images([fmt])))
    try:
        info = imgguard.inspect_bytes(mutated)
    except ImageError:
        return
    assert isinstance(info, ImageInfo)
    hash(info)
    first = imgguard.check(info)
    assert first.status in (Status.PASS, Status.REJECT)
    # check() is a pure function of the facts.
    assert imgguard.check(info) == first
    assert imgguard.check(imgguard.inspect_bytes(mutated)) == first


@_settings(60)
@given(data=testing.polyglots())
def test_polyglots_are_inspected(data: bytes) -> None:
    try:
        info = imgguard.inspect_bytes(data)
    except ImageError:
        return
    assert info.matches and info.matches[0] in (info.format, info.variant)
    imgguard.check(info)


@pytest.mark.parametrize("fmt", testing.FORMATS)
@_settings(30)
@given(data=st.data())
def test_reads_stay_within_the_format_budget(fmt: str, data: st.DataObject) -> None:
    mutated = data.draw(testing.mutated(testing.images([fmt])))
    # The same bytes at the start of a far larger (sparse) file: lengths in the header may now
    # lie inside the file, and only imgguard's caps keep the reads small.
    pad = data.draw(st.sampled_from([0, 0, 1 << 20, 1 << 30, 1 << 40]))
    reader = _reader(mutated, pad)
    driver = formats.by_name(DRIVER_OF[fmt])
    with contextlib.suppress(ImageError):
        driver.inspect(reader)
    assert reader.bytes_read <= BUDGETS[fmt], (reader.bytes_read, reader.reads)

    whole = _reader(mutated, pad)
    with contextlib.suppress(ImageError):
        inspect_reader(whole)
    assert whole.bytes_read <= TOTAL_BUDGET
    assert whole.reads <= 256


def test_mutated_images_inspect_in_milliseconds() -> None:
    """Timing is measured, not asserted per example: the 95th percentile of many inspections
    must stay under 50 ms even on a loaded machine (a typical one takes well under 1 ms)."""
    samples: list[float] = []

    @_settings(15)
    @given(data=st.data())
    def measure(data: st.DataObject) -> None:
        fmt = data.draw(st.sampled_from(testing.FORMATS))
        mutated = data.draw(testing.mutated(testing.images([fmt])))
        start = time.perf_counter()
        with contextlib.suppress(ImageError):
            imgguard.inspect_bytes(mutated)
        samples.append(time.perf_counter() - start)

    for _ in range(8):
        measure()
    assert len(samples) >= 50
    p95 = statistics.quantiles(samples, n=20)[-1]
    assert p95 < 0.050, f"95th percentile {p95 * 1000:.1f} ms over {len(samples)} inspections"
    assert max(samples) < 2.0


# --- the strategies themselves --------------------------------------------------------------


# --- the detector's shortcuts give what the plain loops give -----------------------------------


def _probe_every_driver(reader: ImageReader) -> tuple[str, list[str]]:
    """`inspection._probe_all` without its magic dispatch: every prober and recogniser."""
    best, best_score, recognised = "raw", 0, []
    for driver in formats.drivers():
        if driver.name == "raw":
            continue
        score = driver.probe(reader)
        if score > best_score:
            best, best_score = driver.name, score
        if (score > 0 and not driver.probe_by_name) or driver.recognise(reader):
            recognised.append(driver.name)
    recognised += [driver.name for driver in formats.layout_drivers() if driver.recognise(reader)]
    return best, recognised


def _magic_edits() -> st.SearchStrategy[bytes]:
    """Every driver's magic, cut short, with one byte changed, or followed by random bytes."""
    magics = sorted(
        {magic for driver in formats.drivers() for magic in driver.magic + driver.recognise_magic}
    )
    magic = st.sampled_from(magics)
    return st.one_of(
        st.builds(lambda m, n: m[:n], magic, st.integers(0, 90)),
        st.builds(
            lambda m, i, b, tail: m[:i] + bytes([b]) + m[i + 1 :] + tail,
            magic,
            st.integers(0, 7),
            st.integers(0, 255),
            st.binary(max_size=600),
        ),
        st.builds(lambda m, tail: m + tail, magic, st.binary(max_size=4200)),
        _planted_signatures(),
    )


def _planted_signatures() -> st.SearchStrategy[bytes]:
    """Files with drivers' signatures (and magics) planted where they look, some cut or edited."""
    everything = (*formats.drivers(), *formats.layout_drivers())
    planted = sorted(
        {
            (offset, value)
            for driver in everything
            for offset, values in driver.probe_signatures + driver.recognise_signatures
            for value in values
        }
        | {(0, magic) for driver in everything for magic in driver.magic}
    )

    def plant(size: int, picks: list[tuple[int, bytes]], edit: int | None, filler: int) -> bytes:
        data = bytearray([filler]) * size
        for offset, value in picks:
            start = offset if offset >= 0 else size + offset
            if start < 0:
                continue
            data[start : start + len(value)] = value
            if edit is not None and start + edit % len(value) < len(data):
                data[start + edit % len(value)] ^= 0x20
        return bytes(data)

    return st.builds(
        plant,
        st.integers(0, 6000),
        st.lists(st.sampled_from(planted), max_size=4),
        st.one_of(st.none(), st.integers(0, 7)),
        st.sampled_from([0, 0xFF, 0x20]),
    )


@pytest.mark.parametrize("fmt", testing.FORMATS)
@_settings(20)
@given(data=st.data())
def test_magic_dispatch_matches_every_prober(fmt: str, data: st.DataObject) -> None:
    from imgguard.inspection import _probe_all

    image = data.draw(
        st.one_of(
            testing.mutated(testing.images([fmt])),
            testing.images([fmt]).map(lambda image: image.data),
            testing.polyglots(),
            _magic_edits(),
        )
    )
    qemu_choice, recognised = _probe_all(ImageReader.from_bytes(image))
    expected = _probe_every_driver(ImageReader.from_bytes(image))
    assert (qemu_choice.name, [driver.name for driver in recognised]) == expected


@_settings(40)
@given(
    image=st.one_of(
        testing.images(),
        testing.polyglots(),
        testing.mutated(testing.images()),
        _planted_signatures(),
    )
)
def test_matches_shortcut_gives_what_matches_gives(image: Any) -> None:
    from imgguard.inspection import _has_boot_signature, _matches, _probe_all, _true_format

    data = image if isinstance(image, bytes) else image.data
    reader = ImageReader.from_bytes(data)
    qemu_choice, recognised = _probe_all(reader)
    chosen = _true_format(qemu_choice, recognised)
    expected = _matches(chosen, qemu_choice, recognised, _has_boot_signature(reader))
    assert imgguard.inspect_bytes(data).matches == expected


@_settings(60)
@given(
    info=st.builds(
        ImageInfo,
        format=st.sampled_from(["raw", "qcow2", "vmdk", "luks", "vpc"]),
        matches=st.sampled_from(
            [(), ("qcow2",), ("qcow2", "vdi"), ("raw", "iso9660"), ("raw", "iso9660", "vpc")]
        ),
        variant=st.sampled_from([None, "monolithicSparse", "monolithicFlat"]),
        virtual_size=st.one_of(st.none(), st.integers(0, 1 << 45)),
        file_size=st.integers(0, 1 << 30),
        header=st.sampled_from(
            [
                {},
                {"nb_snapshots": 5000},
                {"nb_snapshots": 0},
                {"container": ""},
                {"container": "xz"},
                {"container": "gzip", "container_inspected": True},
                {"decompression_failed": "bomb"},
            ]
        ),
        encrypted=st.booleans(),
    ),
    claimed=st.sampled_from([None, "", "raw", "qcow2", "vhd"]),
    target=st.sampled_from([None, 0, 1, 1 << 20]),
    convert_to=st.sampled_from([None, "", "raw", "qcow2"]),
    allow_conversion=st.booleans(),
)
def test_rule_plan_runs_what_the_needs_loop_runs(
    info: ImageInfo,
    claimed: str | None,
    target: int | None,
    convert_to: str | None,
    allow_conversion: bool,
) -> None:
    from imgguard import rules
    from imgguard.model import Policy

    request = rules.Request(Policy(allow_conversion=allow_conversion), claimed, target, convert_to)
    expected = []
    for spec in rules.RULES.values():
        # Every rule, whatever its formats and header keys: the plan must not skip one that hits.
        if spec.needs and not any(getattr(info, name) for name in spec.needs):
            continue
        expected += [(spec.id, hit) for hit in spec.check(info, request)]
    planned = {spec.id for spec in rules._run_plan(info, request)}
    assert {rule_id for rule_id, _ in expected} <= planned
    kept, waived = rules.evaluate(info, request)
    assert sorted((f.rule, f.message) for f in kept + waived) == sorted(
        (rule_id, hit.message) for rule_id, hit in expected
    )


def test_field_layout_follows_the_struct() -> None:
    from imgguard.formats import qcow2

    spans = {span.name: span for span in testing.field_layout(qcow2.HEADER_V2)}
    assert spans["size"] == testing.FieldSpan("size", 24, 8, "big")
    assert spans["l1_table_offset"].offset == 40
    vpc_spans = {span.name: span for span in testing.build_vpc().fields}
    assert vpc_spans["parent_locators[7].platform_data_offset"].offset == 512 + 576 + 7 * 24 + 16


def test_polyglot_helpers_make_two_formats() -> None:
    base = testing.build_qcow2().data
    assert "vdi" in imgguard.inspect_bytes(testing.plant_vdi_signature(base)).matches
    assert "vpc" in imgguard.inspect_bytes(testing.append_vhd_footer(base)).matches
    assert "dmg" in imgguard.inspect_bytes(testing.append_koly_trailer(base)).matches
    raw = testing.build_raw(size=1 << 20).data
    assert imgguard.inspect_bytes(testing.plant_mbr(raw)).variant == "mbr"


def test_images_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="no strategy for nope"):
        testing.images(["nope"])


def test_hypothesis_is_optional_at_runtime() -> None:
    """Only imgguard.testing imports hypothesis: the package, CLI and policy work without it."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import imgguard, imgguard.cli, imgguard.policy, imgguard.formats\n"
        "imgguard.formats.drivers(); imgguard.formats.layout_drivers()\n"
        "print(imgguard.check(imgguard.inspect_bytes(b'QFI\\xfb' + bytes(100))).status)\n"
        "try:\n    import imgguard.testing\nexcept ImportError:\n    print('no-testing')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    status, testing_module = result.stdout.split()
    assert status in ("pass", "reject") and testing_module == "no-testing"


@_settings(80)
@given(
    size=st.one_of(
        st.integers(0, 6000),
        st.sampled_from([0, 1, 1535, 1536, 1537, 4095, 4096, 4097, 5631, 5632, 5633, 9000]),
    )
)
def test_read_ends_reads_what_head_and_tail_read(
    size: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("ends") / "image"
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    with open_image(path) as (lazy, _), open_image(path) as (eager, _):
        eager.read_ends()
        assert (eager.head, eager.tail) == (lazy.head, lazy.tail)
        assert (eager.reads, eager.bytes_read) == (lazy.reads, lazy.bytes_read)


def _derivable_structs() -> list[tuple[str, Any]]:
    """Every module-level construct definition in imgguard.formats that the struct-module
    unpacker derives a function for."""
    import importlib
    import pkgutil

    import construct

    from imgguard import formats as package
    from imgguard.reader import _unpacker

    found = []
    seen: set[int] = set()
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"imgguard.formats.{module_info.name}")
        for name, value in vars(module).items():
            definition = value.defersubcon if isinstance(value, construct.Compiled) else value
            if (
                type(definition) is construct.Struct
                and id(value) not in seen
                and _unpacker(value) is not None
            ):
                seen.add(id(value))
                found.append((f"{module_info.name}.{name}", value))
    return found


def _with_constants(definition: Any, raw: bytes) -> bytes:
    """`raw` with the top-level Const fields of a Struct set to their values."""
    import construct

    data = bytearray(raw)
    offset = 0
    for sub in definition.subcons:
        con = sub.subcon if isinstance(sub, construct.Renamed) else sub
        size = con.sizeof()
        if isinstance(con, construct.Const):
            data[offset : offset + size] = con.subcon.build(con.value)
        offset += size
    return bytes(data)


def _plain(value: Any) -> Any:
    """A parse result without construct's private `_io` keys, as plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize(("name", "definition"), _derivable_structs())
@_settings(40)
@given(data=st.data())
def test_derived_unpacker_parses_as_construct_does(
    name: str, definition: Any, data: st.DataObject
) -> None:
    import construct

    from imgguard.reader import _fixed_size, _unpacker

    size = _fixed_size(definition)
    assert size is not None, name
    interpreted = (
        definition.defersubcon if isinstance(definition, construct.Compiled) else definition
    )
    seed = data.draw(st.integers(0, 2**32 - 1))
    raw = data.draw(
        st.sampled_from([random.Random(seed).randbytes(size), bytes(size), b"\xff" * size])
    )
    if data.draw(st.booleans()):
        raw = _with_constants(interpreted, raw)
    fast = _unpacker(definition)
    assert fast is not None
    unpacked = fast(raw)
    try:
        expected = interpreted.parse(raw)
    except construct.ConstructError:
        assert unpacked is None, name  # a Const or OneOf that does not hold
        return
    assert unpacked is not None, name
    assert _plain(unpacked) == _plain(expected), name
    assert list(_plain(unpacked)) == list(_plain(expected)), name


@_settings(80)
@given(
    data=st.binary(max_size=9000),
    offset=st.integers(0, 9100),
    length=st.integers(0, 16),
    loaded=st.sampled_from(["none", "head", "ends"]),
    from_fd=st.booleans(),
)
def test_peek_is_the_bytes_there(
    data: bytes,
    offset: int,
    length: int,
    loaded: str,
    from_fd: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if from_fd:
        path = tmp_path_factory.mktemp("peek") / "image"
        path.write_bytes(data)
        context: Any = open_image(path)
    else:
        context = contextlib.nullcontext((ImageReader.from_bytes(data), None))
    with context as (reader, _):
        if loaded != "none":
            reader.head  # noqa: B018 - loads the head
        if loaded == "ends":
            reader.tail  # noqa: B018 - loads the tail
        before = reader.bytes_read
        assert reader.peek(offset, length) == data[offset : offset + length]
        assert reader.bytes_read - before <= length
