"""Probe every format, choose the way qemu would, and say what the bytes could also be."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from imgguard import formats
from imgguard.errors import ImageError
from imgguard.formats import FormatDriver
from imgguard.formats._driver import _never
from imgguard.model import ImageInfo, Problem, ProblemKind
from imgguard.reader import ImageReader, open_regular

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
        fd, file_stat = open_regular(name)
        try:
            reader = ImageReader(None, size=file_stat.st_size, name=name, fd=fd)
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
    set_field(
        info, "matches", _matches(chosen, qemu_choice, recognised, _has_boot_signature(reader))
    )
    if actual_size is not None:
        set_field(info, "actual_size", actual_size)


_Probe = tuple[
    FormatDriver, Callable[[ImageReader], int] | None, Callable[[ImageReader], bool] | None
]
# The probers and recognisers to call for a head starting with a given 4 bytes (drivers whose
# `magic` starts with them, and every driver without one), the ones for any other head, and
# the raw layouts' recognisers.
_Plan = tuple[
    dict[bytes, tuple[_Probe, ...]],
    tuple[_Probe, ...],
    tuple[tuple[FormatDriver, Callable[[ImageReader], bool]], ...],
]
# The drivers' bound functions, gathered once per (drivers(), layout_drivers()) pair.
_plan_of: list[tuple[object, object, _Plan]] = []


def _probe_plan() -> _Plan:
    drivers, layouts = formats.drivers(), formats.layout_drivers()
    if _plan_of and _plan_of[0][0] is drivers and _plan_of[0][1] is layouts:
        return _plan_of[0][2]
    qemu_drivers = [driver for driver in drivers if driver.name != "raw"]
    for driver in qemu_drivers:
        if any(len(magic) < 4 for magic in driver.magic + driver.recognise_magic):
            raise ValueError(f"{driver.name}: a magic shorter than 4 bytes cannot be dispatched")

    def probes(first4: bytes | None) -> tuple[_Probe, ...]:
        # In the drivers' order (qemu's tie-break order), leaving out only the calls that a
        # driver's magic says would score 0 or say False for a head starting with `first4`.
        plan: list[_Probe] = []
        for driver in qemu_drivers:
            probe: Callable[[ImageReader], int] | None = driver.probe
            recognise = None if driver.recognise is _never else driver.recognise
            if driver.magic and not any(magic[:4] == first4 for magic in driver.magic):
                probe = None
            if driver.recognise_magic and not any(
                magic[:4] == first4 for magic in driver.recognise_magic
            ):
                recognise = None
            if probe is not None or recognise is not None:
                plan.append((driver, probe, recognise))
        return tuple(plan)

    keys = {magic[:4] for driver in qemu_drivers for magic in driver.magic}
    keys.update(magic[:4] for driver in qemu_drivers for magic in driver.recognise_magic)
    plan: _Plan = (
        {key: probes(key) for key in keys},
        probes(None),
        tuple((driver, driver.recognise) for driver in layouts),
    )
    _plan_of[:] = [(drivers, layouts, plan)]
    return plan


def _probe_all(reader: ImageReader) -> tuple[FormatDriver, list[FormatDriver]]:
    """qemu's choice (highest score, first in its driver list on a tie) and every match."""
    best: FormatDriver | None = None
    best_score = 0
    recognised: list[FormatDriver] = []
    by_magic, other, layouts = _probe_plan()
    # One dict lookup instead of a dozen probers that compare their magic with the first bytes
    # (a head shorter than 4 bytes starts with no magic, and gets `other`).
    for driver, probe, recognise in by_magic.get(reader.head[:4], other):
        score = 0 if probe is None else probe(reader)
        if score > best_score:
            best, best_score = driver, score
        if score > 0 or (recognise is not None and recognise(reader)):
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
                format="raw", variant=driver.name, virtual_size=reader.size, problems=(problem,)
            )
        return ImageInfo(format=driver.name, problems=(problem,))


def _has_boot_signature(reader: ImageReader) -> bool:
    return reader.head[510:512] == b"\x55\xaa"


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
