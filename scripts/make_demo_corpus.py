"""Build corpus/demo: a few benign images and a few attacks, made with the real qemu-img.

    python scripts/make_demo_corpus.py [--out corpus/demo]

The result is committed, so the README's demo runs without qemu-img. Every image's expected
verdict and rule ids are in EXPECTED (tests/test_demo.py checks them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

# path -> (verdict, rule ids the default policy must report)
EXPECTED: dict[str, tuple[str, frozenset[str]]] = {
    "benign/cloud.qcow2": ("pass", frozenset()),
    "benign/appliance.vmdk": ("pass", frozenset()),
    "benign/legacy.vhd": ("pass", frozenset()),
    "benign/fixed.vhd": ("pass", frozenset()),
    "benign/desktop.vdi": ("pass", frozenset()),
    "benign/install.iso": ("pass", frozenset()),
    "benign/gpt-disk.raw": ("pass", frozenset()),
    "attacks/backing-etc-passwd.qcow2": ("reject", frozenset({"IG101"})),
    "attacks/backing-json-nbd.qcow2": ("reject", frozenset({"IG105"})),
    "attacks/data-file-etc-shadow.qcow2": ("reject", frozenset({"IG102"})),
    "attacks/flat-extent-etc-passwd.vmdk": ("reject", frozenset({"IG103", "IG204"})),
    "attacks/qcow2-mbr-polyglot.img": ("reject", frozenset({"IG201"})),
    "attacks/truncated.qcow2": ("reject", frozenset({"IG601"})),
    "attacks/huge-l1-table.qcow2": ("reject", frozenset({"IG503"})),
    "attacks/unknown-feature.qcow2": ("reject", frozenset({"IG301"})),
}


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def guest_disk(path: Path, size: int) -> Path:
    """A sparse raw disk with some recognisable guest data spread over it."""
    with path.open("wb") as file:
        file.truncate(size)
        for offset in range(0, size, size // 8):
            file.seek(offset)
            file.write(b"imgguard demo guest data " * 40)
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def build(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    (out / "benign").mkdir(parents=True)
    (out / "attacks").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        guest = guest_disk(scratch / "guest.raw", 1 << 20)
        _benign(out / "benign", scratch, guest)
        _attacks(out / "attacks", scratch)


def _benign(out: Path, scratch: Path, guest: Path) -> None:
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        str(guest),
        str(out / "cloud.qcow2"),
    )
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        str(guest),
        str(out / "appliance.vmdk"),
    )
    qemu_img("convert", "-f", "raw", "-O", "vpc", str(guest), str(out / "legacy.vhd"))
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(out / "fixed.vhd"), "1M")
    qemu_img("convert", "-f", "raw", "-O", "vdi", str(guest), str(out / "desktop.vdi"))
    content = scratch / "iso"
    content.mkdir()
    (content / "README.TXT").write_text("imgguard demo installer\n")
    subprocess.run(
        [
            "genisoimage",
            "-quiet",
            "-V",
            "IMGGUARD_DEMO",
            "-J",
            "-R",
            "-o",
            str(out / "install.iso"),
            str(content),
        ],
        check=True,
    )
    disk = out / "gpt-disk.raw"
    with disk.open("wb") as file:
        file.truncate(2 << 20)
    subprocess.run(
        ["sfdisk", "-q", str(disk)],
        input="label: gpt\n,1M,L\n,,L\n",
        text=True,
        check=True,
        capture_output=True,
    )


def _attacks(out: Path, scratch: Path) -> None:
    def qcow2(name: str, *args: str) -> Path:
        path = out / name
        qemu_img("create", "-q", "-f", "qcow2", *args, str(path), "1G")
        return path

    qcow2("backing-etc-passwd.qcow2", "-u", "-F", "raw", "-b", "/etc/passwd")
    qcow2(
        "backing-json-nbd.qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        'json:{"file.driver": "nbd", "file.host": "10.0.0.1", "file.port": "10809"}',
    )

    # qemu-img creates the data file it is given, so make it under a harmless name of the same
    # length in a scratch directory, then rename it in the header extension.
    target = "/etc/shadow"
    placeholder = "x" * len(target)
    data_file = scratch / "data-file.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"data_file={placeholder}",
            str(data_file),
            "1G",
        ],
        check=True,
        capture_output=True,
        cwd=scratch,
    )
    image = bytearray(data_file.read_bytes()[:65536])
    index = image.index(placeholder.encode())
    image[index : index + len(target)] = target.encode()
    (out / "data-file-etc-shadow.qcow2").write_bytes(bytes(image) + data_file.read_bytes()[65536:])

    descriptor = scratch / "flat.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(descriptor), "1M")
    text = descriptor.read_text().replace('"flat-flat.vmdk"', '"/etc/passwd"')
    (out / "flat-extent-etc-passwd.vmdk").write_text(text)

    polyglot = qcow2("qcow2-mbr-polyglot.img")
    patch(
        polyglot,
        446,
        struct.pack("<B3sB3sII", 0x80, bytes(3), 0x83, bytes(3), 2048, 20480)
        + bytes(48)
        + b"\x55\xaa",
    )

    whole = qcow2("truncated-source.qcow2")
    (out / "truncated.qcow2").write_bytes(whole.read_bytes()[:80])
    whole.unlink()

    # qcow2 spec, "Header": l1_size at 36 (64 Mi entries = 512 MiB for qemu to allocate).
    patch(qcow2("huge-l1-table.qcow2"), 36, struct.pack(">I", 64 << 20))
    # incompatible_features at 72: bit 20 is not defined by any qcow2 version.
    patch(qcow2("unknown-feature.qcow2"), 72, struct.pack(">Q", 1 << 20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "corpus/demo")
    args = parser.parse_args()
    for tool in ("qemu-img", "genisoimage", "sfdisk"):
        if shutil.which(tool) is None:
            print(f"{tool} is required (bash scripts/setup.sh installs it)", file=sys.stderr)
            return 2
    os.umask(0o022)
    build(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
