#!/usr/bin/env python3
"""Regenerate the seed corpora in corpus/fuzz_*/ with the real qemu-img (and the real ISO and
partitioning tools); formats qemu-img cannot write (dmg, bochs, cloop, VMDK3/COWD, differencing
VHD/VHDX) come from the builders in `imgguard.testing`, which use the parsers' own structs.

Seeds are minimised: an image is kept as it is when it is small, else it becomes a sparse input
(see fuzz/_common.py) holding only its non-zero 512-byte blocks, with long runs of data (LUKS
key material, guest data) cut to their first few KiB. The file size is kept, so the parsers see
the same layout as qemu-img wrote. Run from the repository root:

    python fuzz/make_seeds.py            # rewrite corpus/fuzz_*/
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402

from imgguard import testing  # noqa: E402

CORPUS = ROOT / "corpus"
SECRET = "imgguard-fuzz-seed"
BLOCK = 512
MAX_RUN = 8 * 1024  # bytes kept of any run of non-zero blocks
PLAIN_LIMIT = 16 * 1024  # images up to this size are kept verbatim


def qemu_img(*args: str, cwd: Path) -> None:
    # qemu-img's LUKS key-slot timing fails now and then on a busy machine: retry that one.
    for attempt in range(10):
        result = subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, timeout=120)
        if result.returncode == 0:
            return
        if b"accurate CPU usage" not in result.stderr or attempt == 9:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, stderr=result.stderr
            )


def create(fmt: str, size: str, *options: str, backing: str | None = None, secret: bool = False):
    """A seed maker: `qemu-img create -f FMT [-o OPT]... seed SIZE` in the work directory."""

    def make(work: Path) -> bytes:
        args = ["create", "-q", "-f", fmt]
        if secret:
            args += ["--object", f"secret,id=sec0,data={SECRET}"]
        for option in options:
            args += ["-o", option]
        if backing is not None:
            args += ["-b", backing, "-F", "qcow2"]
        target = work / f"seed.{fmt}"
        target.unlink(missing_ok=True)
        qemu_img(*args, str(target), size, cwd=work)
        return target.read_bytes()

    return make


def command(*argv: str, output: str, prepare: Callable[[Path], None] | None = None):
    """A seed maker that runs a tool which writes `output` in the work directory."""

    def make(work: Path) -> bytes:
        if prepare is not None:
            prepare(work)
        subprocess.run(list(argv), cwd=work, check=True, capture_output=True, timeout=120)
        return (work / output).read_bytes()

    return make


def built(image: testing.GeneratedImage):
    return lambda work: image.data


def _iso_tree(work: Path) -> None:
    tree = work / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "README.TXT").write_text("imgguard fuzz seed\n")
    (tree / "boot.img").write_bytes(b"\xeb\x3c\x90" + bytes(2045))


def _raw_disk(work: Path, size: int = 4 << 20) -> None:
    with (work / "disk.raw").open("wb") as file:
        file.truncate(size)


def _mbr(script: str):
    def prepare(work: Path) -> None:
        _raw_disk(work)
        subprocess.run(
            ["sfdisk", "-q", "disk.raw"], input=script.encode(), cwd=work, check=True, timeout=60
        )

    return command("true", output="disk.raw", prepare=prepare)


def _base(work: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=work)


def with_base(maker: Callable[[Path], bytes]) -> Callable[[Path], bytes]:
    def make(work: Path) -> bytes:
        _base(work)
        return maker(work)

    return make


SEEDS: dict[str, Sequence[tuple[str, Callable[[Path], bytes]]]] = {
    "fuzz_qcow": [
        ("qcow2-v3-c512", create("qcow2", "1M", "cluster_size=512")),
        ("qcow2-v2", create("qcow2", "1M", "compat=0.10,cluster_size=4096")),
        (
            "qcow2-backing",
            with_base(create("qcow2", "1M", "cluster_size=4096", backing="base.qcow2")),
        ),
        ("qcow2-datafile", create("qcow2", "1M", "data_file=seed.data,data_file_raw=on")),
        ("qcow2-extl2-zstd", create("qcow2", "1M", "extended_l2=on,compression_type=zstd")),
        ("qcow2-lazy", create("qcow2", "1M", "lazy_refcounts=on,refcount_bits=64")),
        (
            "qcow2-luks",
            create(
                "qcow2",
                "1M",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                secret=True,
            ),
        ),
        ("qcow-v1", create("qcow", "1M")),
        ("qcow-v1-backing", with_base(create("qcow", "1M", backing="base.qcow2"))),
        ("qed", create("qed", "1M", "cluster_size=4096,table_size=1")),
        ("qed-backing", with_base(create("qed", "1M", backing="base.qcow2"))),
    ],
    "fuzz_vmdk": [
        ("vmdk-sparse", create("vmdk", "1M", "subformat=monolithicSparse")),
        ("vmdk-stream", create("vmdk", "1M", "subformat=streamOptimized")),
        ("vmdk-flat-descriptor", create("vmdk", "1M", "subformat=monolithicFlat")),
        ("vmdk-2gb-descriptor", create("vmdk", "1M", "subformat=twoGbMaxExtentSparse")),
        ("vmdk-v6-scsi", create("vmdk", "1M", "hwversion=6,adapter_type=lsilogic")),
        ("vmdk-cowd", built(testing.build_vmdk3(virtual_size=1 << 20))),
    ],
    "fuzz_vhd": [
        ("vpc-dynamic", create("vpc", "1M", "subformat=dynamic")),
        ("vpc-fixed", create("vpc", "1M", "subformat=fixed")),
        ("vhdx-dynamic", create("vhdx", "8M", "block_size=1M,log_size=1M")),
        ("vhdx-fixed", create("vhdx", "2M", "subformat=fixed,block_size=1M,log_size=1M")),
        ("vpc-differencing", built(testing.build_vpc(parent="parent.vhd"))),
        ("vhdx-differencing", built(testing.build_vhdx(parent="parent.vhdx"))),
    ],
    "fuzz_misc": [
        ("vdi-dynamic", create("vdi", "1M")),
        ("vdi-static", create("vdi", "1M", "static=on")),
        ("luks1", create("luks", "1M", "key-secret=sec0,iter-time=10", secret=True)),
        ("parallels", create("parallels", "1M", "cluster_size=4096")),
        ("dmg", built(testing.build_dmg())),
        ("bochs", built(testing.build_bochs())),
        ("cloop", built(testing.build_cloop())),
    ],
    "fuzz_raw_layouts": [
        (
            "iso9660",
            command(
                "genisoimage",
                "-quiet",
                "-V",
                "SEED",
                "-o",
                "seed.iso",
                "tree",
                output="seed.iso",
                prepare=_iso_tree,
            ),
        ),
        (
            "iso9660-eltorito",
            command(
                "genisoimage",
                "-quiet",
                "-J",
                "-b",
                "boot.img",
                "-no-emul-boot",
                "-o",
                "seed.iso",
                "tree",
                output="seed.iso",
                prepare=_iso_tree,
            ),
        ),
        ("mbr", _mbr("label: dos\n,1M,83\n,1M,5\n,512K,83\n,,7\n")),
        (
            "gpt",
            command(
                "sgdisk",
                "-n",
                "1:2048:4095",
                "-t",
                "1:8300",
                "-n",
                "2:4096:6143",
                "-t",
                "2:ef00",
                "disk.raw",
                output="disk.raw",
                prepare=_raw_disk,
            ),
        ),
    ],
}


def minimise(image: bytes) -> bytes:
    """The image itself when small, else a sparse input of its first bytes of each data run."""
    if len(image) <= PLAIN_LIMIT:
        return image
    kept = bytearray(len(image))
    run = 0
    for offset in range(0, len(image), BLOCK):
        block = image[offset : offset + BLOCK]
        if any(block):
            run += BLOCK
            if run <= MAX_RUN:
                kept[offset : offset + len(block)] = block
        else:
            run = 0
    return _common.encode_sparse(bytes(kept), block=BLOCK)


def main() -> int:
    if shutil.which("qemu-img") is None:
        print("qemu-img is required (apt-get install qemu-utils)", file=sys.stderr)
        return 1
    every: list[tuple[str, bytes]] = []
    for harness, seeds in SEEDS.items():
        directory = CORPUS / harness
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for name, make in seeds:
            with tempfile.TemporaryDirectory() as work:
                try:
                    image = make(Path(work))
                except (subprocess.CalledProcessError, OSError) as error:
                    print(f"skipped {harness}/{name}: {error}", file=sys.stderr)
                    continue
            seed = minimise(image)
            (directory / name).write_bytes(seed)
            every.append((name, seed))
            # The first 4 KiB as a plain file too: truncation is what uploads often are (not
            # for formats whose first 4 KiB are guest data: fixed VHD, dmg, ISO 9660).
            if len(image) > 4096 and any(image[:4096]):
                (directory / f"{name}-head").write_bytes(image[:4096])
                every.append((f"{name}-head", image[:4096]))
    whole = CORPUS / "fuzz_inspect_check"
    shutil.rmtree(whole, ignore_errors=True)
    whole.mkdir(parents=True)
    for name, seed in every:
        (whole / name).write_bytes(seed)
    total = sum(p.stat().st_size for p in CORPUS.glob("fuzz_*/*"))
    digest = hashlib.sha256(b"".join(s for _, s in every)).hexdigest()[:12]
    print(f"{len(every)} seeds, {total} bytes in corpus/fuzz_*/ (sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
