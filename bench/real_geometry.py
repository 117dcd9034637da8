"""Tandem at LLaVA-1.5-7B geometry on this CPU: every figure a ratio against its baseline in the same run.

``python -m bench.real_geometry [--sections prefill,memory,uplink,agent,trainer] [--threads 1]`` builds (or finds)
the ``llava-1.5-7b-shape`` zoo member (hidden 4096, vocabulary 32064, CLIP ViT-L/14-336: 576 visual tokens; a
13B-shaped teacher; 2 LM and 2 tower layers, random weights) and measures, each section in its own process (so
each reports its own peak RSS and at most two models live at once):

- ``prefill``: SparseVLM LM prefill time at 64 and 192 of 576 (layer average; Tandem and paper-parity presets)
  against dense, batch 1 and 8 (fp32). Random weights: no accuracy is claimed.
- ``memory``: the device model's bytes at 4-bit NF4 and int8 (bitsandbytes on CPU) against fp16.
- ``uplink``: bytes of one uploaded sample in today's format (UTS keep ratio from deploy/configs/device.yaml)
  against all 576 tokens in that format and a JPEG q90 of the 336x336 frame.
- ``generate``: an N-token greedy answer (``--gen-tokens``, default 8; batch 1, fp32) from the KV cache (one prefill +
  N - 1 one-token steps) against re-running the prefill per token, dense and with SparseVLM at 64 (its pruned
  cache); the answers must be identical, the figure is cached time / uncached time.
- ``agent``: a real offline ``DeviceAgent`` on the 4-bit model with SparseVLM, a few Asks: peak RSS.
- ``trainer``: teacher labels (13B-shaped, bf16), AKD steps with LoRA at width 4096 (seconds per sample), DWC
  update bytes against the fp32 LoRA state and CD-CCA's 0.791 MB; peak RSS.

Writes ``reports/real_geometry.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench._verdict import verdict

CDCCA_DOWNLINK_BYTES = 791_000  # CD-CCA's DWC update (paper: 14.48 GB -> 0.791 MB), docs/../cdcca.md
SECTIONS = ("prefill", "memory", "uplink", "generate", "agent", "trainer")
PREFILL_TARGET = 0.35
"""SparseVLM LM prefill at 64 of 576 visual tokens, as a share of dense (issue: real geometry)."""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def member_root(settings: list[str]) -> Path:
    from sim.zoo.shapes import ensure_shape, shape_by_name

    return ensure_shape(shape_by_name("llava-1.5-7b-shape", settings))


def frames(n: int, size: int = 336) -> list:
    from sim.world import QUESTION_TYPES, World

    world = World(10_000, size)
    return [world.sample(i, "clear", QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(n)]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@torch.no_grad()
def section_prefill(root: Path, repeats: int, batches: list[int]) -> dict:
    from bench.sparsevlm import _prefill_calls
    from common.modeling import load_mllm
    from device.sparse import SparseConfig, disable_sparsevlm, enable_sparsevlm, sparse_stats

    model = load_mllm(root / "device", dtype="float32")
    avg = {"budget_kind": "layer_average", "budget_reference": 576}
    settings = {
        "dense": None,
        "tandem-64": SparseConfig(budget=64, **avg),
        "tandem-192": SparseConfig(budget=192, **avg),
        "paper-parity-64": SparseConfig.paper_parity(64),
        "paper-parity-192": SparseConfig.paper_parity(192),
    }
    out: dict = {"layers": model.model.config.text_config.num_hidden_layers, "settings": {}}
    for batch in batches:
        calls = _prefill_calls(model.model, model.processor, 336, batch)
        times: dict[str, list[float]] = {name: [] for name in settings}
        for rep in range(repeats if batch == 1 else 1):  # interleaved: load drift hits every setting alike
            for name, cfg in settings.items():
                disable_sparsevlm(model.model) if cfg is None else enable_sparsevlm(model.model, cfg)
                if rep == 0 and batch == 1:
                    calls["lm"]()  # warm-up
                t0 = time.perf_counter()
                calls["lm"]()
                times[name].append(time.perf_counter() - t0)
                if cfg is not None and batch == 1:
                    s = sparse_stats(model.model).samples[0]
                    out["settings"].setdefault(name, {}).update(final_tokens=s.final_count, mean_tokens=s.mean_count)
        dense = _median(times["dense"])
        for name, values in times.items():
            row = out["settings"].setdefault(name, {})
            row[f"lm_prefill_s_b{batch}"] = _median(values)
            row[f"ratio_b{batch}"] = _median(values) / dense
    return out


@torch.no_grad()
def section_generate(root: Path, tokens: int, repeats: int) -> dict:
    """Cached vs uncached greedy answers of ``tokens`` tokens, dense and SparseVLM at 64 (same run, batch 1)."""
    from device.agent.runtime import DeviceModel
    from device.sparse import SparseConfig

    model = DeviceModel.load(root / "device", dtype="float32")
    model.eos_id = -1  # random weights: make every answer run its full length
    sample = frames(1)[0]
    feats = model.features([sample.image])
    question = [sample.question]
    out: dict = {"tokens": tokens}
    for name, cfg in (("dense", None), ("tandem-64", SparseConfig(budget=64, budget_kind="layer_average"))):
        model.set_sparse(cfg)
        model.generate(feats, question, [2])  # warm-up
        times: dict[str, list[float]] = {"cached": [], "uncached": []}
        answers: dict[str, list[int]] = {}
        for _ in range(repeats):
            for kind in times:
                t0 = time.perf_counter()
                got = model.generate(feats, question, [tokens], use_cache=kind == "cached")
                times[kind].append(time.perf_counter() - t0)
                answers[kind] = got.sequences[0]
        cached, uncached = _median(times["cached"]), _median(times["uncached"])
        out[name] = {
            "cached_s": cached,
            "uncached_s": uncached,
            "cached_vs_uncached": cached / uncached,
            "identical": answers["cached"] == answers["uncached"],
        }
    return out


def section_memory(root: Path) -> dict:
    from common.modeling import load_mllm

    out = {}
    for name, quant in (("fp16", "none"), ("int8", "8bit"), ("nf4", "4bit")):
        t0 = time.perf_counter()
        dtype = "float16"  # what stays unquantized (tower, projector, embeddings, head) in fp16, as on a GPU
        loaded = load_mllm(root / "device", quantization=quant, dtype=dtype)
        lm = loaded.model.model.language_model
        lm_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
        out[name] = {
            "model_bytes": int(loaded.model.get_memory_footprint()),
            "lm_layers_bytes": int(lm_bytes - lm.embed_tokens.weight.numel() * lm.embed_tokens.weight.element_size()),
            "load_s": time.perf_counter() - t0,
        }
        layers = loaded.model.config.text_config.num_hidden_layers
        out[name]["model_bytes_at_32_layers"] = int(  # measured parts: the rest + 32 / layers x the layers
            out[name]["model_bytes"] + (32 / layers - 1) * out[name]["lm_layers_bytes"]
        )
        del loaded, lm
        gc.collect()
    for row in out.values():
        row["vs_fp16"] = row["model_bytes"] / out["fp16"]["model_bytes"]
        row["lm_layers_vs_fp16"] = row["lm_layers_bytes"] / out["fp16"]["lm_layers_bytes"]
        row["at_32_layers_vs_fp16"] = row["model_bytes_at_32_layers"] / out["fp16"]["model_bytes_at_32_layers"]
    return out


@torch.no_grad()
def section_uplink(root: Path) -> dict:
    from common.llava_tokens import vision_features
    from common.modeling import load_mllm
    from common.sample_codec import UploadSample, encode_sample
    from device.agent.config import load_agent_config
    from device.uts import jpeg_bytes, select_tokens
    from sim.world import World

    keep = load_agent_config(None, {}).uts.keep_ratio
    loaded = load_mllm(root / "device", dtype="float32")
    sample = frames(1)[0]
    noisy = World(10_000, 336).sample(0, "noise", sample.qtype).image  # sensor noise: closer to a camera's JPEG
    pixels = loaded.processor.image_processor(images=[sample.image], return_tensors="pt")["pixel_values"]
    feats = vision_features(loaded.model, pixels)[0]

    def payload(count_share: float) -> int:
        idx = select_tokens(torch.rand(feats.shape[0], generator=torch.Generator().manual_seed(0)), count_share, 4)
        up = UploadSample(
            features=feats[idx], patch_indices=idx, num_patches=feats.shape[0], question=sample.question,
            answer_ids=torch.arange(5), answer_probs=torch.full((5,), 0.2), uncertainty={"confidence": 0.2},
        )  # fmt: skip
        return len(encode_sample(up))

    kept = payload(keep)
    return {
        "visual_tokens": int(feats.shape[0]),
        "feature_width": int(feats.shape[1]),
        "keep_ratio": keep,
        "sample_bytes": kept,
        "all_tokens_bytes": payload(1.0),
        "jpeg_q90_bytes": jpeg_bytes(sample.image, 90),
        "jpeg_q90_noise_shift_bytes": jpeg_bytes(noisy, 90),
        "sample_vs_all_tokens": kept / payload(1.0),
        "sample_vs_jpeg": kept / jpeg_bytes(sample.image, 90),
    }


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frames(seed + 1)[seed].image).save(buf, "PNG")
    return buf.getvalue()


def section_agent(root: Path, asks: int) -> dict:
    import asyncio
    import tempfile

    from device.agent import DeviceAgent, DeviceModel, load_agent_config
    from device.sparse import SparseConfig

    async def go() -> dict:
        with tempfile.TemporaryDirectory() as state:
            cfg = load_agent_config(None, {
                "transport.state_dir": state, "api.listen": "", "metrics.port": None, "guard.enabled": False,
            })  # fmt: skip
            sparse = SparseConfig(budget=64, budget_kind="layer_average", budget_reference=576)
            model = DeviceModel.load(root / "device", quantization="4bit", sparse=sparse)
            agent = DeviceAgent(cfg, model=model, connect=False)
            await agent.start()
            try:
                latencies, answers = [], []
                for i in range(asks):
                    t0 = time.perf_counter()
                    a = await agent.ask(_png(i), "what color is the circle ?")
                    latencies.append(time.perf_counter() - t0)
                    answers.append((a.answer, a.kept_tokens, a.total_tokens))
            finally:
                await agent.stop()
        return {"ask_s": latencies, "answers": answers}

    return asyncio.run(go())


def section_trainer(root: Path, samples: int) -> dict:
    from cloud.akd import AKDConfig, AKDTrainer
    from cloud.akd.teacher import teacher_labels
    from cloud.dwc import CloudMirror, DWCConfig, compress, full_state_bytes
    from common.llava_tokens import PromptBuilder, vision_features
    from common.modeling import load_mllm
    from common.sample_codec import UploadSample, decode_sample, encode_sample

    t_load = time.perf_counter()
    teacher = load_mllm(root / "teacher")  # bf16 as stored
    shots = frames(samples)
    uploads = []
    with torch.no_grad():
        pixels = teacher.processor.image_processor(images=[s.image for s in shots], return_tensors="pt")
        feats = vision_features(teacher.model, pixels["pixel_values"].to(torch.bfloat16)).float()
    for s, f in zip(shots, feats, strict=True):
        idx = torch.arange(0, f.shape[0], 4)  # a quarter of the tokens, as the device's keep ratio sends
        up = UploadSample(f[idx], idx, f.shape[0], s.question, torch.arange(5), torch.full((5,), 0.2), {})
        uploads.append(decode_sample(encode_sample(up)))  # what the cloud reads: int8 features
    prompts_t = PromptBuilder(teacher.processor.tokenizer, teacher.model.config.image_token_id)
    t0 = time.perf_counter()
    labels = teacher_labels(teacher.model, prompts_t, uploads, batch_size=2)
    label_s = time.perf_counter() - t0
    teacher_hidden = teacher.model.config.text_config.hidden_size
    del teacher
    gc.collect()
    device = load_mllm(root / "device", dtype="float32")
    prompts = PromptBuilder(device.processor.tokenizer, device.model.config.image_token_id)
    cfg = AKDConfig(batch_size=2, epochs=1)
    trainer = AKDTrainer(device.model, teacher_hidden, prompts, cfg)
    del device
    gc.collect()
    start_state = trainer.adapter_state()
    load_s = time.perf_counter() - t_load - label_s
    steps = []
    for i in range(0, len(uploads), cfg.batch_size):
        chunk = list(range(i, min(i + cfg.batch_size, len(uploads))))
        t0 = time.perf_counter()
        loss = trainer.losses([uploads[j] for j in chunk], labels.subset(chunk))["total"]
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        steps.append((time.perf_counter() - t0) / len(chunk))
    target = trainer.adapter_state()
    dwc = DWCConfig(bits="auto", block=64, energy_share=0.98, selection="impact")  # deploy/configs/cloud.yaml
    update = compress(CloudMirror(start_state), target, dwc)
    lora = full_state_bytes(target)
    return {
        "teacher_hidden": teacher_hidden,
        "teacher_label_s_per_sample": label_s / len(uploads),
        "akd_s_per_sample": steps,
        "akd_s_per_sample_median": _median(steps),
        "lora_parameters": sum(t.numel() for t in target.values()),
        "lora_fp32_bytes": lora,
        "update_bytes": len(update.payload),
        "update_vs_lora_fp32": len(update.payload) / lora,
        "update_vs_cdcca": len(update.payload) / CDCCA_DOWNLINK_BYTES,
        "update_sent_energy_share": update.sent_share,
        "load_s": load_s,
    }


def run_section(name: str, args: argparse.Namespace) -> dict:
    root = member_root(args.set)
    t0 = time.perf_counter()
    if name == "prefill":
        result = section_prefill(root, args.repeats, [int(b) for b in args.batches.split(",")])
    elif name == "memory":
        result = section_memory(root)
    elif name == "uplink":
        result = section_uplink(root)
    elif name == "generate":
        result = section_generate(root, args.gen_tokens, args.repeats)
    elif name == "agent":
        result = section_agent(root, args.asks)
    else:
        result = section_trainer(root, args.samples)
    return {**result, "wall_s": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.real_geometry", description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--set", action="append", default=[], help="shape recipe setting, e.g. lm_layers=4")
    parser.add_argument("--repeats", type=int, default=3, help="batch-1 timing repeats (batch 8: one)")
    parser.add_argument("--batches", default="1,8", help="prefill batch sizes")
    parser.add_argument("--asks", type=int, default=3, help="Asks the agent answers")
    parser.add_argument("--gen-tokens", type=int, default=8, help="answer tokens of the generate section")
    parser.add_argument("--samples", type=int, default=4, help="uploads the trainer labels and distils")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="(from `python -m bench`) batch 1 only, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path("reports/real_geometry.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:  # `python -m bench`: batch 1 once, no agent or trainer process (minutes, not a quarter hour)
        args.batches, args.repeats = "1", 1
        if args.sections == ",".join(SECTIONS):
            args.sections = "prefill,memory,uplink,generate"
    if args.child:
        print("RESULT " + json.dumps(run_section(args.child, args)), flush=True)
        return 0
    member_root(args.set)  # build once, before the sections start
    results = {"threads": args.threads}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for name in args.sections.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(
            [sys.executable, "-m", "bench.real_geometry", *forwarded, "--child", name],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"section {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return verdict("real_geometry", checks(results))


def checks(results: dict) -> list[tuple[bool, str]]:
    """The issue's targets that the sections run measured (same-run ratios)."""
    out = []
    prefill = results.get("prefill", {}).get("settings", {}).get("tandem-64", {})
    for key in ("ratio_b1", "ratio_b8"):
        if key in prefill:
            out.append((prefill[key] <= PREFILL_TARGET, f"Tandem at 64: LM prefill {prefill[key]:.3f} of dense "
                        f"({key[-2:]}; target <= {PREFILL_TARGET})"))  # fmt: skip
    memory = results.get("memory", {})
    for name in ("nf4", "int8"):
        if name in memory:
            ratio = memory[name]["at_32_layers_vs_fp16"]
            out.append((ratio < 1.0, f"{name} model at 32 layers {ratio:.3f} of fp16"))
    for name, row in results.get("generate", {}).items():
        if isinstance(row, dict):
            out.append((row["identical"], f"{name}: cached answer identical to uncached"))
            out.append((row["cached_vs_uncached"] < 1.0, f"{name}: {results['generate']['tokens']}-token answer from "
                        f"the KV cache {row['cached_vs_uncached']:.3f} of the uncached time"))  # fmt: skip
    uplink = results.get("uplink")
    if uplink:
        ratio = uplink["sample_vs_all_tokens"]
        out.append((ratio < 1.0, f"uploaded sample {ratio:.3f} of all tokens"))
    return out


if __name__ == "__main__":
    sys.exit(main())
