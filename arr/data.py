"""Data: SFT examples with response-only loss masks, a packed replay stream, and their interleaving.

Each source keeps its own loss mask: an SFT row trains on its assistant turns only, a replay row on every token.
Rows carry `is_replay` so the objective can tell them apart.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from .errors import DataError
from .batch import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")

# --------------------------------------------------------------------------------------------------------- SFT


def read_text(path: Path) -> str:
    """A UTF-8 text file; a file that is not one (a binary file, another encoding) is a DataError at its line."""
    if not path.is_file():
        raise DataError(path, "a folder, not a file" if path.is_dir() else "no such file")
    try:
        return path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no text
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 (byte {e.start})", line) from None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a JSONL file, or of a JSON file holding a list of records."""
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON: {e.msg}", e.lineno) from None
        if not isinstance(records, list):
            raise DataError(path, "a .json SFT file must hold a list of records")
        pairs = list(enumerate(records, start=1))
    else:
        pairs = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                pairs.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", lineno) from None
    if not pairs:
        raise DataError(path, "no records: the file is empty")
    for lineno, record in pairs:
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {type(record).__name__}", lineno)
    return pairs


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def record_to_turns(record: dict, fmt: str) -> tuple[list[dict], bool]:
    """Messages of one record, and whether they came from a chat format (which needs a chat template).
    Raises ValueError with a one-line reason; the caller adds the file and line."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt is None:
        raise ValueError(
            f"no known fields (keys: {', '.join(sorted(record)) or 'none'}); expected 'messages', "
            "'instruction'+'output' or 'prompt'+'completion'"
        )
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} needs a string 'content'")
            if m.get("role") not in ROLES:
                raise ValueError(f"message {i} has unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
        turns, chat = [{"role": m["role"], "content": m["content"]} for m in messages], True
    elif fmt == "alpaca":
        fields = [record.get(k) for k in ("instruction", "input", "output")]
        if not all(isinstance(v, str) for v in (fields[0], fields[2])):
            raise ValueError("alpaca records need string 'instruction' and 'output'")
        prompt = fields[0] if not fields[1] else f"{fields[0]}\n\n{fields[1]}"
        turns, chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields[2]}], False
    elif fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must be strings")
        turns, chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], False
    else:
        raise ValueError(f"unknown sft_format {fmt!r}")
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("no assistant turn")
    for i, t in enumerate(turns):
        if t["role"] == "assistant" and not t["content"].strip():
            raise ValueError(f"assistant turn (message {i}) is empty")
    return turns, chat


def render_chat(turns: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of a conversation and the character spans of its assistant turns. A span covers the
    turn's content and its end-of-turn token (the tokenizer's EOS), not the template's newline after it."""
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True) if i else ""
        end_text = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
        if not (text.startswith(start_text) and text.startswith(end_text)):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot mask turns")
        start, end = len(start_text), len(end_text)
        eos_at = text.rfind(eos, start, end) if eos else -1
        spans.append((start, eos_at + len(eos) if eos_at >= 0 else end))
    return text, spans


