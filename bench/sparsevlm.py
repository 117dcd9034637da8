"""SparseVLM benchmark: dense vs Tandem's SparseVLM, the paper-parity preset, FastV, random, and the
VisionZip- and DivPrune-style selections, at the paper's layer-averaged budgets, in one run per model.

``python -m bench.sparsevlm [--quick]`` measures every method on the same inputs of each model and prints
ratios to the dense model measured in the same process; the tables are also written to
``reports/sparsevlm.md``. Budgets are the paper's 192/128/64 visual tokens of 576 averaged over all LM
layers, scaled to each model's visual-token count (48/32/16 of 144).

Measures: visual tokens (final layer and layer-averaged), prefill FLOPs (torch.utils.flop_counter: matmul,
linear and attention; language model = total - vision tower + projector), CPU prefill time (process CPU
seconds, median, methods interleaved), peak live-tensor memory of the prefill (a dispatch-mode tracker:
activations, masks, KV cache, outputs; not weights, not kernel scratch), KV-cache bytes, and greedy
first-token accuracy on the world, clear and shifted domains, as a percentage of dense.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench._sparsevlm_measure import count_flops, median, peak_tensor_bytes, prefill_breakdown, time_call
from bench._verdict import verdict
from common.errors import TandemError
from device.sparse import SparseConfig, disable_sparsevlm, enable_sparsevlm, sparse_stats
from device.sparse.adapters import cache_bytes, output_cache
from device.sparse.config import REFERENCE_KEPT_LISTS
from sim.world import BENCHMARK_DOMAINS, QUESTION_TYPES, World
from sim.zoo.reference import REFERENCE_DIR
from sim.zoo.tokenizer import prompt_for

REFERENCE_VISUAL = 576  # budgets are given for 576 visual tokens and scaled to the model's geometry
# The shipped reference zoo: accuracy on the base teacher and device (144 visual tokens) and the deep member;
# speed (and accuracy when asked) on base576 (576 visual tokens).
DEFAULT_ACCURACY_MODELS = ("base/teacher", "base/device", "deep/device")
DEFAULT_SPEED_MODELS = ("base576/device",)
BASELINES = ("fastv", "random", "visionzip", "divprune")
EVAL_SEED = 10_000  # held-out world seed (training uses small seeds)
console = Console(width=200)


@dataclass
class Method:
    """One row of the table."""

    name: str
    budget: str
    cfg: SparseConfig | None
    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    final_counts: list[int] = field(default_factory=list)
    mean_counts: list[float] = field(default_factory=list)
    perf: dict[str, float] = field(default_factory=dict)

    def accuracy(self, domains: list[str]) -> float:
        total = sum(self.total.get(d, 0) for d in domains)
        return sum(self.correct.get(d, 0) for d in domains) / max(1, total)


def build_methods(n_visual: int, budgets: list[int], rank_lambda: float | None) -> list[Method]:
    """Dense; per budget (layer average, of 576): Tandem's defaults, Tandem keeping the most relevant tokens
    (``tandem-rel``), the paper-parity preset, FastV, random, VisionZip-style and DivPrune-style; optionally
    Tandem's rank mode."""
    methods = [Method("dense", str(n_visual), None)]
    for label in budgets:
        b = max(1, round(label * n_visual / REFERENCE_VISUAL))
        budget = f"{label}->{b}" if b != label else str(b)
        avg = dict(budget=label, budget_kind="layer_average", budget_reference=REFERENCE_VISUAL)
        methods.append(Method("tandem", budget, SparseConfig(**avg)))
        # ablation: Tandem keeping the most relevant tokens (the paper's rule) instead of relevance x diversity
        methods.append(Method("tandem-rel", budget, SparseConfig(**avg, relevance_weight=None)))
        if label in REFERENCE_KEPT_LISTS:
            methods.append(Method("paper-parity", budget, SparseConfig.paper_parity(label)))
        for name in BASELINES:
            methods.append(Method(name, budget, SparseConfig(method=name, **avg)))
    if rank_lambda is not None:
        methods.append(Method("tandem", f"rank(l={rank_lambda})", SparseConfig(mode="rank", rank_lambda=rank_lambda)))
    return methods


def select(model: Any, method: Method) -> None:
    if method.cfg is None:
        disable_sparsevlm(model)
    else:
        enable_sparsevlm(model, method.cfg)


