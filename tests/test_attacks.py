"""Red-team attack images: each must be rejected with the rule that names the attack.

Every image is made by the real qemu-img (7.2) and, where qemu-img will not write the attack,
edited at the offsets the format's spec gives. Where an attack makes qemu read a host file, the
test also checks that imgguard reports the very name qemu opens; `test_qemu_opens_only_reported_
names` runs qemu-img under strace on a sample of them to confirm that. Near misses at the end are
legitimate images, close to the attacks, that must pass.

Attacks that got past imgguard when this file was written say so ("Was a bypass") and name the
module that was fixed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import imgguard
from conftest import (
    QEMU_IMG,
    assert_passes,
    assert_rejects,
    qemu_create,
    rejecting_rules,
    run_qemu_img,
)
from imgguard import Status, check, inspect
from imgguard.reader import ImageReader

# --- building blocks -------------------------------------------------------------------------

# A target the attacks name; it never needs to exist for imgguard, only for the strace test.
SECRET = "/etc/imgguard-attack-target"

QCOW2_EXT_DATA_FILE = 0x44415441
QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_FEATURE_TABLE = 0x6803F857
VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)


def targets(verdict: imgguard.Verdict) -> list[str]:
    assert verdict.info is not None
    return [reference.target for reference in verdict.info.references]


def qemu_probe(path: Path) -> str | None:
    """The format `qemu-img info` (no -f) picks, or None when qemu cannot open the image."""
    result = subprocess.run(
        [QEMU_IMG or "qemu-img", "info", "--output=json", "-U", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        return None
    fmt: str = json.loads(result.stdout)["format"]
    return fmt


def ext(magic: int, data: bytes) -> bytes:
    """One qcow2 header extension: magic, length, data padded to 8 bytes."""
    return struct.pack(">II", magic, len(data)) + data + bytes(-len(data) % 8)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real qemu-img images the attacks are edited from, made once per module."""
    where = tmp_path_factory.mktemp("seeds")
    made: dict[str, bytes] = {}
    for name, fmt, options in (
        ("qcow2", "qcow2", ()),
        ("qcow2v2", "qcow2", ("compat=0.10",)),
        ("vmdk", "vmdk", ()),
        ("stream", "vmdk", ("subformat=streamOptimized",)),
        ("vdi", "vdi", ()),
        ("vhd", "vpc", ()),
        ("vhdfixed", "vpc", ("subformat=fixed",)),
        ("vhdx", "vhdx", ()),
    ):
        path = where / name
        args = ["create", "-q", "-f", fmt]
        for option in options:
            args += ["-o", option]
        run_qemu_img(*args, str(path), "1M")
        made[name] = path.read_bytes()
    return made


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def put(data: bytes, offset: int, chunk: bytes) -> bytes:
    out = bytearray(data)
    if len(out) < offset + len(chunk):
        out += bytes(offset + len(chunk) - len(out))
    out[offset : offset + len(chunk)] = chunk
    return bytes(out)


def qcow2(
    seed: bytes,
    *,
    version: int = 3,
    header_length: int = 112,
    extensions: bytes = b"",
    backing: bytes | None = None,
    backing_offset: int = 2048,
    incompatible: int = 0,
    autoclear: int = 0,
) -> bytes:
    """A qemu-img qcow2 with its extension area rewritten (qcow2 spec, "Header")."""
    out = bytearray(seed)
    struct.pack_into(">I", out, 4, version)
    start = 72
    if version >= 3:
        struct.pack_into(">QQQ", out, 72, incompatible, 0, autoclear)
        struct.pack_into(">I", out, 100, header_length)
        start = header_length
    # Everything from the extensions to the end of the first 4 KiB is rewritten: zeros end the
    # extension list.
    out[start:4096] = extensions + bytes(4096 - start - len(extensions))
    if backing is not None:
        out[backing_offset : backing_offset + len(backing)] = backing
        struct.pack_into(">QI", out, 8, backing_offset, len(backing))
    return bytes(out)


def vmdk_descriptor(seed: bytes) -> bytes:
    """The embedded descriptor of a qemu-img monolithicSparse/streamOptimized file (at 0x200)."""
    return seed[0x200 : 0x200 + 10240].split(b"\0", 1)[0]


def flat_descriptor(extents: bytes, create_type: bytes = b"monolithicFlat") -> bytes:
    return (
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        b'createType="' + create_type + b'"\n\n# Extent description\n' + extents + b"\n"
    )


# --- (1) host-file reads: qcow2 backing file -------------------------------------------------

BACKING_SPELLINGS = {
    "absolute": SECRET.encode(),
    "relative": b"../../../../../../etc/passwd",
    "sibling": b"base.qcow2",
    "dot-relative": b"./base.qcow2",
    "leading-space": b" " + SECRET.encode(),
    "trailing-newline": SECRET.encode() + b"\n",
    # qemu copies backing_file_size bytes and uses the C string: the NUL ends the name.
    "nul-inside": SECRET.encode() + b"\0/tmp/decoy",
    "non-utf8": b"/tmp/\xff\xfe-name",
}


@pytest.mark.parametrize("name", list(BACKING_SPELLINGS))
@pytest.mark.parametrize("version", [2, 3])
def test_qcow2_backing_file_spellings(
    tmp_path: Path, seeds: dict[str, bytes], name: str, version: int
) -> None:
    spelled = BACKING_SPELLINGS[name]
    seed = seeds["qcow2" if version == 3 else "qcow2v2"]
    image = write(tmp_path / "x.qcow2", qcow2(seed, version=version, backing=spelled))
    verdict = assert_rejects(image, "IG101")
    expected = spelled.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    assert targets(verdict) == [expected]


