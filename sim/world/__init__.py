"""The synthetic visual-QA world: coloured shapes, one-word answers, composable domain shifts."""

from sim.world.dataset import Sample, World
from sim.world.questions import QUESTION_TYPES
from sim.world.scenes import COLORS, SHAPES
from sim.world.shifts import BENCHMARK_DOMAINS, SHIFT_NAMES, Domain, parse_domain

__all__ = [
    "BENCHMARK_DOMAINS",
    "COLORS",
    "QUESTION_TYPES",
    "SHAPES",
    "SHIFT_NAMES",
    "Domain",
    "Sample",
    "World",
    "parse_domain",
]
