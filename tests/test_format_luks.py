"""luks: LUKS1 images from qemu-img 7.2, a LUKS header inside a qcow2, crafted LUKS2 headers."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LUKS_SECRET, QEMU_IMG, qemu_info, run_qemu_img
from imgguard.errors import ImageError, MalformedImage, TruncatedImage
from imgguard.formats import luks
from imgguard.model import ImageInfo, ProblemKind
from imgguard.reader import ImageReader, open_image

# Each qemu-img create of a LUKS volume takes ~2 s (qemu times PBKDF2 for a second, twice), so
# the option space is covered by a few images that vary everything at once, made once per module.
LUKS_OPTIONS = {
    "defaults": (),  # aes-256, xts, plain64, sha256
    "aes-128-cbc-essiv": (
        "cipher-alg=aes-128",
        "cipher-mode=cbc",
        "ivgen-alg=essiv",
        "ivgen-hash-alg=sha256",
        "hash-alg=sha1",
    ),
    "twofish-256-xts-sha512": ("cipher-alg=twofish-256", "cipher-mode=xts", "hash-alg=sha512"),
    "serpent-128-cbc-plain": (
        "cipher-alg=serpent-128",
        "cipher-mode=cbc",
        "ivgen-alg=plain",
        "hash-alg=sha384",
    ),
}
# What the header says for each, as (cipher_name, cipher_mode, hash_spec, key_bytes).
EXPECTED = {
    "defaults": ("aes", "xts-plain64", "sha256", 64),
    "aes-128-cbc-essiv": ("aes", "cbc-essiv:sha256", "sha1", 16),
    "twofish-256-xts-sha512": ("twofish", "xts-plain64", "sha512", 64),
    "serpent-128-cbc-plain": ("serpent", "cbc-plain", "sha384", 16),
}


def create_with_secret(path: Path, fmt: str, size: str, options: tuple[str, ...]) -> Path:
    """qemu-img create with the LUKS secret, retried harder than conftest's qemu_create: qemu's
    PBKDF2 timing ("Unable to get accurate CPU usage") fails often on a busy machine."""
    args = ["create", "-q", "-f", fmt, "--object", f"secret,id=sec0,data={LUKS_SECRET}"]
    for option in options:
        args += ["-o", option]
    run_qemu_img(*args, str(path), size, retries=25)
    return path


@pytest.fixture(scope="module")
def luks_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("luks")
    sizes = {"defaults": "1M", "twofish-256-xts-sha512": "16M"}
    return {
        name: create_with_secret(
            folder / f"{name}.luks",
            "luks",
            sizes.get(name, "2M"),
            ("key-secret=sec0", "iter-time=10", *options),
        )
        for name, options in LUKS_OPTIONS.items()
    }


@pytest.fixture(scope="module")
def base_luks(luks_images: dict[str, Path]) -> bytes:
    return luks_images["defaults"].read_bytes()


def inspect_path(path: Path) -> ImageInfo:
    with open_image(path) as (reader, _):
        assert luks.probe(reader) == 100
        return luks.inspect(reader)


@pytest.mark.parametrize("name", sorted(LUKS_OPTIONS))
def test_qemu_created_luks1_matches_qemu_img_info(luks_images: dict[str, Path], name: str) -> None:
    path = luks_images[name]
    info = inspect_path(path)
    # qemu-img info opens LUKS without the key (BDRV_O_NO_IO): it needs only the header.
    expected = qemu_info(path, "luks")
    data = expected["format-specific"]["data"]
    assert expected["format"] == info.format == "luks"
    assert (info.variant, info.version) == ("luks1", 1)
    assert info.virtual_size == expected["virtual-size"]
    assert info.encrypted and expected["encrypted"]
    assert info.problems == ()
    enc = info.encryption
    assert enc is not None
    assert (enc.method, enc.format) == ("luks", "luks1")
    assert (enc.cipher_name, enc.cipher_mode, enc.hash_spec, enc.key_bytes) == EXPECTED[name]
    assert enc.payload_offset == data["payload-offset"]
    assert info.header["uuid"] == data["uuid"]
    assert info.header["mk_digest_iterations"] == data["master-key-iters"]
    assert len(enc.key_slots) == len(data["slots"]) == 8
    for slot, qemu_slot in zip(enc.key_slots, data["slots"], strict=True):
        assert slot.active == qemu_slot["active"]
        assert slot.key_material_offset == qemu_slot["key-offset"]
        assert slot.key_material_length == enc.key_bytes * 4000
        if slot.active:
            assert (slot.iterations, slot.stripes) == (qemu_slot["iters"], qemu_slot["stripes"])
    # Only the active slot's material is a region qemu reads (when unlocking, not at open).
    (table,) = info.tables
    assert (table.offset, table.length, table.loaded_at_open) == (4096, enc.key_bytes * 4000, False)


def test_probe_claims_luks1_only(base_luks: bytes) -> None:
    assert luks.probe(ImageReader.from_bytes(base_luks[:8])) == 100
    assert luks.probe(ImageReader.from_bytes(base_luks[:7])) == 0
    version2 = base_luks[:6] + b"\x00\x02" + base_luks[8:4096]
    assert luks.probe(ImageReader.from_bytes(version2)) == 0
    assert luks.recognise(ImageReader.from_bytes(version2))
    assert not luks.recognise(ImageReader.from_bytes(base_luks[:4096]))


# --- qemu 7.2's checks, each compared with what qemu-img info does with the same bytes --------

SLOT0 = 208


def _set(data: bytes, offset: int, fmt: str, value: Any) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


QEMU_REFUSALS = {
    "stripes 3999": (SLOT0 + 44, ">I", 3999, "key_slots[0].stripes"),
    "slot state": (SLOT0, ">I", 1, "key_slots[0].active"),
    "active slot 0 iterations": (SLOT0 + 4, ">I", 0, "key_slots[0].iterations"),
    "slot over header": (SLOT0 + 40, ">I", 7, "key_slots[0].key_material_offset"),
    "slots overlap": (SLOT0 + 48 + 40, ">I", 100, "key_slots[1].key_material_offset"),
    "slot over payload": (104, ">I", 4039, "key_slots[7].key_material_offset"),
    "payload over header": (104, ">I", 7, "payload_offset"),
    "payload past eof": (104, ">I", 0xFFFFFFFF, "payload_offset"),
    "cipher name unterminated": (8, "32s", b"a" * 32, "cipher_name"),
    "cipher mode unterminated": (40, "32s", b"x" * 32, "cipher_mode"),
    "hash unterminated": (72, "32s", b"s" * 32, "hash_spec"),
    "unknown cipher": (8, "32s", b"blowfish", "cipher_name"),
    "mode without ivgen": (40, "32s", b"xts", "cipher_mode"),
    "unknown hash": (72, "32s", b"md4", "hash_spec"),
    "unknown ivgen": (40, "32s", b"xts-benbi", "cipher_mode"),
    "essiv without hash": (40, "32s", b"xts-essiv", "cipher_mode"),
    "essiv hash too long": (40, "32s", b"xts-essiv:sha512", "cipher_mode"),
    "key size zero": (108, ">I", 0, "cipher_name"),
    "master key iterations 0": (164, ">I", 0, "mk_digest_iterations"),
}
QEMU_ACCEPTS = {
    # qemu halves the XTS key: 33 // 2 == 16 is AES-128.
    "odd xts key": (108, ">I", 33, None),
    "inactive slot iterations 0": (SLOT0 + 48 + 4, ">I", 0, None),
    "payload at end of file": (104, ">I", 3117056 // 512, None),
}


def _qemu_opens(path: Path) -> bool:
    result = subprocess.run(
        [QEMU_IMG, "info", "--output=json", "-f", "luks", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


@pytest.mark.parametrize("case", sorted(QEMU_REFUSALS))
def test_every_check_qemu_makes_is_a_problem(tmp_path: Path, base_luks: bytes, case: str) -> None:
    offset, fmt, value, field = QEMU_REFUSALS[case]
    path = tmp_path / "m.luks"
    path.write_bytes(_set(base_luks, offset, fmt, value))
    assert not _qemu_opens(path)
    info = inspect_path(path)
    assert field in {problem.field for problem in info.problems}


@pytest.mark.parametrize("case", sorted(QEMU_ACCEPTS))
def test_what_qemu_accepts_keeps_its_virtual_size(
    tmp_path: Path, base_luks: bytes, case: str
) -> None:
    offset, fmt, value, field = QEMU_ACCEPTS[case]
    path = tmp_path / "m.luks"
    path.write_bytes(_set(base_luks, offset, fmt, value))
    assert _qemu_opens(path)
    info = inspect_path(path)
    assert info.virtual_size == qemu_info(path, "luks")["virtual-size"]
    assert [problem.field for problem in info.problems] == ([field] if field else [])


def test_payload_past_the_end_has_no_size(base_luks: bytes) -> None:
    # block_crypto_co_getlength() fails with -EIO; imgguard reports no size and says why.
    info = luks.inspect(ImageReader.from_bytes(_set(base_luks, 104, ">I", 0xFFFFFFFF)))
    assert info.virtual_size is None
    assert info.truncated


def test_not_luks_raises(base_luks: bytes) -> None:
    with pytest.raises(MalformedImage):
        luks.inspect(ImageReader.from_bytes(b"LUKX" + base_luks[4:4096]))
    with pytest.raises(MalformedImage):
        luks.inspect(ImageReader.from_bytes(base_luks[:6] + b"\x00\x03" + base_luks[8:4096]))
    with pytest.raises(TruncatedImage):
        luks.inspect(ImageReader.from_bytes(base_luks[:591]))


# --- The LUKS header inside a qcow2 (full disk encryption header extension) ------------------


def _qcow2_fde_extension(data: bytes) -> tuple[int, int]:
    """(offset, length) from the qcow2 extension 0x0537be77, found by hand."""
    position = struct.unpack_from(">I", data, 100)[0]  # header_length (qcow2 v3)
    while True:
        kind, length = struct.unpack_from(">II", data, position)
        assert kind != 0, "no full disk encryption header extension"
        if kind == 0x0537BE77:
            offset, size = struct.unpack_from(">QQ", data, position + 8)
            return offset, size
        position += 8 + (length + 7) // 8 * 8


def test_read_luks_header_inside_qcow2(tmp_path: Path) -> None:
    path = create_with_secret(
        tmp_path / "enc.qcow2",
        "qcow2",
        "1M",
        ("encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10"),
    )
    data = path.read_bytes()
    offset, length = _qcow2_fde_extension(data)
    reader = ImageReader.from_bytes(data)
    encryption = luks.read_luks_header(reader, offset)
    expected = qemu_info(path, "qcow2")["format-specific"]["data"]["encrypt"]
    assert (encryption.method, encryption.format) == ("luks", "luks1")
    assert (encryption.cipher_name, encryption.cipher_mode) == ("aes", "xts-plain64")
    assert encryption.payload_offset == expected["payload-offset"] <= length
    for slot, qemu_slot in zip(encryption.key_slots, expected["slots"], strict=True):
        assert slot.active == qemu_slot["active"]
        # KeySlot offsets are file offsets; qemu's are relative to the LUKS header.
        assert slot.key_material_offset == offset + qemu_slot["key-offset"]
    assert luks.parse_luks_header(reader, offset).problems == ()
    with pytest.raises(ImageError):
        luks.read_luks_header(reader, 0)  # the qcow2 header is no LUKS header
    with pytest.raises(TruncatedImage):
        luks.read_luks_header(ImageReader.from_bytes(data[: offset + 300]), offset)


# --- LUKS2, built by hand (cryptsetup is not available) --------------------------------------

HDR_SIZE = 16384
PAYLOAD = 1 << 20


def luks2_metadata(**overrides: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "keyslots": {
            "0": {
                "type": "luks2",
                "key_size": 64,
                "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                "area": {
                    "type": "raw",
                    "offset": "32768",
                    "size": "258048",
                    "encryption": "aes-xts-plain64",
                    "key_size": 64,
                },
                "kdf": {
                    "type": "argon2id",
                    "time": 4,
                    "memory": 1048576,
                    "cpus": 4,
                    "salt": "AA==",
                },
            },
            "1": {
                "type": "luks2",
                "key_size": 64,
                "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                "area": {
                    "type": "raw",
                    "offset": "290816",
                    "size": "258048",
                    "encryption": "aes-xts-plain64",
                    "key_size": 64,
                },
                "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": "AA=="},
            },
        },
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(PAYLOAD),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": "aes-xts-plain64",
                "sector_size": 512,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": ["0", "1"],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": 1000,
                "salt": "AA==",
                "digest": "AA==",
            }
        },
        "config": {"json_size": str(HDR_SIZE - 4096), "keyslots_size": str(PAYLOAD - 32768)},
    }
    metadata.update(overrides)
    return metadata


def luks2_header(
    metadata: dict[str, Any] | bytes,
    *,
    magic: bytes = luks.LUKS_MAGIC,
    hdr_size: int = HDR_SIZE,
    hdr_offset: int = 0,
    seqid: int = 7,
) -> bytes:
    """One binary header + JSON area with the checksum the spec prescribes."""
    text = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    area = text.ljust(hdr_size - 4096, b"\0")
    fields = {
        "version": 2,
        "hdr_size": hdr_size,
        "seqid": seqid,
        "label": b"imgguard".ljust(48, b"\0"),
        "checksum_alg": b"sha256".ljust(32, b"\0"),
        "salt": bytes(range(64)),
        "uuid": b"6a7c0f42-5d1c-4f63-9c42-2f0a4b3e9d11".ljust(40, b"\0"),
        "subsystem": bytes(48),
        "hdr_offset": hdr_offset,
        "padding": bytes(184),
        "csum": bytes(64),
        "padding4096": bytes(3584),
    }
    struct_ = luks.LUKS2_PRIMARY_HEADER if magic == luks.LUKS_MAGIC else luks.LUKS2_SECONDARY_HEADER
    binary = struct_.build(fields)
    digest = hashlib.sha256(binary + area).digest()
    fields["csum"] = digest.ljust(64, b"\0")
    return bytes(struct_.build(fields) + area)


def luks2_image(metadata: dict[str, Any] | bytes | None = None, size: int = 2 << 20) -> bytes:
    metadata = luks2_metadata() if metadata is None else metadata
    primary = luks2_header(metadata)
    secondary = luks2_header(metadata, magic=luks.LUKS2_SECONDARY_MAGIC, hdr_offset=HDR_SIZE)
    return (primary + secondary).ljust(size, b"\0")


def test_luks2_facts() -> None:
    reader = ImageReader.from_bytes(luks2_image())
    assert luks.probe(reader) == 0
    assert luks.recognise(reader)
    info = luks.inspect(reader)
    assert (info.format, info.variant, info.version) == ("luks", "luks2", 2)
    assert info.virtual_size == (2 << 20) - PAYLOAD
    assert [problem.kind for problem in info.problems] == [ProblemKind.UNSUPPORTED]
    enc = info.encryption
    assert enc is not None and info.encrypted
    assert (enc.format, enc.cipher_name, enc.cipher_mode) == ("luks2", "aes", "xts-plain64")
    assert (enc.hash_spec, enc.key_bytes, enc.payload_offset) == ("sha256", 64, PAYLOAD)
    argon, pbkdf2 = enc.key_slots
    assert (argon.kdf, argon.iterations, argon.memory_kib) == ("argon2id", 4, 1048576)
    assert (argon.key_material_offset, argon.key_material_length) == (32768, 258048)
    assert (pbkdf2.kdf, pbkdf2.iterations, pbkdf2.memory_kib, pbkdf2.index) == (
        "pbkdf2",
        1000,
        None,
        1,
    )
    assert [table.offset for table in info.tables] == [32768, 290816]
    assert info.header["label"] == "imgguard"
    assert info.header["seqid"] == 7


def test_qemu_reads_luks2_as_raw(tmp_path: Path) -> None:
    path = tmp_path / "luks2.img"
    path.write_bytes(luks2_image())
    assert qemu_info(path)["format"] == "raw"
    assert inspect_path_luks2(path).variant == "luks2"


def inspect_path_luks2(path: Path) -> ImageInfo:
    with open_image(path) as (reader, _):
        return luks.inspect(reader)


def _problem_fields(data: bytes) -> set[str | None]:
    return {problem.field for problem in luks.inspect(ImageReader.from_bytes(data)).problems}


def test_luks2_checksum_is_verified() -> None:
    data = bytearray(luks2_image())
    data[4096 + 2] ^= 1  # one bit of the JSON area
    assert "csum" in _problem_fields(bytes(data))


def test_luks2_big_json_area_is_not_read() -> None:
    data = luks2_header(luks2_metadata(), hdr_size=4 << 20)
    info = luks.inspect(ImageReader.from_bytes(data))
    assert [p.kind for p in info.problems if p.field == "hdr_size"] == [ProblemKind.LIMIT]
    assert info.encryption is not None and info.encryption.key_slots == ()


def test_luks2_bad_hdr_size_and_json() -> None:
    assert "hdr_size" in _problem_fields(luks2_header(luks2_metadata(), hdr_size=20000))
    assert "json_area" in _problem_fields(luks2_image(b"{not json"))
    assert "json_area" in _problem_fields(luks2_image(b"[" * 100_000 + b"]" * 100_000))
    assert "json_area" in _problem_fields(luks2_image(b"\xff\xfe"))


def test_luks2_secondary_header_must_agree() -> None:
    primary = luks2_header(luks2_metadata())
    other = luks2_header(
        luks2_metadata(), magic=luks.LUKS2_SECONDARY_MAGIC, hdr_offset=HDR_SIZE, seqid=6
    )
    assert "secondary_header" in _problem_fields((primary + other).ljust(2 << 20, b"\0"))
    assert "secondary_header" in _problem_fields(primary.ljust(2 << 20, b"\0"))


def test_luks2_overlapping_and_past_eof_areas() -> None:
    metadata = luks2_metadata()
    metadata["keyslots"]["1"]["area"]["offset"] = "40960"  # inside keyslot 0's area
    metadata["segments"]["0"]["offset"] = "8192"  # inside the headers
    fields = _problem_fields(luks2_image(metadata))
    assert {"keyslots.1.area.offset", "segments.0.offset"} <= fields
    small = luks2_image(size=300_000)  # the segment starts past the end
    info = luks.inspect(ImageReader.from_bytes(small))
    assert info.virtual_size is None
    assert info.truncated


def test_luks2_junk_values_are_problems_not_crashes() -> None:
    metadata = luks2_metadata(
        keyslots={"0": {"kdf": {"type": "scrypt"}, "area": {"offset": -1, "size": "1e9"}}, "x": 3},
        segments={"0": {"offset": "99999999999999999999999", "size": [], "encryption": 5}},
        digests=[],
        config="none",
    )
    info = luks.inspect(ImageReader.from_bytes(luks2_image(metadata)))
    kinds = {problem.kind for problem in info.problems}
    assert ProblemKind.MALFORMED in kinds and ProblemKind.UNSUPPORTED in kinds


# --- Anything at all: an ImageInfo or an ImageError -------------------------------------------

_FUZZ_SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_FUZZ_SETTINGS
@given(
    cut=st.integers(min_value=0, max_value=6000),
    edits=st.lists(st.tuples(st.integers(0, 591), st.integers(0, 255)), max_size=8),
)
def test_luks1_mutations_give_info_or_image_error(
    base_luks: bytes, cut: int, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(base_luks[:cut])
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    try:
        info = luks.inspect(ImageReader.from_bytes(bytes(data)))
    except ImageError:
        return
    assert info.format == "luks"


LUKS2_SAMPLE = luks2_image(size=HDR_SIZE * 2 + 4096)


@_FUZZ_SETTINGS
@given(
    cut=st.integers(min_value=0, max_value=len(LUKS2_SAMPLE)),
    edits=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 255)), max_size=8),
)
def test_luks2_mutations_give_info_or_image_error(cut: int, edits: list[tuple[int, int]]) -> None:
    data = bytearray(LUKS2_SAMPLE[:cut])
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    try:
        info = luks.inspect(ImageReader.from_bytes(bytes(data)))
    except ImageError:
        return
    assert info.variant in ("luks1", "luks2")
