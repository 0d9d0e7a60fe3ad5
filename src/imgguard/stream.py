"""Inspect an image while it streams past: an upload, a download, stdin.

`StreamInspector` is fed the bytes (or wraps a readable stream with `InspectedStream`) and passes
them on unchanged. It keeps the first `head_limit` bytes (8 MiB: every region a format module
reads at an offset from a header field lies there in images qemu-img and the usual tools make:
VHDX metadata and BAT at 2-4 MiB, a qcow2's backing name and LUKS header, a VMDK's embedded
descriptor, the GPT array, the ISO 9660 descriptors at 32 KiB) and a rolling window of the last
`tail_limit` bytes (256 KiB: a VHD footer, a streamOptimized VMDK's footer, a dmg trailer, a
backup GPT and its array), so its memory is bounded whatever the stream's length and chunking.

**Deciding early.** As the head fills, the inspector runs the format modules on a reader whose
length is not known yet: it is "at least the bytes seen so far". A comparison with the length
that this lower bound already settles (`size < 512` once 4 KiB have arrived) gives its answer;
anything else that depends on the length (arithmetic, a message naming it), the tail, or a
region not yet received stops the attempt, which is retried once the stream has reached the
offset it needed. When an attempt gets through a format's inspection, its facts are the facts a
file inspection finds, and the rules that can be decided without the length run on them. If
they reject, the verdict is `reject` at once (`StreamInspector.verdict`; `InspectedStream`
raises `StreamRejected`), so a service can abort an upload after the regions the format needs:
findings only ever get added by the rest of the stream (a VHD footer at the end adds a reading
to `matches`, never removes one), so an early rejection stands. A pass waits for the end.

**At the end** the inspector inspects the head and tail it kept, exactly as `check()` does a
file: the verdict from `finish()` equals `check()` of the same bytes on disk. A region between
the head and the tail window cannot be read from a stream; asking for one gives a verdict of
`error` with finding IG704 instead of a guess.

**gzip.** A stream that starts with gzip's magic is decompressed as it arrives, within caps
(`imgguard.compressed`), into a second inspector for the image inside, which can reject early
too. At the end the container is judged as `check()` judges a gzip file (rules IG802, IG803).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, NoReturn, cast

import attrs

from imgguard import compressed, formats, inspection, rules
from imgguard.backend.errors import ImageRejected
from imgguard.errors import ImageError
from imgguard.formats import FormatDriver
from imgguard.formats._driver import _never
from imgguard.model import ImageInfo, Policy, Severity, Status, Verdict
from imgguard.reader import HEAD_SIZE, ImageReader

LOG = logging.getLogger(__name__)

HEAD_LIMIT = 8 << 20
TAIL_LIMIT = 256 << 10


class StreamRejected(ImageRejected):
    """The stream's image was rejected (early, or at its end). `bytes_seen` is how far it got."""

    def __init__(self, verdict: Verdict, bytes_seen: int) -> None:
        self.bytes_seen = bytes_seen
        super().__init__(verdict)


# --- a reader over what a stream has shown so far ---------------------------------------------


class _NeedMore(Exception):
    """An attempt needs bytes not seen yet: the stream up to offset `until`, or (None) its end."""

    def __init__(self, until: int | None) -> None:
        self.until = until
        super().__init__(until)


class _RegionUnavailable(Exception):
    def __init__(self, offset: int, length: int, size: int, head: int, tail_start: int) -> None:
        self.offset = offset
        self.length = length
        super().__init__(
            f"inspection needs {length} bytes at offset {offset} of a {size}-byte stream; the "
            f"stream inspector keeps bytes 0-{head} and {tail_start}-{size} only"
        )


def _undetermined(*args: object) -> NoReturn:
    raise _NeedMore(None)


