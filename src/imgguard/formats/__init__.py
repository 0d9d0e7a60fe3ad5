"""One module per disk-image format; `DRIVERS` is the order the detector asks them in.

qemu's prober keeps the first driver with the highest score, walking its driver list; that
order was measured with qemu-img 7.2 on polyglots whose bytes score 100 for two drivers (VDI's
signature sits at offset 64, where other formats' headers can carry it): qed and parallels win
over vdi, and vdi wins over qcow, qcow2, vmdk, vpc, vhdx and luks. Magic-at-offset-0 formats
cannot collide with one another.
"""

from __future__ import annotations

from imgguard.formats import (
    bochs,
    cloop,
    container,
    dmg,
    gpt,
    iso9660,
    luks,
    mbr,
    parallels,
    qcow,
    qcow2,
    qed,
    raw,
    vdi,
    vhdx,
    vmdk,
    vpc,
)
from imgguard.formats._driver import FormatDriver

# qemu's drivers, in qemu's tie-break order; raw, its fallback, last.
DRIVERS: tuple[FormatDriver, ...] = (
    qed.DRIVER,
    parallels.DRIVER,
    vdi.DRIVER,
    qcow.DRIVER,
    qcow2.DRIVER,
    vmdk.DRIVER,
    vpc.DRIVER,
    vhdx.DRIVER,
    luks.DRIVER,
    bochs.DRIVER,
    cloop.DRIVER,
    dmg.DRIVER,
    raw.DRIVER,
)
# Layouts inside a raw disk, most specific first: a hybrid ISO carries an MBR or GPT too.
# A compressed container (imgguard.formats.container) is recognised first, and is not a raw
# layout: its `raw_layout` is false, so it is never absorbed into another format's reading.
LAYOUT_DRIVERS: tuple[FormatDriver, ...] = (
    container.DRIVER,
    iso9660.DRIVER,
    gpt.DRIVER,
    mbr.DRIVER,
)

QEMU_FORMATS = tuple(driver.name for driver in DRIVERS)
RAW_LAYOUTS = tuple(driver.name for driver in LAYOUT_DRIVERS)
_BY_NAME = {driver.name: driver for driver in DRIVERS + LAYOUT_DRIVERS}


def drivers() -> tuple[FormatDriver, ...]:
    """qemu's format drivers, in qemu's tie-break order."""
    return DRIVERS


def layout_drivers() -> tuple[FormatDriver, ...]:
    """The raw-disk layouts, most specific first."""
    return LAYOUT_DRIVERS


def by_name(name: str) -> FormatDriver:
    """The driver for a qemu format name or a raw layout name; KeyError for anything else."""
    return _BY_NAME[name]


__all__ = [
    "DRIVERS",
    "LAYOUT_DRIVERS",
    "QEMU_FORMATS",
    "RAW_LAYOUTS",
    "FormatDriver",
    "by_name",
    "drivers",
    "layout_drivers",
]
