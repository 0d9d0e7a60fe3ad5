"""The interface every format module offers to the detector."""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen

from imgguard.model import ImageInfo
from imgguard.reader import ImageReader

# (offset, values): see FormatDriver.
Signature = tuple[int, tuple[bytes, ...]]


def _never(reader: ImageReader) -> bool:
    return False


@frozen
class FormatDriver:
    """One format as the detector sees it.

    `probe` returns the score qemu's own prober (`bdrv_probe` of the driver called `name`) gives
    these bytes, 0 when qemu would not pick it. `recognise` says the bytes are this format even
    where qemu's prober does not look (a fixed VHD's footer, a dmg's koly trailer). `inspect`
    reads the header and returns the facts, or raises `ImageError`.

    `raw_layout` marks layouts inside a raw disk (ISO 9660, MBR, GPT): qemu reads them as `raw`,
    so they become the `variant` of a raw image. `data_at_start` marks formats whose guest data
    begins at offset 0 (fixed VHD, dmg): a raw layout found there is the guest's, not a second
    format.

    `probe_by_name` marks a prober that looks at the file's name, not its bytes (qemu's dmg
    prober scores 2 for any name ending in ".dmg"): its score decides qemu's choice, but it does
    not make the bytes a second format when another driver wins.

    `magic`, when not empty, says that `probe` scores 0 for any file whose first bytes start
    with none of these, and `recognise_magic` the same of `recognise` (each at least 4 bytes
    long; a footer recogniser has none). The detector uses them only to skip the calls that
    would score 0 or say False anyway; the prober and recogniser stay the definitions.

    `probe_signatures` and `recognise_signatures` do the same for bytes elsewhere: pairs of
    (offset, values), the offset from the end of the file when negative, all values of one pair
    of one length. The call scores 0 or says False unless the bytes at one pair's offset are
    one of its values. A pair is a necessary condition, not the test: the values may be a
    prefix of what the function compares. A pair at a negative offset counts only in a file
    whose size is a multiple of 512: in any other, qemu's end (its length rounded up to whole
    sectors) is not the file's, and the call is made.
    """

    name: str
    probe: Callable[[ImageReader], int]
    inspect: Callable[[ImageReader], ImageInfo]
    recognise: Callable[[ImageReader], bool] = _never
    raw_layout: bool = False
    data_at_start: bool = False
    magic: tuple[bytes, ...] = ()
    probe_by_name: bool = False
    recognise_magic: tuple[bytes, ...] = ()
    probe_signatures: tuple[Signature, ...] = ()
    recognise_signatures: tuple[Signature, ...] = ()
