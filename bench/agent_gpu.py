"""The agent's request path at LLaVA-1.5-7B geometry on a GPU: NF4 against fp16, SparseVLM 64 / 192 against dense.

``python -m bench.agent_gpu [--requests 30] [--smoke]`` builds a LLaVA-1.5-7B-shaped model with random weights
(CLIP ViT-L/14 at 336 px: 576 visual tokens; Llama-2-7B: 32 layers, hidden 4096), saves it once, loads it through
``common.modeling.load_mllm`` in fp16 and in 4-bit NF4 (bitsandbytes, fp16 compute), and runs real ``DeviceAgent``s
(offline, local gRPC API on 127.0.0.1, micro-batcher, UTS) at batch 1: Ask latency p50/p99 and peak GPU memory
per setting, with every ratio against fp16 dense measured in the same run. Writes ``$OUT/agent_gpu.json`` when OUT
is set. ``--smoke`` runs the same code at a tiny geometry (CPU works) to check the script itself;
``--cpu-dry-run`` runs it on the CPU on the zoo's ``llava-1.5-7b-shape`` member (real widths, 2 LM and 2 tower
layers; fp32 and NF4, SparseVLM 64 / 192), one request per setting.
Needs CUDA (and bitsandbytes' CUDA build) for the real run; finishes in a few minutes on one H200.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._verdict import skipped, verdict
from device.agent.service import AgentService

QUESTIONS = ["What colour is the car?", "How many people are there?", "Is there a dog?", "Where is the cup?"]


def geometry(smoke: bool) -> dict:
    if smoke:
        return dict(image=28, patch=14, v_hidden=32, v_layers=2, v_heads=2, v_inter=64, hidden=64, layers=2, heads=4,
                    inter=128, vocab=32064)  # fmt: skip
    return dict(image=336, patch=14, v_hidden=1024, v_layers=24, v_heads=16, v_inter=4096, hidden=4096, layers=32,
                heads=32, inter=11008, vocab=32064)  # fmt: skip


def build_model_dir(target: Path, g: dict, device: str) -> None:
    """A randomly initialised LLaVA-1.5-shaped model + processor, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = sorted({w.strip("?").lower() for q in QUESTIONS for w in q.split()} | {"yes", "no", "red", "two"})
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<image>": 4, "USER:": 5, "ASSISTANT:": 6}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": g["image"]}, crop_size={"height": g["image"], "width": g["image"]}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=g["patch"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=g["v_hidden"], num_hidden_layers=g["v_layers"], num_attention_heads=g["v_heads"],
        intermediate_size=g["v_inter"], image_size=g["image"], patch_size=g["patch"], projection_dim=g["v_hidden"],
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=g["hidden"], num_hidden_layers=g["layers"], num_attention_heads=g["heads"],
        num_key_value_heads=g["heads"], intermediate_size=g["inter"], vocab_size=g["vocab"],
        max_position_embeddings=4096, pad_token_id=0,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def png(seed: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def run_setting(agent, stub, images, requests: int, sparse, cuda: bool, warmup: int = 3) -> dict:
    from protocol.tandem.v1 import agent_pb2

    agent.batcher.between_batches(lambda: agent.model.set_sparse(sparse)).result(60)
    for i in range(warmup):
        await stub.Ask(agent_pb2.AskRequest(image=images[i], question=QUESTIONS[i % 4]))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, kept, total = [], 0, 0
    for i in range(requests):
        t0 = time.perf_counter()
        reply = await stub.Ask(agent_pb2.AskRequest(image=images[i % len(images)], question=QUESTIONS[i % 4]))
        times.append(time.perf_counter() - t0)
        kept, total = reply.visual_tokens_kept, reply.visual_tokens_total
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return {
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "visual_tokens_kept": kept,
        "visual_tokens_total": total,
        "peak_memory_bytes": int(peak),
    }


async def measure(
    model_dir: Path, quantization: str, requests: int, image: int, cuda: bool, budgets, warmup: int = 3
) -> dict:
    import grpc

    from device.agent import DeviceAgent, DeviceModel, load_agent_config
    from device.sparse import SparseConfig
    from protocol.tandem.v1 import agent_pb2_grpc

    with tempfile.TemporaryDirectory() as state:
        cfg = load_agent_config(None, {
            "transport.state_dir": state, "model.source": str(model_dir), "api.listen": "127.0.0.1:0",
            "metrics.port": None, "log_json": False, "guard.enabled": False, "api.request_timeout_s": 600.0,
        })  # fmt: skip
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = DeviceModel.load(
            model_dir, quantization=quantization, device_map="cuda" if cuda else "cpu",
            dtype="float16" if cuda else "float32", sparse=None,
        )  # fmt: skip
        load_s = time.perf_counter() - t0
        weights = torch.cuda.memory_allocated() if cuda else 0
        agent = DeviceAgent(cfg, model=model, connect=False)
        service = AgentService(agent)
        await service.start()
        images = [png(i, image) for i in range(8)]
        rows = {"load_s": load_s, "weights_bytes": int(weights), "settings": {}}
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = agent_pb2_grpc.DeviceAgentStub(channel)
                settings = {"dense": None, **{f"sparsevlm_{b}": SparseConfig(budget=b) for b in budgets}}
                for name, sparse in settings.items():
                    rows["settings"][name] = await run_setting(agent, stub, images, requests, sparse, cuda, warmup)
        finally:
            await service.stop()
        del agent, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny geometry (checks the script, CPU works)")
    parser.add_argument("--quick", action="store_true", help="(from `python -m bench`) same as the default")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a saved model directory")
    parser.add_argument("--cpu-dry-run", action="store_true", help="CPU, the zoo's llava-1.5-7b-shape member")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not (args.smoke or args.cpu_dry_run):
        return skipped("agent_gpu", "needs a CUDA GPU (--smoke or --cpu-dry-run check the script on a CPU)")
    g = geometry(args.smoke)
    warmup = 3
    if args.cpu_dry_run:
        from sim.zoo.shapes import SHAPES, ensure_shape

        args.model_dir = ensure_shape(SHAPES["llava-1.5-7b-shape"]()) / "device"
        args.requests, warmup = min(args.requests, 1), 0
        g = {**geometry(False), "layers": 2, "v_layers": 2}
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-agent-gpu-"))
    model_dir = args.model_dir or tmp / "llava-1.5-7b-random"
    try:
        if not (model_dir / "config.json").is_file():
            t0 = time.perf_counter()
            build_model_dir(model_dir, g, "cuda" if cuda else "cpu")
            print(f"built and saved a random LLaVA-1.5-7B-shaped model in {time.perf_counter() - t0:.0f} s", flush=True)
        budgets = [64, 192] if not args.smoke else [2, 6]
        quants = ["none", "4bit"] if cuda or args.cpu_dry_run else ["none"]
        result = {"geometry": g, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "runs": {}}
        for q in quants:
            name = "fp16" if q == "none" else "nf4"
            result["runs"][name] = asyncio.run(measure(model_dir, q, args.requests, g["image"], cuda, budgets, warmup))
            print(f"{name}: loaded in {result['runs'][name]['load_s']:.0f} s", flush=True)
    finally:
        if args.model_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = result["runs"]["fp16"]["settings"]["dense"]
    print(f"agent request path at batch 1, {args.requests} requests per setting, on {result['device']}")
    head = f"{'setting':24}{'tokens':>10}{'p50 ms':>10}{'p99 ms':>10}{'peak GiB':>10}"
    print(head + f"{'p50 vs fp16 dense':>20}{'peak vs':>10}")
    for qname, run in result["runs"].items():
        for sname, row in run["settings"].items():
            row["p50_vs_fp16_dense"] = row["p50_ms"] / base["p50_ms"]
            row["peak_vs_fp16_dense"] = row["peak_memory_bytes"] / base["peak_memory_bytes"] if cuda else None
            peak = f"{row['peak_memory_bytes'] / 2**30:.2f}" if cuda else "-"
            rel = f"{row['peak_vs_fp16_dense']:.3f}" if cuda else "-"
            print(
                f"{qname + ' ' + sname:24}{row['visual_tokens_kept']:>5}/{row['visual_tokens_total']:<4}"
                f"{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}{peak:>10}{row['p50_vs_fp16_dense']:>20.3f}{rel:>10}"
            )
    result["wall_s"] = time.perf_counter() - started
    print(f"total {result['wall_s']:.0f} s")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "agent_gpu.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {Path(out) / 'agent_gpu.json'}")
    if args.smoke:
        return skipped("agent_gpu", "smoke run at a tiny geometry: the script ran, nothing measured against a target")
    fp16 = result["runs"]["fp16"]["settings"]
    checks = [
        (row["p50_vs_fp16_dense"] < 1, f"fp16 {name}: p50 {row['p50_vs_fp16_dense']:.3f}x dense (target < 1)")
        for name, row in fp16.items()
        if name != "dense"
    ]
    if "nf4" in result["runs"]:
        peak = result["runs"]["nf4"]["settings"]["dense"]["peak_vs_fp16_dense"]
        checks.append((peak < 1, f"nf4 dense peak memory {peak:.3f}x fp16 dense (target < 1)"))
    return verdict("agent_gpu", checks)


if __name__ == "__main__":
    sys.exit(main())
