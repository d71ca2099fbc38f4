"""The initial (reference) model: the trained network with its LoRA adapter switched off.

No second copy of the model is kept. Under PEFT, `disable_adapter()` bypasses every LoRA layer, and because the
standard LoRA init sets B = 0 the adapted model equals the base model at step 0, so "adapter off" *is* the model
training started from, for the whole run.

That stops being true for initialisations that rewrite the base weights (PiSSA and OLoRA move the principal
components into the adapter, CorDA and LoftQ likewise change the base): with the adapter off you would get the
residual weights, not the initial model. Those are refused with a clear error.
"""

from __future__ import annotations

import torch
from peft import PeftModel

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


@torch.no_grad()
def reference_logits(model: torch.nn.Module, peft_model: PeftModel, inputs: dict) -> torch.Tensor:
    """Logits of the initial model. `model` is what the Trainer forwards through (it may be wrapped by DDP/FSDP/
    DeepSpeed), `peft_model` the unwrapped PEFT model whose adapter is switched off meanwhile."""
    with peft_model.disable_adapter():
        return model(**inputs).logits
