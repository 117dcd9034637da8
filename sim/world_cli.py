"""``tandem-sim world``: look at the synthetic world (samples, shifts, generation speed)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from common.errors import ConfigError
from sim.world import BENCHMARK_DOMAINS, World, parse_domain
from sim.world.questions import check_question_type

world_app = typer.Typer(help="Inspect the synthetic world.", no_args_is_help=True)
console = Console()


@world_app.command("sample")
def sample_command(
    count: int = typer.Option(5, "--count", "-n", min=1, help="How many samples to list."),
    domain: str = typer.Option("clear", help="Domain, e.g. clear, night, 'fog:0.5+noise:0.3'."),
    qtype: str | None = typer.Option(None, help="Force a question type (color, shape, count, position, existence)."),
    seed: int = typer.Option(0, help="World seed."),
    image_size: int = typer.Option(96, help="Image side in pixels."),
    save: Path | None = typer.Option(None, help="Also write the images side by side to this PNG."),
) -> None:
    """List samples (question, answer, objects) and optionally save their images."""
    dom = parse_domain(domain)
    if qtype is not None:
        check_question_type(qtype)
    world = World(seed, image_size)
    samples = world.samples(0, count, dom, qtype)
    table = Table(title=f"world seed {seed}, domain {dom.name}")
    for col in ("#", "type", "question", "answer", "objects"):
        table.add_column(col)
    for s in samples:
        objs = ", ".join(f"{o.color} {o.shape}" for o in s.scene.objects)
        table.add_row(str(s.index), s.qtype, s.question, s.answer, objs)
    console.print(table)
    if save is not None:
        _save_strip([s.image for s in samples], save)


@world_app.command("shifts")
def shifts_command(
    index: int = typer.Option(0, help="Sample index to show."),
    seed: int = typer.Option(0, help="World seed."),
    domains: list[str] = typer.Option(list(BENCHMARK_DOMAINS), "--domain", help="Domains to render (repeatable)."),
    save: Path = typer.Option(Path("reports/shifts.png"), help="Where to write the PNG."),
) -> None:
    """Render one scene in several domains, side by side."""
    parsed = [parse_domain(d) for d in domains]
    world = World(seed)
    _save_strip([world.sample(index, d).image for d in parsed], save)
    console.print(f"domains: {', '.join(d.name for d in parsed)}")


@world_app.command("speed")
def speed_command(
    count: int = typer.Option(2000, min=1, help="Samples to generate per domain."),
    domains: list[str] = typer.Option(["clear", "night", "fog", "noise"], "--domain", help="Domains to time."),
) -> None:
    """Generation rate in samples per second (one core)."""
    world = World(0)
    for d in domains:
        dom = parse_domain(d)
        start = time.perf_counter()
        world.samples(0, count, dom)
        rate = count / (time.perf_counter() - start)
        console.print(f"{dom.name:<12} {rate:8.0f} samples/s")


def _save_strip(images: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    if path.suffix.lower() != ".png":
        raise ConfigError(f"--save must name a .png file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    strip = np.concatenate(images, axis=1)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(path)
    console.print(f"wrote {path}")
