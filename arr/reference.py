"""The initial (reference) model, and the one interface through which the objective reads it.

The initial model is the trained network with its LoRA adapter switched off: no second copy is kept. Because the
standard LoRA init sets B = 0, the adapted model equals the base model at step 0, so "adapter off" *is* the model
training started from, for the whole run. Inits that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ) break that
identity and are refused.

A `Reference` gives the initial model's next-token log-probs at the positions the objective selects, as a function
`(a, b) -> RefLogprobs` over the selected positions a..b-1, so that the chunked loss asks for one chunk at a time:
- `OnlineReference`: from the initial model's forward pass of this step, as final hidden states plus its LM head (the
  head runs per chunk) or as logits; computed on the rows that hold KL positions only;
- `CachedReference`: from log-probs computed once before training (`cache.ReferenceCache`, exact or top k).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from .chunked_loss import RefLogprobs, log_softmax_float
from .errors import ConfigError

BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def check_reference_is_initial(model: PeftModel) -> None:
    """Refuse adapters whose init rewrote the base weights (the disabled adapter would not be the initial model)."""
    for name, cfg in model.peft_config.items():
        init = str(getattr(cfg, "init_lora_weights", True)).lower()
        if init.startswith(BASE_REWRITING_INITS):
            raise ConfigError(
                f"init_lora_weights={init!r} (adapter {name!r}) rewrites the base weights, so the model with its "
                "adapter disabled is not the initial model that ARR's KL needs; use init_lora_weights=true or gaussian"
            )


def adapter_layers(peft_model: PeftModel) -> list[torch.nn.Module]:
    """The modules `adapters_off` switches: every PEFT tuner layer and trained module copy (modules_to_save,
    trainable tokens)."""
    return [m for m in peft_model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextmanager
def adapters_off(layers: list[torch.nn.Module]):
    """The initial model inside the block, as under `PeftModel.disable_adapter()`, for the reference forward of every
    training step. PEFT's context manager also checks the model's status and resets requires_grad on every adapter
    weight, walking all modules on entry and exit (docs/PERFORMANCE.md measures what that costs per step). This flips
    only the flag that PEFT's layers read in their forward (`disable_adapters`, stored as `_disable_adapters` in the
    pinned peft) on a list made once; requires_grad does not matter to a forward under no_grad. PEFT's public
    per-layer switch, `enable_adapters(False/True)`, also walks each layer's weights to reset requires_grad:
    bench.reference_cost measures all three (docs/PERFORMANCE.md), and the flag is the only one whose cost does not
    grow with the adapter. A test holds it equal to `disable_adapter()`, so a rename in peft fails there."""
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer._disable_adapters = state


@torch.no_grad()
def reference_logits(model: torch.nn.Module, layers: list[torch.nn.Module], inputs: dict) -> torch.Tensor:
    """Logits of the initial model. `model` is what the Trainer forwards through (it may be wrapped by DDP/FSDP/
    DeepSpeed), `layers` the adapter layers of the PEFT model inside (`adapter_layers`), switched off meanwhile."""
    with adapters_off(layers):
        return model(**inputs).logits


def initial_head(head: torch.nn.Module) -> torch.nn.Module:
    """The initial model's LM head, callable directly: `head` itself unless PEFT wraps it (a LoRA on lm_head, or a
    trained copy through modules_to_save / trainable_token_indices). Toggling the whole model's adapters with
    disable_adapter() walks every module, which is too slow to do per loss chunk."""
    if isinstance(head, BaseTunerLayer):
        return head.get_base_layer()
    if isinstance(head, AuxiliaryTrainingWrapper):
        return head.original_module
    return head


class OnlineReference:
    """The initial model's outputs of this step: final hidden states [B', T, H] with its `head`, or logits [B', T, V]
    (head None). `rows` [B] marks the batch rows they were computed for (None: all of them); every KL position lies
    in one of those rows."""

    def __init__(self, outputs: torch.Tensor, head: torch.nn.Module | None = None, rows: torch.Tensor | None = None):
        self.outputs, self.head, self.rows = outputs, head, rows

    def select(self, kl: torch.Tensor):
        """`kl` [B, T - 1] marks the KL positions; returns (a, b) -> RefLogprobs of the selected positions a..b-1."""
        selected = self.outputs[:, :-1][kl if self.rows is None else kl[self.rows]]
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
