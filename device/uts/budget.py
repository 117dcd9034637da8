"""UTS stage 1 gate: send the most uncertain samples, as many as the uplink budget of a period allows.

Instead of a fixed threshold (CD-CCA uses confidence < 0.5) the gate keeps a window of recent scores and
sets the threshold at the score quantile that would spend the period's remaining budget over the arrivals
it still expects (an EMA of arrivals per period). A hard cap guarantees the budget (samples or bytes per
period) is never exceeded; an optional floor keeps confident samples home even when budget is left.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import numpy as np
from pydantic import Field

from common.config import StrictConfig


class GateConfig(StrictConfig):
    """Budget of one uplink period."""

    unit: Literal["samples", "bytes"] = "samples"
    budget: float = Field(32, gt=0)
    expected_arrivals: int = Field(256, ge=1, description="first guess of samples per period")
    window: int = Field(512, ge=8)
    min_score: float | None = None
    ema: float = Field(0.5, gt=0, le=1)


class BudgetGate:
    """Stateful per-device gate; call ``start_period`` at every period boundary."""

    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()
        self._scores: deque[float] = deque(maxlen=self.config.window)
        self._expected = float(self.config.expected_arrivals)
        self._mean_cost = 1.0
        self._costs: deque[float] = deque(maxlen=self.config.window)
        self.arrivals = 0
        self.spent = 0.0
        self.accepted = 0

    def start_period(self) -> None:
        """Close the current period (updating the arrivals estimate) and open a new one."""
        if self.arrivals:
            a = self.config.ema
            self._expected = (1 - a) * self._expected + a * self.arrivals
        self.arrivals = 0
        self.spent = 0.0
        self.accepted = 0

    @property
    def mean_cost(self) -> float:
        """Mean byte cost of recent samples (the estimate a rejected, unencoded sample is charged with)."""
        return self._mean_cost

    @property
    def remaining(self) -> float:
        """Budget left in this period (samples or bytes)."""
        return self.config.budget - self.spent

    def threshold(self) -> float:
        """The score a sample needs now to be sent (before the hard cap)."""
        floor = self.config.min_score if self.config.min_score is not None else -np.inf
        if not self._scores:
            return float(floor)
        still_expected = max(1.0, self._expected - self.arrivals)
        unit_cost = 1.0 if self.config.unit == "samples" else self._mean_cost
        rate = min(1.0, max(0.0, self.remaining) / (still_expected * unit_cost))
        if rate >= 1.0:
            return float(floor)
        q = float(np.quantile(np.fromiter(self._scores, float), 1.0 - rate))
        return max(q, float(floor))

    def decide(self, score: float, cost_bytes: float = 1.0) -> bool:
        """Record one arrival; True if it should be sent (and charge it to the budget)."""
        if not np.isfinite(score):
            raise ValueError("uncertainty score must be finite")
        threshold = self.threshold()
        self._scores.append(float(score))
        self._costs.append(float(cost_bytes))
        self._mean_cost = float(np.mean(self._costs))
        self.arrivals += 1
        cost = 1.0 if self.config.unit == "samples" else float(cost_bytes)
        if score < threshold or self.spent + cost > self.config.budget:
            return False
        self.spent += cost
        self.accepted += 1
        return True
