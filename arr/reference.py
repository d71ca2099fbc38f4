"""The reference log-probs the objective reads: the initial model's (π₀, arr/initial.py) next-token log-probs at
the positions the objective selects.

A `Reference` gives the initial model's next-token log-probs at the positions the objective selects, as a function
`(a, b) -> RefLogprobs` over the selected positions a..b-1, so that the chunked loss asks for one chunk at a time:
- `OnlineReference`: from the initial model's forward pass of this step, as final hidden states plus its LM head (the
  head runs per chunk) or as logits; computed on the rows that hold KL positions only;
- `CachedReference`: from log-probs computed once before training (`cache.ReferenceCache`, exact or top k).
"""

from __future__ import annotations

import torch

from .chunked_loss import RefLogprobs, log_softmax_float
from .initial import InitialModel


@torch.no_grad()
def reference_logits(model: torch.nn.Module, initial: InitialModel, inputs: dict) -> torch.Tensor:
    """Logits of the initial model. `model` is what the Trainer forwards through (it may be wrapped by DDP/FSDP/
    DeepSpeed), `initial` the InitialModel of the PEFT model inside, switched to meanwhile."""
    with initial.switched_to():
        return model(**inputs).logits


class OnlineReference:
    """The initial model's outputs of this step: final hidden states [B', T', H] with its `head`, or logits
    [B', T', V] (head None), computed on the whole batch or, with `take`, on the part of it that holds the KL
    positions (batch.kl_sequences): `take` maps a [B, T - 1] mask of the batch onto [B', T' - 1]."""

    def __init__(self, outputs: torch.Tensor, head: torch.nn.Module | None = None, take=None):
        self.outputs, self.head, self.take = outputs, head, take

    def select(self, kl: torch.Tensor):
        """`kl` [B, T - 1] marks the KL positions; returns (a, b) -> RefLogprobs of the selected positions a..b-1."""
        selected = self.outputs[:, :-1][kl if self.take is None else self.take(kl)]
        if self.head is None:
            return lambda a, b: RefLogprobs(log_softmax_float(selected[a:b].float().clone()))
        return lambda a, b: RefLogprobs(log_softmax_float(self.head(selected[a:b])))


class CachedReference:
    """Precomputed reference log-probs: `entries` [B, T - 1] are each prediction's entries in `cache`
    (`ReferenceCache.positions`)."""

    def __init__(self, cache, entries: torch.Tensor, device):
        self.cache, self.entries, self.device = cache, entries, device

    def select(self, kl: torch.Tensor):
        selected = self.entries[kl.cpu()]
        return lambda a, b: self.cache.lookup(selected[a:b], self.device)
