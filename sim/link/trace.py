"""Link conditions over time from a CSV file: one row per change, held until the next row.

Header ``t_s`` plus any of ``up_mbps, down_mbps, latency_ms, jitter_ms, loss``; a missing column or an empty
cell keeps the link's configured value at that time, ``inf`` means unlimited bandwidth. ``t_s`` starts at 0
and increases strictly. Example::

    t_s,up_mbps,down_mbps,latency_ms,loss
    0,5,20,40,0
    30,0.256,1,150,0.02
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import ConfigError

COLUMNS = ("t_s", "up_mbps", "down_mbps", "latency_ms", "jitter_ms", "loss")


@dataclass(frozen=True)
class LinkState:
    """What the link does at one moment; ``None`` bandwidth is unlimited."""

    up_mbps: float | None
    down_mbps: float | None
    latency_ms: float
    jitter_ms: float
    loss: float


@dataclass(frozen=True)
class TraceRow:
    """One row: the time it starts and the values it sets (``None``: keep the configured value)."""

    t_s: float
    values: dict[str, float | None]


def _number(path: Path, line: int, column: str, cell: str) -> float | None:
    """A cell as a float (``inf`` bandwidth is ``None``), checked against the column's range."""
    try:
        value = float(cell)
    except ValueError:
        raise ConfigError(f"{path}:{line}: {column} must be a number, got {cell!r}") from None
    if math.isnan(value):
        raise ConfigError(f"{path}:{line}: {column} must be a number, got {cell!r}")
    if column.endswith("_mbps"):
        if value <= 0:
            raise ConfigError(f"{path}:{line}: {column} must be > 0 (or inf for unlimited), got {cell}")
        return None if math.isinf(value) else value
    if column == "loss" and not 0 <= value < 1:
        raise ConfigError(f"{path}:{line}: loss must be in [0, 1), got {cell}")
    if value < 0 or math.isinf(value):
        raise ConfigError(f"{path}:{line}: {column} must be a finite number >= 0, got {cell}")
    return value


class LinkTrace:
    """A parsed trace; ``state(t, base)`` gives the conditions at ``t`` seconds."""

    def __init__(self, rows: list[TraceRow], loop: bool = False) -> None:
        if not rows:
            raise ConfigError("a link trace needs at least one row")
        self.rows = rows
        self.loop = loop
        self._times = [r.t_s for r in rows]

    @property
    def duration_s(self) -> float:
        """Time of the last row (the length of one loop)."""
        return self._times[-1]

    @classmethod
    def load(cls, path: str | Path, loop: bool = False) -> LinkTrace:
        """Parse a CSV trace; ConfigError names the file, the line and the problem."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"link trace not found: {p}")
        with p.open(newline="") as fh:
            reader = csv.reader(line for line in fh if not line.lstrip().startswith("#"))
            header = [h.strip() for h in next(reader, [])]
            if "t_s" not in header:
                raise ConfigError(f"{p}: the header must name a t_s column; columns: {', '.join(COLUMNS)}")
            unknown = [h for h in header if h not in COLUMNS]
            if unknown:
                raise ConfigError(f"{p}: unknown column {unknown[0]!r}; known: {', '.join(COLUMNS)}")
            rows = [
                cls._row(p, n + 2, header, cells) for n, cells in enumerate(reader) if any(c.strip() for c in cells)
            ]
        if not rows:
            raise ConfigError(f"{p}: the trace has no rows")
        if rows[0].t_s != 0:
            raise ConfigError(f"{p}: the first row must start at t_s 0, got {rows[0].t_s:g}")
        for a, b in zip(rows, rows[1:]):
            if b.t_s <= a.t_s:
                raise ConfigError(f"{p}: t_s must increase, {b.t_s:g} follows {a.t_s:g}")
        return cls(rows, loop)

    @staticmethod
    def _row(path: Path, line: int, header: list[str], cells: list[str]) -> TraceRow:
        if len(cells) != len(header):
            raise ConfigError(f"{path}:{line}: {len(cells)} cells for {len(header)} columns")
        values: dict[str, float | None] = {}
        t = 0.0
        for column, cell in zip(header, (c.strip() for c in cells)):
            if column == "t_s":
                if not cell:
                    raise ConfigError(f"{path}:{line}: t_s is empty")
                t = _number(path, line, column, cell) or 0.0
            elif cell:
                values[column] = _number(path, line, column, cell)
        return TraceRow(t, values)

    def state(self, t_s: float, base: LinkState) -> LinkState:
        """Conditions at ``t_s``: the base with the last started row's values on top."""
        if self.loop and self.duration_s > 0:
            t_s = t_s % self.duration_s
        row = self.rows[max(0, bisect.bisect_right(self._times, t_s) - 1)]
        return replace(base, **row.values)
