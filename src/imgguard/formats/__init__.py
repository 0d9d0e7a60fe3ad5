"""One module per disk-image format; `DRIVERS` is the order the detector asks them in.

qemu's prober keeps the first driver with the highest score, walking its driver list; that
order was measured with qemu-img 7.2 on polyglots whose bytes score 100 for two drivers (VDI's
signature sits at offset 64, where other formats' headers can carry it): qed and parallels win
over vdi, and vdi wins over qcow, qcow2, vmdk, vpc, vhdx and luks. Magic-at-offset-0 formats
cannot collide with one another.
"""

from __future__ import annotations

import functools
import importlib

from imgguard.formats._driver import FormatDriver

# qemu driver names, in qemu's tie-break order.
QEMU_FORMATS = (
    "qed",
    "parallels",
    "vdi",
    "qcow",
    "qcow2",
    "vmdk",
    "vpc",
    "vhdx",
    "luks",
    "bochs",
    "cloop",
    "dmg",
    "raw",
)
# Layouts inside a raw disk, most specific first: a hybrid ISO carries an MBR or GPT too.
RAW_LAYOUTS = ("iso9660", "gpt", "mbr")


@functools.cache
def drivers() -> tuple[FormatDriver, ...]:
    """The qemu format drivers, in qemu's tie-break order."""
    return tuple(_load(name) for name in QEMU_FORMATS)


@functools.cache
def layout_drivers() -> tuple[FormatDriver, ...]:
    """The raw-disk layouts, most specific first."""
    return tuple(_load(name) for name in RAW_LAYOUTS)


def by_name(name: str) -> FormatDriver:
    return _load(name)


@functools.cache
def _load(name: str) -> FormatDriver:
    if name not in QEMU_FORMATS and name not in RAW_LAYOUTS:
        raise KeyError(name)
    # Imported on first use, so that one format module can be imported (and tested) on its own.
    module = importlib.import_module(f"imgguard.formats.{name}")
    driver: FormatDriver = module.DRIVER
    return driver


__all__ = ["QEMU_FORMATS", "RAW_LAYOUTS", "FormatDriver", "by_name", "drivers", "layout_drivers"]
