"""The token sequence a sparse prefill carries through the decoder: hidden states plus per-slot
bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Columns of TokenSeq.meta (one long tensor, so that a gather moves all bookkeeping in one op).
POS, VALID, ORIG, VIS, RATER, DECIDE = range(6)


@dataclass
class TokenSeq:
    """Batch of token slots [B, n], kept in original order (a merged token sits at its representative's slot).

    ``meta[..., POS]``: original position id; ``VALID``: real token (not padding / batch filler); ``ORIG``:
    index
    in the input sequence, -1 for merged tokens and filler; ``VIS``: visual token (merged included);
    ``RATER``:
    rater text token; ``DECIDE``: inside the decision prefix. ``rope``: cat(cos, sin) [B, n, 2 * head_dim] of
    each slot's original position, so positions of any layout (1D, M-RoPE) travel with the tokens.
    """

    h: torch.Tensor
    meta: torch.Tensor
    rope: torch.Tensor

    @property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope.chunk(2, dim=-1)
        return cos, sin

    @property
    def length(self) -> int:
        return self.h.shape[1]

    @property
    def pos(self) -> torch.Tensor:
        return self.meta[..., POS]

    @property
    def orig(self) -> torch.Tensor:
        return self.meta[..., ORIG]

    @cached_property
    def valid(self) -> torch.Tensor:
        return self.meta[..., VALID].bool()

    @cached_property
    def visual(self) -> torch.Tensor:
        """Real visual slots (merged included)."""
        return (self.meta[..., VIS] & self.meta[..., VALID]).bool()

    @cached_property
    def rater(self) -> torch.Tensor:
        return self.meta[..., RATER].bool()

    @cached_property
    def decide(self) -> torch.Tensor:
        return self.meta[..., DECIDE].bool()

    @cached_property
    def all_valid(self) -> bool:
        return bool(self.valid.all())

    @cached_property
    def visual_counts(self) -> list[int]:
        """Real visual slots per row."""
        return self.visual.sum(dim=1).tolist()

    @cached_property
    def visual_slots(self) -> torch.Tensor | None:
        """[B, v] slot indices of the visual tokens when every row has the same count ``v``, else None."""
        counts = self.visual_counts
        if len(set(counts)) != 1:
            return None
        return torch.nonzero(self.visual)[:, 1].view(len(counts), counts[0])

    def row(
        self,
        b: int,
        idx: torch.Tensor,
        merged_h: torch.Tensor,
        merged_slot: torch.Tensor,
        merged_key: torch.Tensor | None = None,
    ) -> tuple:
        """Sample ``b`` reduced to sorted slots ``idx`` plus merged tokens with the position of ``merged_slot``,
        placed there (or at the sort keys ``merged_key``, e.g. after the kept visual block)."""
        if len(merged_slot) == 0:
            return self.h[b, idx], self.meta[b, idx], self.rope[b, idx]
        merged_meta = as_merged(self.meta[b, merged_slot])
        if merged_key is None:
            order = torch.argsort(torch.cat([idx, merged_slot]))  # merged slots were pruned: no ties
        else:
            order = torch.argsort(torch.cat([idx.double(), merged_key]))
        h = torch.cat([self.h[b, idx], merged_h.to(self.h.dtype)])[order]
        meta = torch.cat([self.meta[b, idx], merged_meta])[order]
        rope = self.rope[b, torch.cat([idx, merged_slot])[order]]
        return h, meta, rope

    @classmethod
    def stack(cls, rows: list[tuple]) -> TokenSeq:
        """Left-pad the rows (h, meta, rope) with invalid filler slots (ORIG -1) to a common length."""
        if len(rows) == 1:
            return cls(*(x[None] for x in rows[0]))
        n = max(r[0].shape[0] for r in rows)
        padded: list[list[torch.Tensor]] = [[], [], []]
        for row in rows:
            pad = n - row[0].shape[0]
            for k, x in enumerate(row):
                if pad:
                    filler = x.new_zeros(pad, x.shape[1])
                    if k == 1:
                        filler[:, ORIG] = -1
                    x = torch.cat([filler, x])
                padded[k].append(x)
        return cls(*(torch.stack(xs) for xs in padded))


def as_merged(meta: torch.Tensor) -> torch.Tensor:
    """Meta rows [..., 6] of representatives turned into merged tokens' (a copy): real visual non-rater slots with
    no input index, keeping the representative's position and decision flag."""
    merged = meta.clone()
    merged[..., VALID] = 1
    merged[..., ORIG] = -1
    merged[..., VIS] = 1
    merged[..., RATER] = 0
    return merged


def prefill_mask(seq: TokenSeq) -> torch.Tensor | None:
    """Causal 4D boolean mask over the slots ([B, 1, n, n]); ``None`` (plain causal SDPA) when nothing is
    masked.

    Every slot sees itself, so padding / filler rows never produce NaN.
    """
    if seq.all_valid:
        return None
    valid = seq.valid
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
