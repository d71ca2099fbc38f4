"""Chat prompts in, the model's own answers out: batched generation shared by self-generated replay (training) and
the probes of evaluation.py."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .chunked_loss import logits_head


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tokenizer, conversation: str | list[dict]) -> list[int]:
    """Token ids of a user message (or a conversation) in the chat template, ending where the answer starts.
    Without a chat template (plain prompt/completion training), the prompt text itself."""
    turns = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    if not tokenizer.chat_template:
        return encode(tokenizer, "".join(t["content"] for t in turns))
    return encode(tokenizer, tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))


def by_length(rows: list[list[int]], size: int):
    """(indices, rows) batches of similar length, longest first, so that little of each batch is padding."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for i in range(0, len(order), size):
        yield order[i:i + size], [rows[j] for j in order[i:i + size]]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int, batch_size: int,
                   temperature: float = 0.0, seed: int = 0, desc: str | None = None,
                   on_logits: Callable[[int, list[int], Callable[[], torch.Tensor]], None] | None = None
                   ) -> list[list[int]]:
    """Answer token ids (up to and including EOS) for chat prompts, batched by length with left padding: greedy, or
    with `temperature` > 0 sampled from the whole distribution at that temperature (no top-k/top-p), seeded.

    Decoding continues from a prefill of all prompt tokens but the last, run here, whenever the model allows it
    (`records_logits`), whether or not logits are asked for: the answers do not depend on it. `on_logits(i, ids,
    logits)`, when given, is called for prompt i with its row `ids` (prompt then answer) and a function that returns
    the model's raw logits [len(ids) - 1, V] at every prediction of the row: the answer's from the decoding steps
    themselves, the prompt's from the prefill's hidden states (generate() keeps the last prompt position's logits
    only) through the LM head when called, so that the caller can time the work it adds."""
    prefill = records_logits(model)
    if on_logits is not None and not prefill:
        raise ValueError("on_logits: this model's generation cannot continue from a prefill (see records_logits)")
    device = next(model.parameters()).device
    rows = [chat_prompt_ids(tokenizer, p) for p in prompts]
    answers: list[list[int] | None] = [None] * len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False}
    # generation leaves the run's random stream as it found it
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batches = list(by_length(rows, batch_size))
        for indices, batch in tqdm(batches, desc=desc, disable=desc is None):
            width = len(batch[0])
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
            cache = None
            if prefill:  # all prompt tokens but the last: generate() runs that one and returns its logits
                prompt_hidden, cache = prefilled(model, ids[:, :-1], mask[:, :-1])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, past_key_values=cache,
                                 return_dict_in_generate=True, output_logits=on_logits is not None, **sampling)
            for k, (i, row) in enumerate(zip(indices, out.sequences[:, width:].tolist())):
                answers[i] = row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                if on_logits is not None:
                    steps = [step[k] for step in out.logits[:len(answers[i])]]
                    hidden = prompt_hidden[k, width - len(batch[k]):]
                    on_logits(i, batch[k] + answers[i], partial(row_logits, model, hidden, steps))
    return answers


def records_logits(model) -> bool:
    """Whether `greedy_answers` can decode from its own prefill and so give `on_logits`: generate() must continue a
    DynamicCache (no cache_implementation of the model's own)."""
    return model.generation_config.cache_implementation is None


def row_logits(model, prompt_hidden: torch.Tensor, step_logits: list[torch.Tensor]) -> torch.Tensor:
    """A row's logits at every prediction: the LM head (softcapped where the model caps its logits) over its prompt's
    final hidden states, then the steps'."""
    return torch.cat([logits_head(model)(prompt_hidden).float(), torch.stack(step_logits).float()])


def prefilled(model, ids: torch.Tensor, mask: torch.Tensor):
    """The final hidden states of left-padded `ids` and the KV cache that generate() continues from: the positions
    generate() would give them (count of tokens before, padding ignored); no cache for an empty `ids`."""
    if ids.shape[1] == 0:
        head = model.get_output_embeddings()
        return ids.new_zeros(*ids.shape, head.in_features, dtype=head.weight.dtype), None
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                              past_key_values=DynamicCache(config=model.config), use_cache=True)
    return out.last_hidden_state, out.past_key_values
