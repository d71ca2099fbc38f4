r"""The token terms of the ARR objective over selected positions, chunk by chunk, with closed-form gradients.

`chunked_token_loss` applies the LM head to `chunk_size` positions at a time and computes each chunk's gradient on
its logits as it goes: every term's gradient on the logits is p - t for a target distribution t (the label's one-hot
for CE, `kl_and_target`'s t for the KL), so no [positions, vocab] tensor larger than one chunk exists, none is kept
for autograd, and nothing is recomputed in backward. Backward then only routes the stored gradients on, through a
surrogate term whose value is 0. Given logits instead of hidden states (head None) it is the plain full-logits loss.

Liger-Kernel's fused linear losses (fused linear cross-entropy, the chunked distillation losses) are the pattern;
ours is written by hand because it must call any head *module* (a LoRA on `lm_head`, a trained head copy, a head that
FSDP gathers, Gemma 2's softcapped head: `logits_head`), run on CPU as well as CUDA, and take its reference from a
cache as well as from a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

MASKED = -1e4  # the log-prob given to a token removed from a distribution: exp() is 0, and 0 * (MASKED - MASKED) is 0


class RefLogprobs(NamedTuple):
    """The initial model's next-token log-probs at n positions: all V (`logp` [n, V]), or the top k (`logp` [n, k]
    at token ids `idx`, `tail` [n] the log of the remaining mass, and `label_logp` [n] the log-prob of each
    position's label, which a top-k reference cannot give otherwise)."""

    logp: torch.Tensor
    idx: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    label_logp: torch.Tensor | None = None


