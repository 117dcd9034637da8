"""Questions with one-word answers about a scene: colour, shape, count, position, existence."""

from __future__ import annotations

import numpy as np

from common.errors import ConfigError
from sim.world.scenes import COLORS, SHAPES, Scene, SceneObject

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "existence")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
ANSWERS: tuple[str, ...] = COLORS + SHAPES + COUNT_WORDS + POSITIONS + ("yes", "no")

# Every word a question can contain (the tokenizer's vocabulary is built from this).
QUESTION_WORDS: tuple[str, ...] = (
    "what", "color", "is", "the", "shape", "of", "object", "how", "many", "are", "there", "objects",
    "where", "in", "image", "a", "?",
) + COLORS + SHAPES + tuple(PLURALS.values())  # fmt: skip


def check_question_type(qtype: str) -> str:
    """Return ``qtype`` or raise ConfigError naming the valid types."""
    if qtype not in QUESTION_TYPES:
        raise ConfigError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")
    return qtype


def position_of(obj: SceneObject, size: int) -> str | None:
    """Dominant direction of the object from the image centre, or None when ambiguous."""
    dx, dy = obj.cx - size / 2, obj.cy - size / 2
    if max(abs(dx), abs(dy)) < size * 0.12 or abs(abs(dx) - abs(dy)) < size * 0.06:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _color_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    return f"what color is the {obj.shape} ?", obj.color


def _shape_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    colors = [o.color for o in scene.objects]
    unique = [o for o in scene.objects if colors.count(o.color) == 1]
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    return f"what shape is the {obj.color} object ?", obj.shape


def _count_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    kind = int(rng.integers(3))
    if kind == 0:
        return "how many objects are there ?", COUNT_WORDS[len(scene.objects) - 1]
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if kind == 1:
        n = sum(o.shape == obj.shape for o in scene.objects)
        return f"how many {PLURALS[obj.shape]} are there ?", COUNT_WORDS[n - 1]
    n = sum(o.color == obj.color for o in scene.objects)
    return f"how many {obj.color} objects are there ?", COUNT_WORDS[n - 1]


def _position_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    pairs = [(o.color, o.shape) for o in scene.objects]
    candidates = [
        (o, pos)
        for o in scene.objects
        if pairs.count((o.color, o.shape)) == 1 and (pos := position_of(o, scene.size)) is not None
    ]
    if not candidates:
        return None
    obj, pos = candidates[int(rng.integers(len(candidates)))]
    return f"where is the {obj.color} {obj.shape} in the image ?", pos


def _existence_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = sorted(present)[int(rng.integers(len(present)))]
        return f"is there a {color} {shape} ?", "yes"
    # Half of the negatives share the colour or the shape of a present object (harder than random).
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for (c, s) in absent if any(c == pc or s == ps for pc, ps in present)]
    pool = near if near and rng.random() < 0.5 else absent
    color, shape = pool[int(rng.integers(len(pool)))]
    return f"is there a {color} {shape} ?", "no"


_GENERATORS = {
    "color": _color_question,
    "shape": _shape_question,
    "count": _count_question,
    "position": _position_question,
    "existence": _existence_question,
}


def ask(scene: Scene, rng: np.random.Generator, qtype: str | None = None) -> tuple[str, str, str]:
    """Return (question type, question, answer). A requested type the scene cannot support falls back."""
    order = [qtype] if qtype else []
    order += [QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))]
    for t in order:
        qa = _GENERATORS[t](scene, rng)
        if qa is not None:
            return t, qa[0], qa[1]
    raise AssertionError("count and existence questions always apply")  # pragma: no cover
