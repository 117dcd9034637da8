"""Which models a fleet run uses: the shipped reference zoo, the micro zoo (built in seconds), or a directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from sim.zoo.reference import reference_root

REFERENCE_ZOO = reference_root("base")


@dataclass(frozen=True)
class FleetZoo:
    """The teacher (cloud) and device model directories, and what to call them in the report."""

    name: str
    teacher: Path
    device: Path


def resolve_zoo(zoo: str, seed: int = 0) -> FleetZoo:
    """``reference`` (``sim/zoo/reference/base``), ``micro`` (built and cached on first use), a shape member with
    a teacher (``llava-1.5-7b-shape``: built in a minute on first use, ``sim.zoo.shapes``) or a directory holding
    ``teacher/`` and ``device/``."""
    from sim.zoo.shapes import SHAPES

    if zoo in SHAPES:
        from sim.zoo.shapes import ensure_shape, shape_by_name

        recipe = shape_by_name(zoo, [f"seed={seed}"])
        if not recipe.with_teacher:
            with_teacher = ", ".join(name for name, make in SHAPES.items() if make().with_teacher)
            raise ConfigError(f"shape member {zoo} has no teacher for the cloud; use {with_teacher}")
        root = ensure_shape(recipe)
        return FleetZoo(zoo, root / "teacher", root / "device")
    if zoo == "micro":
        from sim.zoo.build import ensure_zoo
        from sim.zoo.recipe import micro_recipe

        paths = ensure_zoo(micro_recipe(seed), progress=False)
        return FleetZoo("micro", paths.teacher, paths.device)
    root = REFERENCE_ZOO if zoo == "reference" else Path(zoo).expanduser()
    if not (root / "teacher").is_dir() or not (root / "device").is_dir():
        if zoo == "reference":
            raise ConfigError(
                f"the reference zoo is not in this checkout ({root}); use --zoo micro, or a built zoo directory "
                "(`tandem-sim zoo path`)"
            )
        raise ConfigError(f"zoo directory {root} must hold teacher/ and device/ model directories")
    return FleetZoo(zoo if zoo == "reference" else str(root), root / "teacher", root / "device")
