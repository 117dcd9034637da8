"""Many agents in one process over one device model: each agent is a *tenant* with its own adapter slot.

The frozen base weights, the vision tower and SparseVLM's state exist once; a tenant owns only its LoRA adapter
(one peft adapter slot). A ``TenantModel`` has the ``DeviceModel`` surface an agent uses (install, adapter,
forward, generate, ...), answering with its own slot; batched across tenants, one forward serves every tenant's
rows, each row with its own adapter (``device.agent.shared_batcher``). The fleet simulator runs its agents this
way; a device that serves several model tenants (cameras with their own adapters) could too.
"""

from __future__ import annotations

import re
import threading

import torch

from device.agent.runtime import DeviceModel, ForwardOut
from device.agent.store import AdapterState

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class TenantModels:
    """The shared ``DeviceModel`` and its tenants' slots; one lock orders slot changes and forwards."""

    def __init__(self, shared: DeviceModel) -> None:
        self.shared = shared
        self.lock = threading.RLock()
        self._tenants: dict[str, TenantModel] = {}

    def tenant(self, name: str) -> TenantModel:
        """A new tenant: its slot holds the shared model's version-0 adapter."""
        slot = "tenant_" + _UNSAFE.sub("_", name)
        with self.lock:
            if slot in self._tenants:
                raise ValueError(f"tenant {name!r} exists")
            self.shared.add_slot(slot)
            tenant = TenantModel(self, slot)
            self._tenants[slot] = tenant
        return tenant

    def __len__(self) -> int:
        return len(self._tenants)


class TenantModel:
    """One agent's view of the shared model: what it installs goes to its slot; what it asks runs on it."""

    def __init__(self, models: TenantModels, slot: str) -> None:
        self.models = models
        self.slot = slot
        shared = models.shared
        self.adapter = shared.adapter
        self.processor = shared.processor
        self.tokenizer = shared.tokenizer
        self.max_new_tokens = shared.max_new_tokens
        self.eos_id = shared.eos_id

    @property
    def shared(self) -> DeviceModel:
        return self.models.shared

    @property
    def sparse(self):
        return self.shared.sparse

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def peft_config(self) -> dict:
        return self.shared.peft_config()

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        with self.models.lock:
            return self.shared.adapter_weights(self.slot)

    def install(self, adapter: AdapterState) -> None:
        with self.models.lock:
            self.shared.install(adapter, self.slot)
        self.adapter = adapter

    def features(self, images: list):
        with self.models.lock:
            return self.shared.features(images)

    def encode(self, images: list):
        with self.models.lock:
            return self.shared.encode(images)

    def forward(self, features, questions: list[str], grids=None) -> ForwardOut:
        with self.models.lock:
            return self.shared.forward(features, questions, grids, slots=[self.slot] * len(questions))

    def generate(self, features, questions: list[str], limits: list[int], grids=None) -> ForwardOut:
        with self.models.lock:
            return self.shared.generate(features, questions, limits, grids, slots=[self.slot] * len(questions))

    def decode(self, token_id: int) -> str:
        return self.shared.decode(token_id)

    def decode_answer(self, ids: list[int]) -> str:
        return self.shared.decode_answer(ids)
