"""The synthetic world: determinism, question validity, shifts that change pixels and compose."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError
from sim.world import BENCHMARK_DOMAINS, COLORS, QUESTION_TYPES, SHAPES, SHIFT_NAMES, World, parse_domain
from sim.world.dataset import patch_labels, patch_owners
from sim.world.questions import ANSWERS, COUNT_WORDS, position_of


def test_same_seed_same_samples_different_seed_differs():
    a = World(3).samples(0, 20, "fog:0.5+noise:0.4")
    b = World(3).samples(0, 20, "fog:0.5+noise:0.4")
    c = World(4).samples(0, 20, "fog:0.5+noise:0.4")
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and x.question == y.question and x.answer == y.answer
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))


def test_sample_is_independent_of_generation_order():
    world = World(1)
    assert np.array_equal(world.sample(7, "night").image, world.samples(5, 3, "night")[2].image)


def test_scene_and_question_shared_across_domains():
    world = World(0)
    clear, night = world.sample(11, "clear"), world.sample(11, "night")
    assert clear.scene == night.scene and clear.question == night.question and clear.answer == night.answer


def test_answers_are_consistent_with_scene():
    world = World(5)
    for s in world.samples(0, 400):
        objs = s.scene.objects
        assert 1 <= len(objs) <= 5 and s.answer in ANSWERS
        if s.qtype == "color":
            shape = s.question.split()[-2]
            assert [o.color for o in objs if o.shape == shape] == [s.answer]
        elif s.qtype == "shape":
            color = s.question.split()[4]
            assert [o.shape for o in objs if o.color == color] == [s.answer]
        elif s.qtype == "count" and s.question == "how many objects are there ?":
            assert s.answer == COUNT_WORDS[len(objs) - 1]
        elif s.qtype == "existence":
            color, shape = s.question.split()[3:5]
            assert (s.answer == "yes") == any(o.color == color and o.shape == shape for o in objs)
        elif s.qtype == "position":
            color, shape = s.question.split()[3:5]
            (obj,) = [o for o in objs if o.color == color and o.shape == shape]
            assert position_of(obj, s.scene.size) == s.answer


def test_world_covers_vocabulary():
    samples = World(2).samples(0, 600)
    assert {s.qtype for s in samples} == set(QUESTION_TYPES)
    colors = {o.color for s in samples for o in s.scene.objects}
    shapes = {o.shape for s in samples for o in s.scene.objects}
    assert colors == set(COLORS) and shapes == set(SHAPES) and len(SHAPES) >= 4 and len(COLORS) >= 6
    assert {len(s.scene.objects) for s in samples} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_forced_question_type(qtype):
    assert {s.qtype for s in World(0).samples(0, 30, qtype=qtype)} == {qtype}


@pytest.mark.parametrize("shift", SHIFT_NAMES)
def test_every_shift_changes_pixels_and_severity_matters(shift):
    world = World(0)
    clear = world.sample(4).image.astype(int)
    mild = world.sample(4, f"{shift}:0.3").image.astype(int)
    full = world.sample(4, shift).image.astype(int)
    assert np.abs(mild - clear).mean() > 0.5
    assert np.abs(full - clear).mean() > np.abs(mild - clear).mean()
    assert np.array_equal(world.sample(4, f"{shift}:0").image, world.sample(4).image)


def test_benchmark_night_is_dark_but_keeps_the_scene():
    world = World(0)
    scenes = [world.sample(i) for i in range(8)]
    clear = np.stack([s.image for s in scenes])
    night = np.stack([world.sample(i, "night").image for i in range(8)])
    assert 0.3 < night.mean() / clear.mean() < 0.45  # 40% of the light, tinted blue
    assert night[..., 2].mean() > night[..., 0].mean()
    # The scene survives: object pixels still differ from the background far more than the sensor noise (sigma
    # 0.01875 of full scale in sim/world/shifts.py, on these 0-255 pixels 4.8 grey levels; measured ~40).
    mask = np.stack([s.index_map >= 0 for s in scenes])
    assert np.abs(night[mask] - night[~mask].mean(0)).mean() > 5 * 0.01875 * 255


def test_shifts_compose():
    world = World(0)
    fog, noise = world.sample(9, "fog").image, world.sample(9, "noise").image
    both = world.sample(9, "fog+noise").image
    assert not np.array_equal(both, fog) and not np.array_equal(both, noise)
    assert parse_domain("fog:0.5+noise").name == "fog:0.5+noise"


@pytest.mark.parametrize("bad", ["sunset", "fog:2", "fog:-0.1", "fog:abc", "fog+nope:0.3", "fog:nan"])
def test_bad_domains_are_clear_errors(bad):
    with pytest.raises(ConfigError) as exc:
        parse_domain(bad)
    assert "\n" not in str(exc.value)


def test_benchmark_domains_parse():
    assert [parse_domain(d).name for d in BENCHMARK_DOMAINS] == list(BENCHMARK_DOMAINS)


def test_patch_labels_match_objects():
    s = World(0).sample(3)
    color, shape, centre = patch_labels(s, 8)
    assert color.shape == (144,) and centre.sum() == len(s.scene.objects)
    assert set(np.unique(color)) - {0} == {1 + COLORS.index(o.color) for o in s.scene.objects}
    assert set(np.unique(shape)) - {0} == {1 + SHAPES.index(o.shape) for o in s.scene.objects}


def test_patch_targets_describe_the_owning_object():
    from sim.world.questions import POSITIONS, position_of
    from sim.zoo.patch_targets import TARGETS, batch_targets, patch_targets

    world = World(0)
    s = next(s for s in (world.sample(i) for i in range(50)) if len(s.scene.objects) >= 3)
    targets = patch_targets(s, 8)
    assert set(targets) == set(TARGETS)
    owner = patch_owners(s, 8)
    assert (targets["region"][owner < 0] == 0).all() and (targets["color"][owner < 0] == 0).all()
    for i, obj in enumerate(s.scene.objects):
        mine = owner == i
        if not mine.any():
            continue
        pos = position_of(obj, s.scene.size)
        assert (targets["region"][mine] == (0 if pos is None else 1 + POSITIONS.index(pos))).all()
        assert (targets["shape"][mine] == 1 + SHAPES.index(obj.shape)).all()
    for name, n in TARGETS.items():
        assert targets[name].min() >= 0 and targets[name].max() < n
    batch = batch_targets([s, world.sample(1)], 8)
    assert batch["color"].shape == (2, 144)
