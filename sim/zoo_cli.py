"""``tandem-sim zoo``: build the tiny LLaVA zoo and evaluate it (or any LLaVA checkpoint) on the world."""

from __future__ import annotations

import json
import sys
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
from sim.zoo.build import ZooPaths, ensure_zoo, is_built, locate_zoo, shipped_zoo, zoo_dir
from sim.zoo.evaluate import Accuracy, evaluate
from sim.zoo.recipe import RECIPES, ZooRecipe
from sim.zoo.reference import EVAL_FILE, compare_zoos, ship, shipped_evaluation
from sim.zoo.report import domain_rows, markdown_table, qtype_rows, rich_table, sampling_error_note
from sim.zoo.shapes import SHAPES, ensure_shape, shape_by_name

zoo_app = typer.Typer(help="Build and evaluate the tiny LLaVA model zoo.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes: wide enough for the tables


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


RecipeOpt = typer.Option("base", "--recipe", help=f"Zoo recipe: {', '.join([*RECIPES, *SHAPES])}.")
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
    compare_samples: int = typer.Option(
        300,
        "--compare-samples",
        min=0,
        help="If the build differs from the shipped zoo, evaluate both on this "
        "many samples per domain (0: compare the weights only).",
    ),
) -> None:
    """Pretrain the vision tower, then the teacher (all domains) and the device model (clear only).

    Always trains from the recipe into the cache (the shipped reference zoo is never overwritten), then says
    whether the result equals the shipped zoo bit for bit and, if not, how far its evaluation is. Shape recipes
    (``*-shape``) are not trained: real geometry, random weights from the seed (``--set lm_layers=4``).
    """
    if recipe in SHAPES:
        build_shape_command(recipe, home, force, settings)
        return
    rec = recipe_by_name(recipe, settings=settings)
    root = zoo_dir(rec, home)
    if is_built(ZooPaths.at(root), rec) and not force:
        console.print(f"zoo [bold]{rec.name}[/] is up to date at {root}")
        paths = ZooPaths.at(root)
    else:
        start = time.perf_counter()
        paths = ensure_zoo(
            rec, home=home, progress=True, force=force, compile_model=compile_model, side_by_side=side_by_side,
            use_shipped=False,
        )  # fmt: skip
        manifest = paths.manifest()
        console.print(f"built zoo [bold]{rec.name}[/] in {time.perf_counter() - start:.0f} s at {paths.root}")
        console.print(f"stage seconds: {manifest['seconds']}  parameters: {manifest['parameters']}")
    shipped = shipped_zoo(rec)
    if shipped is None:
        console.print(f"no shipped zoo for recipe {rec.name!r} (digest {rec.digest()}) to compare with")
        return
    report_against_shipped(paths, shipped, compare_samples)


def build_shape_command(name: str, home: Path | None, force: bool, settings: list[str]) -> None:
    """Build (or find) a shape member and print where it is and what it holds."""
    rec = shape_by_name(name, settings)
    start = time.perf_counter()
    root = ensure_shape(rec, home=home, force=force)
    manifest = json.loads((root / "zoo.json").read_text())
    console.print(f"shape member [bold]{rec.name}[/] at {root} ({time.perf_counter() - start:.0f} s)")
    console.print(f"build seconds: {manifest['seconds']}  parameters: {manifest['parameters']}")


def report_against_shipped(built: ZooPaths, shipped: ZooPaths, samples: int) -> bool:
    """Print whether a build equals the shipped zoo bit for bit; if not, both evaluations side by side."""
    comparisons = compare_zoos(built.root, shipped.root)
    for c in comparisons:
        state = "bit-identical" if c.equal else f"differs (max |diff| {c.max_abs_diff:.3g})"
        console.print(f"{c.member}: {c.identical}/{c.tensors} tensors identical to the shipped zoo: {state}")
    if all(c.equal for c in comparisons):
        console.print(f"[green]the build equals the shipped zoo at {shipped.root} bit for bit[/]")
        return True
    if samples <= 0:
        return False
    console.print(f"evaluating the build and the shipped zoo on {samples} samples per domain")
    domains = list(BENCHMARK_DOMAINS)
    members = zoo_members(built)
    models = {f"{m} (build)": p for m, p in members.items()} | {f"{m} (shipped)": shipped.root / m for m in members}
    results = run_evaluation(models, domains, list(QUESTION_TYPES), samples, seed=0)
    print_tables(results, domains, None)
    for member in members:
        gaps = [results[f"{member} (build)"][d].value - results[f"{member} (shipped)"][d].value for d in domains]
        worst = max(range(len(domains)), key=lambda i: abs(gaps[i]))
        console.print(
            f"{member}: build minus shipped, mean {100 * sum(gaps) / len(gaps):+.1f} points, "
            f"largest {100 * gaps[worst]:+.1f} on {domains[worst]}"
        )
    return False


