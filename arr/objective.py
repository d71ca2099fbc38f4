r"""The ARR objective, whole.

    loss = CE_sft + beta * KL + replay_weight * CE_replay + laplace_lambda / 2 * sum_l sum(F_l * dW_l^2)

or, with `task_kl_beta` set, the KL split by the kind of row it is taken on, each part averaged over its own
positions:

    loss = CE_sft + beta * KL_replay + task_kl_beta * KL_task + replay_weight * CE_replay + laplace

The token terms are token means over one *optimizer step* (every micro-batch of a gradient-accumulation step
and every data-parallel rank), exactly as `transformers.Trainer` normalises its causal-LM loss with
`num_items_in_batch`; the step-wide counts come in as `TokenCounts`.

- CE_sft: next-token cross-entropy over the SFT response tokens (labels != -100 in SFT rows). With beta = 0 and no
  replay this *is* plain LoRA SFT, to the last bit of the loss.
- CE_replay: next-token cross-entropy over the trained tokens of replay rows (every token of a corpus block; the
  answer of a self-generated replay row).
- KL: per-token KL between the trained model pi and the initial model pi_0 (the adapter off, see reference.py) over
  the vocabulary, at the positions `kl_on` places it:
      all                every position;
      sft                every position of SFT rows (prompt and response);
      replay             every position of replay rows;
      prompt_and_replay  every position whose label the SFT CE does not train: SFT prompts and replay rows.
  forward (default): KL(pi_0 || pi) = sum_v pi_0(v) * (log pi_0(v) - log pi(v))   (distillation; gradient pi - pi_0)
  reverse:           KL(pi || pi_0) = sum_v pi(v)   * (log pi(v)   - log pi_0(v))
  kl_mask_target (Mask-the-Target, Xu et al. 2026, arXiv 2605.29498): at a KL position whose label the SFT CE
  trains, the label token y is removed from both distributions and the rest renormalised,
      pi~(v) = pi(v) / (1 - pi(y)) for v != y, pi~(y) = 0   (likewise pi_0~),
  and the KL is taken between pi~ and pi_0~: it keeps the initial model's preferences among the alternatives and
  exerts no pull on y, so it never opposes the CE. Every other KL position keeps the full KL.
  task_kl_beta: the KL on SFT rows (KL_task) gets a weight of its own, e.g. a small one for Mask-the-Target on the
  task's rows beside the replay rows' KL at beta; KL_replay is then the KL on replay rows alone. It needs a kl_on
  that covers both kinds of row (all, prompt_and_replay).
- Laplace (LaLoRA, arXiv 2512.17720), once per optimizer step: dW_l = (alpha / r) * B_l @ A_l is the LoRA update of
  adapted layer l and F_l the diagonal Fisher of the initial model's weights on surrogate source text, per token
  (curvature.py), so sum(F * dW^2) / 2 is the second-order estimate of how much the update raises the per-token
  source NLL. On dW, not on A and B: with B = 0 at init a penalty on A alone is blind to the function, and one on B
  ignores how A scales it; on dW it is 0 at step 0 and measures the change of the weights.

Positions follow the usual shift: the logits at position t predict token t + 1; `labels` are given unshifted. The
token terms are computed by chunked_loss.chunked_token_loss (closed-form gradients, one chunk of logits at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batch import IGNORE_INDEX, continuation_mask, replay_tokens
from .chunked_loss import chunked_token_loss

KL_PLACEMENTS = ("all", "sft", "replay", "prompt_and_replay")
# the kinds of row that hold KL positions under each kl_on (the rows of `where` in ARRObjective.positions)
KL_ROWS = {"all": ("sft", "replay"), "sft": ("sft",), "replay": ("replay",), "prompt_and_replay": ("sft", "replay")}
KL_DIRECTIONS = ("forward", "reverse")


class Positions(NamedTuple):
    """[B, T - 1] bools over the shifted positions: which terms each prediction takes."""

    sft: torch.Tensor  # SFT CE
    replay: torch.Tensor  # replay CE
    kl: torch.Tensor  # KL (KL_replay and KL_task together)
    kl_task: torch.Tensor  # the KL positions of KL_task (none unless task_kl_beta is set)
    kl_masked: torch.Tensor  # KL without the label (kl_mask_target)


class TokenCounts(NamedTuple):
    """Number of positions each token term is averaged over (summed over a whole optimizer step)."""

    sft: torch.Tensor
    kl: torch.Tensor  # KL positions but KL_task's
    kl_task: torch.Tensor
    replay: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        return torch.stack(list(self))

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TokenCounts:
        return cls(*t.unbind())


class LossParts(NamedTuple):
    total: torch.Tensor
    sft_ce: torch.Tensor
    kl: torch.Tensor
    kl_task: torch.Tensor
    replay_ce: torch.Tensor
    laplace: torch.Tensor


class ARRObjective(nn.Module):
    def __init__(self, beta: float = 1.0, kl_on: str = "all", kl_direction: str = "forward",
                 kl_mask_target: bool = False, replay_weight: float = 1.0, laplace_lambda: float = 0.0,
                 task_kl_beta: float | None = None):
        super().__init__()
        self.beta, self.kl_on, self.kl_direction, self.kl_mask_target = beta, kl_on, kl_direction, kl_mask_target
        self.replay_weight, self.laplace_lambda, self.task_kl_beta = replay_weight, laplace_lambda, task_kl_beta

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0 or bool(self.task_kl_beta)

    def kl_rows(self) -> tuple[str, ...]:
        """The kinds of row ("sft", "replay") that hold KL positions: what a reference cache must cover."""
        return KL_ROWS[self.kl_on] if self.needs_reference else ()

    def positions(self, batch: dict) -> Positions:
        """Position t predicts token t + 1 only where continuation_mask[:, t + 1] is 1 (not padding, not the start
        of the next packed sequence)."""
        targets, has_next = batch["labels"][:, 1:], continuation_mask(batch)[:, 1:].bool()
        replay_rows = replay_tokens(batch["is_replay"], targets.shape[1])
        trained = targets.ne(IGNORE_INDEX) & has_next
        sft, replay = trained & ~replay_rows, trained & replay_rows
        where = {"all": has_next, "sft": ~replay_rows, "replay": replay_rows, "prompt_and_replay": ~sft}[self.kl_on]
        kl = has_next & where & self.needs_reference
        kl_task = kl & ~replay_rows & (self.task_kl_beta is not None)
        return Positions(sft, replay, kl, kl_task, kl & sft & self.kl_mask_target)

    def count_tokens(self, batch: dict) -> TokenCounts:
        positions = self.positions(batch)
        return TokenCounts(positions.sft.sum(), (positions.kl & ~positions.kl_task).sum(), positions.kl_task.sum(),
                           positions.replay.sum())

    def laplace_penalty(self, curvature: Iterable[tuple[Callable[[], torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """laplace_lambda / 2 * sum_l sum(F_l * dW_l^2). `curvature` pairs a function rebuilding each dW_l with its
        F_l; each layer runs under checkpointing, so no dW is kept for backward: memory O(one layer)."""
        total = torch.zeros(())
        for delta, fisher in curvature:
            term = checkpoint(lambda d=delta, f=fisher: (f * d().float().square()).sum(), use_reentrant=False)
            total = total.to(term.device) + term
        return self.laplace_lambda / 2 * total

    def forward(self, outputs: torch.Tensor, batch: dict, reference=None, head: nn.Module | None = None,
                counts: TokenCounts | None = None, chunk_size: int = 0, curvature=None, step_share: float = 1.0
                ) -> LossParts:
        """`outputs`: the trained model's final hidden states [B, T, H] with its `head`, or its logits [B, T, V]
        (head None). `batch`: labels, is_replay and the layout (batch.py). `reference`: a reference.py Reference,
        needed when a KL is taken. `counts`: the step-wide denominators (default: this batch's own). `chunk_size`:
        positions per chunk of logits (0: one chunk of the KL positions and one of the rest). `curvature`: the
        Laplace pairs (see laplace_penalty), whose penalty counts `step_share` of its value in this call (1 /
        gradient-accumulation steps)."""
        positions = self.positions(batch)
        counts = counts if counts is not None else self.count_tokens(batch)
        if positions.kl.any() and reference is None:
            raise ValueError("a KL (beta or task_kl_beta > 0) needs the initial model's log-probs (a reference)")
        selected = positions.sft | positions.replay | positions.kl  # row-major, like the reference's KL positions
        task_beta = self.task_kl_beta or 0.0
        weights = torch.stack([1 / counts.sft.clamp(min=1), self.beta / counts.kl.clamp(min=1),
                               task_beta / counts.kl_task.clamp(min=1),
                               self.replay_weight / counts.replay.clamp(min=1)]).float()
        sums, gradient_term = chunked_token_loss(
            outputs[:, :-1][selected], head, batch["labels"][:, 1:][selected].clamp(min=0), positions.sft[selected],
            positions.replay[selected], positions.kl[selected], positions.kl_task[selected],
            positions.kl_masked[selected], weights, reference.select(positions.kl) if positions.kl.any() else None,
            self.kl_direction, chunk_size)
        sft_ce, kl, kl_task, replay_ce = (sums / counts.as_tensor().clamp(min=1)).unbind()
        laplace = self.laplace_penalty(curvature) * step_share if curvature else sft_ce.new_zeros(())
        total = (sft_ce + self.beta * kl + task_beta * kl_task + self.replay_weight * replay_ce
                 + laplace.to(sft_ce.device))
        if gradient_term is not None:
            total = total + gradient_term
        return LossParts(total, sft_ce, kl, kl_task, replay_ce, laplace)
