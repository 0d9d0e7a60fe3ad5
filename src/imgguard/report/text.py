"""The text report: one line per image, readable in a terminal, and a summary line."""

from __future__ import annotations

from collections.abc import Sequence

from imgguard.model import Verdict
from imgguard.report._run import Run, counts

HEADER = ("PATH", "FORMAT", "VIRTUAL SIZE", "VERDICT", "TOP FINDING")


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control characters (newlines, ESC sequences, ...)
    and bytes that were not UTF-8 become backslash escapes.

    Paths come from the scanned tree and names, createTypes and creator strings from the image
    itself: printed raw, a name holding "\\x1b[2J" or a newline could clear the operator's screen
    or forge a report line ("... PASS").
    """
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode() could not decode
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def top_finding(verdict: Verdict) -> str:
    """The worst finding (the first of the worst, as `rules.evaluate` sorts them) and how many
    more there are."""
    worst = verdict.worst
    if worst is None:
        return ""
    text = f"{worst.rule} {worst.severity}: {worst.message}"
    more = len(verdict.findings) - 1
    return f"{text} (+{more} more)" if more else text


def _row(verdict: Verdict) -> tuple[str, str, str, str, str]:
    info = verdict.info
    kind = "-"
    if info is not None:
        kind = f"{info.format}/{info.variant}" if info.variant else info.format
    return (
        printable(verdict.path or "-"),
        printable(kind),
        human_size(info.virtual_size if info else None),
        str(verdict.status).upper(),
        printable(top_finding(verdict)),
    )


def summary_line(verdicts: Sequence[Verdict], run: Run | None = None) -> str:
    summary = counts([str(verdict.status) for verdict in verdicts])
    line = (
        f"{summary['scanned']} scanned: {summary['pass']} pass, {summary['reject']} reject, "
        f"{summary['error']} error"
    )
    if run is not None and run.interrupted:
        planned = run.planned if run.planned is not None else summary["scanned"]
        line += f" (interrupted after {summary['scanned']} of {planned})"
    return line


def render(verdicts: Sequence[Verdict], run: Run | None = None) -> str:
    rows = [HEADER, *(_row(verdict) for verdict in verdicts)]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    lines.append("")
    lines.append(summary_line(verdicts, run))
    return "\n".join(lines) + "\n"