PROTOCOL_BACKINGS = [
    b"file:" + SECRET.encode(),
    b'json:{"driver":"raw","file":{"driver":"file","filename":"' + SECRET.encode() + b'"}}',
    # qemu's JSON parser takes single-quoted strings too.
    b"json:{'file.driver':'nbd','file.host':'10.0.0.1'}",
    b"nbd:10.0.0.1:10809",
    b"nbd+unix:///export?socket=/run/x.sock",
    b"http://169.254.169.254/latest/meta-data/",
    b"https://example.invalid/x",
    b"ssh://root@10.0.0.1/etc/shadow",
    b"fat:/etc",
    b"vvfat:/etc",
    b"iscsi://10.0.0.1/iqn.2000-01.x:t/0",
    b"gluster://10.0.0.1/vol/x",
]


@pytest.mark.parametrize("backing", PROTOCOL_BACKINGS, ids=lambda b: b.split(b":")[0].decode())
def test_qcow2_backing_protocol_is_ig105(
    tmp_path: Path, seeds: dict[str, bytes], backing: bytes
) -> None:
    image = write(tmp_path / "x.qcow2", qcow2(seeds["qcow2"], backing=backing))
    verdict = assert_rejects(image, "IG105")
    assert targets(verdict) == [backing.decode()]