@zoo_app.command("path")
def path_command(recipe: str = RecipeOpt, home: Path | None = HomeOpt, settings: list[str] = SetOpt) -> None:
    """Print where the zoo of a recipe is read from: shipped with the project, a cached build, or not built."""
    if recipe in SHAPES:
        from sim.zoo.shapes import shape_root

        root = shape_root(shape_by_name(recipe, settings), home)
        console.print(f"{root} ({'built' if (root / 'zoo.json').is_file() else 'not built'})")
        return
    rec = recipe_by_name(recipe, settings=settings)
    shipped = shipped_zoo(rec)
    if shipped is not None:
        console.print(f"{shipped.root} (shipped)")
        return
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
        paths = locate_zoo(rec, home)
        if paths is None:
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


def accuracy_counts(results: dict[str, dict[str, Accuracy]]) -> dict:
    """Exact counts (correct, total, per question type) of an evaluation, for eval.json."""
    return {
        model: {d: {"correct": a.correct, "total": a.total, "by_type": dict(a.by_type)} for d, a in per.items()}
        for model, per in results.items()
    }


def library_versions() -> dict[str, str]:
    """The versions an evaluation ran on (its numerics depend on them)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy")}


@zoo_app.command("ship")
def ship_command(
    recipe: str = RecipeOpt,
    home: Path | None = HomeOpt,
    samples: int = typer.Option(1000, min=1, help="Held-out samples per domain for the shipped figures."),
) -> None:
    """Maintainers: copy the cached build of a recipe into sim/zoo/reference/ and measure its figures there."""
    rec = recipe_by_name(recipe)
    built = ZooPaths.at(zoo_dir(rec, home))
    if not is_built(built, rec):
        raise ConfigError(f"zoo {rec.name!r} is not built in the cache; run: tandem-sim zoo build --recipe {rec.name}")
    target = ship(built.root, rec.name)
    console.print(f"shipped zoo {rec.name} ({rec.digest()}) to {target}; measuring its figures")
    domains = list(BENCHMARK_DOMAINS)
    results = run_evaluation(zoo_members(ZooPaths.at(target)), domains, list(QUESTION_TYPES), samples, seed=0)
    print_tables(results, domains, None)
    record = {"digest": rec.digest(), "samples": samples, "seed": 0, "versions": library_versions(),
              "accuracy": accuracy_counts(results)}  # fmt: skip
    (target / EVAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {target / EVAL_FILE}")


@zoo_app.command("basis")
def basis_command(
    recipe: str = RecipeOpt,
    home: Path | None = HomeOpt,
    samples: int = typer.Option(512, min=2, help="Clear-domain frames the PCA is fitted on."),
) -> None:
    """Build the device model's feature basis (PCA of its tower on the clear domain) into its directory: the
    shipped zoo's when the recipe matches it, else the cache's build; says whether it equals the one there."""
    from sim.zoo.basis import write_basis

    rec = recipe_by_name(recipe)
    paths = locate_zoo(rec, home)
    if paths is None:
        raise ConfigError(f"zoo {rec.name!r} is not built; run: tandem-sim zoo build --recipe {rec.name}")
    basis, same = write_basis(paths.device, rec.seed, samples)
    state = "identical to the one it replaces" if same else "new"
    console.print(f"basis {basis.version} ({basis.rank} x {basis.dim}) of {paths.device}: {state}")


def compare_with_shipped_figures(results: dict[str, dict[str, Accuracy]], shipped: dict) -> str:
    """One line: whether an evaluation reproduces the shipped figures exactly, or by how much it differs."""
    counts, gaps = accuracy_counts(results), []
    for model, per in counts.items():
        for d, cell in per.items():
            ref = shipped["accuracy"].get(model, {}).get(d)
            if ref is None or ref["total"] != cell["total"]:
                continue
            gaps.append(abs(cell["correct"] - ref["correct"]) / cell["total"])
    if not gaps:
        return "no shipped figures at this sample count to compare with"
    if max(gaps) == 0:
        return f"reproduces the shipped figures exactly ({len(gaps)} cells)"
    return f"differs from the shipped figures by up to {100 * max(gaps):.1f} points ({len(gaps)} cells)"


def demo_command(
    recipe: str = RecipeOpt,
    samples: int | None = typer.Option(
        None, min=1, help="Held-out samples per domain (default: as many as the shipped figures, or 300)."
    ),
) -> None:
    """Evaluate the shipped reference zoo (nothing is built) and print its tables against the shipped figures."""
    rec = recipe_by_name(recipe)
    paths = ensure_zoo(rec, progress=True)
    figures = shipped_evaluation(rec.name) if paths == shipped_zoo(rec) else None
    samples = samples or (figures or {}).get("samples", 300)
    origin = "shipped" if figures is not None else "built"
    console.print(f"zoo [bold]{rec.name}[/] ({rec.digest()}, {origin}) at {paths.root}; {samples} samples per domain")
    domains = list(BENCHMARK_DOMAINS)
    results = run_evaluation(zoo_members(paths), domains, list(QUESTION_TYPES), samples, seed=0)
    print_tables(results, domains, Path("reports/zoo_eval.md"))
    if figures is not None:
        console.print(compare_with_shipped_figures(results, figures))