def load_model(model_dir: Path | None, recipe: str | None, random_geometry: bool) -> tuple[Any, Any, str]:
    """The device model and its processor: a directory, a random model, or the zoo's trained device model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if random_geometry:
        from sim.zoo.architecture import build_llava
        from sim.zoo.recipe import VisionSpec, ZooRecipe
        from sim.zoo.tokenizer import build_processor

        base = ZooRecipe()
        vision = VisionSpec(**{**base.vision.model_dump(), "image_size": 192, "patch_size": 8})
        processor = build_processor(vision.image_size, vision.patch_size)
        tok = processor.tokenizer
        model = build_llava(vision, base.device, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, 0)
        return model.eval(), processor, "random-init device model, 192 px / patch 8 (576 visual tokens)"
    label = f"model directory {model_dir}"
    if model_dir is None and recipe is not None:
        try:
            from sim.zoo.build import ensure_zoo
            from sim.zoo.recipe import RECIPES
        except ImportError as exc:
            raise TandemError(f"the zoo builder is not available ({exc}); pass --model-dir or --random") from exc
        if recipe not in RECIPES:
            raise TandemError(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
        model_dir = ensure_zoo(RECIPES[recipe](), progress=True).device
        label = f"zoo device model of recipe {recipe} ({model_dir})"
    if model_dir is None or not (model_dir / "config.json").is_file():
        raise TandemError(f"no model in {model_dir}")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor, label


def encode(processor: Any, samples: list) -> dict[str, torch.Tensor]:
    enc = processor(
        images=[s.image for s in samples],
        text=[prompt_for(s.question) for s in samples],
        return_tensors="pt",
        padding=True,
    )
    enc["position_ids"] = (enc["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return dict(enc)


@torch.no_grad()
def measure_accuracy(
    model: Any, processor: Any, methods: list[Method], domains: list[str], n: int, batch: int, image_size: int
) -> None:
    """Greedy first-token accuracy per method and domain; vision features computed once per batch."""
    world = World(EVAL_SEED, image_size)
    tok = processor.tokenizer
    for domain in domains:
        for start in range(0, n, batch):
            samples = [
                world.sample(i, domain, QUESTION_TYPES[i % len(QUESTION_TYPES)])
                for i in range(start, min(n, start + batch))
            ]
            enc = encode(processor, samples)
            pixel_values = enc.pop("pixel_values")
            feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
            for m in methods:
                select(model, m)
                # VisionZip reads the vision tower's CLS attention: its rows run the tower themselves
                image = {"pixel_values": pixel_values} if _needs_tower(m) else {"mm_encoder_outputs": {"image": feats}}
                logits = model(**enc, **image, logits_to_keep=1, use_cache=False).logits
                preds = tok.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
                m.correct[domain] = m.correct.get(domain, 0) + sum(
                    p == s.answer for p, s in zip(preds, samples, strict=True)
                )
                m.total[domain] = m.total.get(domain, 0) + len(samples)
                stats = sparse_stats(model) if m.cfg is not None else None
                if stats is not None:
                    m.final_counts += [s.final_count for s in stats.samples]
                    m.mean_counts += [s.mean_count for s in stats.samples]
        console.print(f"  accuracy: domain {domain} done ({n} samples x {len(methods)} methods)")


def _needs_tower(method: Method) -> bool:
    return method.cfg is not None and method.cfg.method == "visionzip"


def _prefill_calls(model: Any, processor: Any, image_size: int, batch: int) -> dict[str, Any]:
    """Closures running the vision tower, the full prefill and the LM-only prefill on ``batch`` samples."""
    world = World(EVAL_SEED, image_size)
    samples = [world.sample(i, "clear", QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(batch)]
    enc = encode(processor, samples)
    pixel_values = enc.pop("pixel_values")

    def vision() -> Any:
        return model.model.get_image_features(pixel_values=pixel_values, return_dict=True)

    feats = vision()
    return {
        "vision": vision,
        "full": lambda: model(**enc, pixel_values=pixel_values, logits_to_keep=1, use_cache=True),
        "lm": lambda: model(**enc, mm_encoder_outputs={"image": feats}, logits_to_keep=1, use_cache=True),
    }


@torch.no_grad()
def measure_performance(
    model: Any, processor: Any, methods: list[Method], image_size: int, repeats: int, time_batches: list[int]
) -> None:
    """FLOPs, peak memory and KV-cache size of a batch-1 prefill (with a KV cache, as before generation),
    and CPU times of prefills at each batch size in ``time_batches``."""
    calls = _prefill_calls(model, processor, image_size, 1)
    vision_flops = count_flops(calls["vision"])
    for m in methods:
        select(model, m)
        total = count_flops(calls["full"])
        m.perf["flops_total"] = total
        m.perf["flops_lm"] = total - vision_flops
        m.perf["peak_bytes"] = peak_tensor_bytes(calls["full"])
        m.perf["kv_bytes"] = cache_bytes(output_cache(calls["full"]()))
        stats = sparse_stats(model) if m.cfg is not None else None
        if stats is not None:  # token counts of the timed sample (the accuracy run's average replaces them)
            m.perf["vis_final"] = float(stats.samples[0].final_count)
            m.perf["vis_mean"] = float(stats.samples[0].mean_count)
    for batch in time_batches:
        calls = _prefill_calls(model, processor, image_size, batch)
        times: dict[tuple[int, str], list[float]] = {}
        for i, m in enumerate(methods):
            select(model, m)
            for kind in ("full", "lm"):
                calls[kind]()  # warm-up
                times[(i, kind)] = []
        for _ in range(repeats):  # interleaved, so drift of a shared machine hits every method alike
            for i, m in enumerate(methods):
                select(model, m)
                for kind in ("full", "lm"):
                    times[(i, kind)].append(time_call(calls[kind]))
        for (i, kind), values in times.items():
            methods[i].perf[f"time_{kind}_b{batch}"] = median(values)


@torch.no_grad()
def breakdown_line(model: Any, processor: Any, methods: list[Method], image_size: int, repeats: int) -> str:
    """Where a batch-1 LM prefill's CPU time goes, dense vs Tandem at the smallest budget (ms per prefill)."""
    call = _prefill_calls(model, processor, image_size, 1)["lm"]
    tandem = [m for m in methods if m.name == "tandem" and m.budget.split("->")[0].isdigit()]
    parts = []
    for m in [methods[0], *tandem[-1:]]:
        select(model, m)
        stages = prefill_breakdown(model, call, repeats)
        shown = ", ".join(f"{k} {1e3 * v:.2f}" for k, v in stages.items() if v > 0 and k != "total")
        parts.append(f"{m.name} {m.budget}: {1e3 * stages['total']:.2f} ms ({shown})")
    return "Batch-1 LM prefill by stage, ms of CPU (mean of " + str(repeats) + "): " + "; ".join(parts)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _relative(value: float, base: float) -> str:
    """``value`` as % of ``base``; '-' when the base is 0 (no ratio to show)."""
    return _pct(value / base) if base > 0 else "-"