def render_plain(turns: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Prompt and completion concatenated, for tokenizers without a chat template; the completion and EOS train."""
    prompt, completion = turns[0]["content"], turns[1]["content"] + (tokenizer.eos_token or "")
    return prompt + completion, [(len(prompt), len(prompt) + len(completion))]


def tokenize_turns(turns: list[dict], chat: bool, tokenizer, max_length: int) -> dict:
    """input_ids and labels (unshifted; -100 outside the assistant spans), cut to max_length from the right."""
    if tokenizer.chat_template:
        text, spans = render_chat(turns, tokenizer)
    elif chat or len(turns) != 2:
        raise ValueError("chat data needs a tokenizer with a chat template, and this tokenizer has none")
    else:
        text, spans = render_plain(turns, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = enc["input_ids"][:max_length]
    labels = [
        tok if any(a <= s < b for a, b in spans) else IGNORE_INDEX
        for tok, (s, _) in zip(input_ids, enc["offset_mapping"])
    ]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise ValueError(f"no trainable (assistant) token is left after truncation to max_length={max_length}")
    return {"input_ids": input_ids, "labels": labels}


def build_sft_examples(records: Sequence[tuple[object, dict]], source, tokenizer, max_length: int,
                       fmt: str = "auto") -> list[dict]:
    """Tokenize (line, record) pairs; any bad record raises a DataError naming `source` and its line."""
    if not records:
        raise DataError(source, "no SFT records")
    examples = []
    for line, record in tqdm(records, desc="Tokenizing SFT data", disable=len(records) < 1000):
        try:
            examples.append(tokenize_turns(*record_to_turns(record, fmt), tokenizer, max_length))
        except ValueError as e:
            raise DataError(source, str(e), line) from None
    return examples


def load_sft_examples(data, tokenizer, max_length: int, fmt: str = "auto") -> list[dict]:
    """SFT examples from a JSONL/JSON path, a list of records, or a `datasets.Dataset` of records."""
    if isinstance(data, (str, Path)):
        return build_sft_examples(read_jsonl(data), data, tokenizer, max_length, fmt)
    return build_sft_examples([(f"record {i}", dict(r)) for i, r in enumerate(data)], "train_dataset", tokenizer,
                              max_length, fmt)


# ------------------------------------------------------------------------------------------------------ replay

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def stream_replay_texts(source: str, text_field: str = "text", split: str = "train", seed: int = 0,
                        config_name: str | None = None) -> Iterator[str]:
    """Texts of a replay corpus, streamed (never loaded whole) and shuffled in a buffer, via `datasets`.
    A .txt file gives one document per paragraph (blank-line separated)."""
    from datasets import load_dataset  # heavy import, only needed for corpora given by path or hub id

    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if path.exists():
        builders = {_BUILDERS.get(p.suffix) for p in files}
        if not files or None in builders or len(builders) != 1:
            raise DataError(source, f"replay corpus must be one kind of {', '.join(_BUILDERS)} file")
        if any(p.stat().st_size == 0 for p in files):
            raise DataError(next(p for p in files if p.stat().st_size == 0), "empty replay corpus file")
        builder = builders.pop()
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        stream = load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True, **kwargs)
    else:
        try:
            stream = load_dataset(source, config_name, split=split, streaming=True)
        except (OSError, ValueError) as e:  # no such local path and no such (or unreachable) hub data set
            raise DataError(source, f"cannot load the replay corpus: {' '.join(str(e).split())}") from None
    texts, rows = 0, iter(stream.shuffle(seed=seed, buffer_size=10_000))
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            break
        except (OSError, ValueError) as e:  # what `datasets` raises on files it cannot read as one table
            raise DataError(source, f"cannot read the replay corpus: {' '.join(str(e).split())}") from None
        if text_field not in row:
            raise DataError(source, f"replay record {i} has no field {text_field!r} (has: {', '.join(row)})")
        text = row[text_field].strip() if isinstance(row[text_field], str) else ""
        if text:
            texts += 1
            yield text
    if not texts:
        raise DataError(source, "the replay corpus holds no text")


def pack_replay(texts: Iterable[str], tokenizer, seq_length: int, max_sequences: int, source="replay corpus"
                ) -> torch.Tensor:
    """Tokenize texts (each followed by EOS) into one stream and cut it into [n, seq_length] blocks, reading only
    as many texts as `max_sequences` blocks need. The tail shorter than a block is dropped."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    blocks, buffer = [], []
    with tqdm(total=max_sequences, desc="Packing replay sequences", unit="seq") as bar:
        for text in texts:
            buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
            while len(buffer) >= seq_length and len(blocks) < max_sequences:
                blocks.append(buffer[:seq_length])
                buffer = buffer[seq_length:]
                bar.update()
            if len(blocks) >= max_sequences:
                break
    if not blocks:
        raise DataError(source, f"replay corpus is empty or shorter than one sequence of {seq_length} tokens")
    return torch.tensor(blocks, dtype=torch.long)


def token_blocks(source: str | Iterable[str] | torch.Tensor, tokenizer, seq_length: int, n: int, seed: int = 0
                 ) -> torch.Tensor:
    """[n, seq_length] token blocks from a corpus path or hub id (streamed), an iterable of texts (packed), or
    blocks that are already packed (returned as they are)."""
    if isinstance(source, torch.Tensor):
        return source
    if isinstance(source, str):
        source = stream_replay_texts(source, seed=seed)
    return pack_replay(source, tokenizer, seq_length, n)


# ------------------------------------------------------------------------------------------------- interleaving


class MixedDataset(Dataset):
    """Indices [0, n_sft) are SFT examples, [n_sft, n_sft + n_replay) replay sequences: packed corpus blocks
    ([n, seq_length] token ids, every token trained) or rows with their own labels (self-generated replay)."""

    def __init__(self, sft: list[dict], replay: torch.Tensor | list[dict] | None = None):
        self.sft = sft
        self.replay = replay if replay is not None else []

    def __len__(self) -> int:
        return len(self.sft) + len(self.replay)

    def indices(self, kinds: tuple[str, ...]) -> list[int]:
        """The indices of the rows of these kinds ("sft", "replay"), in order."""
        ranges = {"sft": range(len(self.sft)), "replay": range(len(self.sft), len(self))}
        return [i for kind in kinds for i in ranges[kind]]

    def __getitem__(self, i: int | tuple[int, ...]) -> dict | list[dict]:
        if isinstance(i, tuple):  # a task row with the replay rows added beside it (ReplayMixSampler, added)
            return [self[j] for j in i]
        if i < len(self.sft):
            return {**self.sft[i], "is_replay": False, "row": i}
        row = self.replay[i - len(self.sft)]
        if isinstance(row, torch.Tensor):
            row = {"input_ids": row.tolist(), "labels": row.tolist()}
        return {**row, "is_replay": True, "row": i}


def steps_per_epoch(n_sft: int, global_batch: int, replay_ratio: float, added: bool = False) -> int:
    """Optimizer steps that draw every SFT row once: each step draws `global_batch` SFT rows and the replay beside
    them (`added`), or `global_batch` rows of which `replay_ratio` are replay."""
    return math.ceil(n_sft / (global_batch * (1 if added else 1 - replay_ratio)))


def replay_added(args) -> bool:
    return args.replay_mode == "add"


def total_steps(n_sft: int, args) -> int:
    """Optimizer steps of the run: `max_steps`, else its epochs over the SFT rows."""
    epoch = steps_per_epoch(n_sft, args.global_batch, args.replay_ratio, replay_added(args))
    return args.max_steps if args.max_steps > 0 else math.ceil(epoch * args.num_train_epochs)


def rows_drawn(n_sft: int, args) -> tuple[int, int]:
    """The SFT rows and the replay rows the whole run draws (a row drawn twice counts twice)."""
    steps = total_steps(n_sft, args)
    if replay_added(args):  # replay is the ratio's share of task rows + replay: ratio / (1 - ratio) per task row
        sft = steps * args.global_batch
        return sft, _rounded(sft * args.replay_ratio / (1 - args.replay_ratio))
    draws = steps * args.global_batch
    replay = _rounded(draws * args.replay_ratio)
    return draws - replay, replay


def replay_sequences_needed(n_sft: int, args) -> int:
    """Replay sequences the whole run draws (at least 1), capped by `args.replay_max_sequences`; when the pool is
    smaller the sampler reuses it in a new order."""
    needed = max(1, rows_drawn(n_sft, args)[1])
    return needed if args.replay_max_sequences is None else min(needed, args.replay_max_sequences)


def _rounded(x: float) -> int:
    return math.floor(x + 0.5)


class ReplayMixSampler(Sampler[int | tuple[int, ...]]):
    """Orders a MixedDataset so that every optimizer step (`global_batch` consecutive items: per-device batch x
    gradient accumulation x processes) mixes replay into the task's rows at the ratio r, exact over a run up to one
    sequence:

    - in place (`added` False): the step's g items are rows, round((s+1)*g*r) - round(s*g*r) of them replay at
      step s, in place of task rows (the task sees g(1 - r) rows a step);
    - added: the step's g items are g task rows, as plain LoRA's, and round((s+1)*g*q) - round(s*g*q) replay rows,
      q = r / (1 - r) per task row (so replay is still r of the step's rows), ride along: an item that carries
      replay is a tuple (task row, replay rows...), spread evenly over the step's items, which MixedDataset returns
      as a list of rows and the Collator flattens. Micro-batches then hold more rows than the per-device batch.

    SFT and replay indices come from two endless streams of seeded permutations, so the whole order is a pure
    function of (seed, step): deterministic, resumable, and identical on every rank (accelerate then hands each
    rank its own slice of every step)."""

    def __init__(self, n_sft: int, n_replay: int, global_batch: int, ratio: float, seed: int, added: bool = False):
        if not 0 < ratio < 1 or n_replay < 1:
            raise ValueError("ReplayMixSampler needs 0 < ratio < 1 and a non-empty replay pool")
        self.n_sft, self.n_replay, self.global_batch, self.ratio, self.seed = n_sft, n_replay, global_batch, ratio, seed
        self.added = added
        self.steps_per_epoch = steps_per_epoch(n_sft, global_batch, ratio, added)
        self.epoch = 0
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def replay_before(self, step: int) -> int:
        """Replay sequences drawn in steps [0, step)."""
        per_row = self.ratio / (1 - self.ratio) if self.added else self.ratio
        return _rounded(step * self.global_batch * per_row)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def _stream(self, which: int, n: int, position: int) -> int:
        cycle = position // n
        key = (which, cycle)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * cycle + which)
            self._perms[key] = torch.randperm(n, generator=g)
        return int(self._perms[key][position % n])

    def __iter__(self) -> Iterator[int]:
        first = self.epoch * self.steps_per_epoch
        for step in range(first, first + self.steps_per_epoch):
            r0, r1 = self.replay_before(step), self.replay_before(step + 1)
            replay = [self.n_sft + self._stream(1, self.n_replay, p) for p in range(r0, r1)]
            if self.added:
                g = self.global_batch
                riders = [[] for _ in range(g)]
                for k, row in enumerate(replay):
                    riders[k * g // len(replay)].append(row)
                for j, p in enumerate(range(step * g, (step + 1) * g)):
                    row = self._stream(0, self.n_sft, p)
                    yield (row, *riders[j]) if riders[j] else row
                continue
            s0, s1 = step * self.global_batch - r0, (step + 1) * self.global_batch - r1
            yield from (self._stream(0, self.n_sft, p) for p in range(s0, s1))
            yield from replay


class Collator:
    """Batches rows for the trainer: input_ids / labels / is_replay, plus the rows' dataset indices (`row`, for the
    reference cache) when they carry one.

    Padded (`attention_width` None): rows right-padded to the longest, with attention_mask (labels -100 on padding),
    is_replay per row. Padding-free (`attention_width`, see `attention_width()`): rows share packed rows as
    `packed_rows` groups them (per micro-batch, unlike TRL's packing of a whole dataset, so the step's rows and
    replay mix stay as sampled). position_ids restart at 0 for each sequence, which is how the model keeps them
    apart (attention stays within a sequence); padding gets position 0 throughout, so each pad token is a sequence
    of its own that predicts nothing; the first label of each sequence is -100; is_replay and row are per token (why
    it is not transformers' DataCollatorWithFlattening). So one 512-token replay row no longer pads seven short SFT
    rows to 512: they share a second row. Never more positions, nor more estimated compute, than padding; when
    packing saves nothing the batch is the padded one."""

    def __init__(self, pad_token_id: int, attention_width: float | None = None):
        self.pad_token_id, self.attention_width = pad_token_id, attention_width

    def __call__(self, rows: list[dict | list[dict]]) -> dict[str, torch.Tensor]:
        rows = [r for item in rows for r in (item if isinstance(item, list) else [item])]  # added replay: flattened
        lengths = [len(r["input_ids"]) for r in rows]
        if self.attention_width is not None:
            packs = packed_rows(lengths, self.attention_width)
            width = max(sum(lengths[i] for i in pack) for pack in packs)
            if len(packs) * width < len(rows) * max(lengths):
                return self.packed(rows, lengths, packs, width)
        return self.padded(rows, max(lengths))

    def packed(self, rows: list[dict], lengths: list[int], packs: list[list[int]], width: int
               ) -> dict[str, torch.Tensor]:
        shape = (len(packs), width)
        batch = {"input_ids": torch.full(shape, self.pad_token_id), "position_ids": torch.zeros(shape, dtype=torch.long),
                 "labels": torch.full(shape, IGNORE_INDEX), "is_replay": torch.zeros(shape, dtype=torch.bool)}
        with_rows = all("row" in r for r in rows)
        if with_rows:
            batch["row"] = torch.zeros(shape, dtype=torch.long)
        for b, members in enumerate(packs):
            start = 0
            for i in members:
                span = slice(start, start + lengths[i])
                batch["input_ids"][b, span] = torch.as_tensor(rows[i]["input_ids"])
                batch["labels"][b, span] = torch.as_tensor(rows[i]["labels"])
                batch["labels"][b, start] = IGNORE_INDEX  # a sequence's first token is no target of the one before
                batch["position_ids"][b, span] = torch.arange(lengths[i])
                batch["is_replay"][b, span] = bool(rows[i].get("is_replay", False))
                if with_rows:
                    batch["row"][b, span] = rows[i]["row"]
                start += lengths[i]
        return batch

    def padded(self, rows: list[dict], width: int) -> dict[str, torch.Tensor]:
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            attention_mask[i, :n] = 1
        is_replay = torch.tensor([bool(r.get("is_replay", False)) for r in rows])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "is_replay": is_replay}
        if all("row" in r for r in rows):
            batch["row"] = torch.tensor([r["row"] for r in rows])
        return batch


