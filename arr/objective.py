r"""The ARR objective, whole.

    loss = CE_sft + beta * KL + replay_weight * CE_replay + laplace_lambda / 2 * sum_l sum(F_l * dW_l^2)

Two equivalent implementations: `forward` takes [B, T, V] logits (simple, the reference: autograd does the
gradients), `forward_hidden` takes the final hidden states and the LM head and works through the selected tokens in
chunks, computing each chunk's gradient on its logits in closed form as it goes (p - t, see kl_and_target), so no
[tokens, vocab] tensor larger than one chunk ever exists, none is kept for autograd, and nothing is recomputed in the
backward pass. Calling the head *module* (not reading its weight) keeps a LoRA on `lm_head` in play.

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

- The Laplace (LaLoRA) weight-space penalty, once per optimizer step: dW_l = (alpha / r) * B_l @ A_l is the
  effective LoRA update of adapted layer l and F_l the diagonal Fisher of the initial model's weights on surrogate
  source text, per token (see curvature.py), so sum(F * dW^2) / 2 is the second-order estimate of how much the
  update raises the per-token source NLL. The penalty is on dW, not on A and B: with the standard init B = 0, so a
  penalty on A alone would be blind to the function and one on B would ignore how A scales it. On dW it is 0 at
  step 0 and measures the actual change of the weights from the start.

Positions follow the usual shift: the logits at position t predict token t + 1, so a row of length T has T - 1
predictions; `labels` are given unshifted, as in Hugging Face models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    """Boolean masks over the T - 1 shifted positions: (sft CE, replay CE, KL). Position t predicts token t + 1 only
    where attention_mask[:, t + 1] is 1: in a padded batch its attention mask, in a packed one `continuation_mask`
    (0 where a new sequence starts). `is_replay` is per row [B] or, in a packed batch, per token [B, T]."""
    targets = labels[:, 1:]
    has_next = attention_mask[:, 1:].bool()
    replay_rows = is_replay.bool()[:, :-1] if is_replay.dim() == 2 else is_replay.bool()[:, None]
    trainable = targets.ne(IGNORE_INDEX) & has_next
    sft = trainable & ~replay_rows
    replay = trainable & replay_rows
    rows = {"sft": ~replay_rows, "replay": replay_rows, "all": torch.ones_like(replay_rows)}[kl_on]
    return sft, replay, has_next & rows


def continuation_mask(batch: dict) -> torch.Tensor:
    """[B, T], 1 where a token follows the previous one in the same sequence: the attention mask of a padded batch;
    for a packed (padding-free) batch, which has position_ids and no attention mask, 0 where a sequence starts."""
    if "attention_mask" in batch:
        return batch["attention_mask"]
    return batch["position_ids"].ne(0).long()


def count_tokens(batch: dict, kl_on: str) -> TokenCounts:
    sft, replay, kl = position_masks(batch["labels"], continuation_mask(batch), batch["is_replay"], kl_on)
    return TokenCounts(sft.sum(), kl.sum(), replay.sum())


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, direction: str) -> torch.Tensor:
    """KL per row of [N, V] logits, in float32."""
    return kl_from_logprobs(F.log_softmax(logits.float(), dim=-1), F.log_softmax(ref_logits.float(), dim=-1),
                            direction)


def kl_from_logprobs(logp: torch.Tensor, logp_ref: torch.Tensor, direction: str) -> torch.Tensor:
    if direction == "forward":
        return (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return (logp.exp() * (logp - logp_ref)).sum(-1)


def log_softmax_float(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32, written over `logits` when they already are float32: one [n, V] tensor fewer. A linear
    head's backward does not read its output; one whose backward did would stop with autograd's in-place error."""
    logits = logits.float()
    return logits.sub_(logits.logsumexp(-1, keepdim=True))


def coarsened(logp: torch.Tensor, ref_logp: torch.Tensor, ref_idx: torch.Tensor, ref_tail: torch.Tensor):
    """The model's and a top-k reference's log-probs over k + 1 outcomes: the reference's k tokens (`ref_idx`) and
    "any other" (`ref_tail` is the reference's log of that remaining mass)."""
    tail = logp.scatter(1, ref_idx, float("-inf")).logsumexp(-1)
    coarse = torch.cat([logp.gather(1, ref_idx), tail[:, None].clamp(min=-1e4)], 1)  # clamp: no 0 * inf at an empty tail
    return coarse, torch.cat([ref_logp.float(), ref_tail.float()[:, None].clamp(min=-1e4)], 1)


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, ref_idx: torch.Tensor | None = None,
                    ref_tail: torch.Tensor | None = None, direction: str = "forward") -> torch.Tensor:
    """Per-row KL between the model's log-probs `logp` [n, V] and a reference that is either exact (`ref_logp`
    [n, V]) or its top k (`ref_logp` [n, k] at token ids `ref_idx`, plus the log of the remaining mass `ref_tail`).
    Top-k gives the exact KL between the two distributions coarsened to k + 1 outcomes (the k tokens and "any
    other"), a lower bound of the full KL that reaches it as the tail mass goes to 0."""
    if ref_idx is None:
        return kl_from_logprobs(logp, ref_logp.float(), direction)
    return kl_from_logprobs(*coarsened(logp, ref_logp, ref_idx, ref_tail), direction)