class _UnknownLength:
    """The length of a stream that has not ended: at least `low` bytes.

    Comparisons with an integer that `low` already settles give their answer; the rest raise
    `_NeedMore` with the length at which they would be settled. Arithmetic, conversion to int
    and formatting depend on the exact length and raise `_NeedMore(None)` (the end).
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, low: int) -> None:
        self.low = low

    def __repr__(self) -> str:
        return f"<stream length >= {self.low}>"

    @staticmethod
    def _other(other: object) -> int:
        if isinstance(other, bool) or not isinstance(other, int):
            raise _NeedMore(None)
        return other

    def __lt__(self, other: object) -> bool:
        k = self._other(other)
        if self.low >= k:
            return False
        raise _NeedMore(k)

    def __le__(self, other: object) -> bool:
        k = self._other(other)
        if self.low > k:
            return False
        raise _NeedMore(k + 1)

    def __gt__(self, other: object) -> bool:
        k = self._other(other)
        if self.low > k:
            return True
        raise _NeedMore(k + 1)

    def __ge__(self, other: object) -> bool:
        k = self._other(other)
        if self.low >= k:
            return True
        raise _NeedMore(k)

    def __eq__(self, other: object) -> bool:
        k = self._other(other)
        if self.low > k:
            return False
        raise _NeedMore(k + 1)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __bool__(self) -> bool:
        if self.low > 0:
            return True
        raise _NeedMore(1)


for _name in [
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__mul__",
    "__rmul__",
    "__floordiv__",
    "__rfloordiv__",
    "__truediv__",
    "__rtruediv__",
    "__mod__",
    "__rmod__",
    "__divmod__",
    "__rdivmod__",
    "__pow__",
    "__rpow__",
    "__lshift__",
    "__rlshift__",
    "__rshift__",
    "__rrshift__",
    "__and__",
    "__rand__",
    "__or__",
    "__ror__",
    "__xor__",
    "__rxor__",
    "__neg__",
    "__pos__",
    "__abs__",
    "__invert__",
    "__index__",
    "__int__",
    "__float__",
    "__round__",
    "__trunc__",
    "__floor__",
    "__ceil__",
    "__str__",
    "__format__",
    "__bytes__",
]:
    setattr(_UnknownLength, _name, _undetermined)


class _Window:
    """The file object an `ImageReader` reads a stream through: its head, and its tail window.

    Before the end (`size` None) a read past what arrived raises `_NeedMore`; at the end a read
    outside the head and the tail window raises `_RegionUnavailable`.
    """

    def __init__(
        self,
        head: bytearray,
        head_limit: int,
        *,
        seen: int,
        size: int | None = None,
        tail: bytes = b"",
        name: str | None = None,
    ) -> None:
        self._head = head
        self._head_limit = head_limit
        self._seen = seen
        self._size = size
        self._tail = tail
        self._tail_start = (size - len(tail)) if size is not None else seen
        self._position = 0
        self.name = name

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            if self._size is None:
                raise _NeedMore(None)
            offset += self._size
        elif whence == os.SEEK_CUR:
            offset += self._position
        self._position = offset
        return offset

    def read(self, length: int = -1) -> bytes:
        offset = self._position
        if length < 0:
            if self._size is None:
                raise _NeedMore(None)
            length = self._size - offset
        end = offset + length
        self._position = end
        head = self._head
        if end <= len(head):
            return bytes(head[offset:end])
        if self._size is None:
            # More may arrive: wait for it if the head will hold it, else for the end.
            raise _NeedMore(end if end <= self._head_limit else None)
        end = min(end, self._size)
        tail_start = self._tail_start
        if offset >= tail_start:
            return self._tail[offset - tail_start : end - tail_start]
        if offset < len(head) and tail_start <= len(head):
            return bytes(head[offset:]) + self._tail[len(head) - tail_start : end - tail_start]
        raise _RegionUnavailable(offset, length, self._size, len(head), tail_start)


class _StreamReader(ImageReader):
    """An `ImageReader` whose `read_available` does not do arithmetic on an unknown length."""

    def read_available(self, offset: int, length: int, *, field: str) -> bytes:
        size: object = self.size
        if isinstance(size, _UnknownLength) and offset >= 0 and length >= 0:
            if offset + length <= size.low:
                return self.read(offset, length, field=field)
            raise _NeedMore(offset + length)
        return super().read_available(offset, length, field=field)


# --- early decisions --------------------------------------------------------------------------


@attrs.define
class _Early:
    """What an attempt before the end found: the facts and the findings decided so far."""

    info: ImageInfo
    length: _UnknownLength


# Rules that read nothing but `format`, `qemu_format` and `matches` (and the request): they can
# be decided once the format is, before its module has read the rest of the header.
_FORMAT_RULES = ("IG201", "IG202", "IG203")


class _Undecided(Exception):
    """The format is known (`skeleton`), its facts are not yet (`need`)."""

    def __init__(self, skeleton: ImageInfo | None, need: _NeedMore) -> None:
        self.skeleton = skeleton
        self.need = need
        super().__init__(need.until)


def _early_info(reader: ImageReader, length: _UnknownLength) -> ImageInfo:
    """`inspection._inspect` on a stream not yet ended, or `_Undecided`.

    Recognisers that need the tail (a fixed VHD's footer, a dmg trailer) are left pending: they
    only add readings to `matches`, except when qemu's prober falls back to raw, where one of
    them could become the format, and then the attempt waits for the end.
    """
    best: FormatDriver | None = None
    best_score = 0
    recognised: list[FormatDriver] = []
    pending: list[int | None] = []
    for driver in formats.drivers():
        if driver.name == "raw":
            continue
        score = driver.probe(reader)
        if score > best_score:
            best, best_score = driver, score
        if score > 0 and not driver.probe_by_name:
            recognised.append(driver)
        elif driver.recognise is not _never:
            _recognise(driver, reader, recognised, pending)
    for driver in formats.layout_drivers():
        _recognise(driver, reader, recognised, pending)
    qemu_choice = best or formats.by_name("raw")
    if pending and qemu_choice.name == "raw":
        raise _NeedMore(_earliest(pending))
    chosen = inspection._true_format(qemu_choice, recognised)
    matches = inspection._matches(
        chosen, qemu_choice, recognised, inspection._has_boot_signature(reader)
    )
    try:
        info = inspection._inspect_with(chosen, reader)
    except _NeedMore as need:
        skeleton = None
        if chosen in formats.drivers():
            # A qemu format's module names its result after itself (raw layouts and the
            # compressed container report "raw"); `matches` can only grow with the tail.
            skeleton = ImageInfo(format=chosen.name, qemu_format=qemu_choice.name, matches=matches)
        raise _Undecided(skeleton, need) from None
    set_field = object.__setattr__
    set_field(info, "path", reader.name)
    set_field(info, "file_size", length)
    set_field(info, "qemu_format", qemu_choice.name)
    set_field(info, "matches", matches)
    return info


def _recognise(
    driver: FormatDriver,
    reader: ImageReader,
    recognised: list[FormatDriver],
    pending: list[int | None],
) -> None:
    try:
        if driver.recognise(reader):
            recognised.append(driver)
    except _NeedMore as need:
        pending.append(need.until)


def _earliest(untils: Iterable[int | None]) -> int | None:
    known = [until for until in untils if until is not None]
    return min(known) if known else None


def _early_findings(
    info: ImageInfo, request: rules.Request, only: Iterable[str] | None = None
) -> tuple[list[Any], list[Any], int | None, bool]:
    """`rules.evaluate` for the rules that can be decided now: (kept, waived, retry-at, undecided).

    A rule that needs the stream's length raises `_NeedMore` and is skipped; its findings can
    only add to these.
    """
    policy = request.policy
    kept: list[Any] = []
    waived: list[Any] = []
    untils: list[int | None] = []
    specs = rules.RULES.values() if only is None else [rules.RULES[rule_id] for rule_id in only]
    for spec in specs:
        try:
            if spec.needs and not any(getattr(info, name) for name in spec.needs):
                continue
            hits = list(spec.check(info, request))
        except _NeedMore as need:
            untils.append(need.until)
            continue
        for hit in hits:
            default = hit.severity if hit.severity is not None else spec.severity
            severity = policy.severity_overrides.get(spec.id, default)
            finding = rules.make_finding(spec, hit, severity)
            (waived if spec.id in policy.waivers else kept).append(finding)
    kept.sort(key=lambda finding: (-finding.severity, finding.rule))
    return kept, waived, _earliest(untils), bool(untils)


def _rejects(rule_id: str, policy: Policy, severity: Severity | None = None) -> bool:
    """Whether a finding of `rule_id` (at its default severity) rejects under `policy`."""
    if rule_id in policy.waivers:
        return False
    default = severity if severity is not None else rules.RULES[rule_id].severity
    return policy.severity_overrides.get(rule_id, default) >= policy.fail_on


# --- the inspector ----------------------------------------------------------------------------


class StreamInspector:
    """Judge an image from its bytes in order, in bounded memory; see the module docstring.

    `feed(data)` as the bytes arrive, `finish()` at the end. `verdict` is None until the
    verdict is known: a rejection as soon as it is certain, anything else at `finish()`.
    `expected_format` is the format the uploader declared (Glance's `disk_format`),
    `allowed_formats` overrides the policy's list; `target_size` (GiB) and `convert_to` are as
    for `check()`.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        expected_format: str | None = None,
        allowed_formats: Iterable[str] | None = None,
        target_size: int | None = None,
        convert_to: str | None = None,
        name: str | None = None,
        head_limit: int = HEAD_LIMIT,
        tail_limit: int = TAIL_LIMIT,
        containers: bool = True,
        max_decompressed: int | None = None,
        max_ratio: float = compressed.MAX_RATIO,
    ) -> None:
        from imgguard.policy import DEFAULT_POLICY

        policy = policy if policy is not None else DEFAULT_POLICY
        if allowed_formats is not None:
            policy = attrs.evolve(policy, allowed_formats=frozenset(allowed_formats))
        if head_limit < HEAD_SIZE or tail_limit < 2048:
            raise ValueError("head_limit must be at least 4 KiB and tail_limit at least 2 KiB")
        self.policy = policy
        self.request = rules.Request(policy, expected_format, target_size, convert_to)
        self.name = name
        self.head_limit = head_limit
        self.tail_limit = tail_limit
        self.bytes_seen = 0
        self.attempts = 0
        self.verdict: Verdict | None = None
        self.early = False
        self._head = bytearray()
        self._tail = bytearray()
        self._next_attempt: int | None = HEAD_SIZE + 1
        self._early: _Early | None = None
        self._finished = False
        self._containers = containers
        self._max_decompressed = (
            max_decompressed
            if max_decompressed is not None
            else policy.max_virtual_size + policy.max_metadata_bytes + (1 << 30)
        )
        self._max_ratio = max_ratio
        self._container_checked = False
        self._gzip: compressed.GzipDecompressor | None = None
        self._inner: StreamInspector | None = None
        self._gzip_failure: compressed.DecompressionFailed | None = None

    @property
    def memory_budget(self) -> int:
        """The most this inspector (and the one for a gzip container's image) keeps, in bytes."""
        own = self.head_limit + 2 * self.tail_limit
        if self._containers:
            own += self.head_limit + 2 * self.tail_limit + 2 * compressed.CHUNK + (64 << 10)
        return own

    @property
    def rejected(self) -> bool:
        return self.verdict is not None and self.verdict.status is not Status.PASS

    @property
    def decided(self) -> bool:
        return self.verdict is not None

    def feed(self, data: bytes | bytearray | memoryview) -> Verdict | None:
        """Take the next bytes of the stream; the verdict once known (see `verdict`)."""
        if self._finished:
            raise ValueError("feed() after finish()")
        if isinstance(data, memoryview) and data.format != "B":
            data = data.cast("B")
        size = len(data)
        if not size:
            return self.verdict
        if size > 65536 and not isinstance(data, memoryview):
            data = memoryview(data)  # slices of a big chunk without copying it
        head = self._head
        room = self.head_limit - len(head)
        if room > 0:
            head += data[:room] if size > room else data
        tail = self._tail
        tail_limit = self.tail_limit
        tail += data[-tail_limit:] if size > tail_limit else data
        if len(tail) > 2 * tail_limit:
            del tail[:-tail_limit]
        self.bytes_seen += size
        if self._containers:
            self._feed_container(data, size)
        attempt_at = self._next_attempt
        if self.verdict is None and attempt_at is not None and self.bytes_seen >= attempt_at:
            self._attempt()
        return self.verdict

    def finish(self) -> Verdict:
        """The stream ended: the verdict, equal to `check()` of the same bytes as a file."""
        if self._finished:
            assert self.verdict is not None
            return self.verdict
        self._finished = True
        if self._containers and not self._container_checked and self.bytes_seen:
            self._feed_container(b"", 0, ending=True)
        verdict = self._final()
        if self.verdict is None or self.verdict.status is Status.PASS:
            self.verdict = verdict
        else:
            # An early rejection stands; the full findings replace the ones known then.
            self.verdict = verdict if verdict.status is not Status.PASS else self.verdict
        self.early = False
        return self.verdict

    def final_info(self) -> ImageInfo | None:
        """The facts of the full verdict (after `finish()`)."""
        return self.verdict.info if self._finished and self.verdict else None

    # --- attempts before the end ---------------------------------------------------------------

    def _reader(self, size: int | _UnknownLength, tail: bytes = b"") -> ImageReader:
        window = _Window(
            self._head,
            self.head_limit,
            seen=self.bytes_seen,
            size=size if isinstance(size, int) else None,
            tail=tail,
            name=self.name,
        )
        if isinstance(size, int):
            return ImageReader(cast(BinaryIO, window), size=size, name=self.name)
        return _StreamReader(cast(BinaryIO, window), size=cast(int, size), name=self.name)

    def _attempt(self) -> None:
        self.attempts += 1
        try:
            if self._early is None:
                length = _UnknownLength(self.bytes_seen)
                try:
                    info = _early_info(self._reader(length), length)
                except _Undecided as undecided:
                    self._judge_skeleton(undecided.skeleton)
                    raise undecided.need from None
                self._early = _Early(info, length)
            early = self._early
            early.length.low = self.bytes_seen
            kept, waived, until, _ = _early_findings(early.info, self.request)
        except _NeedMore as need:
            self._retry_at(need.until)
            return
        except Exception:
            LOG.debug("stream attempt failed before the end", exc_info=True)
            self._next_attempt = None
            return
        if any(finding.severity >= self.policy.fail_on for finding in kept):
            self._reject_early(early.info, kept, waived)
            return
        self._retry_at(until)
        if self.verdict is not None:
            self._next_attempt = None

    def _judge_skeleton(self, skeleton: ImageInfo | None) -> None:
        """Reject on the format alone (not allowed, not what was declared, a polyglot)."""
        if skeleton is None or self.verdict is not None:
            return
        kept, waived, _, _ = _early_findings(skeleton, self.request, only=_FORMAT_RULES)
        if any(finding.severity >= self.policy.fail_on for finding in kept):
            self._reject_early(skeleton, kept, waived)

    def _retry_at(self, until: int | None) -> None:
        if until is not None and until <= self.bytes_seen:
            LOG.debug("stream attempt asked again for %d bytes already seen", until)
            until = None
        self._next_attempt = until

    def _reject_early(self, info: ImageInfo, kept: list[Any], waived: list[Any]) -> None:
        seen = self.bytes_seen
        changes: dict[str, Any] = {
            field.name: None
            for field in attrs.fields(ImageInfo)
            if isinstance(getattr(info, field.name), _UnknownLength)
        }
        header = {
            key: value
            for key, value in info.header.items()
            if not isinstance(value, _UnknownLength)
        }
        changes.update(
            file_size=seen, header={**header, "stream_bytes_seen": seen, "stream_ended": False}
        )
        concrete = attrs.evolve(info, **changes)
        self.verdict = Verdict(
            Status.REJECT, concrete, tuple(kept), tuple(waived), self.policy.fail_on, self.name
        )
        self.early = True
        self._next_attempt = None

    # --- gzip --------------------------------------------------------------------------------

    def _feed_container(
        self, chunk: bytes | bytearray | memoryview, new: int, *, ending: bool = False
    ) -> None:
        """Decompress a gzip stream into the inner inspector; `chunk` holds the `new` bytes."""
        if not self._container_checked:
            if self.bytes_seen < 16 and not ending:
                return
            self._container_checked = True
            if compressed.container_of(bytes(self._head[:16])) != "gzip":
                self._containers = False
                return
            self._start_gzip()
            # Everything before this chunk is in the head (it is shorter than 16 bytes).
            data = bytes(self._head[: self.bytes_seen - new]) + bytes(chunk)
        elif self._gzip is None or self._gzip_failure is not None:
            return
        else:
            data = bytes(chunk)
        if self._gzip is None:
            return
        assert self._inner is not None
        try:
            for piece in self._gzip.feed(data):
                self._inner.feed(piece)
        except compressed.DecompressionFailed as failure:
            self._gzip_failure = failure
            if self.verdict is None and _rejects("IG803", self.policy) and self._polyglot_rejects():
                self._reject_container_early([], failure)
            return
        inner = self._inner.verdict
        rejected = inner is not None and inner.status is not Status.PASS
        if self.verdict is None and rejected and self._polyglot_rejects():
            assert inner is not None
            self._reject_container_early(list(inner.findings), None, inner.info)

    def _start_gzip(self) -> None:
        self._gzip = compressed.GzipDecompressor(
            max_output=self._max_decompressed, max_ratio=self._max_ratio
        )
        self._inner = StreamInspector(
            self.policy,
            expected_format=self.request.claimed_format,
            target_size=self.request.target_size_gib,
            convert_to=self.request.convert_to,
            name=self.name,
            head_limit=self.head_limit,
            tail_limit=self.tail_limit,
            containers=False,
        )
        # The container itself: rejected at once when the policy refuses compressed images.
        if self._polyglot_rejects():
            outer = ImageInfo(format="raw", variant="compressed", header={"container": "gzip"})
            outer = attrs.evolve(outer, header={**outer.header, "container_inspected": True})
            kept, _, _, _ = _early_findings(outer, self.request, only=("IG802",))
            if any(finding.severity >= self.policy.fail_on for finding in kept):
                self._reject_container_early(kept, None)

    def _polyglot_rejects(self) -> bool:
        """A stream starting with gzip's magic is the gzip container, or (when a footer at its
        end makes it a fixed VHD or a dmg too) a polyglot: an early rejection from the container
        stands only if IG201 would reject the polyglot."""
        return _rejects("IG201", self.policy)

    def _reject_container_early(
        self,
        findings: list[Any],
        failure: compressed.DecompressionFailed | None,
        inner_info: ImageInfo | None = None,
    ) -> None:
        header: dict[str, Any] = {
            "container": "gzip",
            "stream_bytes_seen": self.bytes_seen,
            "stream_ended": False,
        }
        if failure is not None:
            header["decompression_failed"] = str(failure)
            info = ImageInfo(format="raw", variant="compressed", header=header)
            kept, _, _, _ = _early_findings(info, self.request, only=("IG803",))
            findings = findings + kept
        elif inner_info is not None:
            info = attrs.evolve(inner_info, header={**inner_info.header, **header})
        else:
            info = ImageInfo(format="raw", variant="compressed", header=header)
        self.verdict = Verdict(
            Status.REJECT, info, tuple(findings), (), self.policy.fail_on, self.name
        )
        self.early = True

    # --- the end -----------------------------------------------------------------------------

    def _final(self) -> Verdict:
        from imgguard.policy import check

        size = self.bytes_seen
        reader = self._reader(size, bytes(self._tail[-self.tail_limit :]))
        request = self.request
        try:
            info = inspection.inspect_reader(reader)
        except _RegionUnavailable as error:
            return self._error("IG704", str(error), error.offset)
        except ImageError as error:
            return self._error("IG702", str(error), error.offset)
        if info.header.get("container") == "gzip" and self._gzip is not None:
            return self._final_container(info)
        return check(
            info,
            request.policy,
            request.claimed_format,
            request.target_size_gib,
            convert_to=request.convert_to,
        )

    def _error(self, rule_id: str, message: str, offset: int | None) -> Verdict:
        spec = rules.RULES[rule_id]
        severity = self.policy.severity_overrides.get(rule_id, spec.severity)
        finding = rules.make_finding(spec, rules.Hit(message, None, offset), severity)
        return Verdict(Status.ERROR, None, (finding,), (), self.policy.fail_on, self.name)

    def _final_container(self, outer: ImageInfo) -> Verdict:
        from imgguard.policy import check

        assert self._gzip is not None and self._inner is not None
        failure = self._gzip_failure
        if failure is None:
            try:
                self._gzip.finish()
            except compressed.DecompressionFailed as error:
                failure = error
        request = self.request
        header: dict[str, Any] = {
            **outer.header,
            "container_inspected": True,
            "decompressed_size": self._gzip.output_bytes,
        }
        inner: Verdict | None = None
        if failure is None:
            inner = self._inner.finish()
            if inner.info is None:
                # The image inside could not be inspected from the stream (IG704, IG702).
                return attrs.evolve(inner, path=outer.path)
            inner_info = inner.info
            inner_container = inner_info.header.get("container")
            if inner_container:
                header["inner_container"] = inner_container
            info = attrs.evolve(inner_info, path=outer.path, header={**inner_info.header, **header})
        else:
            header["decompression_failed"] = str(failure)
            header["decompression_failure"] = failure.kind
            info = attrs.evolve(outer, header=header)
        verdict = check(
            info,
            request.policy,
            request.claimed_format,
            request.target_size_gib,
            convert_to=request.convert_to,
        )
        if failure is not None and verdict.status is Status.PASS:
            # The image inside was not judged: never a pass, whatever is waived.
            verdict = attrs.evolve(verdict, status=Status.ERROR)
        return verdict

    # --- convenience -------------------------------------------------------------------------

    def wrap(self, source: BinaryIO, *, raise_on_reject: bool = True) -> InspectedStream:
        return InspectedStream(source, self, raise_on_reject=raise_on_reject)


class InspectedStream:
    """A readable stream that passes `source`'s bytes through unchanged, feeding `inspector`.

    With `raise_on_reject` (the default), `read` raises `StreamRejected` as soon as the image
    is rejected (before handing on the bytes that decided it) and at the end of the stream when
    the final verdict is not a pass, so a store reading from it aborts the upload. `observers`
    get every chunk too (a signature verifier's `update`).
    """

    def __init__(
        self,
        source: BinaryIO,
        inspector: StreamInspector,
        *,
        raise_on_reject: bool = True,
        observers: Iterable[Callable[[bytes], object]] = (),
    ) -> None:
        self.source = source
        self.inspector = inspector
        self.raise_on_reject = raise_on_reject
        self.observers = tuple(observers)
        self.bytes_read = 0
        self.ended = False

    def read(self, size: int = -1) -> bytes:
        if self.ended:
            return b""
        data = self.source.read(size if size is not None else -1)
        if not data:
            self.ended = True
            final = self.inspector.finish()
            if self.raise_on_reject and not final.ok:
                raise StreamRejected(final, self.inspector.bytes_seen)
            return b""
        data = bytes(data)
        self.bytes_read += len(data)
        verdict = self.inspector.feed(data)
        if self.raise_on_reject and verdict is not None and not verdict.ok:
            raise StreamRejected(verdict, self.inspector.bytes_seen)
        for observer in self.observers:
            observer(data)
        if size is None or size < 0:
            # read() to the end: the source has nothing more; judge now.
            self.ended = True
            verdict = self.inspector.finish()
            if self.raise_on_reject and not verdict.ok:
                raise StreamRejected(verdict, self.inspector.bytes_seen)
        return data

    def readable(self) -> bool:
        return True

    def __iter__(self) -> Iterator[bytes]:
        while data := self.read(1 << 20):
            yield data

    def close(self) -> None:
        self.source.close()


def inspect_stream(
    source: BinaryIO | Iterable[bytes],
    policy: Policy | None = None,
    *,
    chunk_size: int = 1 << 20,
    stop_on_reject: bool = True,
    **options: Any,
) -> Verdict:
    """Judge a whole stream (a file object or an iterable of chunks); stops reading at an early
    rejection unless `stop_on_reject` is false. `options` go to `StreamInspector`."""
    inspector = StreamInspector(policy, **options)
    chunks: Iterable[bytes]
    if hasattr(source, "read"):
        reader = cast(BinaryIO, source)
        chunks = iter(lambda: reader.read(chunk_size), b"")
    else:
        chunks = source
    for chunk in chunks:
        verdict = inspector.feed(chunk)
        if stop_on_reject and verdict is not None and not verdict.ok:
            return verdict
    return inspector.finish()


def check_container(
    image: str | os.PathLike[str] | BinaryIO,
    policy: Policy,
    claimed_format: str | None = None,
    target_size: int | None = None,
    *,
    convert_to: str | None = None,
) -> Verdict:
    """`check()` of a gzip container: the image inside, streamed through `StreamInspector`."""
    from imgguard.reader import open_regular

    options: dict[str, Any] = {
        "expected_format": claimed_format,
        "target_size": target_size,
        "convert_to": convert_to,
    }
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        fd, _ = open_regular(name)
        with os.fdopen(fd, "rb") as file:
            return inspect_stream(file, policy, stop_on_reject=False, name=name, **options)
    image.seek(0)
    label = getattr(image, "name", None)
    return inspect_stream(
        image,
        policy,
        stop_on_reject=False,
        name=label if isinstance(label, str) else None,
        **options,
    )


__all__ = [
    "HEAD_LIMIT",
    "TAIL_LIMIT",
    "InspectedStream",
    "StreamInspector",
    "StreamRejected",
    "check_container",
    "inspect_stream",
]
