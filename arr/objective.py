r"""The ARR objective, whole.

    loss = CE_sft + beta * KL + replay_weight * CE_replay

All three are token means over one *optimizer step* (every micro-batch of a gradient-accumulation step and every
data-parallel rank), exactly as `transformers.Trainer` normalises its causal-LM loss with `num_items_in_batch`:

- CE_sft: next-token cross-entropy summed over the SFT response tokens (labels != -100 in SFT rows), divided by
  their count. With beta = 0 and no replay this *is* plain LoRA SFT, to the last bit of the loss.
- CE_replay: next-token cross-entropy over every token of the replay rows, divided by their count.
- KL: per-token KL divergence between the trained model pi and the initial model pi_0 over the full vocabulary,
  summed over the positions `kl_on` selects and divided by their count:
      forward (default): KL(pi_0 || pi) = sum_v pi_0(v) * (log pi_0(v) - log pi(v))
      reverse:           KL(pi || pi_0) = sum_v pi(v)   * (log pi(v)   - log pi_0(v))
  Forward KL is distillation from the initial model: its gradient on the logits is pi - pi_0.

Positions follow the usual shift: the logits at position t predict token t + 1, so a row of length T has T - 1
predictions; `labels` are given unshifted, as in Hugging Face models.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class TokenCounts(NamedTuple):
    """Number of prediction positions each loss part is averaged over (summed over a whole optimizer step)."""

    sft: torch.Tensor
    kl: torch.Tensor
    replay: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([self.sft, self.kl, self.replay])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TokenCounts:
        return cls(*t.unbind())


class LossParts(NamedTuple):
    total: torch.Tensor
    sft_ce: torch.Tensor
    kl: torch.Tensor
    replay_ce: torch.Tensor


def position_masks(labels: torch.Tensor, attention_mask: torch.Tensor, is_replay: torch.Tensor, kl_on: str):
    """Boolean masks over the T - 1 shifted positions: (sft CE, replay CE, KL)."""
    targets = labels[:, 1:]
    has_next = attention_mask[:, 1:].bool()
    replay_rows = is_replay.bool()[:, None]
    trainable = targets.ne(IGNORE_INDEX) & has_next
    sft = trainable & ~replay_rows
    replay = trainable & replay_rows
    rows = {"sft": ~replay_rows, "replay": replay_rows, "all": torch.ones_like(replay_rows)}[kl_on]
    return sft, replay, has_next & rows


def count_tokens(batch: dict, kl_on: str) -> TokenCounts:
    sft, replay, kl = position_masks(batch["labels"], batch["attention_mask"], batch["is_replay"], kl_on)
    return TokenCounts(sft.sum(), kl.sum(), replay.sum())


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, direction: str) -> torch.Tensor:
    """KL per row of [N, V] logits, in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits.float(), dim=-1)
    if direction == "forward":
        return (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return (logp.exp() * (logp - logp_ref)).sum(-1)


class ARRObjective(nn.Module):
    def __init__(self, beta: float = 0.1, kl_on: str = "all", kl_direction: str = "forward", replay_weight: float = 1.0):
        super().__init__()
        self.beta, self.kl_on, self.kl_direction, self.replay_weight = beta, kl_on, kl_direction, replay_weight

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        is_replay: torch.Tensor,
        ref_logits: torch.Tensor | None = None,
        counts: TokenCounts | None = None,
    ) -> LossParts:
        """`logits`/`ref_logits`: [B, T, V]; `labels`: [B, T] (unshifted, -100 = no loss); `is_replay`: [B].
        `counts` are the step-wide denominators; by default this batch's own."""
        sft, replay, kl_positions = position_masks(labels, attention_mask, is_replay, self.kl_on)
        if counts is None:
            counts = TokenCounts(sft.sum(), kl_positions.sum(), replay.sum())
        logits = logits[:, :-1]
        targets = labels[:, 1:]
        zero = logits.new_zeros((), dtype=torch.float32)

        def mean_ce(mask, count):
            if not mask.any():
                return zero
            ce = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
            return ce / count.clamp(min=1)

        sft_ce = mean_ce(sft, counts.sft)
        replay_ce = mean_ce(replay, counts.replay)
        kl = zero
        if self.needs_reference and kl_positions.any():
            if ref_logits is None:
                raise ValueError("beta > 0 needs the initial model's logits (ref_logits)")
            per_token = token_kl(logits[kl_positions], ref_logits[:, :-1][kl_positions], self.kl_direction)
            kl = per_token.sum() / counts.kl.clamp(min=1)
        total = sft_ce + self.beta * kl + self.replay_weight * replay_ce
        return LossParts(total, sft_ce, kl, replay_ce)
