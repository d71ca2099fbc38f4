"""What a training batch looks like: facts the collator writes and the objective reads.

A batch holds `input_ids`, unshifted `labels` (IGNORE_INDEX where no loss is taken) and `is_replay`, and one of two
layouts: padded (rows right-padded, `attention_mask`, `is_replay` per row [B]) or packed (several sequences per row,
`position_ids` restarting at 0 for each, no attention mask, `is_replay` per token [B, T]). `row` (optional) holds
each sequence's dataset index, per row or per token likewise.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # labels that take no loss (the Hugging Face / PyTorch cross-entropy convention)


def continuation_mask(batch: dict) -> torch.Tensor:
    """[B, T], 1 where a token follows the previous one in the same sequence: the attention mask of a padded batch;
    for a packed batch, 0 where a sequence starts."""
    if "attention_mask" in batch:
        return batch["attention_mask"]
    return batch["position_ids"].ne(0).long()


def replay_tokens(is_replay: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool, True on the tokens of replay sequences, from `is_replay` per row [B] or per token [B, T]."""
    is_replay = is_replay.bool()
    return is_replay[:, :width] if is_replay.dim() == 2 else is_replay[:, None].expand(-1, width)
