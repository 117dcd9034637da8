"""Label-free regression guard: after a swap, compare the next K answers' confidence with the K before.

No labels exist on a device; a model an update damaged answers less confidently (top-1 probability falls,
entropy rises). If the mean after the swap is worse than the mean before by more than ``margin``, roll back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GuardDecision:
    """The verdict once K answers after a swap were seen."""

    rollback: bool
    reason: str
    before: float
    after: float


class RegressionGuard:
    """Feed it every answer's confidence and entropy; arm it at each swap."""

    def __init__(self, window: int = 32, margin: float = 0.1, metric: Literal["confidence", "entropy"] = "confidence"):
        self.window = int(window)
        self.margin = float(margin)
        self.metric = metric
        self._recent: deque[float] = deque(maxlen=self.window)
        self._baseline: list[float] | None = None
        self._after: list[float] = []
        self.armed_version: str | None = None

    @property
    def armed(self) -> bool:
        return self._baseline is not None

    def _value(self, confidence: float, entropy: float) -> float:
        # Higher is better for both: confidence as is, entropy negated.
        return confidence if self.metric == "confidence" else -entropy

    def observe(self, confidences: list[float], entropies: list[float]) -> None:
        """Record answers (in order)."""
        for c, e in zip(confidences, entropies, strict=True):
            v = self._value(c, e)
            if self._baseline is not None and len(self._after) < self.window:
                self._after.append(v)
            else:
                self._recent.append(v)

    def arm(self, version: str) -> bool:
        """A new version was swapped in: the last K answers become the baseline. False when fewer than K
        answers were seen since the previous swap (nothing to compare with; the swap is kept)."""
        if len(self._recent) < self.window:
            self._baseline = None
            self.armed_version = None
            return False
        self._baseline = list(self._recent)
        self._after = []
        self.armed_version = version
        return True

    def disarm(self) -> None:
        self._baseline = None
        self._after = []
        self.armed_version = None
        self._recent.clear()

    def decision(self) -> GuardDecision | None:
        """None until K answers after the swap were seen; then the verdict (the guard disarms itself)."""
        if self._baseline is None or len(self._after) < self.window:
            return None
        before = sum(self._baseline) / len(self._baseline)
        after = sum(self._after) / len(self._after)
        name = "mean confidence" if self.metric == "confidence" else "mean negative entropy"
        rollback = before - after > self.margin
        reason = (
            f"{name} fell from {before:.3f} to {after:.3f} over {self.window} answers (margin {self.margin:g})"
            if rollback
            else f"{name} {before:.3f} -> {after:.3f} within margin {self.margin:g}"
        )
        self._recent.clear()
        self._recent.extend(self._after)
        self._baseline, self._after, self.armed_version = None, [], None
        return GuardDecision(rollback, reason, before, after)
