"""The initial (reference) model, and the one interface through which the objective reads it.

The initial model is the trained network as training started, reached without a second copy of the model:
- with the standard LoRA init (B = 0) the adapted model equals the base model at step 0, so "adapter off" *is* the
  model training started from, for the whole run;
- inits that rewrite the base weights (PiSSA, OLoRA, CorDA: the base keeps the residual W - s B0 A0) break that
  identity, so a frozen copy of the initial adapter, INITIAL_ADAPTER, is kept beside the trained one and made active
  in its place (`snapshot_initial_adapter`); the adapter is then saved converted to a plain LoRA of the original base
  (`save_adapter`). LoftQ, whose base is quantized, is refused.
`initial_model(peft_model)` is that model inside a `with` block, for everything that reads it (the reference cache,
self-generated replay, the curvature estimate, evaluation's "before"); `adapters_off` is the same switch made cheap
enough for every training step.

A `Reference` gives the initial model's next-token log-probs at the positions the objective selects, as a function
`(a, b) -> RefLogprobs` over the selected positions a..b-1, so that the chunked loss asks for one chunk at a time:
- `OnlineReference`: from the initial model's forward pass of this step, as final hidden states plus its LM head (the
  head runs per chunk) or as logits; computed on the rows that hold KL positions only;
- `CachedReference`: from log-probs computed once before training (`cache.ReferenceCache`, exact or top k).
"""

from __future__ import annotations

import copy
import os
import tempfile
from contextlib import contextmanager

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from .chunked_loss import RefLogprobs, log_softmax_float
from .errors import ConfigError

BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga")
INITIAL_ADAPTER = "arr_initial"  # the frozen copy of the initial adapter, after a base-rewriting init


def snapshot_initial_adapter(peft_model: PeftModel) -> None:
    """Keep the model training starts from reachable: after an init that rewrote the base weights, add a frozen copy
    of the adapter as it is now (INITIAL_ADAPTER), which `initial_model` and `adapters_off` make active in place of
    switching the adapter off. Nothing to do for the standard inits. Refused, with the reason: LoftQ, and under a
    base-rewriting init what PEFT's conversion to a plain LoRA drops or what the snapshot cannot hold (DoRA, LoRA on
    embeddings, trained module copies, trained biases) and a LoRA on the LM head (the chunked loss applies the
    initial head directly)."""
    name = peft_model.active_adapter
    init = str(getattr(peft_model.peft_config[name], "init_lora_weights", True)).lower()
    if init.startswith("loftq"):
        raise ConfigError(f"init_lora_weights={init!r} (adapter {name!r}) starts from a quantized approximation of the "
                          "base weights, which ARR does not set up; use init_lora_weights=true, pissa or olora")
    if not init.startswith(BASE_REWRITING_INITS) or INITIAL_ADAPTER in peft_model.peft_config:
        return
    config = copy.deepcopy(peft_model.peft_config[name])
    unsupported = [what for what, present in (
        ("use_dora", config.use_dora), (f"bias={config.bias!r}", config.bias != "none"),
        ("modules_to_save", config.modules_to_save), ("trainable_token_indices", config.trainable_token_indices),
        ("a LoRA on an embedding", any(isinstance(m, LoraEmbedding) for m in peft_model.modules())),
        ("a LoRA on the LM head", isinstance(peft_model.get_output_embeddings(), BaseTunerLayer))) if present]
    if unsupported:
        raise ConfigError(f"init_lora_weights={init!r} with {', '.join(unsupported)}: the initial model or the "
                          "adapter converted for the original model would be wrong; use init_lora_weights=true there")
    # B = 0 (adding it leaves the base weights alone), frozen, and no dropout: the reference forward runs in train mode
    config.init_lora_weights, config.inference_mode, config.lora_dropout = True, True, 0.0
    peft_model.add_adapter(INITIAL_ADAPTER, config)
    set_peft_model_state_dict(peft_model, get_peft_model_state_dict(peft_model, adapter_name=name),
                              adapter_name=INITIAL_ADAPTER)


@contextmanager
def initial_model(peft_model: PeftModel):
    """The model training started from, inside the block: the adapter switched off (PEFT's disable_adapter()), or
    the snapshot of the initial adapter active in its place (see `snapshot_initial_adapter`)."""
    if INITIAL_ADAPTER not in peft_model.peft_config:
        with peft_model.disable_adapter():
            yield
        return
    active = peft_model.active_adapter
    peft_model.set_adapter(INITIAL_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(active)  # trainable again, the snapshot frozen


def save_adapter(peft_model: PeftModel, folder: str | os.PathLike) -> None:
    """The trained adapter in PEFT format. After a base-rewriting init PEFT converts it
    (`path_initial_model_for_weight_conversion`) into a plain LoRA of twice the rank that applies to the original
    base model, the model users load it on; the snapshot itself is not saved."""
    name = peft_model.active_adapter
    if INITIAL_ADAPTER not in peft_model.peft_config:
        peft_model.save_pretrained(folder, selected_adapters=[name])
        return
    was_training = peft_model.training
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[INITIAL_ADAPTER])  # into tmp/INITIAL_ADAPTER
        initial = os.path.join(tmp, "initial")  # PEFT loads it under its folder's name, then deletes that adapter
        os.rename(os.path.join(tmp, INITIAL_ADAPTER), initial)
        peft_model.save_pretrained(folder, selected_adapters=[name], path_initial_model_for_weight_conversion=initial)
    peft_model.train(was_training)  # (PEFT's load_adapter for the conversion left the model in eval mode)


def adapter_layers(peft_model: PeftModel) -> list[torch.nn.Module]:
    """The modules `adapters_off` switches: every PEFT tuner layer and trained module copy (modules_to_save,
    trainable tokens)."""
    return [m for m in peft_model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextmanager
def adapters_off(layers: list[torch.nn.Module], initial_adapter: str | None = None):
    """`initial_model` made cheap enough for the reference forward of every training step. PEFT's context manager
    (and its set_adapter) also checks the model's status and resets requires_grad on every adapter weight, walking
    all modules on entry and exit (docs/PERFORMANCE.md measures what that costs per step). This sets only what PEFT's
    layers read in their forward, on a list made once: the flag `disable_adapters` (stored as `_disable_adapters` in
    the pinned peft) or, given `initial_adapter`, each tuner layer's active adapter (stored as `_active_adapter`;
    trained module copies, which start equal to the original module, are switched off). requires_grad does not
    matter to a forward under no_grad. PEFT's public per-layer switch, `enable_adapters(False/True)`, also walks
    each layer's weights to reset requires_grad: bench.reference_cost measures all three (docs/PERFORMANCE.md), and
    the flag is the only one whose cost does not grow with the adapter. Tests hold both forms equal to
    `initial_model`, so a rename in peft fails there."""
    swapped = [m for m in layers if initial_adapter is not None and isinstance(m, BaseTunerLayer)]
    switched_off = [m for m in layers if not (initial_adapter is not None and isinstance(m, BaseTunerLayer))]
    flags, active = [m._disable_adapters for m in switched_off], [m._active_adapter for m in swapped]
    for m in switched_off:
        m._disable_adapters = True
    for m in swapped:
        m._active_adapter = [initial_adapter]
    try:
        yield
    finally:
        for m, flag in zip(switched_off, flags):
            m._disable_adapters = flag
        for m, names in zip(swapped, active):
            m._active_adapter = names


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
