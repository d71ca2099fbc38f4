"""The initial (reference) model: the trained network with its LoRA adapter switched off.

No second copy of the model is kept. Under PEFT, `disable_adapter()` bypasses every LoRA layer, and because the
standard LoRA init sets B = 0 the adapted model equals the base model at step 0, so "adapter off" *is* the model
training started from, for the whole run.

That stops being true for initialisations that rewrite the base weights (PiSSA and OLoRA move the principal
components into the adapter, CorDA and LoftQ likewise change the base): with the adapter off you would get the
residual weights, not the initial model. Those are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

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
    weight, walking all modules on entry and exit: 26 ms per call for Qwen2.5-0.5B's shape on an H100, about 0.13 of
    a LoRA step there, and 99 ms for SmolLM2-135M on a 2-core CPU (bench.reference_cost, docs/PERFORMANCE.md).
    This flips only the flag that PEFT's layers read in their forward (`disable_adapters`, stored as
    `_disable_adapters` in the pinned peft) on a list made once; requires_grad does not matter to a forward under
    no_grad."""
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


# ------------------------------------------------------------------------------------- cached reference log-probs


def fingerprint(named_tensors, digest=None):
    """A hash of tensors that changes with any fine-tune or checkpoint swap, cheap even for a 7B model: each
    tensor's name, shape, dtype, float64 sum and a strided sample (not every byte)."""
    digest = digest or hashlib.sha256()
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{tensor.double().sum().item():.10e}".encode())
        digest.update(tensor.flatten()[::4099].float().cpu().numpy().tobytes())
    return digest


def cached_tensors(path: Path, build) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors from the safetensors file `path` when it exists, else `build()`'s, saved there aside and renamed into
    place (a reader never sees a half-written file). Returns them with {"key", "cache_hit", "seconds"} (the seconds
    the build took, 0 on a hit) and, after a build, "mb" on disk. Used by the reference and curvature caches."""
    key = path.stem
    if path.is_file():
        return load_file(path), {"key": key, "cache_hit": True, "seconds": 0.0}
    start = time.perf_counter()
    tensors = build()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    tmp.replace(path)
    return tensors, {"key": key, "cache_hit": False, "seconds": round(seconds, 2),
                     "mb": round(path.stat().st_size / 2**20, 1)}


class ReferenceCache:
    """The initial model's next-token log-probs at every position of a fixed dataset (SFT examples and the replay
    pool), computed once before training so that no step runs the reference forward again.

    exact: all V log-probs per position ([positions, V] float32, for short data). topk: the k largest log-probs,
    their token ids and the log of the remaining mass (see objective.kl_to_reference). Rows are found through
    `offsets`: position t of dataset row i is entry offsets[i] + t."""

    def __init__(self, logp: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor | None = None,
                 tail: torch.Tensor | None = None):
        self.logp, self.offsets, self.idx, self.tail = logp, offsets, idx, tail

    @property
    def topk(self) -> int | None:
        return None if self.idx is None else self.idx.shape[1]

    def positions(self, rows: torch.Tensor, width: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Cache entries of the [B, width - 1] predictions of a batch: `rows` holds the dataset row of each batch row
        [B], or of each token [B, width] with its `position_ids` in a packed batch. Positions with no prediction
        (padding, a sequence's last token) give unused entries."""
        if position_ids is None:
            entries = self.offsets[rows.cpu()][:, None] + torch.arange(width - 1)[None]
        else:
            entries = self.offsets[rows[:, :-1].cpu()] + position_ids[:, :-1].cpu()
        return entries.clamp(max=len(self.logp) - 1)

    def lookup(self, entries: torch.Tensor, device) -> tuple:
        entries = entries.cpu()
        if self.idx is None:
            return (self.logp[entries].to(device),)
        return self.logp[entries].to(device), self.idx[entries].to(device).long(), self.tail[entries].to(device)

    @staticmethod
    @torch.no_grad()
    def build(peft_model: PeftModel, dataset, collate, topk: int | None, batch_size: int = 8
              ) -> dict[str, torch.Tensor]:
        """Reference log-probs of every row of `dataset`, `batch_size` rows per forward, adapter off, eval mode, as
        the tensors of a ReferenceCache (logp, offsets and, for top-k, idx and tail)."""
        device = next(peft_model.parameters()).device
        was_training = peft_model.training
        peft_model.eval()
        logps, idxs, tails, lengths = [], [], [], []
        try:
            with peft_model.disable_adapter():
                for start in tqdm(range(0, len(dataset), batch_size), desc="Caching reference log-probs"):
                    rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                    batch = collate(rows)
                    logits = peft_model(input_ids=batch["input_ids"].to(device),
                                        attention_mask=batch["attention_mask"].to(device)).logits
                    for row, row_logits in zip(rows, logits):
                        logp = torch.log_softmax(row_logits[: len(row["input_ids"]) - 1].float(), -1)
                        lengths.append(len(logp))
                        if topk is None:
                            logps.append(logp.cpu())
                            continue
                        values, ids = logp.topk(topk, dim=-1)
                        logps.append(values.cpu())
                        idxs.append(ids.int().cpu())
                        tails.append(logp.scatter(1, ids, float("-inf")).logsumexp(-1).cpu())
        finally:
            peft_model.train(was_training)
        offsets = torch.tensor([0, *lengths]).cumsum(0)[:-1]
        if topk is None:
            return {"logp": torch.cat(logps), "offsets": offsets}
        return {"logp": torch.cat(logps), "offsets": offsets, "idx": torch.cat(idxs), "tail": torch.cat(tails)}


def reference_cache(peft_model: PeftModel, dataset, collate, topk: int | None, folder: str | Path
                    ) -> tuple[ReferenceCache, dict]:
    """The cache for this model, data and k from `folder` when there, else built and saved there. The key hashes
    the base model's weights, every row's token ids (so the data and the tokenizer) and k."""
    digest = fingerprint((n, p) for n, p in peft_model.named_parameters() if "lora_" not in n)
    digest.update(f"topk={topk}".encode())
    for i in range(len(dataset)):
        digest.update(torch.as_tensor(dataset[i]["input_ids"]).numpy().tobytes())
    path = Path(folder) / f"{digest.hexdigest()[:32]}.safetensors"
    tensors, info = cached_tensors(path, lambda: ReferenceCache.build(peft_model, dataset, collate, topk))
    return ReferenceCache(**tensors), info
