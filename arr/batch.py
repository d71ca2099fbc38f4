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


def kl_sequences(inputs: dict, kl: torch.Tensor):
    """The model inputs cut down to the sequences that hold KL positions (`kl` [B, T - 1]), for the reference forward,
    and a function mapping a [B, T - 1] mask of the whole batch onto the positions of the cut-down one. Padded: the
    rows that hold any. Packed: each row's such sequences moved to its start, the rest of the width filled with
    tokens at position 0 (each a sequence of its own, as the collator pads), so a packed row that shares a replay
    sequence with SFT sequences passes only the replay sequence. Order is kept: masks select in the same order.
    When every row (padded) or token (packed) is needed: the inputs themselves and None."""
    if "attention_mask" in inputs or "position_ids" not in inputs:
        rows = kl.any(1)
        if bool(rows.all()):
            return inputs, None
        sub = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
        return sub, lambda mask: mask[rows]
    position_ids = inputs["position_ids"]
    sequence = position_ids.eq(0).cumsum(1)  # each token's sequence within its row
    at_token = torch.nn.functional.pad(kl, (0, 1))  # a KL position and the token it predicts share a sequence
    holds = torch.zeros(position_ids.shape[0], position_ids.shape[1] + 1, dtype=torch.long,
                        device=kl.device).scatter_add_(1, sequence, at_token.long()).gt(0)
    keep = holds.gather(1, sequence)
    if bool(keep.all()):
        return inputs, None
    rows = keep.any(1)
    keep = keep[rows]
    kept = keep.sum(1, keepdim=True)
    width = int(kept.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept tokens first, in order
    valid = torch.arange(width, device=kl.device)[None] < kept
    sub = dict(inputs, input_ids=inputs["input_ids"][rows].gather(1, order),
               position_ids=position_ids[rows].gather(1, order).masked_fill(~valid, 0))
    return sub, lambda mask: (torch.nn.functional.pad(mask, (0, 1))[rows].gather(1, order) & valid)[:, :-1]
