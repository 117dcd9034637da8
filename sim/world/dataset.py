"""The world: seeded, deterministic samples (image, question, answer) in any domain.

Sample ``i`` of a world shows the same scene and question in every domain; only the shift differs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from sim.world.questions import QUESTION_TYPES, ask, check_question_type
from sim.world.scenes import (
    CLEAR_PALETTE,
    COLORS,
    MAX_OBJECTS,
    SHAPES,
    SHIFTED_PALETTE,
    Scene,
    render_scene,
    sample_scene,
)
from sim.world.shifts import Domain, parse_domain


@dataclass(frozen=True)
class Sample:
    """One visual question: uint8 HxWx3 image, question, one-word answer, and what produced them."""

    index: int
    domain: str
    image: np.ndarray
    question: str
    answer: str
    qtype: str
    scene: Scene
    index_map: np.ndarray


def _palette(domain: Domain) -> dict[str, tuple[float, float, float]]:
    s = domain.severity_of("palette")
    if s == 0:
        return CLEAR_PALETTE
    return {
        c: tuple((1 - s) * a + s * b for a, b in zip(CLEAR_PALETTE[c], SHIFTED_PALETTE[c]))  # type: ignore[misc]
        for c in CLEAR_PALETTE
    }


class World:
    """A seeded source of samples; ``image_size`` in pixels (square)."""

    def __init__(self, seed: int = 0, image_size: int = 96) -> None:
        if image_size < 32:
            raise ValueError("image_size must be at least 32 pixels")
        self.seed = int(seed)
        self.image_size = int(image_size)

    def _scene_and_question(
        self, index: int, qtype: str | None, max_objects: int
    ) -> tuple[Scene, tuple[str, str, str]]:
        rng = np.random.default_rng([self.seed, index])
        wanted = qtype or QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
        for _ in range(50):
            scene = sample_scene(rng, self.image_size, max_objects)
            qa = ask(scene, rng, wanted)
            if qa[0] == wanted:
                return scene, qa
        return scene, qa  # pragma: no cover - every type is supported by most scenes

    def sample(
        self, index: int, domain: str | Domain = "clear", qtype: str | None = None, max_objects: int = MAX_OBJECTS
    ) -> Sample:
        """Sample number ``index`` in ``domain``; ``qtype`` forces a question type; ``max_objects`` caps the
        scene size (used by training curricula)."""
        if qtype is not None:
            check_question_type(qtype)
        dom = parse_domain(domain)
        scene, (t, question, answer) = self._scene_and_question(index, qtype, max_objects)
        shift_rng = np.random.default_rng([self.seed, index, zlib.crc32(dom.name.encode())])
        render_rng = np.random.default_rng([self.seed, index, 1])
        image, index_map = render_scene(
            scene,
            _palette(dom),
            render_rng,
            textured_background=dom.severity_of("background") > 0,
            background_strength=0.6 * dom.severity_of("background"),
        )
        image = dom.apply_pixels(image, shift_rng)
        pixels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Sample(index, dom.name, pixels, question, answer, t, scene, index_map)

    def extra_questions(self, sample: Sample, turns: int) -> list[tuple[str, str, str]]:
        """Up to ``turns`` further distinct (type, question, answer) about the sample's scene, types rotated.

        Used for multi-turn training conversations, as in LLaVA's instruction data.
        """
        rng = np.random.default_rng([self.seed, sample.index, 2])
        seen = {sample.question}
        out: list[tuple[str, str, str]] = []
        for attempt in range(4 * turns):
            if len(out) == turns:
                break
            qa = ask(sample.scene, rng, QUESTION_TYPES[attempt % len(QUESTION_TYPES)])
            if qa[1] not in seen:
                seen.add(qa[1])
                out.append(qa)
        return out

    def samples(self, start: int, count: int, domain: str | Domain = "clear", qtype: str | None = None) -> list[Sample]:
        """``count`` consecutive samples from index ``start``."""
        dom = parse_domain(domain)
        return [self.sample(i, dom, qtype) for i in range(start, start + count)]


def patch_owners(sample: Sample, patch_size: int) -> np.ndarray:
    """Index of the object owning each patch (row-major over the patch grid), -1 for background.

    A patch belongs to the object covering most of it; an object covering a third of a patch owns it.
    """
    grid = sample.index_map.shape[0] // patch_size
    patches = sample.index_map[: grid * patch_size, : grid * patch_size].reshape(grid, patch_size, grid, patch_size)
    patches = patches.transpose(0, 2, 1, 3).reshape(grid * grid, -1).astype(np.int16) + 1
    counts = np.stack([(patches == k).sum(1) for k in range(len(sample.scene.objects) + 1)], axis=1)
    counts[:, 0] = counts[:, 0] // 2
    return counts.argmax(1) - 1


def patch_labels(sample: Sample, patch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch (colour, shape, centre) labels from the object-index map, row-major over the patch grid.

    Colour and shape are 0 for background, else 1 + id of the object owning the patch (``patch_owners``);
    centre is 1 for the patch holding an object's centre.
    """
    grid = sample.index_map.shape[0] // patch_size
    owner = patch_owners(sample, patch_size)
    color = np.zeros(grid * grid, dtype=np.int64)
    shape = np.zeros(grid * grid, dtype=np.int64)
    centre = np.zeros(grid * grid, dtype=np.int64)
    for i, obj in enumerate(sample.scene.objects):
        color[owner == i] = 1 + COLORS.index(obj.color)
        shape[owner == i] = 1 + SHAPES.index(obj.shape)
        gx, gy = min(int(obj.cx // patch_size), grid - 1), min(int(obj.cy // patch_size), grid - 1)
        centre[gy * grid + gx] = 1
    return color, shape, centre
