"""On-disk caches keyed by content: the initial model's log-probs on a fixed dataset (the reference cache) and, for
curvature.py, the Fisher estimate. A key hashes everything the cached values depend on, so a changed model, data,
tokenizer or setting gets a new entry and a stale one is never read."""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .chunked_loss import RefLogprobs, final_logit_softcap, logits_head
from .initial import fingerprint, initial_model

REFERENCE_CACHE_FORMAT = "v4"  # part of the key: change it when what the cache holds changes (v4: row lengths)


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` into a file beside `path` of this writer's own, then renamed into place: a reader never sees a
    half-written file, and writers of one key at once (other runs, other nodes sharing $ARR_CACHE) never write into
    the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_tensors(path: Path, build) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors from the safetensors file `path` when it exists, else `build()`'s, saved there aside and renamed into
    place (a reader never sees a half-written file). Returns them with {"key", "cache_hit", "seconds"} (the seconds
    the build took, 0 on a hit) and, after a build, "mb" on disk."""
    key = path.stem
    if path.is_file():
        return load_file(path), {"key": key, "cache_hit": True, "seconds": 0.0}
    start = time.perf_counter()
    tensors = build()
    seconds = time.perf_counter() - start
    write_atomically(path, partial(save_file, {k: v.contiguous().cpu() for k, v in tensors.items()}))
    return tensors, {"key": key, "cache_hit": False, "seconds": round(seconds, 2),
                     "mb": round(path.stat().st_size / 2**20, 1)}


class ReferenceCache:
    """The initial model's next-token log-probs at every position of the rows of a fixed dataset (SFT examples and
    the replay pool) that hold KL positions, computed once before training so that no step runs the reference
    forward again.

    exact: all V log-probs per position ([positions, V] float32, for short data). topk: the k largest log-probs,
    their token ids, the log of the remaining mass and the log-prob of the next token of the row (see
    chunked_loss.RefLogprobs). Rows are found through `offsets`: position t of dataset row i is entry
    offsets[i] + t (a row not cached has offset 0; the objective never reads it)."""

    def __init__(self, logp: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor | None = None,
                 tail: torch.Tensor | None = None, label_logp: torch.Tensor | None = None):
        self.logp, self.offsets, self.idx, self.tail, self.label_logp = logp, offsets, idx, tail, label_logp

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

    def lookup(self, entries: torch.Tensor, device) -> RefLogprobs:
        entries = entries.cpu()
        if self.idx is None:
            return RefLogprobs(self.logp[entries].to(device))
        return RefLogprobs(self.logp[entries].to(device), self.idx[entries].to(device).long(),
                           self.tail[entries].to(device), self.label_logp[entries].to(device))

    @staticmethod
    @torch.no_grad()
    def build(peft_model: PeftModel, dataset, collate, topk: int | None, rows: list[int],
              tokens_per_batch: int = 4096) -> dict[str, torch.Tensor]:
        """Reference log-probs of the `rows` of `dataset` (the initial model, eval mode): logp and, for top-k, idx,
        tail and label_logp, the rows' entries one after the other, and `lengths`, each row's entry count. Rows go
        through the trunk sorted by length, as many per forward as fit in `tokens_per_batch` padded tokens (larger
        batches than a training step's: no gradient is kept), and their predictions through the LM head a fixed
        number at a time."""
        def length(i: int) -> int:
            return len(dataset[i]["input_ids"])

        device = next(peft_model.parameters()).device
        was_training = peft_model.training
        peft_model.eval()
        order = sorted(rows, key=length)
        per_row: dict[int, dict[str, torch.Tensor]] = {}
        try:
            with initial_model(peft_model), tqdm(total=len(order), desc="Caching reference log-probs") as bar:
                decoder, head = peft_model.get_decoder(), logits_head(peft_model)
                start = 0
                while start < len(order):
                    end = start + 1  # rows ascend in length: the batch's width is its last row's
                    while end < len(order) and (end + 1 - start) * length(order[end]) <= tokens_per_batch:
                        end += 1
                    taken, start = order[start:end], end
                    batch = collate([dataset[i] for i in taken])
                    input_ids = batch["input_ids"].to(device)
                    hidden = decoder(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                                     use_cache=False).last_hidden_state
                    predicts = batch["attention_mask"][:, 1:].bool().to(device)  # position t predicts token t + 1
                    entries = ReferenceCache.entries(head, hidden[:, :-1][predicts], input_ids[:, 1:][predicts], topk)
                    counts = predicts.sum(1).tolist()
                    for i, row_entries in zip(taken, zip(*(v.split(counts) for v in entries.values()))):
                        per_row[i] = dict(zip(entries, row_entries))
                    bar.update(len(taken))
        finally:
            peft_model.train(was_training)
        return ReferenceCache.joined([per_row[i] for i in rows])

    @staticmethod
    def joined(rows_entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rows' entries (`entries` of each row's predictions) one after the other, with `lengths`, what `build`
        returns and the cache file holds."""
        tensors = {name: torch.cat([row[name] for row in rows_entries]) for name in rows_entries[0]}
        return {**tensors, "lengths": torch.tensor([len(row["logp"]) for row in rows_entries])}

    @staticmethod
    def entries(head: torch.nn.Module, hidden: torch.Tensor, following: torch.Tensor, topk: int | None,
                chunk_size: int = 256) -> dict[str, torch.Tensor]:
        """Cache entries of N predictions from their final hidden states [N, H] and next tokens [N]: all
        log-probs, or the top k with the log of the remaining mass and the next token's log-prob. `chunk_size`
        predictions at a time, so [chunk, V] tensors of one size recur, which the allocator reuses (a [T, V] tensor
        per row, T varying, left gigabytes of freed memory resident)."""
        parts = []
        for a in range(0, len(hidden), chunk_size):
            logp = torch.log_softmax(head(hidden[a:a + chunk_size]).float(), -1)
            if topk is None:
                parts.append({"logp": logp.cpu()})
                continue
            label_logp = logp.gather(1, following[a:a + chunk_size, None]).squeeze(1)
            values, ids = logp.topk(topk, dim=-1)
            tail = logp.scatter_(1, ids, float("-inf")).logsumexp(-1)  # in place: logp is not needed after
            parts.append({"logp": values.cpu(), "idx": ids.int().cpu(), "tail": tail.cpu(),
                          "label_logp": label_logp.cpu()})
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def reference_cache(peft_model: PeftModel, dataset, collate, topk: int | None, folder: str | Path,
                    rows: list[int] | None = None, computed: tuple[dict, float] | None = None
                    ) -> tuple[ReferenceCache, dict]:
    """The cache of `dataset`'s `rows` (default: all) for this model and k from `folder` when there, else built and
    saved there. The key hashes the base model's weights and final-logit softcap (if any), the rows' token ids in
    order (so the data and the tokenizer), k and the cache format, not where the rows sit in `dataset`: runs on other
    data that hold the same KL-bearing rows (the same self-generated replay under `kl_on: replay`) share one cache.
    `computed`: these rows' entries at this k computed elsewhere (what `build` returns; self-generated replay records
    them while it generates) and the seconds they took: saved in place of a build."""
    rows = list(range(len(dataset))) if rows is None else rows
    digest = fingerprint(peft_model)
    digest.update(f"topk={topk},{REFERENCE_CACHE_FORMAT}".encode())
    cap = final_logit_softcap(peft_model)
    if cap:  # (only then: other models' caches keep their keys, and an uncapped one of this model is never read)
        digest.update(f",softcap={cap}".encode())
    for i in rows:
        ids = torch.as_tensor(dataset[i]["input_ids"])
        digest.update(f"|{len(ids)}|".encode() + ids.numpy().tobytes())
    path = Path(folder) / f"{digest.hexdigest()[:32]}.safetensors"
    if computed is None:
        tensors, info = cached_tensors(path, lambda: ReferenceCache.build(peft_model, dataset, collate, topk, rows))
    else:
        entries, seconds = computed
        k = entries["idx"].shape[1] if "idx" in entries else None
        if k != topk or entries["lengths"].tolist() != [len(dataset[i]["input_ids"]) - 1 for i in rows]:
            raise ValueError("the computed reference entries do not cover these rows at this k")
        tensors, info = cached_tensors(path, lambda: dict(entries))
        info["seconds"] = 0.0 if info["cache_hit"] else seconds
    offsets = torch.zeros(len(dataset), dtype=torch.long)
    lengths = tensors.pop("lengths")
    offsets[rows] = lengths.cumsum(0) - lengths  # where each row's entries start
    return ReferenceCache(offsets=offsets, **tensors), info
