"""Self-generated replay (`replay_data: self`, after Marek et al. 2026, arXiv 2605.26097): the initial model's own
answers to general chat prompts, generated once before training and replayed at `replay_ratio` like any replay row.

For an instruct model whose instruction data is not public, its own answers are the closest thing to the
distribution it was tuned on; Wikipedia text is not, and replaying it pulls a chat model away from its chat
behaviour. A row is the prompt in the chat template followed by the answer. The KL to the initial model covers the
whole row wherever `kl_on` places it on replay; the replay CE (`replay_weight`) trains the answer tokens. Use the KL
alone (`replay_weight: 0`) with greedy answers: the KL keeps the whole next-token distribution, which is what the
model's behaviour on unseen prompts depends on, while a CE on greedy answers pulls every position toward its argmax
token, a sharpening that raised the NLL of held-out text in docs/RESULTS.md's screen. With sampled answers
(temperature 1) the CE is an unbiased sample of the forward KL's gradient instead.

Answers are greedy by default (the initial model's most likely reply, deterministic) or sampled at
`self_replay_temperature` (seeded), and cached in $ARR_CACHE/self_replay under a key of the model's weights, the
chat template, the prompts and the generation settings. A run continued from earlier runs (arr/lineage.py) gives
`lineage_replay_share` of the rows to the earlier tasks' training prompts, which the initial model, holding those
tasks, answers itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peft import PeftModel

from . import resources
from .batch import IGNORE_INDEX
from .cache import ReferenceCache, write_atomically
from .config import cache_dir
from .data import read_jsonl, read_text
from .errors import DataError
from .generation import chat_prompt_ids, greedy_answers, records_logits
from .initial import fingerprint, initial_model

SELF = "self"  # the replay_data value that asks for self-generated replay


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl/.json file of records with a `prompt` field."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        prompts = []
        for line, record in read_jsonl(path):
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise DataError(path, "a self-replay prompt record needs a non-empty string field 'prompt'", line)
            prompts.append(record["prompt"].strip())
        return prompts
    prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise DataError(path, "no prompts: the file is empty")
    return prompts


def self_replay_rows(peft_model: PeftModel, tokenizer, n: int, args, reference_topk: int | None = None,
                     earlier: list[list[dict]] | None = None) -> tuple[list[dict], dict, tuple[dict, float] | None]:
    """`n` replay rows (fewer when there are fewer prompts; the sampler then reuses them) of the initial model's
    answers, from the cache or generated now. Returns the rows ({input_ids, labels}), {key, cache_hit, rows and,
    when generated, seconds, the recording of the entries left out} and, when generated with `reference_topk`, the rows' top-k reference cache entries
    (cache.reference_cache's `computed`): decoding computes the initial model's logits at every answer position
    anyway, so the entries cost the LM head over the prompts and the top-k, not a forward of every row."""
    prompts = read_prompts(args.self_replay_prompts) if args.self_replay_prompts else resources.self_replay_prompts()
    k = min(len(earlier or []), round(n * args.lineage_replay_share)) if args.lineage_replay == "prompts" else 0
    prompts = prompts[:n - k] + (earlier or [])[:k]
    settings = {"max_new_tokens": args.self_replay_max_new_tokens, "temperature": args.self_replay_temperature,
                "seed": args.seed if args.self_replay_temperature > 0 else None}
    digest = fingerprint(peft_model)
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token, prompts, settings]).encode())
    path = cache_dir() / "self_replay" / f"{digest.hexdigest()[:32]}.json"
    info = {"key": path.stem, "cache_hit": path.is_file(), "rows": len(prompts)}
    reference = None
    if path.is_file():
        answers = json.loads(path.read_text())
    else:
        entries, seconds = [None] * len(prompts), [0.0]

        def record(i: int, ids: list[int], logits) -> None:
            start = time.perf_counter()
            following = torch.tensor(ids[1:], device=next(peft_model.parameters()).device)
            entries[i] = ReferenceCache.entries(torch.nn.Identity(), logits(), following, reference_topk)
            seconds[0] += time.perf_counter() - start

        recording = bool(reference_topk) and records_logits(peft_model)  # else a build makes the cache later
        was_training, start = peft_model.training, time.perf_counter()
        peft_model.eval()
        try:
            with initial_model(peft_model):
                answers = greedy_answers(peft_model, tokenizer, prompts, settings["max_new_tokens"], batch_size=16,
                                         temperature=settings["temperature"], seed=args.seed,
                                         desc="Generating self-replay answers",
                                         on_logits=record if recording else None)
        finally:
            peft_model.train(was_training)
        info["seconds"] = round(time.perf_counter() - start - seconds[0], 2)  # (the recording: the cache's)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(answers)))
        if recording:
            reference = ReferenceCache.joined(entries), seconds[0]
    rows = []
    for prompt, answer in zip(prompts, answers):
        context = chat_prompt_ids(tokenizer, prompt)
        rows.append({"input_ids": context + answer, "labels": [IGNORE_INDEX] * len(context) + answer})
    return rows, info, reference