def test_qcow2_backing_name_inside_extension_area(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    # backing_file_offset inside the header's extension area: qemu stops the extensions there
    # and still reads the name.
    image = write(
        tmp_path / "x.qcow2", qcow2(seeds["qcow2"], backing=b"/etc/hosts", backing_offset=120)
    )
    assert targets(assert_rejects(image, "IG101")) == ["/etc/hosts"]


@pytest.mark.parametrize("header_length", [104, 108, 112, 200, 4000])
def test_qcow2_backing_with_unusual_header_length(
    tmp_path: Path, seeds: dict[str, bytes], header_length: int
) -> None:
    image = qcow2(seeds["qcow2"], header_length=header_length, backing=SECRET.encode())
    verdict = assert_rejects(write(tmp_path / "x.qcow2", image), "IG101")
    assert SECRET in targets(verdict)


def test_qcow2_backing_format_names_another_driver(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    # A backing format of "vmdk" makes qemu parse the backing file as a descriptor.
    image = qcow2(
        seeds["qcow2"], extensions=ext(QCOW2_EXT_BACKING_FORMAT, b"vmdk"), backing=b"/etc/passwd"
    )
    verdict = assert_rejects(write(tmp_path / "x.qcow2", image), "IG101")
    assert verdict.info is not None and verdict.info.backing_format == "vmdk"


def test_qcow2_backing_file_made_by_qemu_img(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    run_qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/dev/sda", str(image), "1G"
    )
    assert targets(assert_rejects(image, "IG101")) == ["/dev/sda"]


# --- (1) host-file reads: qcow2 external data file -------------------------------------------


@pytest.mark.parametrize(
    ("extensions_before", "header_length", "version"),
    [
        (b"", 112, 3),
        (b"", 104, 3),
        (b"", 108, 3),
        (b"", 256, 3),
        # After a feature table and an unknown extension qemu skips.
        (ext(QCOW2_EXT_FEATURE_TABLE, bytes(48)) + ext(0x12345678, b"abc"), 112, 3),
        (ext(QCOW2_EXT_BACKING_FORMAT, b"raw"), 112, 3),
    ],
    ids=["plain", "hl104", "hl108", "hl256", "after-unknown-ext", "after-backing-format"],
)
def test_qcow2_data_file_in_every_place(
    tmp_path: Path,
    seeds: dict[str, bytes],
    extensions_before: bytes,
    header_length: int,
    version: int,
) -> None:
    extensions = extensions_before + ext(QCOW2_EXT_DATA_FILE, SECRET.encode())
    image = qcow2(
        seeds["qcow2"], header_length=header_length, extensions=extensions, incompatible=1 << 2
    )
    verdict = assert_rejects(write(tmp_path / "x.qcow2", image), "IG102")
    assert targets(verdict) == [SECRET]


def test_qcow2_data_file_raw_external_data(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    extensions = ext(QCOW2_EXT_DATA_FILE, b"/dev/vda")
    image = qcow2(seeds["qcow2"], extensions=extensions, incompatible=1 << 2, autoclear=1 << 1)
    assert targets(assert_rejects(write(tmp_path / "x.qcow2", image), "IG102")) == ["/dev/vda"]


def test_qcow2_data_file_twice_reports_both(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    # qemu keeps the last one; both are reported.
    extensions = ext(QCOW2_EXT_DATA_FILE, b"/decoy") + ext(QCOW2_EXT_DATA_FILE, SECRET.encode())
    image = qcow2(seeds["qcow2"], extensions=extensions, incompatible=1 << 2)
    verdict = assert_rejects(write(tmp_path / "x.qcow2", image), "IG102")
    assert SECRET in targets(verdict)


def test_qcow2_data_file_bit_without_name(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    image = qcow2(seeds["qcow2"], incompatible=1 << 2)
    assert_rejects(write(tmp_path / "x.qcow2", image), "IG102")


def test_qcow2_data_file_json(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    name = b"json:{'driver':'file','filename':'/etc/shadow'}"
    image = qcow2(seeds["qcow2"], extensions=ext(QCOW2_EXT_DATA_FILE, name), incompatible=1 << 2)
    assert_rejects(write(tmp_path / "x.qcow2", image), "IG105")


def test_qcow2_data_file_and_backing(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    image = qcow2(
        seeds["qcow2"],
        extensions=ext(QCOW2_EXT_DATA_FILE, b"/dev/sdb"),
        incompatible=1 << 2,
        backing=b"/dev/sdc",
    )
    verdict = assert_rejects(write(tmp_path / "x.qcow2", image), "IG101", "IG102")
    assert sorted(targets(verdict)) == ["/dev/sdb", "/dev/sdc"]


def test_qcow2_data_file_made_by_qemu_img(tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    image = tmp_path / "x.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(image), "1M")
    assert targets(assert_rejects(image, "IG102")) == [str(data)]


# --- (1) host-file reads: qcow v1 and QED ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["qcow", "qed"])
def test_legacy_backing_files(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"x.{fmt}"
    run_qemu_img("create", "-q", "-f", fmt, "-u", "-F", "raw", "-b", SECRET, str(image), "1M")
    verdict = assert_rejects(image, "IG101", "IG203")
    assert targets(verdict) == [SECRET]


# --- (1) host-file reads: VMDK descriptors ---------------------------------------------------

EXTENT_ATTACKS = {
    "flat": (b'RW 2048 FLAT "/etc/passwd" 0', b"monolithicFlat", "IG103"),
    "flat-relative": (b'RW 2048 FLAT "../../etc/passwd" 0', b"monolithicFlat", "IG103"),
    "name-with-space": (b'RW 2048 FLAT "/srv/a b/disk" 0', b"monolithicFlat", "IG103"),
    "tabs": (b'RW\t2048\tFLAT\t"/etc/passwd"\t0', b"monolithicFlat", "IG103"),
    "leading-space": (b'    RW 2048 FLAT "/etc/passwd" 0', b"monolithicFlat", "IG103"),
    # sscanf() skips newlines: one extent spread over five lines.
    "spread-over-lines": (b'RW\n2048\nFLAT\n"/etc/passwd"\n0', b"monolithicFlat", "IG103"),
    "vertical-tab": (b'RW\x0b2048\x0cFLAT "/etc/passwd" 0', b"monolithicFlat", "IG103"),
    "plus-signs": (b'RW +2048 FLAT "/etc/passwd" +0', b"monolithicFlat", "IG103"),
    "huge-offset": (b'RW 2048 FLAT "/etc/passwd" 99999999999999999999', b"monolithicFlat", "IG103"),
    "vmfs": (b'RW 2048 VMFS "/etc/passwd"', b"vmfs", "IG103"),
    "sparse": (b'RW 2048 SPARSE "/var/lib/x.vmdk"', b"twoGbMaxExtentSparse", "IG103"),
    "vmfssparse": (b'RW 2048 VMFSSPARSE "/var/lib/x.vmdk"', b"vmfsSparse", "IG103"),
    "sesparse": (b'RW 2048 SESPARSE "/var/lib/x.vmdk"', b"seSparse", "IG103"),
    "zero-then-flat": (b'RW 2048 ZERO\nRW 2048 FLAT "/etc/passwd" 0', b"monolithicFlat", "IG103"),
    "size-0-then-flat": (
        b'RW 0 FLAT "/etc/group" 0\nRW 2048 FLAT "/etc/passwd" 0',
        b"monolithicFlat",
        "IG103",
    ),
    "commented-decoy": (
        b'#RW 2048 FLAT "/etc/group" 0\nRW 2048 FLAT "/etc/passwd" 0',
        b"monolithicFlat",
        "IG103",
    ),
    "file-protocol": (b'RW 2048 FLAT "file:/etc/passwd" 0', b"monolithicFlat", "IG105"),
    "nbd": (b'RW 2048 FLAT "nbd:10.0.0.1:10809" 0', b"monolithicFlat", "IG105"),
    "json-single-quotes": (
        b"RW 2048 FLAT \"json:{'driver':'file','filename':'/etc/passwd'}\" 0",
        b"monolithicFlat",
        "IG105",
    ),
    # A createType the policy allows does not make a descriptor file safe.
    "allowed-create-type": (b'RW 2048 FLAT "/etc/passwd" 0', b"monolithicSparse", "IG103"),
    "vmfsraw": (b'RW 2048 VMFSRAW "/dev/sda"', b"vmfs", "IG103"),
    "vmfsrdm": (b'RW 2048 VMFSRDM "/dev/sda"', b"vmfs", "IG103"),
}


@pytest.mark.parametrize("name", list(EXTENT_ATTACKS))
def test_vmdk_descriptor_extents(tmp_path: Path, name: str) -> None:
    extents, create_type, rule_id = EXTENT_ATTACKS[name]
    image = write(tmp_path / "x.vmdk", flat_descriptor(extents, create_type))
    assert_rejects(image, rule_id)


def test_vmdk_descriptor_crlf(tmp_path: Path) -> None:
    text = flat_descriptor(b'RW 2048 FLAT "/etc/passwd" 0').replace(b"\n", b"\r\n")
    verdict = assert_rejects(write(tmp_path / "x.vmdk", text), "IG103")
    assert targets(verdict) == ["/etc/passwd"]


def test_vmdk_descriptor_blank_lines_duplicate_extent(tmp_path: Path) -> None:
    # Each blank line before an extent makes qemu add it once more.
    image = write(tmp_path / "x.vmdk", flat_descriptor(b'\n\n\nRW 2048 FLAT "/etc/passwd" 0'))
    assert_rejects(image, "IG103")


def test_vmdk_descriptor_without_version_line(tmp_path: Path) -> None:
    # qemu's prober needs "version=" first; `-f vmdk` opens it anyway.
    text = b'createType="monolithicFlat"\nCID=1\nparentCID=ffffffff\nRW 2048 FLAT "/etc/passwd" 0\n'
    assert targets(assert_rejects(write(tmp_path / "x.vmdk", text), "IG103")) == ["/etc/passwd"]


def test_vmdk_monolithic_flat_made_by_qemu_img(tmp_path: Path) -> None:
    image = tmp_path / "x.vmdk"
    run_qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(image), "1M")
    verdict = assert_rejects(image, "IG103", "IG204")
    assert targets(verdict) == ["x-flat.vmdk"]


@pytest.mark.parametrize(
    ("edit", "target"),
    [
        (lambda d: d + b'parentFileNameHint="/etc/passwd"\n', "/etc/passwd"),
        (lambda d: d + b'parentFileNameHint="../../x.vmdk"\n', "../../x.vmdk"),
        # strstr() finds the key in a comment too.
        (
            lambda d: d.replace(b"# Disk DescriptorFile", b'# parentFileNameHint="/etc/passwd"'),
            "/etc/passwd",
        ),
        # qemu skips any two characters after the key.
        (lambda d: d + b'parentFileNameHintXX/etc/passwd"\n', "/etc/passwd"),
    ],
    ids=["plain", "relative", "in-comment", "odd-separator"],
)
@pytest.mark.parametrize("seed_name", ["vmdk", "stream"])
def test_vmdk_sparse_parent_hint(
    tmp_path: Path,
    seeds: dict[str, bytes],
    seed_name: str,
    edit: Callable[[bytes], bytes],
    target: str,
) -> None:
    seed = seeds[seed_name]
    image = write(tmp_path / "x.vmdk", put(seed, 0x200, edit(vmdk_descriptor(seed)) + b"\0"))
    verdict = assert_rejects(image, "IG104")
    assert targets(verdict) == [target]


def test_vmdk_parent_hint_read_at_0x200_whatever_desc_offset(
    tmp_path: Path, seeds: dict[str, bytes]
) -> None:
    seed = bytearray(seeds["vmdk"])
    struct.pack_into("<QQ", seed, 28, 0, 0)  # desc_offset, desc_size: no descriptor
    text = vmdk_descriptor(seeds["vmdk"]) + b'parentFileNameHint="/etc/passwd"\n'
    image = write(tmp_path / "x.vmdk", put(bytes(seed), 0x200, text))
    assert targets(assert_rejects(image, "IG104")) == ["/etc/passwd"]


def test_vmdk_capacity_zero_opens_embedded_descriptor(
    tmp_path: Path, seeds: dict[str, bytes]
) -> None:
    # vmdk_open_vmdk4(): capacity 0 and a desc_offset: the descriptor there is a descriptor file.
    seed = bytearray(seeds["vmdk"])
    struct.pack_into("<QQQ", seed, 12, 0, 128, 0x60)  # capacity, granularity, desc_offset
    text = flat_descriptor(b'RW 2048 FLAT "/etc/passwd" 0')
    image = write(tmp_path / "x.vmdk", put(bytes(seed), 0x60 * 512, text + b"\0"))
    verdict = assert_rejects(image, "IG103")
    assert targets(verdict) == ["/etc/passwd"]


def test_vmdk_cowd_parent(tmp_path: Path) -> None:
    header = bytearray(2048)
    struct.pack_into("<4sIIIIIII", header, 0, b"COWD", 1, 0, 2048, 8, 4, 1, 8)
    header[32 : 32 + 11] = b"/etc/passwd"  # u.child.parentFileName (flags: not root)
    image = write(tmp_path / "x.vmdk", bytes(header) + bytes(8192))
    verdict = assert_rejects(image, "IG104")
    assert "/etc/passwd" in targets(verdict)


@pytest.mark.parametrize("seed_name", ["vmdk", "stream"])
def test_vmdk_embedded_descriptor_names_host_file(
    tmp_path: Path, seeds: dict[str, bytes], seed_name: str
) -> None:
    # Was a bypass (fixed in vmdk.py): qemu ignores a sparse file's embedded extent lines, but
    # VMware reads the embedded descriptor, and oslo's format_inspector refuses '/' in them.
    seed = seeds[seed_name]
    text = re.sub(
        rb'RW (\d+) SPARSE "[^"]*"', rb'RW \1 FLAT "/etc/shadow" 0', vmdk_descriptor(seed)
    )
    image = write(tmp_path / "x.vmdk", put(seed, 0x200, text + b"\0"))
    assert {"IG103", "IG603"} & rejecting_rules(check(image))


# --- (1) what qemu really opens --------------------------------------------------------------


def _opened_under(trace: str, directory: Path) -> set[str]:
    opened = set()
    for match in re.finditer(r'openat\([^,]*, "([^"]*)"', trace):
        name = match.group(1)
        if name.startswith(str(directory)) and not name.endswith((".trace", ".out")):
            opened.add(os.path.normpath(name))
    return opened


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize(
    "kind",
    ["qcow2-backing", "qcow2-relative", "qcow2-data-file", "vmdk-flat", "vmdk-hint", "vmdk-cap0"],
)
def test_qemu_opens_only_reported_names(tmp_path: Path, seeds: dict[str, bytes], kind: str) -> None:
    """`qemu-img convert` under strace: every file it opens is one imgguard reported."""
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(1 << 20))
    images = tmp_path / "images"
    images.mkdir()
    image = images / "upload"
    if kind == "qcow2-backing":
        data = qcow2(seeds["qcow2"], backing=str(secret).encode())
    elif kind == "qcow2-relative":
        data = qcow2(seeds["qcow2"], backing=b"../secret")
    elif kind == "qcow2-data-file":
        data = qcow2(
            seeds["qcow2"],
            extensions=ext(QCOW2_EXT_DATA_FILE, str(secret).encode()),
            incompatible=1 << 2,
        )
    elif kind == "vmdk-flat":
        data = flat_descriptor(b'RW 2048 FLAT "../secret" 0')
    elif kind == "vmdk-hint":
        text = vmdk_descriptor(seeds["vmdk"]) + f'parentFileNameHint="{secret}"\n'.encode()
        data = put(seeds["vmdk"], 0x200, text + b"\0")
    else:
        seed = bytearray(seeds["vmdk"])
        struct.pack_into("<QQQ", seed, 12, 0, 128, 0x60)
        data = put(bytes(seed), 0x60 * 512, flat_descriptor(b'RW 2048 FLAT "../secret" 0'))
    image.write_bytes(data)
    trace = tmp_path / "qemu.trace"
    subprocess.run(
        [
            "strace",
            "-f",
            "-e",
            "trace=openat",
            "-o",
            str(trace),
            QEMU_IMG or "qemu-img",
            "convert",
            "-U",
            "-O",
            "raw",
            str(image),
            str(tmp_path / "x.out"),
        ],
        capture_output=True,
        check=False,
        timeout=60,
    )
    opened = _opened_under(trace.read_text(errors="replace"), tmp_path) - {str(image)}
    assert opened == {str(secret)}, "the attack image no longer makes qemu open the secret"
    verdict = check(image)
    assert not verdict.ok
    reported = {os.path.normpath(os.path.join(images, target)) for target in targets(verdict)}
    assert opened <= reported


# --- (2) format confusion --------------------------------------------------------------------


def _mbr_entry() -> bytes:
    entry = bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 2048)
    return entry + bytes(48) + b"\x55\xaa"


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    where = tmp_path_factory.mktemp("iso")
    (where / "tree").mkdir()
    (where / "tree" / "a.txt").write_text("hello")
    out = where / "plain.iso"
    tool = shutil.which("genisoimage") or shutil.which("xorriso")
    if tool is None:
        pytest.skip("no ISO tool")
    if tool.endswith("genisoimage"):
        args = [tool, "-quiet", "-o", str(out), str(where / "tree")]
    else:
        args = [tool, "-as", "mkisofs", "-quiet", "-o", str(out), str(where / "tree")]
    subprocess.run(args, check=True, capture_output=True)
    return out.read_bytes()


POLYGLOTS: dict[str, Callable[[dict[str, bytes], bytes], bytes]] = {
    "qcow2+vdi-signature": lambda s, i: put(s["qcow2"], 64, VDI_SIGNATURE),
    "vdi+qcow2-magic-gone": lambda s, i: put(s["vdi"], 0, s["qcow2"][:64]),
    "iso-system-area+qcow2": lambda s, i: put(i, 0, s["qcow2"][:512]),
    "iso-system-area+vmdk-descriptor": lambda s, i: put(
        i, 0, flat_descriptor(b'RW 2048 FLAT "x" 0', b"monolithicSparse")
    ),
    "qcow2+iso-cd001": lambda s, i: put(s["qcow2"], 32768, b"\x01CD001\x01"),
    "qcow2+vhd-footer": lambda s, i: s["qcow2"] + s["vhdfixed"][-512:],
    "qcow2+mbr": lambda s, i: put(s["qcow2"], 446, _mbr_entry()),
    "qcow2+gpt-header": lambda s, i: put(
        s["qcow2"], 512, b"EFI PART\x00\x00\x01\x00\x5c\x00\x00\x00"
    ),
    "qcow2+dmg-koly": lambda s, i: s["qcow2"] + b"koly" + struct.pack(">II", 4, 512) + bytes(500),
    "vmdk-sparse+mbr": lambda s, i: put(s["vmdk"], 446, _mbr_entry()),
    "vhdx+vdi-signature": lambda s, i: put(s["vhdx"], 64, VDI_SIGNATURE),
    "dynamic-vhd+vdi-signature": lambda s, i: put(s["vhd"], 64, VDI_SIGNATURE),
    "vmdk-stream+vhd-footer": lambda s, i: s["stream"] + s["vhdfixed"][-512:],
}


@pytest.mark.parametrize("name", list(POLYGLOTS))
def test_polyglots_are_rejected(
    tmp_path: Path, seeds: dict[str, bytes], iso: bytes, name: str
) -> None:
    image = write(tmp_path / "x.img", POLYGLOTS[name](seeds, iso))
    verdict = check(image)
    assert verdict.status is Status.REJECT
    assert verdict.info is not None
    # Whatever else is wrong, the second reading must be named.
    assert "IG201" in rejecting_rules(verdict) or len(verdict.info.matches) > 1, (
        verdict.info.matches
    )
    qemu = qemu_probe(image)
    if qemu is not None:
        assert verdict.info.qemu_format == qemu


@pytest.mark.parametrize(
    "prefix",
    [
        b"version=1\n",
        b"version=1\r\n",
        b"# comment\n   \nversion=2\n",
        b"  \r\n# x\nversion=3\n",
    ],
    ids=["lf", "crlf", "comment-blank", "blank-crlf-comment"],
)
def test_raw_disk_that_qemu_probes_as_vmdk(tmp_path: Path, prefix: bytes) -> None:
    # A "raw" upload whose first bytes are what vmdk_probe() looks for: qemu opens it as a
    # descriptor and follows the extent it names.
    data = prefix + b'createType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n'
    image = write(tmp_path / "disk.raw", data + bytes(1 << 16))
    verdict = assert_rejects(image, "IG103")
    assert verdict.info is not None and verdict.info.qemu_format == "vmdk"
    assert check(image, claimed_format="raw").status is Status.REJECT


def test_descriptor_past_probe_window_claimed_vmdk(tmp_path: Path) -> None:
    # qemu's prober sees only 2 KiB and calls this raw, but `qemu-img convert -f vmdk` parses the
    # whole descriptor and opens the extent: declared vmdk, it must not pass as raw.
    data = b"#" + b"A" * 5000 + b'\ncreateType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n'
    image = write(tmp_path / "x.img", data)
    assert check(image, claimed_format="vmdk").status is Status.REJECT
    assert qemu_probe(image) == inspect(image).qemu_format == "raw"


def test_descriptor_past_probe_window_unclaimed(tmp_path: Path) -> None:
    # Was a bypass (fixed in vmdk.py): recognise() looked at the first 4 KiB only, but
    # `qemu-img -f vmdk` parses the whole C string, up to 1 MiB - 1.
    data = b"#" + b"A" * 5000 + b'\ncreateType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n'
    image = write(tmp_path / "x.img", data + bytes(1 << 16))
    verdict = check(image)
    assert "IG103" in rejecting_rules(verdict)
    assert targets(verdict) == ["/etc/passwd"]


def test_qcow2_magic_with_version_0(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    # Was a bypass (fixed in qcow2.py): no prober claims version 0, so the file passed as raw.
    image = write(tmp_path / "x.img", put(seeds["qcow2"], 4, struct.pack(">I", 0)))
    assert qemu_probe(image) == "raw"
    verdict = check(image)
    assert verdict.info is not None and verdict.info.format == "qcow2"
    assert "IG302" in rejecting_rules(verdict)


@pytest.mark.parametrize("layout", ["oslo-nsr-at-16", "udf-vrs"])
def test_qcow2_udf_polyglot(tmp_path: Path, seeds: dict[str, bytes], layout: str) -> None:
    # Was a bypass (fixed in iso9660.py): only CD001 was recognised at sector 16, not a UDF
    # recognition sequence, which Linux mounts and oslo's ISO inspector flags.
    data = seeds["qcow2"]
    if layout == "oslo-nsr-at-16":
        data = put(data, 32768, b"\x00NSR02\x01")
    else:
        for sector, ident in ((16, b"BEA01"), (17, b"NSR02"), (18, b"TEA01")):
            data = put(data, sector * 2048, b"\x00" + ident + b"\x01")
    image = write(tmp_path / "x.qcow2", data)
    assert "IG201" in rejecting_rules(check(image))


def test_claimed_format_mismatch(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    image = write(tmp_path / "x.img", seeds["qcow2"])
    assert "IG202" in rejecting_rules(check(image, claimed_format="raw"))
    assert "IG202" in rejecting_rules(check(image, claimed_format="vmdk"))


# --- (3) resource abuse ----------------------------------------------------------------------


def _sparse_with_footer(path: Path, size: int, footer: bytes) -> Path:
    try:
        with path.open("wb") as file:
            file.truncate(size)
            file.seek(size)
            file.write(footer)
    except OSError as error:  # pragma: no cover - a filesystem without large sparse files
        pytest.skip(f"cannot make a sparse file of {size} bytes: {error}")
    return path


@pytest.mark.parametrize("claimed", [None, "raw"])
def test_fixed_vhd_footer_hides_raw_size_from_target_check(
    tmp_path: Path, seeds: dict[str, bytes], claimed: str | None
) -> None:
    # A 3 GiB raw disk ending in the footer of a 1 MiB fixed VHD: qemu-img (probing, or -f raw
    # for a `raw` declaration) writes 3 GiB into the volume; the footer's size said 1 MiB.
    image = _sparse_with_footer(tmp_path / "x.img", 3 << 30, seeds["vhdfixed"][-512:])
    assert qemu_probe(image) == "raw"
    assert "IG502" in rejecting_rules(check(image, claimed_format=claimed, target_size=1))
    # Declared vhd, qemu-img -f vpc takes the footer's size: that fits.
    assert check(image, claimed_format="vhd", target_size=1).ok


def test_fixed_vhd_footer_hides_raw_size_from_size_cap(
    tmp_path: Path, seeds: dict[str, bytes]
) -> None:
    image = _sparse_with_footer(tmp_path / "x.img", 3 << 40, seeds["vhdfixed"][-512:])
    verdict = check(image)
    assert "IG501" in rejecting_rules(verdict)


def test_qcow2_l1_and_refcount_tables_over_budget(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    data = bytearray(seeds["qcow2"])
    struct.pack_into(">I", data, 36, 0x400000)  # l1_size: 32 MiB
    struct.pack_into(">I", data, 56, 0x400)  # refcount_table_clusters: 64 MiB (over qemu's cap)
    assert_rejects(write(tmp_path / "x.qcow2", bytes(data)), "IG503")


def test_qcow2_snapshot_count(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    data = bytearray(seeds["qcow2"])
    struct.pack_into(">IQ", data, 60, 65536, 0x30000)
    assert_rejects(write(tmp_path / "x.qcow2", bytes(data)), "IG505")


@pytest.mark.parametrize(("bits", "rule_id"), [(8, "IG602"), (22, "IG602"), (63, "IG602")])
def test_qcow2_cluster_bits_extremes(
    tmp_path: Path, seeds: dict[str, bytes], bits: int, rule_id: str
) -> None:
    data = put(seeds["qcow2"], 20, struct.pack(">I", bits))
    assert_rejects(write(tmp_path / "x.qcow2", data), rule_id)


def test_vdi_block_map_over_qemu_limit(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    data = put(seeds["vdi"], 384, struct.pack("<I", 0x3FFFFFFF))  # blocks_in_image
    assert_rejects(write(tmp_path / "x.vdi", data), "IG503")


def test_vmdk_grain_directory_over_budget(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    data = bytearray(seeds["vmdk"])
    # 16 GiB with 1-sector grains and 1 entry per grain table: 32 Mi grain directory entries,
    # which qemu allocates (128 MiB) and reads at open. (2 TiB would wrap qemu's uint32 l1_size
    # to 0.)
    struct.pack_into("<QQ", data, 12, 1 << 25, 1)
    struct.pack_into("<I", data, 44, 1)
    verdict = check(write(tmp_path / "x.vmdk", bytes(data)))
    assert {"IG503", "IG604"} & rejecting_rules(verdict)


def test_vhd_bat_over_budget(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    data = bytearray(seeds["vhd"])
    # Dynamic disk header at 512: max_table_entries at +28 (big-endian); checksum left stale.
    struct.pack_into(">I", data, 512 + 28, 0x4000000)
    assert not check(write(tmp_path / "x.vhd", bytes(data))).ok


def test_vhd_parent_locators_share_one_read_cap(seeds: dict[str, bytes]) -> None:
    # Eight 64 KiB parent locators qemu never reads: inspection read 520 KiB of them before the
    # cap became shared (vpc.py).
    data = bytearray(seeds["vhd"])
    dynamic = 512
    for index in range(8):
        struct.pack_into(
            ">4sIIIQ",
            data,
            dynamic + 576 + index * 24,
            b"W2ru",
            1 << 16,
            1 << 16,
            0,
            (index + 1) << 16,
        )
    struct.pack_into(">I", data, dynamic + 36, 0)
    struct.pack_into(">I", data, dynamic + 36, ~sum(data[dynamic : dynamic + 1024]) & 0xFFFFFFFF)
    image = bytes(data[:-512]) + bytes(9 << 16) + bytes(data[-512:])
    reader = ImageReader.from_bytes(image)
    from imgguard.inspection import inspect_reader

    info = inspect_reader(reader)
    assert info.format == "vpc"
    assert reader.bytes_read < 128 * 1024
    assert "IG604" in rejecting_rules(check(info))


def test_vmdk_descriptor_of_a_mebibyte(tmp_path: Path) -> None:
    text = flat_descriptor(b'RW 2048 FLAT "/etc/passwd" 0') + b"#" * (2 << 20)
    image = write(tmp_path / "x.vmdk", text)
    assert_rejects(image, "IG103")


def test_luks_iterations(tmp_path: Path) -> None:
    image = qemu_create(
        tmp_path / "x.luks", "luks", "1M", ["key-secret=sec0", "iter-time=10"], secret=True
    )
    # LUKS1 key slot 0 (offset 208): active, iterations.
    data = put(image.read_bytes(), 208 + 4, struct.pack(">I", 0xFFFFFFFF))
    image.write_bytes(data)
    assert "IG506" in {f.rule for f in check(image, imgguard.Policy(allow_encrypted=True)).findings}


@pytest.mark.parametrize("container", ["luks", "qcow2"])
def test_luks_master_key_digest_iterations(tmp_path: Path, container: str) -> None:
    # Slot iterations stay small; mk_digest_iterations (LUKS1 offset 164) is what qemu runs again
    # for every active slot it tries, whatever the passphrase: 2**32-1 of them is hours of CPU.
    if container == "luks":
        options = ["key-secret=sec0", "iter-time=10"]
    else:
        options = ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10"]
    image = qemu_create(tmp_path / f"x.{container}", container, "1M", options, secret=True)
    base = 0
    if container == "qcow2":
        base = inspect(image).header["crypto_header_offset"]
    image.write_bytes(put(image.read_bytes(), base + 164, struct.pack(">I", 0xFFFFFFFF)))
    policy = imgguard.Policy(allow_encrypted=True)
    verdict = check(image, policy)
    assert verdict.status is Status.REJECT
    assert "IG506" in rejecting_rules(verdict)
    assert [f.field for f in verdict.findings if f.rule == "IG506"] == ["mk_digest_iterations"]


# --- (4) robustness --------------------------------------------------------------------------


ROBUSTNESS = {
    "empty": b"",
    "qcow2-magic-only": b"QFI\xfb",
    "kdmv-magic-only": b"KDMV",
    "cowd-magic-only": b"COWD",
    "vhdx-ident-only": b"vhdxfile",
    "descriptor-all-whitespace": b"version=1\n" + b" \n" * 400_000,
    "descriptor-many-extents": b'version=1\ncreateType="monolithicFlat"\n'
    + b'RW 1 FLAT "a" 0\n' * 60_000,
    "descriptor-long-digits": b'version=1\ncreateType="vmfs"\nRW '
    + b"9" * 100_000
    + b' VMFS "a"\n',
    "descriptor-long-cid": b"version=1\nCID=" + b"f" * 100_000 + b"\nparentCID=1\n",
    "descriptor-unclosed-quotes": b'version=1\ncreateType="' + b"a" * 500_000,
}


@pytest.mark.parametrize("name", list(ROBUSTNESS))
def test_inspect_is_bounded(name: str) -> None:
    reader = ImageReader.from_bytes(ROBUSTNESS[name])
    from imgguard.inspection import inspect_reader

    info = inspect_reader(reader)  # never anything but an ImageInfo
    check(info)
    # qemu reads a descriptor whole up to 1 MiB - 1; nothing else should read more than that.
    assert reader.bytes_read <= (1 << 20) + 8192


# --- near misses: legitimate images that must pass -------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("qcow2", ()),
        ("qcow2", ("compat=0.10",)),
        ("qcow2", ("cluster_size=512",)),
        ("qcow2", ("cluster_size=2M",)),
        ("qcow2", ("extended_l2=on",)),
        ("qcow2", ("compression_type=zstd",)),
        ("qcow2", ("lazy_refcounts=on",)),
        ("qcow2", ("preallocation=metadata",)),
        ("vmdk", ()),
        ("vmdk", ("subformat=streamOptimized",)),
        ("vmdk", ("adapter_type=lsilogic", "hwversion=6")),
        ("vpc", ()),
        ("vpc", ("subformat=fixed",)),
        ("vhdx", ()),
        ("vdi", ()),
        ("raw", ()),
    ],
    ids=lambda value: value if isinstance(value, str) else ",".join(value) or "default",
)
def test_near_miss_plain_images_pass(tmp_path: Path, fmt: str, options: tuple[str, ...]) -> None:
    image = tmp_path / f"x.{fmt}"
    args = ["create", "-q", "-f", fmt]
    for option in options:
        args += ["-o", option]
    run_qemu_img(*args, str(image), "64M")
    verdict = assert_passes(image)
    assert verdict.info is not None and verdict.info.references == ()
    qemu = qemu_probe(image)
    assert qemu == verdict.info.qemu_format


def test_near_miss_qcow2_with_unknown_compatible_extension(
    tmp_path: Path, seeds: dict[str, bytes]
) -> None:
    # Extensions qemu skips, and a feature table that names a data file bit: no reference.
    extensions = ext(QCOW2_EXT_FEATURE_TABLE, b"\x00\x02" + b"external data file".ljust(46, b"\0"))
    extensions += ext(0x12345678, b"/etc/passwd")
    image = write(tmp_path / "x.qcow2", qcow2(seeds["qcow2"], extensions=extensions))
    assert_passes(image)


def test_near_miss_qcow2_backing_name_empty(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    # A name that starts with NUL is no backing file to qemu.
    image = write(tmp_path / "x.qcow2", qcow2(seeds["qcow2"], backing=b"\0/etc/passwd"))
    verdict = check(image)
    assert verdict.info is not None and verdict.info.references == ()


def test_near_miss_vmdk_with_paths_in_ddb(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    # ddb values with slashes are not references.
    text = vmdk_descriptor(seeds["vmdk"]) + b'ddb.comment = "/srv/images/base"\n'
    image = write(tmp_path / "x.vmdk", put(seeds["vmdk"], 0x200, text + b"\0"))
    assert_passes(image)


def test_near_miss_iso_and_hybrid(tmp_path: Path, iso: bytes) -> None:
    plain = write(tmp_path / "plain.iso", iso)
    assert_passes(plain)
    if shutil.which("isohybrid"):
        hybrid = write(tmp_path / "hybrid.iso", iso)
        subprocess.run(["isohybrid", str(hybrid)], capture_output=True, check=False)
        verdict = check(hybrid)
        assert verdict.info is not None and verdict.info.format == "raw"


def test_near_miss_pure_udf_volume(tmp_path: Path) -> None:
    data = bytes(1 << 20)
    for sector, ident in ((16, b"BEA01"), (17, b"NSR02"), (18, b"TEA01")):
        data = put(data, sector * 2048, b"\x00" + ident + b"\x01")
    verdict = assert_passes(write(tmp_path / "udf.img", data))
    assert verdict.info is not None and verdict.info.format == "raw"
    assert verdict.info.header["udf"] == ("BEA01", "NSR02", "TEA01")


def test_near_miss_partitioned_disks(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.raw"
    disk.write_bytes(bytes(8 << 20))
    if shutil.which("sgdisk"):
        subprocess.run(["sgdisk", "-n", "1:2048:0", str(disk)], capture_output=True, check=True)
        assert_passes(disk)
    mbr = tmp_path / "mbr.raw"
    mbr.write_bytes(bytes(8 << 20))
    if shutil.which("sfdisk"):
        subprocess.run(
            ["sfdisk", "-q", str(mbr)], input=b"2048,,83\n", capture_output=True, check=True
        )
        assert_passes(mbr)


def test_near_miss_fixed_vhd_declared_raw(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    image = write(tmp_path / "x.vhd", seeds["vhdfixed"])
    assert check(image, claimed_format="raw").ok
    assert check(image, claimed_format="vhd").ok