@torch.no_grad()
def kl_and_target(logp: torch.Tensor, ref_logp: torch.Tensor, ref_idx: torch.Tensor | None = None,
                  ref_tail: torch.Tensor | None = None, direction: str = "forward"):
    """`kl_to_reference`, and the distribution t per row for which the KL's gradient on the logits is p - t (p the
    model's softmax). Forward KL: t is the reference, pi_0. Reverse KL: t = p * (1 - log(p / pi_0) + KL), from
    d KL(p || pi_0) / d z_j = p_j * (log(p_j / pi_0(j)) - KL). With a top-k reference both hold on the k + 1 coarse
    outcomes, and a tail token j gets the tail's value times p_j / P(tail). Works in place on an exact `ref_logp`
    (few [n, V] tensors at a time), which the caller must not use again."""
    if ref_idx is None:
        ref_logp = ref_logp.float()
        if direction == "forward":
            target = ref_logp.exp()
            return ref_logp.sub_(logp).mul_(target).sum(-1), target
        p = logp.exp()
        log_ratio = ref_logp.sub_(logp)  # log(pi_0 / p)
        kl = -(p * log_ratio).sum(-1)
        return kl, p.mul_(log_ratio.add_(1 + kl[:, None]))
    coarse, coarse_ref = coarsened(logp, ref_logp, ref_idx, ref_tail)
    kl = kl_from_logprobs(coarse, coarse_ref, direction)
    if direction == "forward":  # t_j = p_j * pi_0(tail) / P(tail) on the tail, in logs (p_j may underflow to 0)
        target = (logp + (coarse_ref[:, -1:] - coarse[:, -1:])).exp_()
        return kl, target.scatter_(1, ref_idx, coarse_ref[:, :-1].exp())
    factor = (coarse_ref - coarse).add_(1 + kl[:, None])
    target = logp.exp().mul_(factor[:, -1:])
    return kl, target.scatter_(1, ref_idx, coarse[:, :-1].exp() * factor[:, :-1])


