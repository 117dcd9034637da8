"""The cloud's GPU work at real LLaVA-1.5 geometry (random weights): teacher labelling at 13B, AKD at 7B, and
fractional learners packed on one GPU.

Self-contained (torch, transformers, peft only; no project imports), so it runs on a bare GPU machine:

    python -m bench.cloud_gpu            # one GPU, under 5 minutes on an H200; JSON to $OUT/cloud_gpu.json if set
    python -m bench.cloud_gpu --tiny     # the same code on tiny shapes on the CPU (a smoke test)
    python -m bench.cloud_gpu --cpu-dry-run  # real widths (13B teacher, 7B student, ViT-L) at 2 LM and 2 tower
                                             # layers on the CPU: the zoo's shape members' geometry (minutes)

1. Teacher labelling: LLaVA-1.5-13B shapes (Llama 5120 x 40 layers, CLIP ViT-L/336 tower), bf16; an upload is
   half of the 576 visual tokens (tower features, as a device uplinks them) plus a question; the teacher projects
   them and answers: samples/s.
2. AKD at LLaVA-1.5-7B shapes (4096 x 32): LoRA r=8 on q/k/v/o/gate/up/down and the projector, the loss of
   ``cloud.akd`` (CE on the teacher's answer + T^2 KL at T=2 + MSE of an alignment map 4096->5120 to the teacher's
   hidden state), AdamW: samples/s and peak memory; GPU memory after the learner is released.
3. Packing: the same AKD on a 7B-wide, 8-layer student in 1 and then 4 learner processes at once on the one GPU
   (Ray tasks with num_gpus=0.25 when Ray is installed, else spawned processes each limited to a quarter of
   the memory; always processes with --tiny): aggregate samples/s of 4 against 1.
Every ratio is measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "tiny-t": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
}
VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=336)
VISION_TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28)
LORA_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|.*multi_modal_projector\.(linear_1|linear_2)"
)


def build_llava(
    text: str, tiny: bool, device: torch.device, layers: int | None = None, vision_layers: int | None = None
):
    """A randomly initialised LLaVA of the named text shape, bf16 on ``device`` (fp32 on the CPU)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    shape = dict(SHAPES[text])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    vision_shape = dict(VISION_TINY if tiny else VISION)
    if vision_layers is not None:
        vision_shape["num_hidden_layers"] = vision_layers
    vision = CLIPVisionConfig(**vision_shape, patch_size=14)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **shape),
        image_token_index=32000,
    )
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def uploads(n: int, tokens: int, feat_dim: int, device: torch.device, seed: int = 0):
    """``n`` uploads: ``tokens`` tower features each and a 24-token question."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.randn(n, tokens, feat_dim, generator=g).to(device)
    questions = torch.randint(10, 32000, (n, 24), generator=g).to(device)
    return feats, questions


def answer_forward(model, feats: torch.Tensor, questions: torch.Tensor):
    """Projector on the uploaded features, then the language model on [features, question]; the answer
    position's logits and last hidden state (what ``common.llava_tokens.answer_forward`` computes)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft injects LoRA in place
    inner = model.model
    dtype = next(inner.multi_modal_projector.parameters()).dtype
    vis = inner.multi_modal_projector(feats.to(dtype))
    embeds = torch.cat([vis, inner.get_input_embeddings()(questions)], dim=1)
    out = inner.language_model(inputs_embeds=embeds, return_dict=True)
    last = out.last_hidden_state[:, -1]
    return model.lm_head(last).float(), last.float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_labelling(teacher, feats, questions, batch: int, device) -> tuple[float, torch.Tensor, torch.Tensor]:
    answer_forward(teacher, feats[:batch], questions[:batch])  # warm-up
    sync(device)
    start = time.perf_counter()
    logits, hidden = [], []
    for i in range(0, len(feats), batch):
        lo, hi = answer_forward(teacher, feats[i : i + batch], questions[i : i + batch])
        logits.append(lo)
        hidden.append(hi)
    sync(device)
    return len(feats) / (time.perf_counter() - start), torch.cat(logits), torch.cat(hidden)


