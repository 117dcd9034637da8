"""Compiled training of the zoo stages: the swap and restore, and the error without a compiler (a compiled
training step is tested with the eager one in test_zoo.py)."""

from __future__ import annotations

import pytest
from torch import nn

from common.errors import ConfigError
from sim.zoo import build
from sim.zoo.compiling import compiled
from sim.zoo.recipe import micro_recipe


def test_compiling_without_a_compiler_is_a_clear_error_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "compiler_available", lambda: False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        build.ensure_zoo(micro_recipe(), home=tmp_path, progress=False, compile_model=True)
    assert not any(tmp_path.iterdir())


def test_compiled_swaps_children_in_and_restores_them_even_on_error():
    parent = nn.Sequential()
    parent.add_module("a", nn.Linear(2, 2))
    plain = parent.a
    with compiled(parent, ("a",), True):
        assert parent.a is not plain and parent.a._orig_mod is plain
    assert parent.a is plain
    with pytest.raises(RuntimeError), compiled(parent, ("a",), True):
        raise RuntimeError("stage failed")
    assert parent.a is plain
    with compiled(parent, ("a",), False):
        assert parent.a is plain