class ARRObjective(nn.Module):
    def __init__(self, beta: float = 0.1, kl_on: str = "all", kl_direction: str = "forward", replay_weight: float = 1.0,
                 laplace_lambda: float = 0.0):
        super().__init__()
        self.beta, self.kl_on, self.kl_direction, self.replay_weight = beta, kl_on, kl_direction, replay_weight
        self.laplace_lambda = laplace_lambda

    def weight_penalty(self, delta_weights: Iterable[Callable[[], torch.Tensor]], fishers: Iterable[torch.Tensor]
                       ) -> torch.Tensor:
        """laplace_lambda / 2 * sum_l sum(F_l * dW_l^2). `delta_weights` rebuild each dW_l (shaped like its F_l);
        each layer runs under checkpointing, so no dW is kept for backward: memory O(one layer)."""
        total = torch.zeros(())
        for delta, fisher in zip(delta_weights, fishers):
            term = checkpoint(lambda d=delta, f=fisher: (f * d().float().square()).sum(), use_reentrant=False)
            total = total.to(term.device) + term
        return self.laplace_lambda / 2 * total

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
        ref_cached: tuple[torch.Tensor, Callable] | None = None,
    ) -> LossParts:
        """`logits`/`ref_logits`: [B, T, V]; `labels`: [B, T] (unshifted, -100 = no loss); `attention_mask` and
        `is_replay` as in `position_masks`.
        `counts` are the step-wide denominators; by default this batch's own. `ref_cached` replaces `ref_logits`
        by precomputed reference log-probs: (cache positions [B, T - 1], lookup(positions) -> the reference
        arguments of `kl_to_reference`)."""
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
            if ref_logits is None and ref_cached is None:
                raise ValueError("beta > 0 needs the initial model's logits (ref_logits or ref_cached)")
            if ref_cached is not None:
                positions, lookup = ref_cached
                ref = lookup(positions[kl_positions])
            else:
                ref = (F.log_softmax(ref_logits[:, :-1][kl_positions].float(), -1),)
            per_token = kl_to_reference(F.log_softmax(logits[kl_positions].float(), -1), *ref,
                                        direction=self.kl_direction)
            kl = per_token.sum() / counts.kl.clamp(min=1)
        total = sft_ce + self.beta * kl + self.replay_weight * replay_ce
        return LossParts(total, sft_ce, kl, replay_ce)

    def forward_hidden(
        self,
        hidden: torch.Tensor,
        head,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        is_replay: torch.Tensor,
        ref_hidden: torch.Tensor | None = None,
        ref_head=None,
        counts: TokenCounts | None = None,
        chunk_size: int = 128,
        ref_cached: tuple[torch.Tensor, Callable] | None = None,
    ) -> LossParts:
        """The same loss from final hidden states [B, T, H]. `head` maps [n, H] to logits, `ref_head` likewise for
        the initial model (the same module unless the head itself is adapted). `ref_cached` replaces (`ref_hidden`,
        `ref_head`) by precomputed reference log-probs, as in `forward`."""
        sft, replay, kl_positions = position_masks(labels, attention_mask, is_replay, self.kl_on)
        if counts is None:
            counts = TokenCounts(sft.sum(), kl_positions.sum(), replay.sum())
        use_kl = self.needs_reference and bool(kl_positions.any())
        if use_kl and ref_cached is None and (ref_hidden is None or ref_head is None):
            raise ValueError("beta > 0 needs the initial model's hidden states and head (ref_hidden, ref_head) "
                             "or ref_cached")
        rows = sft | replay | (kl_positions if use_kl else torch.zeros_like(sft))
        flat = [hidden[:, :-1][rows], labels[:, 1:][rows].clamp(min=0), sft[rows], replay[rows], kl_positions[rows]]
        ref_flat, ref_distribution = None, None
        if use_kl and ref_cached is not None:
            ref_flat, ref_distribution = ref_cached[0][rows], ref_cached[1]
        elif use_kl:
            ref_flat = ref_hidden[:, :-1][rows]

            def ref_distribution(ref_h):
                return (log_softmax_float(ref_head(ref_h)),)

        weights = torch.stack([1 / counts.sft.clamp(min=1), self.beta / counts.kl.clamp(min=1),
                               self.replay_weight / counts.replay.clamp(min=1)]).float()
        head_params = [p for p in head.parameters() if p.requires_grad]  # a LoRA on lm_head, a trained head copy
        track = torch.is_grad_enabled() and (flat[0].requires_grad or bool(head_params))

        @torch.no_grad()
        def sums_and_logit_grad(logits, targets, sft_rows, replay_rows, kl_rows, ref_part):
            """The chunk's three loss sums and the gradient of its weighted loss on the logits, without autograd:
            every part's gradient is p - t for a target distribution t per row (p the model's softmax): the label's
            one-hot for CE, kl_and_target's t for KL. Liger-Kernel's fused linear losses work the same way (as CUDA
            kernels for a plain weight matrix); this runs anywhere, with any head module, and holds no [n, V] tensor
            for autograd."""
            logp = log_softmax_float(logits)
            nll = -logp.gather(1, targets[:, None]).squeeze(1)
            kl, target = torch.zeros_like(nll), None
            if ref_part is not None:
                kl, target = kl_and_target(logp, *ref_distribution(ref_part), direction=self.kl_direction)
            sums = torch.stack([(nll * sft_rows).sum(), (kl * kl_rows).sum(), (nll * replay_rows).sum()])
            if not track:
                return sums, None
            ce_weight = sft_rows * weights[0] + replay_rows * weights[2]
            kl_weight = kl_rows * weights[1] if target is not None else torch.zeros_like(ce_weight)
            grad = logp.exp_().mul_((ce_weight + kl_weight)[:, None])
            if target is not None:
                grad.sub_(target.mul_(kl_weight[:, None]))
            return sums, grad.scatter_add_(1, targets[:, None], -ce_weight[:, None])

        # Each chunk's gradient is taken during the forward pass, so its logits are freed with the chunk and never
        # recomputed. Backward then only routes the stored gradients on, through a surrogate term whose value is 0.
        hidden_grad = torch.zeros_like(flat[0]) if track and flat[0].requires_grad else None
        param_grads = [torch.zeros_like(p) for p in head_params] if track else []
        sums = hidden.new_zeros(3, dtype=torch.float32)
        for start in range(0, flat[0].shape[0], chunk_size):
            part = [t[start:start + chunk_size] for t in flat]
            ref_part = ref_flat[start:start + chunk_size] if ref_flat is not None else None
            h = part[0].detach().requires_grad_(hidden_grad is not None)
            with torch.set_grad_enabled(track):
                logits = head(h)
            chunk, logit_grad = sums_and_logit_grad(logits, *part[1:], ref_part)
            sums = sums + chunk
            if track:
                wrt = ([h] if hidden_grad is not None else []) + head_params
                grads = list(torch.autograd.grad(logits, wrt, logit_grad.to(logits.dtype), allow_unused=True))
                if hidden_grad is not None:
                    hidden_grad[start:start + chunk_size] = grads.pop(0)
                for total, g in zip(param_grads, grads):
                    if g is not None:
                        total += g
            del logits, logit_grad  # else this chunk's [n, V] tensors live on while the next chunk makes its own
        sft_ce = sums[0] / counts.sft.clamp(min=1)
        kl = sums[1] / counts.kl.clamp(min=1)
        replay_ce = sums[2] / counts.replay.clamp(min=1)
        total = sft_ce + self.beta * kl + self.replay_weight * replay_ce
        if track:
            pairs = ([(flat[0], hidden_grad)] if hidden_grad is not None else []) + list(zip(head_params, param_grads))
            surrogate = sum((t.float() * g.float()).sum() for t, g in pairs)
            total = total + (surrogate - surrogate.detach())
        return LossParts(total, sft_ce, kl, replay_ce)
