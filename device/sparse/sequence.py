"""The token sequence a sparse prefill carries through the decoder: hidden states plus per-slot bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSeq:
    """Batch of token slots [B, n]. Slots stay in original order (merged tokens sit at their representative's slot).

    ``pos``: original position ids; ``valid``: real token (not padding / batch filler); ``orig``: index in the
    input sequence, -1 for merged tokens and filler; ``vis``: visual token (merged included); ``rater``: rater
    text token; ``decide``: inside the decision prefix.
    """

    h: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    orig: torch.Tensor
    vis: torch.Tensor
    rater: torch.Tensor
    decide: torch.Tensor

    @property
    def length(self) -> int:
        return self.h.shape[1]

    def row(self, b: int, idx: torch.Tensor, merged_h: torch.Tensor, merged_slot: torch.Tensor) -> dict:
        """Sample ``b`` reduced to slots ``idx`` plus merged tokens placed at ``merged_slot`` (sorted order)."""
        key = torch.cat([idx, merged_slot]).float()
        # a merged token takes the slot of its pruned representative; order by slot, merged after a tie
        key = key + torch.cat([torch.zeros(len(idx)), torch.full((len(merged_slot),), 0.5)]).to(key.device)
        order = torch.argsort(key)
        m = len(merged_slot)
        fields = {
            "h": torch.cat([self.h[b, idx], merged_h.to(self.h.dtype)]),
            "pos": torch.cat([self.pos[b, idx], self.pos[b, merged_slot]]),
            "valid": torch.cat([self.valid[b, idx], torch.ones(m, dtype=torch.bool, device=idx.device)]),
            "orig": torch.cat([self.orig[b, idx], torch.full((m,), -1, dtype=torch.long, device=idx.device)]),
            "vis": torch.cat([self.vis[b, idx], torch.ones(m, dtype=torch.bool, device=idx.device)]),
            "rater": torch.cat([self.rater[b, idx], torch.zeros(m, dtype=torch.bool, device=idx.device)]),
            "decide": torch.cat([self.decide[b, idx], self.decide[b, merged_slot]]),
        }
        return {k: v[order] for k, v in fields.items()}

    @classmethod
    def stack(cls, rows: list[dict]) -> TokenSeq:
        """Left-pad the rows with invalid filler slots to a common length."""
        n = max(r["h"].shape[0] for r in rows)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in rows[0]}
        for r in rows:
            pad = n - r["h"].shape[0]
            for k, v in r.items():
                if pad:
                    filler = torch.zeros((pad, *v.shape[1:]), dtype=v.dtype, device=v.device)
                    if k == "orig":
                        filler -= 1
                    v = torch.cat([filler, v])
                out[k].append(v)
        return cls(**{k: torch.stack(v) for k, v in out.items()})


def prefill_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """Causal 4D boolean mask over the slots ([B, 1, n, n]); ``None`` (plain causal SDPA) when nothing is masked.

    Every slot sees itself, so padding / filler rows never produce NaN.
    """
    if bool(valid.all()):
        return None
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(n, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


def decode_mask(prefix_valid: torch.Tensor, new_valid: torch.Tensor, q: int) -> torch.Tensor:
    """Mask [B, 1, q, n_prefix + t] for ``q`` new tokens (the last ``q`` of ``new_valid`` [B, t])."""
    b, t = new_valid.shape
    n = prefix_valid.shape[1]
    past = t - q
    causal_new = torch.ones(q, t, dtype=torch.bool, device=new_valid.device).tril(diagonal=past)
    new_part = causal_new[None] & new_valid[:, None, :]
    new_part[:, :, past:] |= torch.eye(q, dtype=torch.bool, device=new_valid.device)[None]
    prefix_part = prefix_valid[:, None, :].expand(b, q, n)
    return torch.cat([prefix_part, new_part], dim=-1)[:, None]
