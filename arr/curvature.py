"""Curvature of the initial model on surrogate source data, for the Laplace (LaLoRA) penalty of objective.py.

For every LoRA-adapted layer l this estimates the diagonal empirical Fisher of its base weight W_l *per token*:

    F_l = mean over sequences s of  (d/dW_l sum_t log p(x_{t+1} | x_{<=t}))^2 / n_s

with n_s the number of predicted tokens of s. If token gradients are roughly uncorrelated, the squared gradient of
a sequence's summed log-likelihood is n_s times the per-token Fisher, hence the division; then sum(F * dW^2) / 2 is
the second-order estimate of how much a weight change dW raises the per-token NLL on the source data, in the same
unit as the CE terms. The model is the initial one (adapter off, eval mode: no dropout). Sequences are taken one at
a time because a squared *batch* gradient is not a Fisher; the cost is one forward and backward per sequence.

A Kronecker-factored (K-FAC) variant would capture correlations inside a layer; it is not implemented (the
diagonal costs one weight-sized tensor per layer and no extra pass over the data).

Estimates are cached on disk (safetensors) under a key made of the model's adapted weights, the token ids of the
surrogate sequences (so the data and the tokenizer) and the estimator, and reused by any run with the same key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from .cache import cached_tensors
from .initial import initial_model, tensor_digest

ESTIMATOR = "diagonal-empirical-fisher-per-token-v1"  # part of the cache key: change it when the estimate changes


def adapted_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA layers of the active adapter, by module name."""
    adapter = model.active_adapter
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def delta_weight(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """The layer's effective LoRA update dW = scaling * B @ A, shaped like its base weight (PEFT's own formula,
    which handles fan_in_fan_out and rsLoRA scaling)."""
    return layer.get_delta_weight(adapter)


def curvature_key(model: PeftModel, blocks: torch.Tensor) -> str:
    """Cache key: the adapted layers' names and a fingerprint of their base weights, and the token ids."""
    digest = hashlib.sha256(ESTIMATOR.encode())
    tensor_digest(((name, layer.get_base_layer().weight) for name, layer in sorted(adapted_layers(model).items())),
                  digest)
    digest.update(blocks.cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def diagonal_fisher(model: PeftModel, blocks: torch.Tensor, desc: str = "curvature") -> dict[str, torch.Tensor]:
    """Per-token diagonal Fisher of each adapted layer's base weight, on `blocks` ([n, T] token ids), by name."""
    layers = adapted_layers(model)
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    device = next(iter(weights.values())).device
    was_training = model.training
    model.eval()
    flags = {name: w.requires_grad for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with initial_model(model):
            for ids in tqdm(blocks, desc=desc, leave=False):
                ids = ids[None].to(device)
                logits = model(input_ids=ids).logits[0, :-1].float()
                log_likelihood = -F.cross_entropy(logits, ids[0, 1:], reduction="sum")
                grads = torch.autograd.grad(log_likelihood, list(weights.values()))
                for name, grad in zip(weights, grads):
                    fisher[name] += grad.float().square() / (ids.shape[1] - 1)
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
        model.train(was_training)
    return {name: f / len(blocks) for name, f in fisher.items()}


def load_or_estimate(model: PeftModel, blocks: torch.Tensor, cache_dir: str | Path
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """The Fisher from `cache_dir` when an estimate with the same key is there, else estimated and cached.
    Returns it with {"key", "cache_hit", "seconds", ...} (see reference.cached_tensors)."""
    path = Path(cache_dir) / f"{curvature_key(model, blocks)}.safetensors"
    fisher, info = cached_tensors(path, lambda: diagonal_fisher(model, blocks))
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in fisher.items()}, info
