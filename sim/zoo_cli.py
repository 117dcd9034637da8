"""``tandem-sim zoo``: build the tiny LLaVA zoo and evaluate it (or any LLaVA checkpoint) on the world."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress

from common.errors import ConfigError
from common.modeling import load_mllm
from sim.world import BENCHMARK_DOMAINS, QUESTION_TYPES, parse_domain
from sim.world.questions import check_question_type
from sim.zoo.batching import BatchEncoder
from sim.zoo.build import ZooPaths, ensure_zoo, is_built, zoo_dir
from sim.zoo.evaluate import Accuracy, evaluate
from sim.zoo.recipe import RECIPES, ZooRecipe
from sim.zoo.report import domain_rows, markdown_table, qtype_rows, rich_table, sampling_error_note

zoo_app = typer.Typer(help="Build and evaluate the tiny LLaVA model zoo.", no_args_is_help=True)
console = Console()


def recipe_by_name(name: str, seed: int | None = None, settings: list[str] | None = None) -> ZooRecipe:
    """The named recipe, with ``seed`` and ``FIELD=JSON`` settings applied (and validated)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]()
    updates: dict = {} if seed is None else {"seed": seed}
    for item in settings or []:
        field, sep, text = item.partition("=")
        if not sep or field not in ZooRecipe.model_fields:
            raise ConfigError(
                f"--set needs FIELD=VALUE with a recipe field ({', '.join(ZooRecipe.model_fields)}); got {item!r}"
            )
        try:
            updates[field] = json.loads(text)
        except json.JSONDecodeError:
            updates[field] = text  # a bare word, e.g. name=night-test
    if not updates:
        return recipe
    try:
        return ZooRecipe.model_validate(recipe.model_dump() | updates)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise ConfigError(f"invalid recipe setting {where}: {err['msg'].removeprefix('Value error, ')}") from None


RecipeOpt = typer.Option("base", "--recipe", help=f"Zoo recipe: {', '.join(RECIPES)}.")
HomeOpt = typer.Option(None, "--home", help="Zoo cache directory (default $TANDEM_HOME/zoo or ~/.cache/tandem/zoo).")
SetOpt = typer.Option(
    [], "--set", help="Override a recipe field, FIELD=JSON (repeatable), e.g. vision_colour_rolls='{\"night\": 2}'."
)


@zoo_app.command("build")
def build_command(
    recipe: str = RecipeOpt,
    home: Path | None = HomeOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even when the cache is up to date."),
    settings: list[str] = SetOpt,
    compile_model: bool = typer.Option(
        False,
        "--compile",
        help="Train teacher and device compiled by TorchInductor (9-25% faster steps here; needs a C++ compiler; "
        "weights differ slightly from an eager build).",
    ),
    side_by_side: bool | None = typer.Option(
        None,
        "--side-by-side/--one-by-one",
        help="Train the device stage in a second process while the teacher trains, one thread each "
        "(default: on with two or more cores, for recipes with long stages).",
    ),
) -> None:
    """Pretrain the vision tower, then the teacher (all domains) and the device model (clear only)."""
    rec = recipe_by_name(recipe, settings=settings)
    root = zoo_dir(rec, home)
    if is_built(ZooPaths.at(root), rec) and not force:
        console.print(f"zoo [bold]{rec.name}[/] is up to date at {root}")
        return
    start = time.perf_counter()
    paths = ensure_zoo(
        rec, home=home, progress=True, force=force, compile_model=compile_model, side_by_side=side_by_side
    )
    manifest = paths.manifest()
    console.print(f"built zoo [bold]{rec.name}[/] in {time.perf_counter() - start:.0f} s at {paths.root}")
    console.print(f"stage seconds: {manifest['seconds']}  parameters: {manifest['parameters']}")


@zoo_app.command("path")
def path_command(recipe: str = RecipeOpt, home: Path | None = HomeOpt, settings: list[str] = SetOpt) -> None:
    """Print the zoo directory of a recipe (and whether it is built)."""
    rec = recipe_by_name(recipe, settings=settings)
    root = zoo_dir(rec, home)
    state = "built" if is_built(ZooPaths.at(root), rec) else "not built"
    console.print(f"{root} ({state})")


def zoo_members(paths: ZooPaths) -> dict[str, Path]:
    """The model directories a built zoo holds (device-only recipes have no teacher)."""
    return {name: p for name, p in (("teacher", paths.teacher), ("device", paths.device)) if p.is_dir()}