def header(time_batches: list[int]) -> list[str]:
    times = [f"{kind} time b{b}" for b in time_batches for kind in ("LM", "total")]
    return ["method", "budget", "vis layer-avg", "vis final", "LM FLOPs", "total FLOPs", *times]


ACC_HEADER = ["peak mem", "KV cache", "acc kept clear %", "acc kept shifted %", "acc kept all %"]


def table_rows(
    methods: list[Method], clear: list[str], shifted: list[str], n_visual: int, time_batches: list[int]
) -> list[list[str]]:
    dense = methods[0]
    rows = []
    for m in methods:
        p, d = m.perf, dense.perf
        final = sum(m.final_counts) / len(m.final_counts) if m.final_counts else p.get("vis_final", n_visual)
        mean = sum(m.mean_counts) / len(m.mean_counts) if m.mean_counts else p.get("vis_mean", n_visual)
        times = [
            f"{p[f'time_{kind}_b{b}'] / d[f'time_{kind}_b{b}']:.3f}" for b in time_batches for kind in ("lm", "full")
        ]
        rows.append(
            [
                m.name,
                m.budget,
                f"{mean:.1f}",
                f"{final:.1f}",
                f"{p['flops_lm'] / d['flops_lm']:.3f}",
                f"{p['flops_total'] / d['flops_total']:.3f}",
                *times,
                f"{p['peak_bytes'] / d['peak_bytes']:.3f}",
                f"{p['kv_bytes'] / d['kv_bytes']:.3f}",
                _relative(m.accuracy(clear), dense.accuracy(clear)),
                _relative(m.accuracy(shifted), dense.accuracy(shifted)) if shifted else "-",
                _relative(m.accuracy(clear + shifted), dense.accuracy(clear + shifted)),
            ]
        )
    return rows


