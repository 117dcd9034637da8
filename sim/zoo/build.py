"""Build the zoo (vision pretraining, teacher, device model) with progress, and cache it on disk.

A recipe whose zoo ships with the project (``sim/zoo/reference/``) is not built: ``ensure_zoo`` returns the
shipped zoo. Other builds are cached outside the repository, under ``$TANDEM_HOME/zoo`` (default
``~/.cache/tandem/zoo``), in a directory named by the recipe's digest: an unchanged recipe is never rebuilt, a
changed one builds anew.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from common.errors import ConfigError
from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.batching import BatchEncoder
from sim.zoo.compiling import compiler_available
from sim.zoo.recipe import ZooRecipe
from sim.zoo.reference import reference_root
from sim.zoo.side_stage import SideStage
from sim.zoo.tokenizer import build_processor
from sim.zoo.train import init_projector_from_heads, pretrain_vision, train_answers

MANIFEST = "zoo.json"


@dataclass(frozen=True)
class ZooPaths:
    """Where a built zoo lives: the teacher and device model directories (model + processor each)."""

    root: Path
    teacher: Path
    device: Path

    @classmethod
    def at(cls, root: Path) -> ZooPaths:
        return cls(root=root, teacher=root / "teacher", device=root / "device")

    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text())


def zoo_home() -> Path:
    """Base directory of all cached zoos."""
    base = os.environ.get("TANDEM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return Path(base) / "zoo"


def zoo_dir(recipe: ZooRecipe, home: Path | None = None) -> Path:
    """The cache directory of a recipe's build (not the shipped zoo)."""
    return (home or zoo_home()) / f"{recipe.name}-{recipe.digest()}"


def shipped_zoo(recipe: ZooRecipe) -> ZooPaths | None:
    """The zoo shipped with the project for exactly this recipe (same digest), or None."""
    paths = ZooPaths.at(reference_root(recipe.name))
    return paths if is_built(paths, recipe) else None


def locate_zoo(recipe: ZooRecipe, home: Path | None = None) -> ZooPaths | None:
    """Where the recipe's zoo can be read without building: the shipped one, else a cached build, else None."""
    shipped = shipped_zoo(recipe)
    if shipped is not None:
        return shipped
    cached = ZooPaths.at(zoo_dir(recipe, home))
    return cached if is_built(cached, recipe) else None


