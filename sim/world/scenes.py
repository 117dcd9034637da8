"""Scene sampling and rendering: 1-5 non-overlapping coloured shapes on a background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")

# Clear-domain RGB prototypes (0-1).
CLEAR_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.13, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.58, 0.18, 0.75),
    "orange": (0.98, 0.52, 0.08),
}
# An unseen palette: same colour names, other shades (what a new camera or new paint would give).
SHIFTED_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.75, 0.25, 0.45),
    "green": (0.45, 0.75, 0.35),
    "blue": (0.25, 0.55, 0.95),
    "yellow": (0.85, 0.90, 0.45),
    "purple": (0.45, 0.28, 0.60),
    "orange": (0.90, 0.42, 0.30),
}

MAX_OBJECTS = 5


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; centre and radius are in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    radius: float

    @property
    def shape_id(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def color_id(self) -> int:
        return COLORS.index(self.color)


@dataclass(frozen=True)
class Scene:
    """A scene: its objects and its background grey level, independent of any domain shift."""

    size: int
    objects: tuple[SceneObject, ...]
    background: float


def sample_scene(rng: np.random.Generator, size: int, max_objects: int = MAX_OBJECTS) -> Scene:
    """Sample 1..max_objects (at most 5) non-overlapping objects with varied shape, colour, size and position."""
    n = int(rng.integers(1, min(max_objects, MAX_OBJECTS) + 1))
    r_min, r_max = size * 0.07, size * 0.14
    margin = 2.0
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < n and attempts < 200:
        attempts += 1
        r = float(rng.uniform(r_min, r_max))
        cx = float(rng.uniform(r + margin, size - r - margin))
        cy = float(rng.uniform(r + margin, size - r - margin))
        if any((cx - o.cx) ** 2 + (cy - o.cy) ** 2 < (r + o.radius + 2.0) ** 2 for o in objects):
            continue
        objects.append(
            SceneObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                color=COLORS[int(rng.integers(len(COLORS)))],
                cx=cx,
                cy=cy,
                radius=r,
            )
        )
    return Scene(size=size, objects=tuple(objects), background=float(rng.uniform(0.72, 0.92)))


def _shape_mask(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy, r = xs - obj.cx, ys - obj.cy, obj.radius
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        side = r * 0.82
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if obj.shape == "triangle":
        top, bottom = -r, r * 0.75
        frac = (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * r)
    if obj.shape == "cross":
        arm = r * 0.33
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(
    scene: Scene,
    palette: dict[str, tuple[float, float, float]],
    rng: np.random.Generator,
    textured_background: bool = False,
    background_strength: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render to (float32 HxWx3 image in [0, 1], int8 HxW object-index map with -1 for background)."""
    size = scene.size
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = scene.background
    if textured_background:
        yy, xx = (g.astype(np.float32) for g in np.ogrid[0:size, 0:size])
        period = size / float(rng.uniform(5.0, 9.0))
        angle = float(rng.uniform(0, np.pi))
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        stripes = (np.sin(2 * np.pi * phase / period) > 0).astype(np.float32)
        tint = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
        image = image * (1 - background_strength) + background_strength * (
            stripes[..., None] * tint + (1 - stripes[..., None]) * (1 - tint)
        )
    index_map = np.full((size, size), -1, dtype=np.int8)
    for i, obj in enumerate(scene.objects):
        x0, x1 = max(int(obj.cx - obj.radius) - 1, 0), min(int(obj.cx + obj.radius) + 2, size)
        y0, y1 = max(int(obj.cy - obj.radius) - 1, 0), min(int(obj.cy + obj.radius) + 2, size)
        ys, xs = (g.astype(np.float32) + 0.5 for g in np.ogrid[y0:y1, x0:x1])
        mask = _shape_mask(obj, xs, ys)
        jitter = rng.uniform(-0.04, 0.04, size=3)
        color = np.clip(np.asarray(palette[obj.color]) + jitter, 0.0, 1.0).astype(np.float32)
        image[y0:y1, x0:x1][mask] = color
        index_map[y0:y1, x0:x1][mask] = i
    return image, index_map
