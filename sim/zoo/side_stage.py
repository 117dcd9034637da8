"""Train one zoo stage in a child process while the parent trains another (the teacher and device stages are
independent once the vision tower is trained, and at this size a stage gains little from a second core).

The model's parameters move to shared memory before the child starts; the child builds the same architecture
around those very tensors (a pickled transformers model loses its output hooks), trains them in place, and the
parent sees the result. Progress and the loss history come back over a queue.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.batching import BatchEncoder
from sim.zoo.recipe import ZooRecipe
from sim.zoo.tokenizer import build_processor
from sim.zoo.train import train_answers


class SideStageError(RuntimeError):
    """The child process failed; the message carries its traceback."""


def _child(state: dict[str, torch.Tensor], recipe: ZooRecipe, member: str, kwargs: dict[str, Any], out) -> None:
    torch.set_num_threads(1)
    try:
        v = recipe.vision
        processor = build_processor(v.image_size, v.patch_size)
        encoder = BatchEncoder.from_processor(processor)
        model = build_llava(v, getattr(recipe, member), len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
        model.load_state_dict(state, assign=True)  # train the parent's shared tensors in place
        world = World(kwargs.pop("world_seed"), v.image_size)
        spec = getattr(recipe, f"{member}_stage")
        losses = train_answers(
            model, world, encoder, spec, on_step=lambda step, loss: out.put(("step", step, loss)), **kwargs
        )
        out.put(("done", losses, None))
    except BaseException:  # the parent re-raises it with the child's traceback
        out.put(("error", traceback.format_exc(), None))


class SideStage:
    """``train_answers`` on the recipe's ``member`` (``model``, built by ``build_llava`` from the recipe) in a
    spawned process with one thread; ``join`` returns its losses."""

    def __init__(
        self,
        model: torch.nn.Module,
        recipe: ZooRecipe,
        member: str,
        on_step: Callable[[int, float], None],
        **train_kwargs: Any,
    ) -> None:
        model.share_memory()
        state = model.state_dict()
        ctx = mp.get_context("spawn")
        self._queue = ctx.Queue()
        args = (state, recipe, member, train_kwargs, self._queue)
        self._process = ctx.Process(target=_child, args=args, daemon=True)
        self._on_step = on_step
        self._result: tuple[str, Any] | None = None
        self.finished_at: float | None = None  # perf_counter() when the child's result (or failure) arrived
        self.finished = threading.Event()
        self._process.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                kind, a, b = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._process.is_alive():
                    self._result = ("error", f"the stage's process exited with code {self._process.exitcode}")
                    break
                continue
            if kind == "step":
                self._on_step(a, b)
                continue
            self._result = (kind, a)
            break
        self.finished_at = time.perf_counter()
        self.finished.set()

    def watching(
        self, on_step: Callable[[int, float], None], on_done: Callable[[], None] | None = None
    ) -> Callable[[int, float], None]:
        """``on_step`` for the parent's own stage that raises SideStageError once the child has failed, and
        calls ``on_done`` once after the child has finished (e.g. to give the parent the freed core)."""
        told = False

        def checked(step: int, loss: float) -> None:
            nonlocal told
            if self.finished.is_set():
                if self._result is not None and self._result[0] != "done":
                    self.join()
                if on_done is not None and not told:
                    told = True
                    on_done()
            on_step(step, loss)

        return checked

    def stop(self) -> None:
        """End the child at once (the parent's own stage failed)."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()

    def join(self) -> list[float]:
        """Wait for the child; its losses, or SideStageError with the child's traceback."""
        self.finished.wait()
        self._process.join()
        assert self._result is not None
        kind, value = self._result
        if kind != "done":
            raise SideStageError(f"side stage failed:\n{value}")
        return value
