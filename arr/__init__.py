"""ARR: LoRA fine-tuning that does not forget (Approximate Regularized Replay, Riemer et al. 2025)."""

import importlib

# Imported on first use (PEP 562), as transformers does: `arr --help` and argument errors never wait for torch.
_EXPORTS = {"ARRConfig": "config", "DataArguments": "config", "ModelArguments": "config", "ARRError": "errors",
            "ConfigError": "errors", "DataError": "errors", "ARRObjective": "objective", "LossParts": "objective",
            "TokenCounts": "objective", "ARRTrainer": "trainer"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'arr' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return [*globals(), *__all__]