def run_evaluation(
    models: dict[str, Path],
    domains: list[str],
    qtypes: list[str],
    samples: int,
    seed: int,
) -> dict[str, dict[str, Accuracy]]:
    """Load each model directory and evaluate it on every domain, with a progress bar."""
    results: dict[str, dict[str, Accuracy]] = {}
    loaded = {name: load_mllm(path) for name, path in models.items()}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=samples * len(domains) * len(models))
        for name, item in loaded.items():
            encoder = BatchEncoder.from_processor(item.processor)
            size = item.processor.image_processor.crop_size["height"]
            results[name] = evaluate(
                item.model, encoder, domains, samples_per_domain=samples, seed=seed, image_size=size,
                qtypes=qtypes, on_batch=lambda n: progress.advance(task, n),
            )  # fmt: skip
    return results


def print_tables(results: dict[str, dict[str, Accuracy]], domains: list[str], report: Path | None) -> None:
    header = ["model", *domains, "mean", "min"]
    rows = domain_rows(results, domains)
    console.print(rich_table("accuracy % by domain", header, rows))
    note = sampling_error_note(results, domains)
    console.print(note)
    qheader = ["model", *QUESTION_TYPES]
    qrows = qtype_rows(results, domains)
    console.print(rich_table("accuracy % by question type", qheader, qrows))
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        text = "## Accuracy % by domain\n\n" + markdown_table(header, rows) + f"\n{note}\n"
        text += "\n## Accuracy % by question type\n\n" + markdown_table(qheader, qrows)
        report.write_text(text)
        console.print(f"wrote {report}")


@zoo_app.command("eval")
def eval_command(
    recipe: str = RecipeOpt,
    home: Path | None = HomeOpt,
    model: list[Path] = typer.Option([], "--model", help="Evaluate these model directories instead (repeatable)."),
    domain: list[str] = typer.Option(list(BENCHMARK_DOMAINS), "--domain", help="Domains (repeatable)."),
    qtype: list[str] = typer.Option(list(QUESTION_TYPES), "--qtype", help="Question types (repeatable)."),
    samples: int = typer.Option(300, min=1, help="Held-out samples per domain."),
    seed: int = typer.Option(0, help="Evaluation seed."),
    report: Path | None = typer.Option(None, help="Also write the tables to this markdown file."),
    as_json: Path | None = typer.Option(None, "--json", help="Also write the accuracies to this JSON file."),
    settings: list[str] = SetOpt,
) -> None:
    """Accuracy table: rows = models, columns = clear and each shift; plus per question type."""
    domains = [parse_domain(d).name for d in domain]
    qtypes = [check_question_type(q) for q in qtype]
    if model:
        models = row_names(model)
    else:
        rec = recipe_by_name(recipe, settings=settings)
        paths = ZooPaths.at(zoo_dir(rec, home))
        if not is_built(paths, rec):
            raise ConfigError(f"zoo {rec.name!r} is not built yet; run: tandem-sim zoo build --recipe {rec.name}")
        models = zoo_members(paths)
    results = run_evaluation(models, domains, qtypes, samples, seed)
    print_tables(results, domains, report)
    if as_json is not None:
        as_json.parent.mkdir(parents=True, exist_ok=True)
        data = {m: {d: {"accuracy": a.value, "by_type": {q: a.of_type(q) for q in qtypes}} for d, a in r.items()}
                for m, r in results.items()}  # fmt: skip
        as_json.write_text(json.dumps(data, indent=2))


def row_names(paths: list[Path]) -> dict[str, Path]:
    """Table row name -> model directory: the directory's name, or the path as given where names collide (two
    zoos' ``teacher``); ConfigError when a directory is given twice."""
    names = [p.name or str(p) for p in paths]
    rows = {(str(p) if names.count(n) > 1 else n): p for p, n in zip(paths, names)}
    if len(rows) < len(paths):
        raise ConfigError("the same model directory is given twice with --model")
    return rows


def demo_command(
    recipe: str = RecipeOpt,
    samples: int = typer.Option(300, min=1, help="Held-out samples per domain."),
) -> None:
    """Build the zoo (cached) and print its evaluation tables."""
    rec = recipe_by_name(recipe)
    paths = ensure_zoo(rec, progress=True)
    console.print(f"zoo [bold]{rec.name}[/] at {paths.root}")
    domains = list(BENCHMARK_DOMAINS)
    results = run_evaluation(zoo_members(paths), domains, list(QUESTION_TYPES), samples, seed=0)
    print_tables(results, domains, Path("reports/zoo_eval.md"))
