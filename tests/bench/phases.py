"""The per-phase breakdown of one start or update, from the shim's timing lines
(hostshim/timing.py): read from a shim's log file, or recorded in this process."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LINE = re.compile(r"tenant (?P<tenant>\S+): phase (?P<phase>.+) took (?P<ms>[0-9.]+) ms")
TOTAL = "apply (total)"

Phases = list[tuple[str, float]]  # (phase, ms), in the order they ended


def parse(lines: list[str], tenant: str) -> Phases:
    found = []
    for line in lines:
        if (m := _LINE.search(line)) and m["tenant"] == tenant:
            found.append((m["phase"], float(m["ms"])))
    return found


def last_apply(phases: Phases) -> Phases:
    """The phases of the last apply that did work (the slowest of those since the previous
    breakdown was taken: no-op PUTs of a poll end quickly)."""
    runs: list[Phases] = [[]]
    for phase, ms in phases:
        runs[-1].append((phase, ms))
        if phase == TOTAL:
            runs.append([])
    done = [r for r in runs if r and r[-1][0] == TOTAL]
    return max(done, key=lambda r: r[-1][1]) if done else []


class LogTail:
    """The lines a log file gained since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[str]:
        with self.path.open(errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        return text.splitlines()


class Recorder(logging.Handler):
    """Timing lines of a shim running in this process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


@contextmanager
def recording() -> Iterator[Recorder]:
    logger = logging.getLogger("bitbuilder.hostshim.timing")
    recorder, level = Recorder(), logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)


def table(title: str, phases: Phases, total_ms: float | None = None) -> str:
    """One row per phase, with its share of `total_ms` (the apply's own total if not given)."""
    own = dict(phases).get(TOTAL)
    total = total_ms if total_ms is not None else own
    rows = [title]
    shown = 0.0
    for phase, ms in phases:
        if phase == TOTAL:
            continue
        shown += ms
        share = f"{ms / total * 100:5.1f}%" if total else ""
        rows.append(f"  {phase:<36} {ms:8.1f} ms {share}")
    if own is not None:
        rows.append(f"  {'(shim, other: state, checks)':<36} {own - shown:8.1f} ms")
        rows.append(f"  {'= shim apply':<36} {own:8.1f} ms")
    if total_ms is not None and own is not None:
        rows.append(f"  {'driver (notice, PUT, status write)':<36} {total_ms - own:8.1f} ms")
        rows.append(f"  {'= commit pushed -> Running seen':<36} {total_ms:8.1f} ms")
    return "\n".join(rows)