def is_built(paths: ZooPaths, recipe: ZooRecipe) -> bool:
    try:
        return paths.manifest().get("digest") == recipe.digest()
    except (OSError, json.JSONDecodeError):
        return False


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(str(root) + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def ensure_zoo(
    recipe: ZooRecipe,
    *,
    home: Path | None = None,
    progress: bool = True,
    force: bool = False,
    compile_model: bool = False,
    side_by_side: bool | None = None,
    use_shipped: bool = True,
) -> ZooPaths:
    """Return the built zoo for ``recipe``: the shipped one when it exists (and ``use_shipped``), else the cached
    build, building it first when it is not cached (or ``force``, which always trains into the cache).

    ``compile_model`` trains the teacher and device stages compiled (``sim.zoo.compiling``; needs a C++ compiler,
    ConfigError otherwise). ``side_by_side`` trains the device stage in a second process, one thread each, while
    the teacher trains (default: when there are two cores and the stages are long enough to pay for the start).
    """
    if compile_model and not compiler_available():
        raise ConfigError("compiling needs a C++ compiler (g++ or clang++) on the PATH; build without --compile")
    if use_shipped and not force:
        shipped = shipped_zoo(recipe)
        if shipped is not None:
            return shipped
    root = zoo_dir(recipe, home)
    paths = ZooPaths.at(root)
    with _build_lock(root):
        if is_built(paths, recipe) and not force:
            return paths
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        if side_by_side is None:
            side_by_side = recipe.with_teacher and (os.cpu_count() or 1) >= 2 and recipe.device_stage.steps >= 200
        manifest = _build_into(ZooPaths.at(staging), recipe, progress, compile_model, side_by_side)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return paths


def _build_into(
    paths: ZooPaths, recipe: ZooRecipe, show_progress: bool, compile_model: bool, side_by_side: bool
) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    v = recipe.vision
    processor = build_processor(v.image_size, v.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    vocab, image_id, pad_id = len(processor.tokenizer), encoder.image_id, encoder.pad_id
    teacher = build_llava(v, recipe.teacher, vocab, image_id, pad_id, recipe.seed)
    device = build_llava(v, recipe.device, vocab, image_id, pad_id, recipe.seed + 1)
    timings: dict[str, float] = {}
    final_loss: dict[str, float] = {}
    with _progress(show_progress) as bar:
        plain = show_progress and not bar.console.is_terminal

        def reporter(name: str, total: int):
            """A progress callback for one stage, and a function recording its time and final loss."""
            task = bar.add_task(name, total=total, loss=float("nan"))
            start = time.perf_counter()

            def on_step(step: int, loss: float) -> None:
                bar.update(task, completed=step + 1, loss=loss)
                if plain and (step + 1) % max(1, total // 10) == 0:  # no live bar in logs: a line per 10%
                    elapsed = time.perf_counter() - start
                    print(f"{name}: {step + 1}/{total} loss {loss:.3f} {elapsed:.0f}s", flush=True)

            def record(losses: list[float], end: float | None = None) -> None:
                timings[name] = round((end or time.perf_counter()) - start, 1)
                final_loss[name] = round(sum(losses[-20:]) / len(losses[-20:]), 4)

            return on_step, record

        def run(name: str, total: int, fn) -> None:
            on_step, record = reporter(name, total)
            record(fn(on_step))

        heads = []

        def vision_stage(cb) -> list[float]:
            losses, trained_heads, private = pretrain_vision(
                teacher.model.vision_tower,
                World(recipe.seed, v.image_size),
                encoder,
                recipe.vision_stage,
                cb,
                max_severity=recipe.vision_max_severity,
                private_heads=recipe.vision_private_heads,
                confusion_weight=recipe.vision_confusion_weight,
                colour_rolls=recipe.vision_colour_rolls,
                shift_weights=recipe.vision_shift_weights,
            )
            heads.append(trained_heads)
            heads.extend(private[name] for name in sorted(private))
            return losses

        run("vision", recipe.vision_stage.steps, vision_stage)
        # The device keeps a frozen copy of the teacher's vision tower.
        device.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
        if recipe.projector_from_heads:
            # The teacher's stage-1 alignment saw every domain: all the heads; the device's only the clear ones.
            init_projector_from_heads(teacher, heads)
            init_projector_from_heads(device, heads[0])

        finish = recipe.teacher_finish
        teacher_steps = recipe.teacher_stage.steps + (finish.steps if finish else 0)

        def teacher_job(cb) -> list[float]:
            losses = train_answers(
                teacher, World(recipe.seed + 1, v.image_size), encoder, recipe.teacher_stage,
                shifted=True, min_severity=recipe.teacher_min_severity, seed=recipe.seed + 1, on_step=cb,
                shift_weights=recipe.teacher_shift_weights, compile_model=compile_model,
            )  # fmt: skip
            if finish:  # fresh scenes (another world seed), the same progress bar
                done = len(losses)
                losses += train_answers(
                    teacher, World(recipe.seed + 3, v.image_size), encoder, finish,
                    shifted=True, min_severity=finish.min_severity, seed=recipe.seed + 3,
                    on_step=lambda step, loss: cb(done + step, loss),
                    shift_weights=finish.shift_weights, compile_model=compile_model,
                )  # fmt: skip
            return losses

        device_kwargs = {"shifted": False, "min_severity": 0.0, "seed": recipe.seed + 2, "compile_model": compile_model}
        if recipe.with_teacher and side_by_side:
            # Two processes of one thread each: the device stage in a child, the teacher here; the teacher takes
            # the freed core once the device is done (on these models one and two threads give the same bits).
            parent_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            device_step, device_record = reporter("device (clear)", recipe.device_stage.steps)
            side = SideStage(device, recipe, "device", device_step, world_seed=recipe.seed + 2, **device_kwargs)
            try:
                run(
                    "teacher (all)",
                    teacher_steps,
                    lambda cb: teacher_job(side.watching(cb, lambda: torch.set_num_threads(parent_threads))),
                )
            except BaseException:
                side.stop()
                raise
            device_record(side.join(), side.finished_at)
        else:
            if recipe.with_teacher:
                run("teacher (all)", teacher_steps, teacher_job)
            run(
                "device (clear)",
                recipe.device_stage.steps,
                lambda cb: train_answers(
                    device, World(recipe.seed + 2, v.image_size), encoder, recipe.device_stage, on_step=cb,
                    **device_kwargs,
                ),
            )  # fmt: skip
    members = (("teacher", teacher), ("device", device)) if recipe.with_teacher else (("device", device),)
    for member, model in members:
        out = getattr(paths, member)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    torch.set_num_threads(threads)
    return {
        "digest": recipe.digest(),
        "recipe": recipe.model_dump(),
        "seconds": timings,
        "compiled": compile_model,
        "side_by_side": recipe.with_teacher and side_by_side,
        "final_loss": final_loss,
        "parameters": {
            **(
                {"teacher_language_model": sum(p.numel() for p in teacher.model.language_model.parameters())}
                if recipe.with_teacher
                else {}
            ),
            "device_language_model": sum(p.numel() for p in device.model.language_model.parameters()),
            "vision_tower": sum(p.numel() for p in teacher.model.vision_tower.parameters()),
        },
    }
