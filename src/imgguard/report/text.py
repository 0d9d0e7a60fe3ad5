"""The text report: one line per image, readable in a terminal, and a summary line."""

from __future__ import annotations

from collections.abc import Sequence

from imgguard.model import Verdict


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _row(verdict: Verdict) -> list[str]:
    info = verdict.info
    kind = "-"
    if info is not None:
        kind = f"{info.format}/{info.variant}" if info.variant else info.format
    worst = verdict.worst
    finding = f"{worst.rule} {worst.message}" if worst else ""
    return [
        verdict.path or "-",
        kind,
        human_size(info.virtual_size if info else None),
        str(verdict.status).upper(),
        finding,
    ]


def render(verdicts: Sequence[Verdict]) -> str:
    header = ["PATH", "FORMAT", "VIRTUAL SIZE", "VERDICT", "TOP FINDING"]
    rows = [_row(verdict) for verdict in verdicts]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(4)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    counts = {status: 0 for status in ("pass", "reject", "error")}
    for verdict in verdicts:
        counts[str(verdict.status)] += 1
    lines.append("")
    lines.append(
        f"{len(verdicts)} scanned: {counts['pass']} pass, {counts['reject']} reject, "
        f"{counts['error']} error"
    )
    return "\n".join(lines) + "\n"
