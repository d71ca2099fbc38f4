"""ARR: LoRA fine-tuning that does not forget (Approximate Regularized Replay, Riemer et al. 2025)."""

from .config import ARRConfig, DataArguments, ModelArguments
from .errors import ARRError, ConfigError, DataError
from .objective import ARRObjective, LossParts, TokenCounts
from .trainer import ARRTrainer

__all__ = ["ARRConfig", "ARRError", "ARRObjective", "ARRTrainer", "ConfigError", "DataArguments", "DataError",
           "LossParts", "ModelArguments", "TokenCounts"]
__version__ = "0.1.0"