def akd_steps(student_base, t_logits, t_hidden, feats, questions, batch: int, steps: int, device, ready=None) -> dict:
    """LoRA + alignment map AKD steps; samples/s after one warm-up step, and peak memory. ``ready`` (a barrier's
    wait) is called between the warm-up and the timed steps, so packed learners time the same interval."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    student = get_peft_model(student_base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights and their optimiser state in fp32
    hidden = student_base.config.text_config.hidden_size
    align = torch.nn.Linear(hidden, t_hidden.shape[1], device=device)
    params = [p for p in student.parameters() if p.requires_grad] + list(align.parameters())
    optim = torch.optim.AdamW(params, lr=2e-4)
    temp = 2.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> None:
        sl = slice((i * batch) % len(feats), (i * batch) % len(feats) + batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, last = answer_forward(student, feats[sl], questions[sl])
        tl, th = t_logits[sl], t_hidden[sl]
        ce = F.cross_entropy(logits, tl.argmax(-1))
        kd = (
            temp
            * temp
            * F.kl_div(
                F.log_softmax(logits / temp, -1), F.log_softmax(tl / temp, -1), log_target=True, reduction="batchmean"
            )
        )
        loss = ce + kd + 0.1 * F.mse_loss(align(last), th)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()

    step(0)
    sync(device)
    if ready is not None:
        ready()
    start, t_first = time.perf_counter(), time.time()
    for i in range(1, steps + 1):
        step(i)
    sync(device)
    rate = steps * batch / (time.perf_counter() - start)
    t_last = time.time()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    trainable = sum(p.numel() for p in params)
    optim.state.clear()  # the caller releases the model; nothing of this learner stays referenced
    return {
        "samples_per_s": rate,
        "peak_bytes": int(peak),
        "trainable_params": int(trainable),
        "samples": steps * batch,
        "t_first": t_first,
        "t_last": t_last,
    }


def release(device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.memory_allocated())
    return 0


def learner_job(tiny: bool, steps: int, batch: int, fraction: float | None, barrier=None) -> dict:
    """One packed learner: a 7B-wide, 8-layer student (2 layers tiny) trains ``steps`` AKD steps."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction)
    text = "tiny" if tiny else "7b"
    student = build_llava(text, tiny, device, layers=None if tiny else 8)
    feat_dim = student.config.vision_config.hidden_size
    feats, questions = uploads(batch * 4, 16 if tiny else 288, feat_dim, device, seed=1)
    t_hidden = 96 if tiny else 5120
    t_logits = torch.randn(len(feats), 32064, device=device)
    t_hid = torch.randn(len(feats), t_hidden, device=device)
    start = time.perf_counter()
    ready = barrier.wait if barrier is not None else None
    out = akd_steps(student, t_logits, t_hid, feats, questions, batch, steps, device, ready)
    out["wall_s"] = time.perf_counter() - start
    out["gpu_ids"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    del student
    out["allocated_after_release"] = release(device)
    return out


def _proc_main(args: tuple, queue) -> None:
    queue.put(learner_job(*args))


def pack(n: int, tiny: bool, steps: int, batch: int) -> dict:
    """``n`` learners at once, each on 1/n of the GPU; aggregate samples/s (Ray actors when Ray is there)."""
    start = time.perf_counter()
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None and not tiny:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        gpus = 0 if tiny or not torch.cuda.is_available() else 1.0 / n
        remote = ray.remote(num_gpus=gpus, num_cpus=0)(learner_job)
        results = ray.get([remote.remote(tiny, steps, batch, None) for _ in range(n)])
        mode = f"ray actors, num_gpus={gpus:g}"
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue, barrier = ctx.Queue(), ctx.Barrier(n)
        job_args = (tiny, steps, batch, 0.95 / n, barrier)
        procs = [ctx.Process(target=_proc_main, args=(job_args, queue)) for _ in range(n)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
        mode = f"spawned processes, memory fraction {0.95 / n:.2f} each"
    wall = time.perf_counter() - start
    # Aggregate over the span from the first learner's first timed step to the last one's end.
    span = max(r["t_last"] for r in results) - min(r["t_first"] for r in results)
    train_rate = sum(r["samples"] for r in results) / span
    return {"learners": n, "mode": mode, "wall_s": wall, "train_samples_per_s": train_rate, "jobs": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes on the CPU (smoke test).")
    parser.add_argument("--quick", action="store_true", help="Accepted for `python -m bench`; without a GPU: --tiny.")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument(
        "--cpu-dry-run", action="store_true",
        help="Real widths at 2 LM / 2 tower layers on the CPU (labelling and AKD; packing as --tiny), few samples.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    tiny = (args.tiny or not torch.cuda.is_available()) and not dry
    device = torch.device("cpu" if tiny or dry else "cuda")
    depth = {"layers": 2, "vision_layers": 2} if dry else {}
    if dry:
        args.samples = min(args.samples, 4)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": tiny}
    report["cpu_dry_run"] = dry
    t0 = time.perf_counter()
    teacher = build_llava("tiny-t" if tiny else "13b", tiny, device, **depth)
    report["teacher_build_s"] = time.perf_counter() - t0
    report["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    tokens = 8 if tiny else 288  # half of 576 visual tokens
    feats, questions = uploads(args.samples, tokens, teacher.config.vision_config.hidden_size, device)
    rate, t_logits, t_hidden = time_labelling(teacher, feats, questions, 2 if dry else 16, device)
    report["teacher_label_samples_per_s"] = rate
    name = "tiny" if tiny else "13B"
    print(f"teacher {name} ({report['teacher_params'] / 1e9:.2f} B params) labels {rate:.3g} samples/s")
    del teacher
    report["allocated_after_teacher_release"] = release(device)

    student = build_llava("tiny" if tiny else "7b", tiny, device, **depth)
    report["student_params"] = sum(p.numel() for p in student.parameters())
    batch, steps = (1, 2) if dry else (8, 4 if tiny else 12)
    akd = akd_steps(student, t_logits, t_hidden, feats, questions, batch, steps, device)
    del student
    akd["allocated_after_release"] = release(device)
    report["akd_7b"] = akd
    print(
        f"AKD {'tiny' if tiny else '7B'}: {akd['samples_per_s']:.3g} samples/s, "
        f"peak {akd['peak_bytes'] / 2**30:.1f} GiB, {akd['trainable_params'] / 1e6:.2f} M trainable; "
        f"{akd['allocated_after_release'] / 2**20:.0f} MiB held after release"
    )
    print(f"  teacher labelling / AKD throughput: {rate / akd['samples_per_s']:.2f}x")

    steps = 3 if tiny or dry else 10
    one = pack(1, tiny or dry, steps, 8)  # a dry run packs tiny learners (four 7B-wide ones exceed a small host)
    four = pack(4, tiny or dry, steps, 8)
    report["packing"] = {"one": one, "four": four, "ratio": four["train_samples_per_s"] / one["train_samples_per_s"]}
    print(
        f"packing ({four['mode']}): 1 learner {one['train_samples_per_s']:.1f} samples/s, 4 at once "
        f"{four['train_samples_per_s']:.1f} samples/s = {report['packing']['ratio']:.2f}x"
    )
    report["total_s"] = time.perf_counter() - t0
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cloud_gpu.json"), "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    print(f"total {report['total_s']:.0f} s")
    if tiny:  # the verdict protocol of bench/__main__.py, written out: this file imports nothing of the project
        print("VERDICT cloud_gpu: SKIP no GPU: the tiny smoke run completed, nothing measured against a target")
        return 0
    checks = [
        (report["packing"]["ratio"] >= 1.0, f"4 packed learners {report['packing']['ratio']:.2f}x one (target >= 1)"),
        (akd["allocated_after_release"] == 0, f"{akd['allocated_after_release']} B held after release (target 0)"),
    ]
    missed = [what for ok, what in checks if not ok]
    status = "FAIL" if missed else "PASS"
    print(f"VERDICT cloud_gpu: {status} {'; '.join(missed or [what for _, what in checks])}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
