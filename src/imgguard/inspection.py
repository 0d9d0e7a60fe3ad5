"""Probe every format, choose the way qemu would, and say what the bytes could also be."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from imgguard import formats
from imgguard.errors import ImageError
from imgguard.formats import FormatDriver
from imgguard.formats._common import qemu_length
from imgguard.formats._driver import Signature, _never
from imgguard.formats.mbr import BOOT_SIGNATURE
from imgguard.model import ImageInfo, Problem, ProblemKind
from imgguard.reader import HEAD_SIZE, TAIL_SIZE, ImageReader, open_regular

ImageSource = str | os.PathLike[str] | BinaryIO

# An ImageError means the header could not be read; the image is still the format its magic says.
_PROBLEM_KIND_OF_ERROR = {
    "TruncatedImage": ProblemKind.TRUNCATED,
    "LimitExceeded": ProblemKind.LIMIT,
}


def inspect(image: ImageSource) -> ImageInfo:
    """Inspect a path or a seekable binary file; never executes or follows anything.

    Returns an `ImageInfo` for any bytes at all, or raises an `ImageError` when the file cannot
    be opened or read (not a regular file, permission denied, I/O error).
    """
    if isinstance(image, (str, os.PathLike)):
        # open_image() without its context manager: this is the hot path of every scan.
        name = os.fspath(image)
        fd, file_stat = open_regular(name, fstat=False)
        try:
            reader = ImageReader(None, size=file_stat.st_size, name=name, fd=fd)
            reader.read_ends()
            # qemu-img's "actual-size" is the space allocated on disk, not the length.
            return _inspect(reader, actual_size=file_stat.st_blocks * 512)
        finally:
            os.close(fd)
    reader = ImageReader.from_file(image)
    return inspect_reader(reader)


def inspect_bytes(data: bytes, name: str | None = None) -> ImageInfo:
    """Inspect an in-memory image (a header, an upload's first bytes, a fuzz input)."""
    return inspect_reader(ImageReader.from_bytes(data, name=name))


def inspect_reader(reader: ImageReader) -> ImageInfo:
    return _inspect(reader)


def _inspect(reader: ImageReader, actual_size: int | None = None) -> ImageInfo:
    qemu_choice, recognised = _probe_all(reader)
    chosen = _true_format(qemu_choice, recognised)
    info = _inspect_with(chosen, reader)
    _finish(info, reader, chosen, qemu_choice, recognised, actual_size)
    return info


def _finish(
    info: ImageInfo,
    reader: ImageReader,
    chosen: FormatDriver,
    qemu_choice: FormatDriver,
    recognised: list[FormatDriver],
    actual_size: int | None,
) -> None:
    """The detector's own fields, set on the driver's result in place.

    Not an `attrs.evolve` (which runs ImageInfo's 21-field __init__ and converter a second time,
    ~5 us). Safe because every driver returns a new ImageInfo that nothing else holds yet, and
    none of these fields has a converter or validator.
    """
    set_field = object.__setattr__
    set_field(info, "path", reader.name)
    set_field(info, "file_size", reader.size)
    set_field(info, "qemu_format", qemu_choice.name)
    boot_signature = reader.head[510:512] == BOOT_SIGNATURE
    if (
        chosen is qemu_choice
        and not boot_signature
        and (not recognised or (len(recognised) == 1 and recognised[0] is chosen))
    ):
        # The usual image: one reading, the one qemu picks (what _matches() says for it).
        set_field(info, "matches", (chosen.name,))
    else:
        set_field(info, "matches", _matches(chosen, qemu_choice, recognised, boot_signature))
    if actual_size is not None:
        set_field(info, "actual_size", actual_size)


_Probe = tuple[
    FormatDriver, Callable[[ImageReader], int] | None, Callable[[ImageReader], bool] | None
]
_Layout = tuple[FormatDriver, Callable[[ImageReader], bool]]
# Per image, one key says which of the drivers' magics and signatures its bytes hold (each
# position's known value, or None); per key, the (driver, prober, recogniser) calls that could
# succeed, in qemu's driver order, and the layouts' recognisers that could. Keys are bounded:
# at most (values + 1) per position.
_SignatureKey = Callable[[bytes, bytes], tuple[bytes | None, ...]]


class _ProbePlan:
    def __init__(self, drivers: tuple[FormatDriver, ...], layouts: tuple[FormatDriver, ...]):
        self.drivers = drivers
        self.layouts = layouts
        self.qemu_drivers = [driver for driver in drivers if driver.name != "raw"]
        for driver in self.qemu_drivers:
            if any(len(magic) < 4 for magic in driver.magic + driver.recognise_magic):
                raise ValueError(
                    f"{driver.name}: a magic shorter than 4 bytes cannot be dispatched"
                )
        values_at: dict[tuple[int, int], set[bytes]] = {}
        first4 = values_at.setdefault((0, 4), set())
        for driver in self.qemu_drivers:
            first4.update(magic[:4] for magic in driver.magic + driver.recognise_magic)
        for driver in (*self.qemu_drivers, *layouts):
            for offset, values in driver.probe_signatures + driver.recognise_signatures:
                lengths = {len(value) for value in values}
                if len(lengths) != 1 or 0 in lengths:
                    raise ValueError(f"{driver.name}: signature values of one length needed")
                length = lengths.pop()
                # The key sees only the head and the tail: a signature elsewhere would never
                # match, and its call would never be made.
                if not (0 <= offset <= HEAD_SIZE - length or -TAIL_SIZE <= offset <= -length):
                    raise ValueError(
                        f"{driver.name}: a signature at {offset} is outside the head and the tail"
                    )
                values_at.setdefault((offset, length), set()).update(values)
        self.positions = list(values_at)
        self.key: _SignatureKey = self._key_function(values_at)
        # Per key, for files in whole 512-byte sectors and for the others.
        self.plans: dict[
            tuple[bytes | None, ...], tuple[tuple[_Probe, ...], tuple[_Layout, ...]]
        ] = {}
        self.plans_ragged: dict[
            tuple[bytes | None, ...], tuple[tuple[_Probe, ...], tuple[_Layout, ...]]
        ] = {}

    def _key_function(self, values_at: dict[tuple[int, int], set[bytes]]) -> _SignatureKey:
        # One generated expression: a slice and a dict lookup per position, no loop.
        namespace: dict[str, object] = {}
        terms = []
        for index, ((offset, length), values) in enumerate(values_at.items()):
            namespace[f"known{index}"] = {value: value for value in values}
            if offset >= 0:
                where = f"head[{offset}:{offset + length}]"
            else:
                end = offset + length
                # Past the start of a short tail the slice comes out short, and matches nothing.
                where = f"tail[{offset}:{end if end < 0 else ''}]"
            terms.append(f"known{index}.get({where})")
        exec(f"def key(head, tail):\n    return ({', '.join(terms)},)\n", namespace)
        key: _SignatureKey = namespace["key"]  # type: ignore[assignment]
        return key

    def calls(
        self, key: tuple[bytes | None, ...], whole_sectors: bool
    ) -> tuple[tuple[_Probe, ...], tuple[_Layout, ...]]:
        plans = self.plans if whole_sectors else self.plans_ragged
        found = plans.get(key)
        if found is None:
            found = plans[key] = self._calls(key, whole_sectors)
        return found

    def _calls(
        self, key: tuple[bytes | None, ...], whole_sectors: bool
    ) -> tuple[tuple[_Probe, ...], tuple[_Layout, ...]]:
        present = dict(zip(self.positions, key, strict=True))
        first4 = present[(0, 4)]

        def possible(magics: tuple[bytes, ...], signatures: tuple[Signature, ...]) -> bool:
            # The magic dispatch and the signatures leave out only calls that would score 0 or
            # say False; everything else is called and decides. In a file whose size is not a
            # multiple of 512, qemu reads "the end" at its length rounded up to whole sectors
            # (vpc_open()'s footer), not where a signature's offset from the end points.
            if magics and not any(magic[:4] == first4 for magic in magics):
                return False
            return not signatures or any(
                (offset < 0 and not whole_sectors) or present[(offset, len(values[0]))] in values
                for offset, values in signatures
            )

        probes: list[_Probe] = []
        for driver in self.qemu_drivers:
            probe: Callable[[ImageReader], int] | None = driver.probe
            recognise = None if driver.recognise is _never else driver.recognise
            if not possible(driver.magic, driver.probe_signatures):
                probe = None
            if not possible(driver.recognise_magic, driver.recognise_signatures):
                recognise = None
            if probe is not None or recognise is not None:
                probes.append((driver, probe, recognise))
        layouts = tuple(
            (driver, driver.recognise)
            for driver in self.layouts
            if possible((), driver.recognise_signatures)
        )
        return tuple(probes), layouts


# The plan for the current (drivers(), layout_drivers()) pair.
_plan_of: list[_ProbePlan] = []


def _probe_plan() -> _ProbePlan:
    drivers, layouts = formats.drivers(), formats.layout_drivers()
    if _plan_of and _plan_of[0].drivers is drivers and _plan_of[0].layouts is layouts:
        return _plan_of[0]
    plan = _ProbePlan(drivers, layouts)
    _plan_of[:] = [plan]
    return plan


def _probe_all(reader: ImageReader) -> tuple[FormatDriver, list[FormatDriver]]:
    """qemu's choice (highest score, first in its driver list on a tie) and every match."""
    best: FormatDriver | None = None
    best_score = 0
    recognised: list[FormatDriver] = []
    plan = _probe_plan()
    # One key for the magics and signatures instead of a dozen probers that compare their own.
    probes, layouts = plan.calls(plan.key(reader.head, reader.tail), not reader.size % 512)
    for driver, probe, recognise in probes:
        score = 0 if probe is None else probe(reader)
        if score > best_score:
            best, best_score = driver, score
        # A score from the file's name alone (dmg) is no reading of the bytes.
        if (score > 0 and not driver.probe_by_name) or (
            recognise is not None and recognise(reader)
        ):
            recognised.append(driver)
    for driver, recognise_layout in layouts:
        if recognise_layout(reader):
            recognised.append(driver)
    return best or formats.by_name("raw"), recognised


def _true_format(qemu_choice: FormatDriver, recognised: list[FormatDriver]) -> FormatDriver:
    if qemu_choice.name != "raw":
        return qemu_choice
    # qemu falls back to raw for formats whose marker it does not probe (a fixed VHD's footer,
    # a dmg's koly trailer): the bytes are still that format, and say so.
    for driver in recognised:
        if not driver.raw_layout:
            return driver
    for driver in recognised:
        return driver
    return qemu_choice


def _inspect_with(driver: FormatDriver, reader: ImageReader) -> ImageInfo:
    try:
        return driver.inspect(reader)
    except ImageError as error:
        kind = _PROBLEM_KIND_OF_ERROR.get(type(error).__name__, ProblemKind.MALFORMED)
        problem = Problem(kind, error.message, field=error.field, offset=error.offset)
        if driver.raw_layout:
            # A layout that cannot be read is no reason to stop calling the disk raw.
            return ImageInfo(
                format="raw",
                variant=driver.name,
                virtual_size=qemu_length(reader),
                problems=(problem,),
            )
        return ImageInfo(format=driver.name, problems=(problem,))


def _has_boot_signature(reader: ImageReader) -> bool:
    return reader.head[510:512] == BOOT_SIGNATURE


def _matches(
    chosen: FormatDriver,
    qemu_choice: FormatDriver,
    recognised: list[FormatDriver],
    boot_signature: bool = False,
) -> tuple[str, ...]:
    """Every format the bytes could be read as, the chosen one first.

    Raw layouts (ISO 9660, GPT, MBR) are all `raw` to qemu, so inside a raw disk they are one
    image (a hybrid ISO carries an MBR and a GPT on purpose), and inside a format whose guest data
    starts at offset 0 (a fixed VHD of a partitioned disk) they are the guest's data. `raw` itself
    is listed only where qemu's prober would fall back to it for bytes of another format.
    """
    names = [chosen.name]
    absorb_layouts = chosen.data_at_start or chosen.raw_layout
    for driver in recognised:
        if driver.name in names or (driver.raw_layout and absorb_layouts):
            continue
        names.append(driver.name)
    if qemu_choice.name not in names and not chosen.raw_layout:
        names.append(qemu_choice.name)
    # A boot sector signature at 510 in a container header that does not otherwise read as an
    # MBR (no partition entries) still makes the first sector a boot sector to firmware, and
    # oslo.utils' inspector counts it as a second format. No qemu-img-made header has it; LUKS
    # is left out because a key slot's random salt covers offset 510.
    if (
        boot_signature
        and not absorb_layouts
        and chosen.name not in ("raw", "luks", "mbr")
        and "mbr" not in names
    ):
        names.append("mbr")
    return tuple(names)
