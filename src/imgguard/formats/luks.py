"""luks: LUKS1 and LUKS2 encrypted volumes (qemu's `crypto/block-luks.c`, `block/crypto.c`).

References: the LUKS1 on-disk format specification 1.2.3 (cryptsetup `docs/on-disk-format.pdf`),
the LUKS2 on-disk format specification 1.1.x (cryptsetup `docs/on-disk-format-luks2.pdf`), and
qemu 7.2's `qcrypto_block_luks_check_header()` / `qcrypto_block_luks_parse_header()`, whose
checks are reproduced below as `Problem`s. qemu 7.2 implements LUKS1 only: its prober claims
version 1 headers, and a version 2 header makes it fall back to `raw` (so LUKS2 is recognised
here with `recognise`, not `probe`).

`parse_luks_header(reader, offset)` and `read_luks_header(reader, offset)` also serve qcow2,
whose full-disk-encryption header extension embeds a LUKS header at some offset in the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import construct
from attrs import frozen

from imgguard.errors import ImageError, MalformedImage, TruncatedImage
from imgguard.formats._common import qemu_length
from imgguard.formats._driver import FormatDriver
from imgguard.model import Encryption, ImageInfo, KeySlot, Problem, ProblemKind, Table
from imgguard.reader import ImageReader, parse_struct

NAME = "luks"

# LUKS1 spec section 2.4 / qemu `qcrypto_block_luks_magic`.
LUKS_MAGIC = b"LUKS\xba\xbe"
# LUKS2 spec section 2.1: the secondary binary header carries the magic reversed.
LUKS2_SECONDARY_MAGIC = b"SKUL\xba\xbe"
SECTOR_SIZE = 512
# qemu's QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET: key material may not start before 4 KiB.
KEY_SLOT_OFFSET = 4096
NUM_KEY_SLOTS = 8
# LUKS1 spec: the anti-forensic splitter uses 4000 stripes; qemu 7.2 refuses anything else.
LUKS_STRIPES = 4000
KEY_SLOT_ENABLED = 0x00AC71F3
KEY_SLOT_DISABLED = 0x0000DEAD

# --- LUKS1 (spec section 2.4, table 1 and 2; big-endian) ---------------------------------------

LUKS1_KEY_SLOT = construct.Struct(
    # Enum, so that a value other than the two the spec defines stays visible as an int.
    "active"
    / construct.Enum(construct.Int32ub, enabled=KEY_SLOT_ENABLED, disabled=KEY_SLOT_DISABLED),
    "iterations" / construct.Int32ub,  # PBKDF2 iterations for this slot's passphrase
    "salt" / construct.Bytes(32),
    "key_material_offset" / construct.Int32ub,  # in 512-byte sectors from the header start
    "stripes" / construct.Int32ub,  # anti-forensic stripes
)

LUKS1_HEADER = construct.Struct(
    "magic" / construct.Const(LUKS_MAGIC),
    "version" / construct.Int16ub,
    "cipher_name" / construct.Bytes(32),  # C string, e.g. "aes"
    "cipher_mode" / construct.Bytes(32),  # C string, "<mode>-<ivgen>[:<ivhash>]"
    "hash_spec" / construct.Bytes(32),  # C string, e.g. "sha256"
    "payload_offset" / construct.Int32ub,  # in 512-byte sectors from the header start
    "key_bytes" / construct.Int32ub,  # master key length
    "mk_digest" / construct.Bytes(20),
    "mk_digest_salt" / construct.Bytes(32),
    "mk_digest_iterations" / construct.Int32ub,
    "uuid" / construct.Bytes(40),  # C string, ASCII UUID
    "key_slots" / construct.Array(NUM_KEY_SLOTS, LUKS1_KEY_SLOT),
)
LUKS1_HEADER_SIZE = 592  # qemu: QEMU_BUILD_BUG_ON(sizeof(QCryptoBlockLUKSHeader) != 592)


# --- LUKS2 binary header (LUKS2 spec section 2.1, `struct luks2_hdr_disk`; big-endian) --------


def _luks2_binary_header(magic: bytes) -> construct.Construct:
    return construct.Struct(
        "magic" / construct.Const(magic),
        "version" / construct.Int16ub,
        "hdr_size" / construct.Int64ub,  # binary header + JSON area, bytes
        "seqid" / construct.Int64ub,  # bumped on every update; both copies must agree
        "label" / construct.Bytes(48),
        "checksum_alg" / construct.Bytes(32),
        "salt" / construct.Bytes(64),
        "uuid" / construct.Bytes(40),
        "subsystem" / construct.Bytes(48),
        "hdr_offset" / construct.Int64ub,  # offset of this copy from the device start
        "padding" / construct.Bytes(184),
        "csum" / construct.Bytes(64),  # over hdr_size bytes with this field zeroed
        "padding4096" / construct.Bytes(7 * 512),
    )


LUKS2_PRIMARY_HEADER = _luks2_binary_header(LUKS_MAGIC)
LUKS2_SECONDARY_HEADER = _luks2_binary_header(LUKS2_SECONDARY_MAGIC)
LUKS2_BINARY_HEADER_SIZE = 4096
LUKS2_CSUM_OFFSET = 448
# LUKS2 spec section 2.1: hdr_size is one of 16, 32, 64, 128, 256, 512 KiB, 1, 2 or 4 MiB.
LUKS2_HDR_SIZES = frozenset(16384 << shift for shift in range(9))
# imgguard reads at most this much JSON; a bigger area is reported, not read.
LUKS2_JSON_CAP = 1 << 20
# cryptsetup's LUKS2_KEYSLOTS_MAX; also imgguard's cap on segments and digests looked at.
LUKS2_MAX_OBJECTS = 32

# Compiled parsers are ~5x faster; the input is always read at its exact length first, so the
# compiled code's struct.error on short input cannot happen.
_LUKS1_PARSER = LUKS1_HEADER.compile()

# --- What qemu 7.2 accepts (crypto/block-luks.c name maps, qapi/crypto.json enums) -----------

_CIPHER_KEY_BYTES = {
    "aes": (16, 24, 32),
    "cast5": (16,),
    "serpent": (16, 24, 32),
    "twofish": (16, 24, 32),
}
_CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
_HASH_DIGEST_LEN = {
    "md5": 16,
    "sha1": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "ripemd160": 20,
}
_IVGENS = ("plain", "plain64", "essiv")
# LUKS2 header checksum algorithms imgguard can verify (cryptsetup writes sha256).
_CHECKSUM_ALGS = ("sha1", "sha224", "sha256", "sha384", "sha512")


@frozen
class LuksHeader:
    """Everything read from one LUKS header, wherever it sits in the file.

    Key material offsets in `encryption.key_slots` and in `tables` are file offsets (the header's
    own offset added); `encryption.payload_offset` is the header's payload offset in bytes,
    relative to the header start, as the header states it. `data_size` is the size of the
    encrypted payload the header describes (LUKS1: file size minus payload, None when the payload
    starts past the end of the file; LUKS2: the first segment's size).
    """

    version: int
    encryption: Encryption
    problems: tuple[Problem, ...]
    tables: tuple[Table, ...]
    header: Mapping[str, Any]
    data_size: int | None


def probe(reader: ImageReader) -> int:
    # block_crypto_probe_luks -> qcrypto_block_luks_has_format: at least 8 bytes, the magic and
    # version == 1 (QCRYPTO_BLOCK_LUKS_VERSION). qemu 7.2 does not claim LUKS2.
    head = reader.head
    if len(head) >= 8 and head[:6] == LUKS_MAGIC and head[6:8] == b"\x00\x01":
        return 100
    return 0


def recognise(reader: ImageReader) -> bool:
    # LUKS2: qemu's prober looks only for version 1, so qemu would open this as raw.
    head = reader.head
    return len(head) >= 8 and head[:6] == LUKS_MAGIC and head[6:8] == b"\x00\x02"


def read_luks_header(reader: ImageReader, offset: int) -> Encryption:
    """The encryption facts of the LUKS1/LUKS2 header at `offset`; `ImageError` on bad bytes."""
    return parse_luks_header(reader, offset).encryption


def parse_luks_header(reader: ImageReader, offset: int) -> LuksHeader:
    """Read the LUKS header at `offset` with qemu 7.2's checks as `Problem`s.

    Raises `ImageError` when there is no readable LUKS header there at all (short, wrong magic,
    a version other than 1 or 2).
    """
    prefix = reader.read(offset, 8, field="luks.magic")
    if prefix[:6] != LUKS_MAGIC:
        raise MalformedImage(
            f"no LUKS magic (found {prefix[:6]!r})", field="luks.magic", offset=offset
        )
    version = int.from_bytes(prefix[6:8], "big")
    if version == 1:
        return _parse_luks1(reader, offset)
    if version == 2:
        return _parse_luks2(reader, offset)
    raise MalformedImage(
        f"LUKS version {version} is not supported (only 1 and 2 exist)",
        field="luks.version",
        offset=offset + 6,
    )


def inspect(reader: ImageReader) -> ImageInfo:
    parsed = parse_luks_header(reader, 0)
    problems = list(parsed.problems)
    virtual_size = parsed.data_size
    if parsed.version == 1:
        payload = parsed.encryption.payload_offset or 0
        # block_crypto_co_getlength(): bdrv_getlength(file), whole sectors, less the payload.
        length = qemu_length(reader)
        virtual_size = length - payload if payload <= length else None
        if payload > length:
            # block_crypto_co_getlength() returns -EIO: qemu-img info fails to open the image.
            problems.append(
                Problem(
                    ProblemKind.TRUNCATED,
                    f"payload starts at {payload}, past the end of the file ({reader.size}); "
                    "qemu cannot compute a size",
                    field="payload_offset",
                    offset=104,
                )
            )
    else:
        problems.append(
            Problem(
                ProblemKind.UNSUPPORTED,
                "LUKS2: qemu 7.2 supports LUKS1 only and reads this file as raw "
                f"(virtual size {reader.size})",
                field="version",
                offset=6,
            )
        )
    return ImageInfo(
        format=NAME,
        variant=f"luks{parsed.version}",
        virtual_size=virtual_size,
        version=parsed.version,
        encrypted=True,
        encryption=parsed.encryption,
        tables=parsed.tables,
        problems=tuple(problems),
        header=parsed.header,
    )


# --- LUKS1 ------------------------------------------------------------------------------------


def _parse_luks1(reader: ImageReader, offset: int) -> LuksHeader:
    data = reader.read(offset, LUKS1_HEADER_SIZE, field="luks.header")
    hdr = parse_struct(_LUKS1_PARSER, data, offset=offset, what="luks")
    problems: list[Problem] = []

    def problem(kind: ProblemKind, message: str, field: str, rel: int) -> None:
        problems.append(Problem(kind, message, field=field, offset=offset + rel))

    # qcrypto_block_luks_check_header(): the three algorithm strings must be NUL terminated.
    strings = {}
    for name, rel in (("cipher_name", 8), ("cipher_mode", 40), ("hash_spec", 72)):
        raw: bytes = hdr[name]
        if b"\0" not in raw:
            label = name.replace("_", " ")
            problem(ProblemKind.MALFORMED, f"{label} is not NUL terminated", name, rel)
        strings[name] = _c_string(raw)
    uuid = _c_string(hdr["uuid"])

    payload_sectors: int = hdr["payload_offset"]
    key_bytes: int = hdr["key_bytes"]
    header_sectors = KEY_SLOT_OFFSET // SECTOR_SIZE
    if payload_sectors < header_sectors:
        problem(
            ProblemKind.INCONSISTENT,
            f"payload (sector {payload_sectors}) overlaps the LUKS header",
            "payload_offset",
            104,
        )
    if hdr["mk_digest_iterations"] == 0:
        # qemu 7.2: "LUKS key iteration count is zero".
        problem(
            ProblemKind.MALFORMED,
            "master key digest iteration count is zero",
            "mk_digest_iterations",
            164,
        )

    slots: list[KeySlot] = []
    spans: list[tuple[int, int, int]] = []
    tables: list[Table] = []
    for index, slot in enumerate(hdr["key_slots"]):
        rel = 208 + 48 * index
        field = f"key_slots[{index}]"
        active_raw = slot["active"]
        active = active_raw == "enabled"
        stripes: int = slot["stripes"]
        start: int = slot["key_material_offset"]
        if stripes != LUKS_STRIPES:
            problem(
                ProblemKind.MALFORMED,
                f"key slot {index} is corrupted (stripes {stripes} != {LUKS_STRIPES})",
                f"{field}.stripes",
                rel + 44,
            )
        if active_raw not in ("enabled", "disabled"):
            problem(
                ProblemKind.MALFORMED,
                f"key slot {index} state {int(active_raw):#010x} is neither enabled nor disabled",
                f"{field}.active",
                rel,
            )
        if active and slot["iterations"] == 0:
            problem(
                ProblemKind.MALFORMED,
                f"key slot {index} iteration count is zero",
                f"{field}.iterations",
                rel + 4,
            )
        # qcrypto_block_luks_splitkeylen_sectors(): key_bytes * stripes bytes, rounded up to
        # sectors and then to the header's 8 sectors (cryptsetup's layout, not the spec's).
        length_sectors = _round_up(-(-key_bytes * stripes // SECTOR_SIZE), header_sectors)
        if start < header_sectors:
            problem(
                ProblemKind.INCONSISTENT,
                f"key slot {index} material (sector {start}) overlaps the LUKS header",
                f"{field}.key_material_offset",
                rel + 40,
            )
        # qemu adds these as 32-bit unsigned ints, which can wrap; imgguard does not.
        if start + length_sectors > payload_sectors:
            problem(
                ProblemKind.INCONSISTENT,
                f"key slot {index} material (sectors {start}..{start + length_sectors}) "
                f"overlaps the encrypted payload (sector {payload_sectors})",
                f"{field}.key_material_offset",
                rel + 40,
            )
        for other, other_start, other_len in spans:
            if start + length_sectors > other_start and other_start + other_len > start:
                problem(
                    ProblemKind.INCONSISTENT,
                    f"key slots {other} and {index} overlap in the header",
                    f"{field}.key_material_offset",
                    rel + 40,
                )
        spans.append((index, start, length_sectors))

        material_offset = offset + start * SECTOR_SIZE
        # What qemu reads (and allocates) to unlock the slot: key_bytes * stripes bytes.
        material_length = key_bytes * stripes
        if active:
            tables.append(
                Table(
                    f"key_slots[{index}].key_material",
                    material_offset,
                    material_length,
                    loaded_at_open=False,
                )
            )
            if material_offset + material_length > reader.size:
                problem(
                    ProblemKind.TRUNCATED,
                    f"key slot {index} material ends past the end of the file",
                    f"{field}.key_material_offset",
                    rel + 40,
                )
        slots.append(
            KeySlot(
                index=index,
                active=active,
                iterations=slot["iterations"],
                key_material_offset=material_offset,
                key_material_length=material_length,
                stripes=stripes,
                kdf="pbkdf2",
            )
        )

    for message, field, rel in _luks1_algorithm_problems(
        strings["cipher_name"], strings["cipher_mode"], strings["hash_spec"], key_bytes
    ):
        problem(ProblemKind.UNSUPPORTED, message, field, rel)

    payload_offset = payload_sectors * SECTOR_SIZE
    end = offset + payload_offset
    data_size = reader.size - end if end <= reader.size else None
    encryption = Encryption(
        method="luks",
        format="luks1",
        cipher_name=strings["cipher_name"],
        cipher_mode=strings["cipher_mode"],
        hash_spec=strings["hash_spec"],
        key_bytes=key_bytes,
        payload_offset=payload_offset,
        key_slots=tuple(slots),
        # qcrypto_block_luks_load_key() checks every candidate master key with PBKDF2 over
        # mk_digest_iterations: each active slot tried costs these on top of its own.
        digest_iterations=hdr["mk_digest_iterations"],
    )
    header = {
        "version": 1,
        "cipher_name": strings["cipher_name"],
        "cipher_mode": strings["cipher_mode"],
        "hash_spec": strings["hash_spec"],
        "payload_offset": payload_sectors,
        "key_bytes": key_bytes,
        "mk_digest_iterations": hdr["mk_digest_iterations"],
        "uuid": uuid,
        "active_key_slots": sum(slot.active for slot in slots),
    }
    return LuksHeader(
        version=1,
        encryption=encryption,
        problems=tuple(problems),
        tables=tuple(tables),
        header=header,
        data_size=data_size,
    )


def _luks1_algorithm_problems(
    cipher_name: str, cipher_mode: str, hash_spec: str, key_bytes: int
) -> list[tuple[str, str, int]]:
    """qcrypto_block_luks_parse_header(): the names qemu 7.2 can map to its algorithms."""
    found: list[tuple[str, str, int]] = []
    mode, dash, ivgen_spec = cipher_mode.partition("-")
    if not dash:
        return [(f"unexpected cipher mode string format {cipher_mode!r}", "cipher_mode", 40)]
    ivgen, colon, ivhash = ivgen_spec.partition(":")
    if colon and ivhash not in _HASH_DIGEST_LEN:
        found.append((f"IV hash algorithm {ivhash!r} not supported", "cipher_mode", 40))
    if mode not in _CIPHER_MODES:
        found.append((f"cipher mode {mode!r} not supported", "cipher_mode", 40))
    # qcrypto_block_luks_cipher_name_lookup(): XTS keys are two keys of half the length.
    cipher_key = key_bytes // 2 if mode == "xts" else key_bytes
    if cipher_key not in _CIPHER_KEY_BYTES.get(cipher_name, ()):
        found.append(
            (
                f"algorithm {cipher_name!r} with key size {cipher_key} bytes not supported",
                "cipher_name",
                8,
            )
        )
    if hash_spec not in _HASH_DIGEST_LEN:
        found.append((f"hash algorithm {hash_spec!r} not supported", "hash_spec", 72))
    if ivgen not in _IVGENS:
        found.append((f"IV generator {ivgen!r} not supported", "cipher_mode", 40))
    elif ivgen == "essiv":
        if not colon:
            found.append(("missing IV generator hash specification", "cipher_mode", 40))
        elif ivhash in _HASH_DIGEST_LEN and cipher_name in _CIPHER_KEY_BYTES:
            # qcrypto_block_luks_essiv_cipher(): ESSIV keys the cipher with the hash digest.
            digest = _HASH_DIGEST_LEN[ivhash]
            if digest != cipher_key and digest not in _CIPHER_KEY_BYTES[cipher_name]:
                found.append(
                    (
                        f"no {cipher_name} cipher with key size {digest} for ESSIV with {ivhash}",
                        "cipher_mode",
                        40,
                    )
                )
    return found


# --- LUKS2 ------------------------------------------------------------------------------------


def _parse_luks2(reader: ImageReader, offset: int) -> LuksHeader:
    data = reader.read(offset, LUKS2_BINARY_HEADER_SIZE, field="luks2.header")
    hdr = parse_struct(LUKS2_PRIMARY_HEADER, data, offset=offset, what="luks2")
    problems: list[Problem] = []

    def problem(kind: ProblemKind, message: str, field: str, rel: int | None) -> None:
        problems.append(
            Problem(kind, message, field=field, offset=None if rel is None else offset + rel)
        )

    hdr_size: int = hdr["hdr_size"]
    checksum_alg = _c_string(hdr["checksum_alg"])
    uuid = _c_string(hdr["uuid"])
    header: dict[str, Any] = {
        "version": 2,
        "hdr_size": hdr_size,
        "seqid": hdr["seqid"],
        "label": _c_string(hdr["label"]),
        "checksum_alg": checksum_alg,
        "uuid": uuid,
        "subsystem": _c_string(hdr["subsystem"]),
        "hdr_offset": hdr["hdr_offset"],
    }
    if hdr["hdr_offset"] != 0:
        problem(
            ProblemKind.INCONSISTENT,
            f"primary header says it is at offset {hdr['hdr_offset']}, not 0",
            "hdr_offset",
            256,
        )

    metadata: dict[str, Any] | None = None
    if hdr_size not in LUKS2_HDR_SIZES:
        problem(
            ProblemKind.MALFORMED,
            f"hdr_size {hdr_size} is not one of the sizes the LUKS2 spec allows (16 KiB..4 MiB)",
            "hdr_size",
            8,
        )
    elif hdr_size - LUKS2_BINARY_HEADER_SIZE > LUKS2_JSON_CAP:
        problem(
            ProblemKind.LIMIT,
            f"JSON area of {hdr_size - LUKS2_BINARY_HEADER_SIZE} bytes is over imgguard's cap "
            f"of {LUKS2_JSON_CAP}; not read",
            "hdr_size",
            8,
        )
    else:
        metadata = _read_luks2_json(reader, offset, hdr_size, data, checksum_alg, hdr, problem)
        _check_luks2_secondary(reader, offset, hdr_size, hdr, problem)

    return _luks2_facts(reader, offset, hdr_size, header, metadata, problem, problems)


def _read_luks2_json(
    reader: ImageReader,
    offset: int,
    hdr_size: int,
    binary: bytes,
    checksum_alg: str,
    hdr: Any,
    problem: Any,
) -> dict[str, Any] | None:
    json_length = hdr_size - LUKS2_BINARY_HEADER_SIZE
    try:
        area = reader.read(
            offset + LUKS2_BINARY_HEADER_SIZE, json_length, field="luks2.json", cap=LUKS2_JSON_CAP
        )
    except TruncatedImage:
        problem(
            ProblemKind.TRUNCATED,
            f"JSON area ({json_length} bytes) runs past the end of the file",
            "json_area",
            LUKS2_BINARY_HEADER_SIZE,
        )
        return None

    # Spec section 2.1: csum is the hash of the whole header area (binary header with csum
    # zeroed, then the JSON area), stored from its first byte and zero padded.
    try:
        if checksum_alg not in _CHECKSUM_ALGS:
            raise ValueError(checksum_alg)
        hasher = hashlib.new(checksum_alg)
    except ValueError:
        problem(
            ProblemKind.UNSUPPORTED,
            f"checksum algorithm {checksum_alg!r} is unknown; checksum not verified",
            "checksum_alg",
            72,
        )
    else:
        hasher.update(binary[:LUKS2_CSUM_OFFSET])
        hasher.update(bytes(64))
        hasher.update(binary[LUKS2_CSUM_OFFSET + 64 :])
        hasher.update(area)
        digest = hasher.digest()
        if len(digest) > 64 or hdr.csum != digest + bytes(64 - len(digest)):
            problem(
                ProblemKind.INCONSISTENT,
                f"header checksum ({checksum_alg}) does not match",
                "csum",
                LUKS2_CSUM_OFFSET,
            )

    # The JSON text is a C string: it ends at the first NUL and the rest is padding.
    text = area.split(b"\0", 1)[0]
    try:
        metadata = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        problem(
            ProblemKind.MALFORMED,
            f"JSON area is not valid JSON: {type(error).__name__}",
            "json_area",
            LUKS2_BINARY_HEADER_SIZE,
        )
        return None
    if not isinstance(metadata, dict):
        problem(
            ProblemKind.MALFORMED,
            "JSON area is not a JSON object",
            "json_area",
            LUKS2_BINARY_HEADER_SIZE,
        )
        return None
    return metadata


def _check_luks2_secondary(
    reader: ImageReader, offset: int, hdr_size: int, hdr: Any, problem: Any
) -> None:
    """Spec section 2.1: a second copy of the binary header follows the first at hdr_size."""
    where = offset + hdr_size
    data = reader.read_available(where, LUKS2_BINARY_HEADER_SIZE, field="luks2.secondary")
    if len(data) < LUKS2_BINARY_HEADER_SIZE:
        problem(
            ProblemKind.TRUNCATED,
            f"secondary header at {where} is past the end of the file",
            "secondary_header",
            hdr_size,
        )
        return
    try:
        second = parse_struct(LUKS2_SECONDARY_HEADER, data, offset=where, what="luks2.secondary")
    except ImageError:
        problem(
            ProblemKind.INCONSISTENT,
            f"no secondary header (magic SKUL\\xba\\xbe) at {where}",
            "secondary_header",
            hdr_size,
        )
        return
    mismatches = [
        name
        for name, value, expected in (
            ("version", second["version"], 2),
            ("hdr_size", second["hdr_size"], hdr_size),
            ("hdr_offset", second["hdr_offset"], hdr_size),
            ("seqid", second["seqid"], hdr.seqid),
            ("uuid", second["uuid"], hdr.uuid),
        )
        if value != expected
    ]
    if mismatches:
        problem(
            ProblemKind.INCONSISTENT,
            "secondary header disagrees with the primary: " + ", ".join(mismatches),
            "secondary_header",
            hdr_size,
        )


def _luks2_facts(
    reader: ImageReader,
    offset: int,
    hdr_size: int,
    header: dict[str, Any],
    metadata: dict[str, Any] | None,
    problem: Any,
    problems: list[Problem],
) -> LuksHeader:
    json_rel = LUKS2_BINARY_HEADER_SIZE
    slots: list[KeySlot] = []
    tables: list[Table] = []
    cipher_name = cipher_mode = hash_spec = None
    key_bytes: int | None = None
    payload_offset: int | None = None
    data_size: int | None = None
    digest_iterations: int | None = None

    if metadata is not None:
        keyslots = _objects(metadata, "keyslots", problem)
        segments = _objects(metadata, "segments", problem)
        digests = _objects(metadata, "digests", problem)
        config = metadata.get("config")
        if isinstance(config, dict):
            json_size = _u64(config.get("json_size"))
            if json_size is not None and json_size != hdr_size - LUKS2_BINARY_HEADER_SIZE:
                problem(
                    ProblemKind.INCONSISTENT,
                    f"config.json_size {json_size} does not match hdr_size {hdr_size}",
                    "config.json_size",
                    json_rel,
                )
            header["keyslots_size"] = _u64(config.get("keyslots_size"))
            requirements = config.get("requirements")
            if isinstance(requirements, dict) and isinstance(requirements.get("mandatory"), list):
                header["requirements"] = tuple(
                    str(item) for item in requirements["mandatory"][:LUKS2_MAX_OBJECTS]
                )
        else:
            problem(ProblemKind.MALFORMED, "JSON has no config object", "config", json_rel)

        # The first segment (lowest id) is the data segment qemu-like readers map.
        if segments:
            seg_id, segment = segments[0]
            field = f"segments.{seg_id}"
            payload_offset = _u64(segment.get("offset"))
            if payload_offset is None:
                problem(ProblemKind.MALFORMED, "segment offset is missing", field, json_rel)
            else:
                if payload_offset < 2 * hdr_size:
                    problem(
                        ProblemKind.INCONSISTENT,
                        f"segment starts at {payload_offset}, inside the two headers",
                        f"{field}.offset",
                        json_rel,
                    )
                end = offset + payload_offset
                size = segment.get("size")
                if size == "dynamic":
                    data_size = reader.size - end if end <= reader.size else None
                else:
                    data_size = _u64(size)
                    if data_size is None:
                        problem(ProblemKind.MALFORMED, "segment size is invalid", field, json_rel)
                if end > reader.size or (data_size is not None and end + data_size > reader.size):
                    problem(
                        ProblemKind.TRUNCATED,
                        "data segment ends past the end of the file",
                        f"{field}.offset",
                        json_rel,
                    )
            encryption = segment.get("encryption")
            if isinstance(encryption, str):
                cipher_name, _, cipher_mode = encryption.partition("-")
            else:
                problem(ProblemKind.MALFORMED, "segment has no encryption", field, json_rel)
        else:
            problem(ProblemKind.MALFORMED, "JSON has no segments", "segments", json_rel)

        for _, digest in digests:
            if isinstance(digest.get("hash"), str):
                hash_spec = digest["hash"]
                break
        # cryptsetup verifies a candidate volume key against each digest with its PBKDF2.
        for _, digest in digests:
            if digest.get("type") == "pbkdf2":
                count = _int(digest.get("iterations"))
                if count is not None and count > (digest_iterations or 0):
                    digest_iterations = count

        spans: list[tuple[str, int, int]] = []
        for slot_id, slot in keyslots:
            field = f"keyslots.{slot_id}"
            index = int(slot_id) if slot_id.isdigit() and len(slot_id) < 10 else -1
            size_of_key = slot.get("key_size")
            if isinstance(size_of_key, int) and not isinstance(size_of_key, bool):
                if key_bytes is None:
                    key_bytes = size_of_key
            else:
                problem(ProblemKind.MALFORMED, "key_size is missing", field, json_rel)
            kdf = _obj(slot.get("kdf"))
            kdf_type = kdf.get("type") if isinstance(kdf.get("type"), str) else None
            if kdf_type == "pbkdf2":
                iterations = _int(kdf.get("iterations"))
                memory = None
            elif kdf_type in ("argon2i", "argon2id"):
                # Argon2's time cost plays the part of the iteration count; memory is in KiB.
                iterations = _int(kdf.get("time"))
                memory = _int(kdf.get("memory"))
                if memory is None:
                    problem(
                        ProblemKind.MALFORMED, "argon2 memory missing", f"{field}.kdf", json_rel
                    )
            else:
                iterations = memory = None
                problem(
                    ProblemKind.UNSUPPORTED,
                    f"unknown kdf type {kdf_type!r}",
                    f"{field}.kdf",
                    json_rel,
                )
            if kdf_type is not None and iterations is None:
                problem(ProblemKind.MALFORMED, "kdf cost missing", f"{field}.kdf", json_rel)
            af = _obj(slot.get("af"))
            stripes = _int(af.get("stripes"))
            area = _obj(slot.get("area"))
            area_offset = _u64(area.get("offset"))
            area_size = _u64(area.get("size"))
            material_offset = None if area_offset is None else offset + area_offset
            if area_offset is None or area_size is None:
                problem(ProblemKind.MALFORMED, "keyslot area is invalid", f"{field}.area", json_rel)
            else:
                tables.append(
                    Table(f"{field}.area", offset + area_offset, area_size, loaded_at_open=False)
                )
                if area_offset < 2 * hdr_size:
                    problem(
                        ProblemKind.INCONSISTENT,
                        f"keyslot {slot_id} area overlaps the headers",
                        f"{field}.area.offset",
                        json_rel,
                    )
                if payload_offset is not None and area_offset + area_size > payload_offset:
                    problem(
                        ProblemKind.INCONSISTENT,
                        f"keyslot {slot_id} area overlaps the data segment",
                        f"{field}.area.offset",
                        json_rel,
                    )
                if offset + area_offset + area_size > reader.size:
                    problem(
                        ProblemKind.TRUNCATED,
                        f"keyslot {slot_id} area ends past the end of the file",
                        f"{field}.area.offset",
                        json_rel,
                    )
                for other, other_offset, other_size in spans:
                    if (
                        area_offset + area_size > other_offset
                        and other_offset + other_size > area_offset
                    ):
                        problem(
                            ProblemKind.INCONSISTENT,
                            f"keyslots {other} and {slot_id} areas overlap",
                            f"{field}.area.offset",
                            json_rel,
                        )
                spans.append((slot_id, area_offset, area_size))
            slots.append(
                KeySlot(
                    index=index,
                    active=True,  # a LUKS2 keyslot exists only while it is in use
                    iterations=iterations,
                    key_material_offset=material_offset,
                    key_material_length=area_size,
                    stripes=stripes,
                    kdf=kdf_type,
                    memory_kib=memory,
                )
            )
        header["keyslots"] = len(keyslots)
        header["segments"] = len(segments)

    encryption = Encryption(
        method="luks",
        format="luks2",
        cipher_name=cipher_name,
        cipher_mode=cipher_mode,
        hash_spec=hash_spec,
        key_bytes=key_bytes,
        payload_offset=payload_offset,
        key_slots=tuple(slots),
        digest_iterations=digest_iterations,
    )
    return LuksHeader(
        version=2,
        encryption=encryption,
        problems=tuple(problems),
        tables=tuple(tables),
        header=header,
        data_size=data_size,
    )


def _objects(metadata: dict[str, Any], name: str, problem: Any) -> list[tuple[str, dict[str, Any]]]:
    """The `name` object's members that are objects, sorted by numeric id, at most 32."""
    section = metadata.get(name)
    if not isinstance(section, dict):
        problem(ProblemKind.MALFORMED, f"JSON has no {name} object", name, LUKS2_BINARY_HEADER_SIZE)
        return []
    members = [(str(key), value) for key, value in section.items() if isinstance(value, dict)]
    if len(members) != len(section):
        problem(
            ProblemKind.MALFORMED,
            f"{name} has members that are not objects",
            name,
            LUKS2_BINARY_HEADER_SIZE,
        )
    members.sort(key=lambda item: (not item[0].isdigit(), len(item[0]), item[0]))
    if len(members) > LUKS2_MAX_OBJECTS:
        problem(
            ProblemKind.LIMIT,
            f"{len(members)} {name}, over the cap of {LUKS2_MAX_OBJECTS}; the rest are ignored",
            name,
            LUKS2_BINARY_HEADER_SIZE,
        )
        members = members[:LUKS2_MAX_OBJECTS]
    return members


_U64_TEXT = re.compile(r"[0-9]{1,20}")


def _u64(value: object) -> int | None:
    """LUKS2 writes 64-bit numbers as decimal strings (spec section 3.1)."""
    if isinstance(value, str) and _U64_TEXT.fullmatch(value):
        number = int(value)
        return number if number < 1 << 64 else None
    return None


def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    return None


def _c_string(raw: bytes) -> str:
    """A fixed-size char array as C reads it: up to the first NUL."""
    return raw.split(b"\0", 1)[0].decode("ascii", errors="backslashreplace")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


DRIVER = FormatDriver(
    name=NAME,
    probe=probe,
    inspect=inspect,
    recognise=recognise,
    magic=(LUKS_MAGIC,),
    recognise_magic=(LUKS_MAGIC,),
)
