"""Learner state on disk, per subject, so that any process (or a restarted Ray actor) can resume a learner.

Layout under ``<state_dir>/learners/<kind>/<subject>/``:
- ``mirror/<version>.safetensors``: the exact adapter state of each version the device may hold (immutable);
- ``gen-<n>/``: one generation of the learner (``learner.safetensors``: adapters, alignment map, optimiser;
  ``replay.safetensors`` and ``held_out.safetensors``: raw upload bytes and teacher labels, with the teacher's
  answer sequences and their step logits when it labelled with sequences; ``state.json``);
- ``current.json``: which generation is live; ``pending.json``: a generation that waits for its update to be
  published (written before publishing, promoted after, so a crash in between neither loses nor repeats it).
Every file is written to a temporary name, fsynced and renamed, and every new name (files and directories) is
synced in its directory before ``pending.json`` or ``current.json`` refers to it, so a power cut leaves the old
generation or the new one (tests/durable_support.py checks the order). Tensors are safetensors, never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cloud.adaptation.learner import LabelledBuffer, Learner
from cloud.akd import TeacherLabels
from cloud.dwc import CloudMirror
from common.durable import fsync_dir, make_dirs, replace_atomically
from common.errors import TandemError
from common.sample_codec import decode_sample


class StateError(TandemError):
    """Saved learner state is missing or inconsistent (a mirror whose digest differs from the record)."""


@dataclass(frozen=True)
class Pending:
    """A saved generation whose update still has to be published."""

    job_id: int
    generation: int
    payload: bytes
    header_json: str


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors, scalars = {}, {}
    for idx, per in state["state"].items():
        for key, value in per.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], text: str) -> dict:
    doc = json.loads(text)
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in doc["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}


def _save_buffer(path: Path, buf: LabelledBuffer) -> None:
    tensors = {f"p.{i}": torch.frombuffer(bytearray(p), dtype=torch.uint8) for i, p in enumerate(buf.payloads)}
    if len(buf):
        labels = buf.labels()
        tensors.update(logits=labels.logits, hidden=labels.hidden)
        if labels.sequences is not None and labels.step_logits is not None:
            width = labels.step_logits.shape[1]
            ids = [s + [-1] * (width - len(s)) for s in labels.sequences]
            tensors.update(sequence_ids=torch.tensor(ids, dtype=torch.int64), step_logits=labels.step_logits)
    _save_tensors(path, tensors, {"count": str(len(buf))})


def _load_buffer(path: Path, buf: LabelledBuffer) -> None:
    tensors = load_file(str(path))
    n = sum(1 for k in tensors if k.startswith("p."))
    if n == 0:
        return
    payloads = [tensors[f"p.{i}"].numpy().tobytes() for i in range(n)]
    labels = TeacherLabels(tensors["logits"], tensors["hidden"])
    if "sequence_ids" in tensors:  # the teacher labelled with answer sequences
        labels.sequences = [[int(t) for t in row if t >= 0] for row in tensors["sequence_ids"].tolist()]
        labels.step_logits = tensors["step_logits"]
    buf.extend(payloads, [decode_sample(p) for p in payloads], labels)


class LearnerStore:
    """Saves and restores learners of one state directory."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "learners"

    def dir(self, key: str) -> Path:
        kind, _, subject = key.partition(":")
        return self.root / kind / subject

    def exists(self, key: str) -> bool:
        return (self.dir(key) / "current.json").is_file()

    # -- saving --------------------------------------------------------------------------------------------
    def _next_generation(self, base: Path) -> int:
        gens = [int(p.name[4:]) for p in base.glob("gen-*") if p.name[4:].isdigit()]
        return max(gens, default=0) + 1

    def save(self, key: str, learner: Learner, job_id: int = 0) -> int:
        """Write a new generation (not yet live); returns its number."""
        base = self.dir(key)
        make_dirs(base / "mirror")
        written = False
        for version, state in learner.history.items():
            path = base / "mirror" / f"{version}.safetensors"
            if not path.exists():
                _save_tensors(path, state, {"version": version})
                written = True
        if written:  # the new mirror names are durable before any generation refers to them
            fsync_dir(base / "mirror")
        gen = self._next_generation(base)
        gdir = base / f"gen-{gen:06d}"
        shutil.rmtree(gdir, ignore_errors=True)
        gdir.mkdir()
        t = learner.trainer
        opt_tensors, opt_json = _flatten_optimizer(t.optimizer.state_dict())
        tensors = {f"adapter.{k}": v for k, v in learner.adapters().items()}
        tensors.update({f"align.{k}": v for k, v in t.align.state_dict().items()})
        tensors.update(opt_tensors)
        _save_tensors(gdir / "learner.safetensors", tensors, {"optimizer": opt_json})
        _save_buffer(gdir / "replay.safetensors", learner.replay)
        _save_buffer(gdir / "held_out.safetensors", learner.held_out)
        doc = {
            "job_id": job_id,
            "mirror_version": learner.mirror.version,
            "mirror_digest": learner.mirror_digest(),
            "history": list(learner.history),
            "counter": learner.counter,
        }
        replace_atomically(gdir / "state.json", json.dumps(doc, indent=1).encode())
        fsync_dir(base)
        return gen

    def promote(self, key: str, generation: int) -> None:
        """Make ``generation`` live and drop ``pending.json`` and older generations."""
        base = self.dir(key)
        replace_atomically(base / "current.json", json.dumps({"generation": generation}).encode())
        (base / "pending.json").unlink(missing_ok=True)
        for p in base.glob("gen-*"):
            if p.name != f"gen-{generation:06d}":
                shutil.rmtree(p, ignore_errors=True)

    def save_pending(self, key: str, learner: Learner, job_id: int, payload: bytes, header_json: str) -> Pending:
        """Save the learner as it will be once the update is published, with the update itself."""
        gen = self.save(key, learner, job_id)
        gdir = self.dir(key) / f"gen-{gen:06d}"
        replace_atomically(gdir / "update.bin", payload)
        doc = {"job_id": job_id, "generation": gen, "header": header_json}
        replace_atomically(self.dir(key) / "pending.json", json.dumps(doc).encode())
        return Pending(job_id, gen, payload, header_json)

    def pending(self, key: str) -> Pending | None:
        """The pending generation, if one waits."""
        path = self.dir(key) / "pending.json"
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        payload = (self.dir(key) / f"gen-{doc['generation']:06d}" / "update.bin").read_bytes()
        return Pending(int(doc["job_id"]), int(doc["generation"]), payload, doc["header"])

    def discard_pending(self, key: str) -> None:
        """Forget a pending generation (its job will be rerun from the live state)."""
        path = self.dir(key) / "pending.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            path.unlink()
            shutil.rmtree(self.dir(key) / f"gen-{doc['generation']:06d}", ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------
    def current(self, key: str) -> dict:
        """``state.json`` of the live generation (with its number under ``generation``)."""
        base = self.dir(key)
        gen = int(json.loads((base / "current.json").read_text())["generation"])
        doc = json.loads((base / f"gen-{gen:06d}" / "state.json").read_text())
        doc["generation"] = gen
        return doc

    def restore(self, key: str, learner: Learner, generation: int | None = None) -> None:
        """Load a generation (the live one by default) into a freshly built ``learner`` (empty buffers)."""
        base = self.dir(key)
        doc = self.current(key) if generation is None else {"generation": generation}
        gdir = base / f"gen-{int(doc['generation']):06d}"
        doc.update(json.loads((gdir / "state.json").read_text()))
        tensors = load_file(str(gdir / "learner.safetensors"), device=str(learner.device))
        with safe_open(str(gdir / "learner.safetensors"), framework="pt") as fh:
            opt_json = fh.metadata()["optimizer"]
        t = learner.trainer
        t.load_adapter_state({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        t.align.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("align.")})
        opt = {k: v for k, v in tensors.items() if k.startswith("opt.")}
        t.optimizer.load_state_dict(_unflatten_optimizer(opt, opt_json))
        history = {v: load_file(str(base / "mirror" / f"{v}.safetensors")) for v in doc["history"]}
        learner.history = history
        learner.mirror = CloudMirror(history[doc["mirror_version"]], doc["mirror_version"])
        learner.counter = int(doc["counter"])
        _load_buffer(gdir / "replay.safetensors", learner.replay)
        _load_buffer(gdir / "held_out.safetensors", learner.held_out)
        if learner.mirror_digest() != doc["mirror_digest"]:
            raise StateError(f"mirror of {key} at {doc['mirror_version']} does not match its recorded digest")
