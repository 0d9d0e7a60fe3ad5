"""What every report format is told about the scan besides its verdicts."""

from __future__ import annotations

from attrs import frozen


@frozen
class Run:
    """How the scan that produced the verdicts went.

    `planned` is how many images the scan set out to judge (more than there are verdicts when it
    was interrupted); `working_directory` is what relative paths in the report are relative to.
    """

    exit_code: int = 0
    planned: int | None = None
    interrupted: bool = False
    working_directory: str | None = None


def counts(statuses: list[str]) -> dict[str, int]:
    """`scanned` and the number of each verdict, as the JSON contract's `summary` has them."""
    summary = {"scanned": len(statuses)}
    for status in ("pass", "reject", "error"):
        summary[status] = statuses.count(status)
    return summary