def target_lines(
    methods: list[Method],
    clear: list[str],
    shifted: list[str],
    budgets: list[int],
    time_batches: list[int],
    accuracy: bool,
) -> list[str]:
    """The issue's targets, each with the measured figure and PASS / MISS."""
    dense = methods[0]
    domains = clear + shifted
    by = {(m.name, m.budget.split("->")[0]): m for m in methods}
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'PASS' if ok else 'MISS'}: {text}")

    low = min(budgets)
    m64 = by.get(("tandem", str(low)))
    if m64 is not None and 1 in time_batches:
        r = m64.perf["time_lm_b1"] / dense.perf["time_lm_b1"]
        check(r <= 0.5, f"LM prefill CPU time at {low} (layer average), batch 1: {r:.3f} of dense (target <= 0.5)")
    if not accuracy:
        return lines
    base = dense.accuracy(domains)
    if m64 is not None:
        for name, doms in (("clear", clear), ("shifted", shifted), ("all", domains)):
            if doms:
                r = m64.accuracy(doms) / max(dense.accuracy(doms), 1e-9)
                check(r >= 0.95, f"tandem at {low}: {_pct(r)}% of dense accuracy ({name}; target >= 95%)")
    for b in budgets:
        s = by.get(("tandem", str(b)))
        if s is None:
            continue
        others = [
            m for m in methods if m.budget.split("->")[0] == str(b) and m.name not in ("tandem", "tandem-rel", "dense")
        ]
        acc = {m.name: m.accuracy(domains) for m in [s, *others]}
        beaten = [n for n in acc if n != "tandem" and acc[n] > acc["tandem"]]
        detail = ", ".join(f"{n} {_pct(a / max(base, 1e-9))}" for n, a in acc.items())
        check(not beaten, f"budget {b}: % of dense (all domains): {detail} (target: tandem at or above every row)")
        if beaten:  # were the rows above it spending more tokens? (FastV and paper-parity cannot go lower)
            own = _mean_count(s)
            more = [n for n in beaten if _mean_count(next(m for m in others if m.name == n)) > 1.1 * own]
            fair = [n for n in beaten if n not in more]
            note = (
                f"above it: {', '.join(fair) or 'none'} at its layer average; {', '.join(more) or 'none'} with > 1.1x"
            )
            check(not fair, f"budget {b}: tandem against rows at the same layer average ({note})")
    return lines