class SoftcappedHead(torch.nn.Module):
    """An LM head followed by final-logit softcapping, cap * tanh(logits / cap), in the order the model's own forward
    applies it (Gemma 2): the logits the model gives, from final hidden states."""

    def __init__(self, head: torch.nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def final_logit_softcap(model) -> float | None:
    """The cap `model`'s forward applies to its logits (`final_logit_softcapping`: Gemma 2), or None."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None) or None


def logits_head(model, head: torch.nn.Module | None = None) -> torch.nn.Module:
    """What maps `model`'s final hidden states to its logits, for whatever applies the head itself (the chunked loss,
    the reference cache, recorded generation): `head` (default: the model's output embeddings), softcapped when the
    model caps its logits."""
    head = model.get_output_embeddings() if head is None else head
    cap = final_logit_softcap(model)
    return SoftcappedHead(head, cap) if cap else head


def kl_from_logprobs(logp: torch.Tensor, logp_ref: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-row KL: forward KL(ref || model) or reverse KL(model || ref), from log-probs."""
    if direction == "forward":
        return (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return (logp.exp() * (logp - logp_ref)).sum(-1)


def log_softmax_float(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32, written over `logits` when they already are float32: one [n, V] tensor fewer. A linear
    head's backward does not read its output; one whose backward did would stop with autograd's in-place error."""
    logits = logits.float()
    return logits.sub_(logits.logsumexp(-1, keepdim=True))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def without_target(logp: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place on the `rows` of [n, V] log-probs: the label token removed and the rest renormalised
    (Mask-the-Target). The label then has log-prob MASKED, so its probability is 0."""
    at = targets[:, None]
    label = logp.gather(1, at)
    logp.scatter_(1, at, torch.where(rows[:, None], float("-inf"), label))
    logp.sub_(torch.where(rows, logp.logsumexp(-1), 0.0)[:, None])
    return logp.scatter_(1, at, torch.where(rows[:, None], MASKED, label))


def reference_without_target(ref: RefLogprobs, targets: torch.Tensor, rows: torch.Tensor) -> RefLogprobs:
    """`without_target` for a reference, exact or top k. For top k: the label is dropped from the k tokens when it is
    one of them, else its mass (`label_logp`) leaves the tail; then both are renormalised by 1 - p(label)."""
    if ref.idx is None:
        return RefLogprobs(without_target(ref.logp.float(), targets, rows))
    hit = ref.idx.eq(targets[:, None]) & rows[:, None]
    label = ref.label_logp.float()
    tail = ref.tail.float()
    tail = torch.where(rows & ~hit.any(1), tail + log1mexp(label - tail), tail)
    norm = torch.where(rows, log1mexp(label), 0.0)
    values = (ref.logp.float() - norm[:, None]).masked_fill(hit, MASKED)
    return RefLogprobs(values, ref.idx, tail - norm, label)


def coarsened(logp: torch.Tensor, ref: RefLogprobs, in_place: bool = False):
    """The model's and a top-k reference's log-probs over k + 1 outcomes: the reference's k tokens and "any other".
    `in_place`: the k tokens are masked in `logp` itself for the tail's sum and then put back, bit for bit (no
    [n, V] copy; not on a tensor that autograd tracks)."""
    top = logp.gather(1, ref.idx)
    if in_place:
        tail = logp.scatter_(1, ref.idx, float("-inf")).logsumexp(-1)
        logp.scatter_(1, ref.idx, top)
    else:
        tail = logp.scatter(1, ref.idx, float("-inf")).logsumexp(-1)
    coarse = torch.cat([top, tail[:, None].clamp(min=MASKED)], 1)  # clamp: no 0 * inf
    return coarse, torch.cat([ref.logp.float(), ref.tail.float()[:, None].clamp(min=MASKED)], 1)


def kl_to_reference(logp: torch.Tensor, ref: RefLogprobs, direction: str = "forward") -> torch.Tensor:
    """Per-row KL between the model's log-probs `logp` [n, V] and a reference, exact or top k. Top k gives the exact
    KL between the two distributions coarsened to k + 1 outcomes (the k tokens and "any other"), a lower bound of the
    full KL that reaches it as the tail mass goes to 0."""
    if ref.idx is None:
        return kl_from_logprobs(logp, ref.logp.float(), direction)
    return kl_from_logprobs(*coarsened(logp, ref), direction)


@torch.no_grad()
def kl_and_target(logp: torch.Tensor, ref: RefLogprobs, direction: str = "forward"):
    """`kl_to_reference`, and the distribution t per row for which the KL's gradient on the logits is p - t (p the
    model's softmax). Forward KL: t is the reference. Reverse KL: t = p * (1 - log(p / ref) + KL), from
    d KL(p || ref) / d z_j = p_j * (log(p_j / ref_j) - KL). With a top-k reference both hold on the k + 1 coarse
    outcomes, and a tail token j gets the tail's value times p_j / P(tail). Works in place on an exact reference
    (few [n, V] tensors at a time), which the caller must not use again; with a top-k one it masks the k tokens in
    `logp` for the tail's sum and puts them back (`coarsened`)."""
    if ref.idx is None:
        ref_logp = ref.logp.float()
        if direction == "forward":
            target = ref_logp.exp()
            return ref_logp.sub_(logp).mul_(target).sum(-1), target
        p = logp.exp()
        log_ratio = ref_logp.sub_(logp)  # log(ref / p)
        kl = -(p * log_ratio).sum(-1)
        return kl, p.mul_(log_ratio.add_(1 + kl[:, None]))
    coarse, coarse_ref = coarsened(logp, ref, in_place=True)
    kl = kl_from_logprobs(coarse, coarse_ref, direction)
    if direction == "forward":  # t_j = p_j * ref(tail) / P(tail) on the tail, in logs (p_j may underflow to 0)
        target = (logp + (coarse_ref[:, -1:] - coarse[:, -1:])).exp_()
        return kl, target.scatter_(1, ref.idx, coarse_ref[:, :-1].exp())
    factor = (coarse_ref - coarse).add_(1 + kl[:, None])
    target = logp.exp().mul_(factor[:, -1:])
    return kl, target.scatter_(1, ref.idx, coarse[:, :-1].exp() * factor[:, :-1])


@torch.no_grad()
def _chunk_sums_and_logit_grad(logp, targets, sft, replay, kl, kl_task, masked, weights, reference, direction,
                               track):
    """One chunk: the four loss sums (sft NLL, KL, task KL, replay NLL) and, when `track`, the gradient of the
    weighted loss on the chunk's logits. `logp` holds the chunk's float32 logits and is overwritten; `reference()`
    gives the reference at the chunk's KL positions (None: no KL here). With every position under an unmasked KL, at
    most three [chunk, V] tensors exist at a time (reverse KL briefly a fourth)."""
    logp = log_softmax_float(logp)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    kl_sum, kl_task_sum, kl_grad, p = nll.new_zeros(()), nll.new_zeros(()), None, None
    kl_rows = kl.nonzero().squeeze(1)
    every_row = len(kl_rows) == len(kl)
    ref = reference() if reference is not None else None
    if ref is not None:
        rows_masked = masked[kl_rows]
        aliased = every_row and not rows_masked.any()  # the KL reads logp itself: no copy
        model_logp = logp if aliased else logp[kl_rows]
        if rows_masked.any():
            kl_targets = targets[kl_rows]
            model_logp = without_target(model_logp, kl_targets, rows_masked)
            ref = reference_without_target(ref, kl_targets, rows_masked)
        values, target = kl_and_target(model_logp, ref, direction)
        del ref  # kl_and_target wrote over an exact reference; its memory goes now
        on_task = kl_task[kl_rows]
        kl_sum, kl_task_sum = (values * ~on_task).sum(), (values * on_task).sum()
        if track:  # weight * (p - t) on the KL rows, written over t
            p_kl = logp.exp_() if aliased else model_logp.exp_()
            kl_grad = target.neg_().add_(p_kl).mul_(torch.where(on_task, weights[2], weights[1])[:, None])
            p = p_kl if aliased else None
            del p_kl, model_logp
    sums = torch.stack([(nll * sft).sum(), kl_sum, kl_task_sum, (nll * replay).sum()])
    if not track:
        return sums, None
    ce_weight = sft * weights[0] + replay * weights[3]
    p = logp.exp_() if p is None else p
    grad = p.mul_(ce_weight[:, None]).scatter_add_(1, targets[:, None], -ce_weight[:, None])
    if kl_grad is not None:
        grad = grad.add_(kl_grad) if every_row else grad.index_add_(0, kl_rows, kl_grad)
    return sums, grad


def chunked_token_loss(inputs: torch.Tensor, head: torch.nn.Module | None, targets: torch.Tensor, sft: torch.Tensor,
                       replay: torch.Tensor, kl: torch.Tensor, kl_task: torch.Tensor, masked: torch.Tensor,
                       weights: torch.Tensor, reference: Callable[[int, int], RefLogprobs] | None, direction: str,
                       chunk_size: int):
    """Loss sums and gradients over n selected positions.

    inputs: [n, H] final hidden states (then `head` maps them to logits) or [n, V] logits (head None);
    targets: [n] next-token labels (any valid id where no CE is taken); sft, replay, kl, kl_task, masked: [n] bools,
    which terms each position takes (kl_task: its KL is summed apart, as the task KL; masked: its KL leaves the label
    out); weights: [4] the factors of the sft CE, KL, task KL and replay CE sums in the loss; reference(a, b): the
    reference log-probs of the KL positions a..b-1 in order. Returns the [4] sums and a term of value 0 whose
    gradient is the weighted loss's (None when nothing is tracked)."""
    head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
    track = torch.is_grad_enabled() and (inputs.requires_grad or bool(head_params))
    input_grad = torch.zeros_like(inputs) if track and inputs.requires_grad else None
    param_grads = [torch.zeros_like(p) for p in head_params]
    sums = inputs.new_zeros(4, dtype=torch.float32)
    chunk_size, kl_done = chunk_size or max(1, len(inputs)), 0
    # the KL positions in chunks of their own, in order: there the KL reads the chunk's log-probs in place (unless
    # Mask-the-Target masks some), where a chunk that mixed them with CE-only positions would copy its KL rows out
    parts = [i[a:a + chunk_size] for i in (torch.nonzero(~kl).squeeze(1), torch.nonzero(kl).squeeze(1))
             for a in range(0, len(i), chunk_size)]
    for part in parts:
        kl_end = kl_done + int(kl[part].sum())
        chunk_reference = None
        if reference is not None and kl_end > kl_done:
            chunk_reference = partial(reference, kl_done, kl_end)
        if head is None:
            logits = h = inputs.detach()[part].float()  # a copy (indexed), written over below
        else:
            h = inputs[part].detach()
            h.requires_grad_(input_grad is not None)
            with torch.set_grad_enabled(track):
                logits = head(h)
        chunk, logit_grad = _chunk_sums_and_logit_grad(logits if head is None else logits.detach(), targets[part],
                                                       sft[part], replay[part], kl[part], kl_task[part],
                                                       masked[part], weights, chunk_reference, direction, track)
        sums, kl_done = sums + chunk, kl_end
        if track and head is None:  # (index_copy_: an indexed assignment would not cast to bf16 logits)
            input_grad.index_copy_(0, part, logit_grad.to(input_grad.dtype))
        elif track:
            wrt = ([h] if input_grad is not None else []) + head_params
            grads = list(torch.autograd.grad(logits, wrt, logit_grad.to(logits.dtype), allow_unused=True))
            if input_grad is not None:
                input_grad.index_copy_(0, part, grads.pop(0))
            for total, g in zip(param_grads, grads):
                if g is not None:
                    total += g
        del h, logits, logit_grad  # else this chunk's [n, V] tensors live on while the next chunk makes its own
    if not track:
        return sums, None
    pairs = ([(inputs, input_grad)] if input_grad is not None else []) + list(zip(head_params, param_grads))
    surrogate = sum((t.float() * g.float()).sum() for t, g in pairs)
    return sums, surrogate - surrogate.detach()
