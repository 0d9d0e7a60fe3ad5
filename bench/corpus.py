"""The benchmark corpus: every format qemu-img 7.2 can create, built once into a cache directory.

Each image is described by a `Spec`; `build` creates the missing ones (qemu-img, genisoimage) and
returns the `Image`s that exist. A manifest records the qemu-img version, so a new qemu-img
rebuilds the corpus.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SMALL = "64M"
LARGE = "2T"
# A VHD's CHS geometry tops out just under 2040 GiB.
VPC_LARGE = "2000G"
DATA_SIZE = 8 << 20
LUKS = ["--object", "secret,id=sec0,data=x"]
LUKS_OPTS = "key-secret=sec0,iter-time=10"


@dataclass(frozen=True)
class Spec:
    name: str  # file name in the cache, also the label in the tables
    group: str  # the row the image is summed into ("qcow2", "vmdk", ...)
    qemu_format: str  # what qemu-img info says (and -f takes)
    create: tuple[str, ...] = ()  # qemu-img create/convert options after the format
    size: str = SMALL
    data: bool = False  # converted from a raw file with data instead of created empty
    extra: tuple[str, ...] = field(default=())  # leading qemu-img arguments (--object ...)


def _specs() -> list[Spec]:
    specs: list[Spec] = []

    def trio(
        group: str,
        qemu_format: str,
        create: tuple[str, ...] = (),
        *,
        suffix: str = "",
        large: str | None = LARGE,
        data: bool = True,
        extra: tuple[str, ...] = (),
    ) -> None:
        stem = f"{group}{suffix}"
        specs.append(Spec(f"{stem}-small", group, qemu_format, create, SMALL, extra=extra))
        if large:
            specs.append(Spec(f"{stem}-large", group, qemu_format, create, large, extra=extra))
        if data:
            specs.append(Spec(f"{stem}-data", group, qemu_format, create, SMALL, True, extra))

    trio("raw", "raw")
    trio("qcow2", "qcow2", ("-o", "compat=1.1"), suffix="-v3")
    trio("qcow2", "qcow2", ("-o", "compat=0.10"), suffix="-v2")
    trio("qcow2", "qcow2", ("-o", "compat=1.1,cluster_size=512"), suffix="-c512", large=None)
    trio("qcow2", "qcow2", ("-o", "compat=1.1,cluster_size=4096"), suffix="-c4k", data=False)
    trio("qcow2", "qcow2", ("-o", "compat=1.1,cluster_size=2M"), suffix="-c2m")
    trio("qcow", "qcow")
    trio("qed", "qed")
    trio("vmdk", "vmdk", ("-o", "subformat=monolithicSparse"), suffix="-sparse")
    trio("vmdk", "vmdk", ("-o", "subformat=streamOptimized"), suffix="-stream")
    trio("vpc", "vpc", ("-o", "subformat=dynamic"), suffix="-dynamic", large=VPC_LARGE)
    trio("vpc", "vpc", ("-o", "subformat=fixed"), suffix="-fixed", large=None)
    trio("vhdx", "vhdx", ("-o", "subformat=dynamic"), suffix="-dynamic")
    trio("vhdx", "vhdx", ("-o", "subformat=fixed"), suffix="-fixed", large=None)
    trio("vdi", "vdi", ("-o", "static=off"), suffix="-dynamic")
    trio("vdi", "vdi", ("-o", "static=on"), suffix="-static", large=None)
    trio("parallels", "parallels")
    trio("luks", "luks", ("-o", LUKS_OPTS), extra=tuple(LUKS))
    specs.append(Spec("iso-small", "iso9660", "raw"))
    return specs


SPECS = _specs()


@dataclass(frozen=True)
class Image:
    spec: Spec
    path: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def group(self) -> str:
        return self.spec.group


def qemu_img_version() -> str:
    out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def build(cache: Path, *, log: bool = True) -> list[Image]:
    images_dir = cache / "images"
    manifest = cache / "manifest.json"
    version = qemu_img_version()
    if manifest.exists() and json.loads(manifest.read_text()).get("qemu-img") != version:
        shutil.rmtree(images_dir, ignore_errors=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    source = images_dir / "source.bin"
    if not source.exists():
        _write_source(source)
    images: list[Image] = []
    for spec in SPECS:
        path = images_dir / f"{spec.name}.img"
        if not path.exists():
            if log:
                print(f"bench: building {path.name}", file=sys.stderr)
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            try:
                _create(spec, source, tmp, images_dir)
            except subprocess.CalledProcessError as error:
                print(f"bench: cannot build {spec.name}: {error.stderr}", file=sys.stderr)
                tmp.unlink(missing_ok=True)
                continue
            tmp.rename(path)
        images.append(Image(spec, str(path)))
    manifest.write_text(json.dumps({"qemu-img": version, "images": [i.name for i in images]}))
    return images


def _write_source(path: Path) -> None:
    """8 MiB: random data in every other 256 KiB, zeros between, so formats allocate some."""
    rng = random.Random(6)
    chunk = 256 << 10
    with open(path, "wb") as out:
        for index in range(DATA_SIZE // chunk):
            out.write(rng.randbytes(chunk) if index % 2 == 0 else bytes(chunk))


def _qemu_img(args: list[str]) -> None:
    # luks's key derivation benchmarks the CPU first, which now and then fails on a busy machine.
    for attempt in range(5):
        result = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "Unable to get accurate CPU usage" not in result.stderr or attempt == 4:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, result.stdout, result.stderr
            )
        time.sleep(0.2)


def _create(spec: Spec, source: Path, out: Path, images_dir: Path) -> None:
    if spec.group == "iso9660":
        _create_iso(out, images_dir)
        return
    fmt = spec.qemu_format
    if spec.data:
        args = ["convert", *spec.extra, "-f", "raw", "-O", fmt, *spec.create]
        _qemu_img([*args, str(source), str(out)])
    else:
        _qemu_img(["create", *spec.extra, "-q", "-f", fmt, *spec.create, str(out), spec.size])


def _create_iso(out: Path, images_dir: Path) -> None:
    tree = images_dir / "iso-tree"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "boot").mkdir(parents=True)
    for index in range(20):
        (tree / f"file{index:02}.txt").write_text(f"file {index}\n" * 100)
    (tree / "boot" / "readme").write_text("imgguard bench\n")
    subprocess.run(
        ["genisoimage", "-quiet", "-R", "-J", "-V", "BENCH", "-o", str(out), str(tree)],
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(tree)


def scan_tree(cache: Path, images: list[Image], count: int) -> Path:
    """`count` distinct paths (hard links to the corpus, 100 per directory) for the scan run."""
    top = cache / f"scan-{count}"
    stamp = cache / f"scan-{count}.complete"
    if stamp.exists() and stamp.read_text() == str(len(images)):
        return top
    shutil.rmtree(top, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    for index in range(count):
        image = images[index % len(images)]
        directory = top / f"d{index // 100:04}"
        if index % 100 == 0:
            directory.mkdir(parents=True)
        target = directory / f"{index:05}-{image.name}.img"
        try:
            os.link(image.path, target)
        except OSError:
            if os.path.getsize(image.path) > (64 << 20):
                raise
            shutil.copyfile(image.path, target)
    stamp.write_text(str(len(images)))
    return top