def _mean_count(method: Method) -> float:
    """Visual tokens averaged over the LM layers and the accuracy samples (the timed sample's without them)."""
    if method.mean_counts:
        return sum(method.mean_counts) / len(method.mean_counts)
    return method.perf.get("vis_mean", 0.0)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _positive_ints(text: str, option: str, example: str) -> set[int]:
    try:
        values = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        values = set()
    if not values or min(values) < 1:
        raise TandemError(f"{option} needs comma-separated positive integers, e.g. {example}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sparsevlm", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples, domains and repeats")
    parser.add_argument(
        "--model-dir", type=Path, action="append", default=None,
        help="a saved LLaVA model + processor directory, accuracy and speed (repeatable; default: the shipped "
        f"reference zoo's {', '.join(DEFAULT_ACCURACY_MODELS)})",
    )  # fmt: skip
    parser.add_argument(
        "--speed-dir", type=Path, action="append", default=None,
        help=f"a model measured for speed only (repeatable; default: the reference {DEFAULT_SPEED_MODELS[0]})",
    )  # fmt: skip
    parser.add_argument("--recipe", default=None, help="a zoo recipe's device model instead (built if missing)")
    parser.add_argument("--random", action="store_true", help="random-init 576-token model (speed figures only)")
    parser.add_argument("--samples", type=int, default=0, help="samples per domain (default 64 quick, 1000 full)")
    parser.add_argument("--budgets", default="192,128,64", help="layer-averaged budgets of 576 (scaled)")
    parser.add_argument("--rank-lambda", type=float, default=None, help="also Tandem's rank mode with this lambda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=0, help="timing repeats (default 9 quick, 21 full)")
    parser.add_argument("--batch", type=int, default=32, help="accuracy batch size")
    parser.add_argument("--time-batches", default="1,8", help="batch sizes of the timed prefills")
    parser.add_argument("--out", type=Path, default=Path("reports/sparsevlm.md"), help="markdown report path")
    return parser.parse_args(argv)


def _models(args: argparse.Namespace) -> list[tuple[Path | None, bool]]:
    """(model directory, measure accuracy) for every model of the run; missing reference members skipped."""
    if args.random or args.recipe:
        return [(None, not args.random)]
    if args.model_dir or args.speed_dir:
        return [(d, True) for d in args.model_dir or []] + [(d, False) for d in args.speed_dir or []]
    found = [(REFERENCE_DIR / m, True) for m in DEFAULT_ACCURACY_MODELS] + [
        (REFERENCE_DIR / m, False) for m in DEFAULT_SPEED_MODELS
    ]
    found = [(d, acc) for d, acc in found if (d / "config.json").is_file()]
    if not found:
        raise TandemError(f"no reference zoo under {REFERENCE_DIR}; pass --model-dir, --recipe or --random")
    return found


def run_model(
    model_dir: Path | None, accuracy: bool, args: argparse.Namespace, budgets: list[int], batches: list[int]
) -> str:
    """Measure one model; print its table and return its markdown section."""
    quick = args.quick
    n = args.samples or (64 if quick else 1000)
    reps = args.repeats or (9 if quick else 21)
    clear = ["clear"]
    shifted = ["night", "fog"] if quick else [d for d in BENCHMARK_DOMAINS if d != "clear"]
    model, processor, description = load_model(model_dir, args.recipe, args.random)
    image_size = int(model.config.vision_config.image_size)
    n_visual = (image_size // int(model.config.vision_config.patch_size)) ** 2
    methods = build_methods(n_visual, budgets, args.rank_lambda)
    n_layers = model.config.text_config.num_hidden_layers
    console.print(
        f"[bold]SparseVLM benchmark[/]: {description}; {n_visual} visual tokens, {n_layers} LM layers, "
        f"{args.threads} thread(s)"
    )
    measure_performance(model, processor, methods, image_size, reps, batches)
    stages = breakdown_line(model, processor, methods, image_size, max(20, 5 * reps))
    console.print("  performance measured")
    if accuracy:
        measure_accuracy(model, processor, methods, clear + shifted, n, args.batch, image_size)
    head = header(batches) + ACC_HEADER
    rows = table_rows(methods, clear, shifted if accuracy else [], n_visual, batches)
    if not accuracy:
        head, rows = head[:-3], [r[:-3] for r in rows]
    table = Table(title=f"{description}: ratios to dense, same run")
    for h in head:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    d = methods[0].perf
    dense = methods[0]
    times = "; ".join(
        f"batch {b}: LM {1e3 * d[f'time_lm_b{b}']:.2f} ms, total {1e3 * d[f'time_full_b{b}']:.2f} ms" for b in batches
    )
    absolute = (
        f"Dense absolute: LM prefill {d['flops_lm'] / 1e6:.1f} MFLOPs, total {d['flops_total'] / 1e6:.1f} MFLOPs "
        f"(batch 1); CPU time {times} (median of {reps}, {args.threads} thread(s)); peak live tensors "
        f"{d['peak_bytes'] / 2**20:.2f} MiB; KV cache {d['kv_bytes'] / 2**10:.1f} KiB"
    )
    if accuracy:
        absolute += (
            f"; accuracy clear {_pct(dense.accuracy(clear))}%, shifted {_pct(dense.accuracy(shifted))}% "
            f"({n} samples per domain; shifted = {', '.join(shifted)})"
        )
    absolute += ".\n\n" + stages + "."
    targets = target_lines(methods, clear, shifted, budgets, batches, accuracy)
    console.print(absolute)
    for line in targets:
        console.print(line)
    return (
        f"## {description}\n\n{n_visual} visual tokens; {n_layers} LM layers.\n\n"
        + markdown(head, rows)
        + "\n\n"
        + absolute
        + "\n\n### Targets\n\n"
        + "\n".join(targets)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on every model and write the tables to the console and to a markdown file."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = sorted(_positive_ints(args.budgets, "--budgets", "192,128,64"), reverse=True)
    batches = sorted(_positive_ints(args.time_batches, "--time-batches", "1,8"))
    sections = [run_model(d, acc, args, budgets, batches) for d, acc in _models(args)]
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.sparsevlm", *(sys.argv[1:] if argv is None else argv)])
    out.write_text(
        "# SparseVLM benchmark\n\n"
        f"Command: `{command}`; torch CPU threads: {args.threads} (host has {os.cpu_count()}).\n\n"
        "Budgets: visual tokens averaged over all LM layers (the paper's 192/128/64 of 576), scaled to each "
        "model's count. Columns: layer-averaged and final visual tokens (merged tokens counted); FLOPs from "
        "torch.utils.flop_counter at batch 1 (LM = total - vision tower and projector); times are process "
        "CPU-time medians of interleaved prefills at batch b; peak mem = peak live tensor bytes created during "
        "the batch-1 prefill (dispatch-mode tracker); accuracy kept = greedy first token == answer, as % of "
        "dense.\n\n" + "\n".join(sections)
    )
    console.print(f"report written to {out}")
    targets = [ln[2:] for section in sections for ln in section.splitlines() if ln.startswith(("- PASS", "- MISS"))]
    return verdict("sparsevlm", [(t.startswith("PASS"), t.split(": ", 1)[1]) for t in targets])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TandemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
