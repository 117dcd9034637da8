"""Domain shifts: parameterised, composable image transforms, each with a severity in [0, 1].

A domain is an ordered list of shifts written ``name[:severity]`` joined by ``+``, e.g. ``night``,
``fog:0.5+noise:0.3``; ``clear`` is the empty list. Severity 1.0 is the benchmark strength.
Render-time shifts (``palette``, ``background``) change how the scene is drawn; the others act on pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError

PixelShift = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return image
    radius = max(1, int(np.ceil(2.5 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma * sigma)).astype(np.float32)
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    out = sum(w * padded[radius + o : radius + o + image.shape[0]] for o, w in zip(offsets, kernel))
    padded = np.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[:, radius + o : radius + o + image.shape[1]] for o, w in zip(offsets, kernel))


def _dusk(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    tint = np.array([1.0, 0.82, 0.62], dtype=np.float32) ** s
    return image * (1.0 - 0.55 * s) * tint


def _night(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    # Benchmark night (s=1) keeps 40% of the light, tinted blue, with sensor noise: dark enough that models
    # trained on daylight fail, not so dark that the scene is lost (at 20% of the light even a model trained on
    # night images could no longer read the shapes through this zoo's frozen vision tower).
    tint = np.array([0.765, 0.862, 1.111], dtype=np.float32) ** s
    dark = image * (1.0 - 0.60 * s) * tint
    return dark + (0.01875 * s) * rng.standard_normal(image.shape, dtype=np.float32)


def _cast(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    cast = np.array([0.15, 0.85, 0.70], dtype=np.float32)
    return image * (1.0 - 0.45 * s) + 0.45 * s * cast


def _fog(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    foggy = image * (1.0 - 0.6 * s) + 0.6 * s * 0.78
    return _gaussian_blur(foggy, 1.4 * s)


def _blur(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return _gaussian_blur(image, 2.0 * s)


def _noise(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image + (0.20 * s) * rng.standard_normal(image.shape, dtype=np.float32)
    salt = rng.random(image.shape[:2]) < 0.03 * s
    noisy[salt] = rng.random((int(salt.sum()), 1)).astype(np.float32)
    return noisy


PIXEL_SHIFTS: dict[str, PixelShift] = {
    "dusk": _dusk,
    "night": _night,
    "cast": _cast,
    "fog": _fog,
    "blur": _blur,
    "noise": _noise,
}
RENDER_SHIFTS: tuple[str, ...] = ("palette", "background")
SHIFT_NAMES: tuple[str, ...] = tuple(PIXEL_SHIFTS) + RENDER_SHIFTS

# Domains reported by evaluation tables, in column order.
BENCHMARK_DOMAINS: tuple[str, ...] = ("clear", "dusk", "night", "cast", "fog", "noise", "palette", "background")


@dataclass(frozen=True)
class ShiftSpec:
    """One shift and its severity."""

    name: str
    severity: float = 1.0

    def __str__(self) -> str:
        return self.name if self.severity == 1.0 else f"{self.name}:{self.severity:g}"


@dataclass(frozen=True)
class Domain:
    """An ordered composition of shifts; empty means the clear domain."""

    shifts: tuple[ShiftSpec, ...] = ()

    @property
    def name(self) -> str:
        return "+".join(str(s) for s in self.shifts) or "clear"

    def __str__(self) -> str:
        return self.name

    def severity_of(self, name: str) -> float:
        """Summed severity of a render-time shift (0 when absent)."""
        return float(min(1.0, sum(s.severity for s in self.shifts if s.name == name)))

    def apply_pixels(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply the pixel shifts in order, clipping to [0, 1] after each."""
        for spec in self.shifts:
            fn = PIXEL_SHIFTS.get(spec.name)
            if fn is not None and spec.severity > 0:
                image = np.clip(fn(image, spec.severity, rng), 0.0, 1.0).astype(np.float32)
        return image


def parse_domain(text: str | Domain) -> Domain:
    """Parse ``clear`` or ``name[:severity](+name[:severity])*``; raise ConfigError on anything else."""
    if isinstance(text, Domain):
        return text
    text = text.strip()
    if text in ("", "clear"):
        return Domain()
    shifts = []
    for part in text.split("+"):
        name, _, sev = part.strip().partition(":")
        name = name.strip()
        if name not in SHIFT_NAMES:
            raise ConfigError(f"unknown shift {name!r} in domain {text!r}; known: clear, {', '.join(SHIFT_NAMES)}")
        severity = 1.0
        if sev:
            try:
                severity = float(sev)
            except ValueError:
                raise ConfigError(f"severity of {name!r} must be a number in [0, 1], got {sev!r}") from None
        if not 0.0 <= severity <= 1.0 or np.isnan(severity):
            raise ConfigError(f"severity of {name!r} must be in [0, 1], got {severity}")
        shifts.append(ShiftSpec(name, severity))
    return Domain(tuple(shifts))