def attention_width(config) -> float:
    """The packed-row width at which a position's attention through a dense mask (QK and AV: 2 x width x the query
    width, in multiply-adds) costs as much as its linear layers (q, k, v, o and a gated MLP), from a decoder's sizes
    (`config`, a transformers PretrainedConfig): how `packed_rows` weighs attention area against positions.
    SmolLM2-135M: 3,072."""
    config = config.get_text_config()
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    query, key_value = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    return (2 * hidden * query + 2 * hidden * key_value + 3 * hidden * mlp) / (2 * query)


def packed_rows(lengths: list[int], attention_width: float) -> list[list[int]]:
    """Indices of the sequences grouped into rows at the least estimated compute: rows x width positions, each
    costing 1 + width / attention_width (its linear layers, and its attention through the packed row's dense mask).
    For each number of rows, down from one per sequence (padding), the sequences go longest first into the row with
    the fewest tokens so far (LPT scheduling: the widest row, which every row is padded to, stays narrow), at widths
    up to four times the longest sequence. Counting positions alone would put every sequence in one row, whose
    attention grows with the square of its width; counting attention area alone keeps one long row among short ones
    padded (an 85-token replay row among seven 67-token SFT rows: 8 x 85 positions, where this rule picks 2 rows of
    286, 10.5% less estimated compute)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest, total, best = lengths[order[0]], sum(lengths), None
    for n_rows in range(len(lengths), 0, -1):
        if total > 4 * longest * n_rows:  # no narrower rows from here on
            break
        packs, emptiest = [[] for _ in range(n_rows)], [(0, row) for row in range(n_rows)]  # (tokens, row): a heap
        for i in order:
            tokens, row = heapq.heappop(emptiest)
            packs[row].append(i)
            heapq.heappush(emptiest, (tokens + lengths[i], row))
        width = max(tokens for tokens, _ in emptiest)
        cost = n_rows * width * (1 + width / attention_width)
        if width <= 4 * longest and (best is None or cost < best[0]):
            best = cost, packs
    return best[1]
