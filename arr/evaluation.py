"""What did the model forget, and what did it learn? General-capability probes before and after a fine-tune.

Every probe runs on data the replay corpus never contains (Wikipedia titles held out by `resources.is_heldout_title`,
chat exchanges, MMLU questions, the model's own answers). "Before" is the same network with its adapter disabled,
which for the standard LoRA init is exactly the initial model (see reference.py).

Probes (units in brackets; ↓ = lower is better):
- heldout_nll     mean next-token NLL per token on held-out Wikipedia lead paragraphs [nats/token ↓]. The PEFT-style
                  forgetting metric; labels are shifted (token t is scored from tokens < t).
- knowledge_mc    title -> its Wikipedia description among 4 (3 distractors from other held-out titles), scored by
                  the mean log-likelihood per continuation token (length-normalised) [accuracy ↑].
- mmlu            the MMLU questions shipped in lm-eval (tasks/mmlu/flan_cot_fewshot: 282 few-shot samples over 57
                  subjects, 281 usable; one answers "(E)" to a four-choice question), zero-shot, scored by the
                  log-likelihood of the answer letter after "The answer is (" [accuracy ↑]. A 135M model is near
                  chance (0.25) here; it matters for bigger models.
- chat_nll        NLL per token of the reference answers of chatterbot-corpus English exchanges, in the chat
                  template [nats/token ↓].
- behaviour_kl    mean per-token KL(initial || tuned) on the initial model's own greedy answers to fixed general
                  prompts [nats/token ↓; 0 before by definition].
- task_em/task_nll  the new task on held-out examples: exact match of the greedy answer [↑], answer NLL [↓].

Headline `forgetting` [nats/token ↓] = mean over heldout_nll, chat_nll and behaviour_kl of max(0, after - before):
the damage on each of the three likelihood probes, where a gain on one probe cannot cancel damage on another.
(Replaying Wikipedia packed with EOS lowers the NLL of short chat answers and of held-out Wikipedia text while the
model's own answers drift, so a plain average of deltas let replay pass for retention.) The multiple-choice
accuracies (knowledge_mc, mmlu) are reported beside it, in their own unit.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import textwrap
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from . import resources, run_folder
from .resources import GENERAL_PROMPTS
from .data import read_jsonl, record_to_turns
from .cache import write_atomically
from .chunked_loss import kl_from_logprobs
from .config import cache_dir
from .errors import ARRError, ConfigError, DataError
from .generation import by_length, chat_prompt_ids, encode, greedy_answers
from .initial import fingerprint, initial_model

CHAT_PACKAGE, LM_EVAL_PACKAGE = "chatterbot-corpus", "lm-eval"
LOWER_IS_BETTER = {"heldout_nll", "chat_nll", "behaviour_kl", "task_nll"}
LOWER_IS_BETTER_LM_EVAL = ("perplexity", "bits_per_byte", "bpb", "nll")  # lm-eval metrics named like these


@dataclass
class EvalArgs:
    """Sizes of the probes (the defaults finish in a few minutes on 2 CPU cores for a 135M model)."""

    heldout_docs: int = field(default=24, metadata={"help": "Held-out Wikipedia paragraphs for heldout_nll."})
    max_doc_tokens: int = field(default=128, metadata={"help": "Tokens kept of each held-out paragraph."})
    knowledge_items: int = field(default=40, metadata={"help": "Questions of knowledge_mc."})
    mmlu_items: int = field(default=24, metadata={"help": "MMLU questions (at most 281)."})
    chat_items: int = field(default=48, metadata={"help": "chatterbot exchanges for chat_nll."})
    drift_prompts: int = field(default=12, metadata={"help": f"General prompts for behaviour_kl (<= {len(GENERAL_PROMPTS)})."})
    drift_tokens: int = field(default=32, metadata={"help": "Greedy answer length for behaviour_kl."})
    task_items: int = field(default=100, metadata={"help": "Held-out task examples (the bundled task has 100)."})
    task_data: str | None = field(
        default=None,
        metadata={"help": "Held-out examples of the new task: a JSONL/JSON file in any SFT format; the last assistant "
                          "turn is the answer, exact match after stripping whitespace. Empty: the bundled date "
                          "task's test split."},
    )
    lm_eval_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "Optional lm-eval harness tasks run on the in-memory model before and after (needs "
                          "pip install 'arr[lm-eval]'; hub tasks need the hub), e.g. [hellaswag,arc_easy]."},
    )
    lm_eval_include_path: str | None = field(
        default=None, metadata={"help": "A folder of your own lm-eval task YAMLs (local data works offline)."}
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "At most this many documents per lm-eval task."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the probe samples."})

    def __post_init__(self):
        for key, value in vars(self).items():
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"eval key {key} takes an integer >= 0, got {value}")
        if self.task_data is not None and not Path(self.task_data).is_file():
            raise ConfigError(f"eval key task_data: no such file {self.task_data!r}")
        if self.lm_eval_include_path is not None and not Path(self.lm_eval_include_path).is_dir():
            raise ConfigError(f"eval key lm_eval_include_path: no such folder {self.lm_eval_include_path!r}")


# ---------------------------------------------------------------------------------------------- probe data


def heldout_documents(n: int, seed: int) -> list[str]:
    records = resources.wiki_split("heldout")
    return [r["extract"] for r in random.Random(seed).sample(records, min(n, len(records)))]


def knowledge_questions(n: int, seed: int) -> list[tuple[str, list[str], int]]:
    """(prompt, 4 continuations, index of the right one) from held-out titles with a description."""
    records = [r for r in resources.wiki_split("heldout") if r.get("description")]
    rng = random.Random(seed)
    items = []
    for record in rng.sample(records, min(n, len(records))):
        distractors = rng.sample([r["description"] for r in records if r["description"] != record["description"]], 3)
        choices = distractors + [record["description"]]
        rng.shuffle(choices)
        items.append((f"Question: What is {record['title']}?\nAnswer:", [f" {c}" for c in choices],
                      choices.index(record["description"])))
    return items


def mmlu_questions(n: int, seed: int) -> list[tuple[str, int]]:
    """(prompt ending in 'The answer is (', index of the right letter) from lm-eval's packaged few-shot samples."""
    return random.Random(seed).sample(all_mmlu_questions(), min(n, len(all_mmlu_questions())))


@cache  # before and after, and every method of a compare, draw from the same 57 parsed files
def all_mmlu_questions() -> tuple[tuple[str, int], ...]:
    folder = resources.package_file(LM_EVAL_PACKAGE, "mmlu/flan_cot_fewshot/_mmlu.yaml").parent
    items = []
    for path in sorted(folder.glob("mmlu_*.yaml")):
        spec = read_yaml(path)
        for sample in spec["fewshot_config"]["samples"]:
            answer = re.search(r"answer is \(([ABCD])\)", sample["target"])
            if answer:
                items.append((f"{spec['description']}\n\nQ: {sample['question'].strip()}\nA: The answer is (",
                              "ABCD".index(answer.group(1))))
    return tuple(items)


def task_examples(path: str | None, n: int | None, split: str = "test") -> list[tuple[list[dict], str]]:
    """(conversation before the last assistant turn, that turn's text) for the first n (None: all) task examples of
    `path`, or of the bundled date task's `split`."""
    records = read_jsonl(path) if path else list(enumerate(resources.date_task(split), start=1))
    examples = []
    for line, record in records[:n]:
        try:
            turns, _ = record_to_turns(record, "auto")
        except ValueError as e:
            raise DataError(path, str(e), line) from None
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        examples.append((turns[:last], turns[last]["content"].strip()))
    return examples


def chat_exchanges(n: int, seed: int) -> list[tuple[str, str]]:
    return random.Random(seed).sample(all_chat_exchanges(), min(n, len(all_chat_exchanges())))


@cache
def all_chat_exchanges() -> tuple[tuple[str, str], ...]:
    """The first two turns of every chatterbot English conversation whose two turns are non-empty text."""
    folder = resources.package_file(CHAT_PACKAGE, "english/greetings.yml").parent
    pairs = []
    for path in sorted(folder.glob("*.yml")):
        for conversation in read_yaml(path).get("conversations", []):
            if len(conversation) >= 2 and all(isinstance(t, str) and t.strip() for t in conversation[:2]):
                pairs.append((conversation[0].strip(), conversation[1].strip()))
    return tuple(pairs)


def read_yaml(path: Path):
    """A packaged data file, parsed by libyaml where PyYAML was built with it (about 10x the pure-Python parser)."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# --------------------------------------------------------------------------------------------- scoring core


@torch.no_grad()
def score_at(model, tokenizer, rows: list[list[int]], positions: list[range], score, batch_size: int, desc: str
             ) -> list:
    """`score(i, logits)` for each row i, with its float logits [len(positions[i]), V] at its `positions`, scored
    batch by batch so that no more than one batch of logits is held. Rows are right-padded and batched by
    length; the LM head runs only at positions some row of the batch asks for (the model's `logits_to_keep`),
    which on MMLU-style prompts (one scored position) skips nearly all of the head's work."""
    device = next(model.parameters()).device
    out: list = [None] * len(rows)
    pad = tokenizer.pad_token_id or 0
    for indices, batch in tqdm(list(by_length(rows, batch_size)), desc=desc, leave=False):
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        keep = sorted({t for i in indices for t in positions[i]})
        column = {t: k for k, t in enumerate(keep)}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=torch.tensor(keep, device=device)).logits
        for row, i in enumerate(indices):
            out[i] = score(i, logits[row, [column[t] for t in positions[i]]].float())
    return out


def continuation_logprobs(model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int, desc: str
                          ) -> list[tuple[float, int]]:
    """Sum of log p(continuation token | everything before it) and the number of continuation tokens, for each
    (context ids, continuation ids) pair. The logits at position t score token t + 1 (shifted labels)."""
    positions = [range(len(c) - 1, len(c) + len(x) - 1) for c, x in pairs]
    def total(i, logits):
        targets = torch.tensor(pairs[i][1], device=logits.device)
        return torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets].sum().item(), len(targets)

    return score_at(model, tokenizer, [c + x for c, x in pairs], positions, total, batch_size, desc)


def next_token_logprobs(model, tokenizer, contexts: list[list[int]], candidates: list[int], batch_size: int,
                        desc: str) -> list[list[float]]:
    """log p(candidate | context) for single-token candidates: one forward per context, not one per candidate."""
    return score_at(model, tokenizer, contexts, [range(len(c) - 1, len(c)) for c in contexts],
                    lambda i, logits: torch.log_softmax(logits[0], -1)[candidates].tolist(), batch_size, desc)


def answer_ids(tokenizer, answer: str) -> list[int]:
    return encode(tokenizer, answer) + [tokenizer.eos_token_id]


def _nll(scores):
    return -sum(s for s, _ in scores) / max(1, sum(n for _, n in scores))


def _accuracy(scores, items, normalise: bool):
    correct, k = 0, 0
    for _, choices, right in items:
        group = scores[k:k + len(choices)]
        k += len(choices)
        values = [s / n if normalise else s for s, n in group]
        correct += values.index(max(values)) == right
    return correct / max(1, len(items))


# ------------------------------------------------------------------------------------------------- probes

# Each probe group (task: task_nll and task_em; lm_eval: its tasks' metrics) and the EvalArgs fields its value depends
# on besides batch_size and seed: its "before" is cached by these alone, so a new task file reruns only the task's.
PROBES = {
    "heldout_nll": ("heldout_docs", "max_doc_tokens"),
    "knowledge_mc": ("knowledge_items",),
    "mmlu": ("mmlu_items",),
    "chat_nll": ("chat_items",),
    "behaviour_kl": ("drift_prompts", "drift_tokens"),
    "task": ("task_items", "task_data"),
    "lm_eval": ("lm_eval_tasks", "lm_eval_include_path", "lm_eval_limit"),
}


def probes_that_run(args: EvalArgs) -> list[str]:
    """The probe groups `args` gives any item (a size of 0 leaves a probe out of the report)."""
    sizes = {"heldout_nll": args.heldout_docs, "knowledge_mc": args.knowledge_items, "mmlu": args.mmlu_items,
             "chat_nll": args.chat_items, "behaviour_kl": min(args.drift_prompts, args.drift_tokens),
             "task": len(task_examples(args.task_data, args.task_items)), "lm_eval": len(args.lm_eval_tasks)}
    return [name for name in PROBES if sizes[name] > 0]


def probe_items(args: EvalArgs) -> dict[str, int]:
    """The number of scored items of each accuracy probe (for its interval and its chance band)."""
    return {"knowledge_mc": len(knowledge_questions(args.knowledge_items, args.seed)),
            "mmlu": len(mmlu_questions(args.mmlu_items, args.seed)),
            "task_em": len(task_examples(args.task_data, args.task_items))}


def run_probe(name: str, model, tokenizer, args: EvalArgs, drift_answers=None, reference=None) -> dict[str, float]:
    """One probe group's values on `model`. `reference` (a context manager factory giving the initial model) and
    `drift_answers` (its greedy answers) enable behaviour_kl; without them it is 0 (the model is the reference)."""
    b = args.batch_size
    if name == "heldout_nll":
        docs = [encode(tokenizer, d)[: args.max_doc_tokens] for d in heldout_documents(args.heldout_docs, args.seed)]
        pairs = [(d[:1], d[1:]) for d in docs if len(d) > 1]
        return {name: _nll(continuation_logprobs(model, tokenizer, pairs, b, name))}
    if name == "knowledge_mc":
        items = knowledge_questions(args.knowledge_items, args.seed)
        pairs = [(encode(tokenizer, p), encode(tokenizer, c)) for p, choices, _ in items for c in choices]
        return {name: _accuracy(continuation_logprobs(model, tokenizer, pairs, b, name), items, True)}
    if name == "mmlu":
        questions = mmlu_questions(args.mmlu_items, args.seed)
        letters = [encode(tokenizer, letter)[0] for letter in "ABCD"]
        scores = next_token_logprobs(model, tokenizer, [encode(tokenizer, q) for q, _ in questions], letters, b, name)
        return {name: sum(row.index(max(row)) == right for row, (_, right) in zip(scores, questions)) / len(questions)}
    if name == "chat_nll":
        pairs = [(chat_prompt_ids(tokenizer, q), answer_ids(tokenizer, a))
                 for q, a in chat_exchanges(args.chat_items, args.seed)]
        return {name: _nll(continuation_logprobs(model, tokenizer, pairs, b, name))}
    if name == "behaviour_kl":
        return {name: behaviour_kl(model, tokenizer, drift_answers, reference, args) if reference else 0.0}
    if name == "task":
        return task_scores(model, tokenizer, args.task_data, args.task_items, b)
    return lm_eval_scores(model, tokenizer, args)


def run_probes(model, tokenizer, args: EvalArgs, drift_answers=None, reference=None) -> dict[str, float]:
    """Every probe `args` gives any item, on `model` (see run_probe)."""
    return {k: v for name in probes_that_run(args)
            for k, v in run_probe(name, model, tokenizer, args, drift_answers, reference).items()}


def task_scores(model, tokenizer, task_data: str | None, items: int, batch_size: int) -> dict[str, float]:
    """The task's answer NLL and exact match on its first `items` held-out examples ({} when there are none)."""
    task = task_examples(task_data, items)
    if not task:
        return {}
    pairs = [(chat_prompt_ids(tokenizer, turns), answer_ids(tokenizer, answer)) for turns, answer in task]
    out = {"task_nll": _nll(continuation_logprobs(model, tokenizer, pairs, batch_size, "task_nll"))}
    longest = max(len(ids) for _, ids in pairs)
    answers = greedy_answers(model, tokenizer, [turns for turns, _ in task], longest + 4, batch_size)
    out["task_em"] = sum(tokenizer.decode(a, skip_special_tokens=True).strip() == answer
                         for a, (_, answer) in zip(answers, task)) / len(task)
    return out


@cache
def task_manager(include_path: str | None, own_only: bool = False):
    """lm-eval's task index, built once for before and after: of the tasks under `include_path` alone (`own_only`),
    or of those and every task YAML lm-eval ships (over 14,000 entries: most of a minute to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=not own_only)


def lm_eval_scores(model, tokenizer, args: EvalArgs) -> dict[str, float]:
    """The lm-eval harness's metrics of `args.lm_eval_tasks` on the in-memory model (lm-eval's `HFLM` wraps it as
    it is, so with the adapter switched off this scores the initial model), as {"lm_eval:TASK:METRIC": value}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ARRError(f"lm_eval_tasks need the lm-eval harness: pip install 'arr[lm-eval]' ({e})") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)

    def evaluate(own_only: bool) -> dict:
        return simple_evaluate(model=lm, tasks=list(args.lm_eval_tasks), limit=args.lm_eval_limit,
                               task_manager=task_manager(args.lm_eval_include_path, own_only),
                               bootstrap_iters=0, random_seed=args.seed)["results"]

    own = args.lm_eval_include_path is not None and set(args.lm_eval_tasks) <= set(
        task_manager(args.lm_eval_include_path, True).all_tasks)
    try:
        try:  # tasks of the user's own folder are indexed from it alone, unless they need lm-eval's own
            results = evaluate(own_only=own)
        except (KeyError, ValueError):
            if not own:
                raise
            results = evaluate(own_only=False)
    except (KeyError, ValueError) as e:  # lm-eval's way of saying a task name is unknown
        raise ARRError(f"lm_eval_tasks: {' '.join(str(e).split())}") from None
    return {f"lm_eval:{task}:{metric.partition(',')[0]}": float(value)
            for task, metrics in results.items() for metric, value in metrics.items()
            if isinstance(value, (int, float)) and "_stderr" not in metric}


def behaviour_kl(model, tokenizer, drift_answers, reference, args: EvalArgs) -> float:
    """Mean per-token KL(initial || model) over the initial model's greedy answers (answer positions only)."""
    rows = [chat_prompt_ids(tokenizer, p) + a for p, a in zip(GENERAL_PROMPTS[: args.drift_prompts], drift_answers)]
    positions = [range(len(r) - len(a) - 1, len(r) - 1) for r, a in zip(rows, drift_answers)]
    with reference():  # the reference's log-probs are kept: drift answers are few and short
        ref_logp = score_at(model, tokenizer, rows, positions, lambda i, logits: torch.log_softmax(logits, -1),
                            args.batch_size, "behaviour_kl")
    kls = score_at(model, tokenizer, rows, positions,
                   lambda i, logits: kl_from_logprobs(torch.log_softmax(logits, -1), ref_logp[i], "forward"),
                   args.batch_size, "behaviour_kl")
    return sum(k.sum().item() for k in kls) / max(1, sum(k.numel() for k in kls))


def evaluate_adapter(peft_model, tokenizer, args: EvalArgs | None = None, before: dict | None = None,
                     drift_answers: list[list[int]] | None = None, cache_before: bool = False) -> dict:
    """Probes with the adapter disabled (before: the initial model) and enabled (after). `before` and the initial
    model's greedy answers to the drift prompts (`drift_answers`) can be passed in to reuse one baseline across runs;
    `cache_before` keeps each probe's in $ARR_CACHE/eval_before for every later evaluation of the same initial
    model with the same settings of that probe (before_cache_path). Returns evaluation_result's dict."""
    args = args or EvalArgs()
    peft_model.eval()
    if before is None:
        before, answers = before_values(peft_model, tokenizer, args, cache_before)
        drift_answers = drift_answers or answers
    elif drift_answers is None and "behaviour_kl" in probes_that_run(args):
        with initial_model(peft_model):
            drift_answers = initial_drift_answers(peft_model, tokenizer, args)
    after = after_values(peft_model, tokenizer, args, drift_answers)
    check_finite(after, "with the adapter on")
    return evaluation_result(before, after, args)


def after_values(peft_model, tokenizer, args: EvalArgs, drift_answers) -> dict[str, float]:
    """Every probe on the model as it is (adapter on), behaviour_kl against the initial model's `drift_answers`."""
    return run_probes(peft_model, tokenizer, args, drift_answers, reference=partial(initial_model, peft_model))


def evaluation_result(before: dict, after: dict, args: EvalArgs) -> dict:
    """{"before", "after", "delta", "forgetting", "items" (of each accuracy probe), "eval_args"}."""
    delta = {k: after[k] - before[k] for k in after}
    items = {k: n for k, n in probe_items(args).items() if k in after}
    return {"before": {k: before[k] for k in after}, "after": after, "delta": delta,
            "forgetting": headline_forgetting(delta), "items": items, "eval_args": vars(args)}


def check_finite(values: dict[str, float], which: str) -> None:
    """A non-finite probe value is an error, never a score (the headline's max(0, nan) would be 0: no forgetting)."""
    name = next((k for k, v in values.items() if not math.isfinite(v)), None)
    if name is not None:
        raise ARRError(f"probe {name} is {values[name]} {which}: the model's outputs are not finite numbers, so "
                       "there is nothing to score")


def before_values(peft_model, tokenizer, args: EvalArgs, cache: bool = False) -> tuple[dict, list | None]:
    """The initial model's value of every probe that runs, and its greedy answers to the drift prompts; with
    `cache`, each probe's read from (or kept in) its own file of $ARR_CACHE/eval_before."""
    weights = fingerprint(peft_model) if cache else None
    before, drift_answers = {}, None
    with initial_model(peft_model):
        for name in probes_that_run(args):
            path = before_cache_path(weights, tokenizer, args, name) if cache else None
            if path is not None and path.is_file():
                saved = json.loads(path.read_text())
            else:
                saved = {"values": run_probe(name, peft_model, tokenizer, args)}
                check_finite(saved["values"], "with the adapter off (the initial model)")
                if name == "behaviour_kl":
                    saved["drift_answers"] = initial_drift_answers(peft_model, tokenizer, args)
                if path is not None:
                    text = json.dumps(saved)
                    write_atomically(path, lambda tmp: tmp.write_text(text))
            before.update(saved["values"])
            drift_answers = saved.get("drift_answers", drift_answers)
    return before, drift_answers


def before_cache_path(weights_digest, tokenizer, args: EvalArgs, probe: str) -> Path:
    """Where the initial model's value of one probe group lives: keyed by the initial model's weights
    (`initial.fingerprint`), the tokenizer's template, the probe and its own settings (PROBES; a task file by its
    content), and nothing else: another task file or another probe's size leaves it valid."""
    settings = {k: getattr(args, k) for k in (*PROBES[probe], "batch_size", "seed")}
    if probe == "task":
        data = Path(args.task_data).read_bytes() if args.task_data else b"bundled date task"
        settings["task_data"] = hashlib.sha256(data).hexdigest()
    digest = weights_digest.copy()
    digest.update(json.dumps([probe, settings, tokenizer.chat_template, tokenizer.eos_token]).encode())
    return cache_dir() / "eval_before" / f"{digest.hexdigest()[:32]}.json"


# `arr train`'s report after training (eval_after) and the in-training probes (probe_steps): the headline probes,
# knowledge_mc and the task, small enough to cost a fraction of the embedded run; `full` is arr eval's default sizes.
# knowledge_mc's 385 questions give its accuracy a 95% interval of at most +-5 points at any accuracy
# (SmolLM2-135M-Instruct scores about 55% there, where 320 would give +-5.4).
EVAL_AFTER = {"quick": dict(heldout_docs=12, knowledge_items=385, mmlu_items=0, chat_items=16, drift_prompts=6,
                            drift_tokens=24, task_items=24),
              "full": {}}


def report_args(task_data: str | None = None, eval_after: str = "quick", bundled_task: bool = False,
                sizes: dict | None = None) -> EvalArgs:
    """The probes of the report after training at `eval_after`'s sizes (quick ones for the probe_steps rounds of a
    run with eval_after none), with `sizes` (EvalArgs keys) on top: the task's held-out examples from `task_data`,
    or the bundled date task's test split with `bundled_task`, else no task score."""
    has_task = task_data is not None or bundled_task
    preset = EVAL_AFTER["full" if eval_after == "full" else "quick"]
    return EvalArgs(**{**preset, **(sizes or {}), "task_data": task_data, **({} if has_task else {"task_items": 0})})


def initial_drift_answers(initial_model, tokenizer, args: EvalArgs) -> list[list[int]]:
    """The initial model's greedy answers to the general prompts, on which behaviour_kl is measured."""
    return greedy_answers(initial_model, tokenizer, list(GENERAL_PROMPTS[: args.drift_prompts]), args.drift_tokens,
                          args.batch_size)


HEADLINE_PROBES = ("heldout_nll", "chat_nll", "behaviour_kl")


def headline_forgetting(delta: dict[str, float]) -> float:
    """The mean over the headline probes that ran of max(0, delta)."""
    ran = [p for p in HEADLINE_PROBES if p in delta]
    return sum(max(0.0, delta[p]) for p in ran) / len(ran) if ran else 0.0


# For scale under every report: plain LoRA's headline on the embedded default recipe (docs/results/default.json,
# method "lora"; tests/test_evaluation.py holds the two equal).
REFERENCE_LORA = (0.2481, "plain LoRA on the embedded default recipe (docs/results/default.json, method lora: "
                          "SmolLM2-135M-Instruct, the date task, 24 steps of 8 at lr 1e-3, seed 42, arr eval's sizes)")
# Each row in words: what it measures, its unit (nats/token, or an accuracy in points), whether lower is better.
ROWS = {
    "heldout_nll": ("held-out Wikipedia text, NLL", "nats/token", True),
    "knowledge_mc": ("knowledge, 4-choice accuracy", "points", False),
    "mmlu": ("MMLU, 4-choice accuracy", "points", False),
    "chat_nll": ("chat answers, NLL", "nats/token", True),
    "behaviour_kl": ("drift from its own answers, KL", "nats/token", True),
    "task_em": ("the task, exact match", "points", False),
    "task_nll": ("the task's answers, NLL", "nats/token", True),
}
CHANCE = {"knowledge_mc": 0.25, "mmlu": 0.25}


def half_interval(p: float, n: int) -> float:
    """Half the 95% (normal approximation) interval of an accuracy p over n items."""
    return 1.96 * (p * (1 - p) / max(1, n)) ** 0.5


def at_chance(result: dict, probe: str) -> bool:
    """Whether the initial model's accuracy lies within the 95% band of guessing: the probe does not measure this
    model (MMLU at 135M)."""
    chance, n = CHANCE.get(probe), result.get("items", {}).get(probe)
    return chance is not None and n is not None and abs(result["before"][probe] - chance) <= half_interval(chance, n)


def format_table(result: dict, lora: tuple[float, str] = REFERENCE_LORA) -> str:
    """The report as aligned text: each probe that ran, in words, its change in its unit and relative to before,
    then a line that says what the headline measures beside plain LoRA's (`lora`: its value and where it is from)."""
    rows = [("probe", "measures (↓ lower / ↑ higher is better)", "before", "after", "change", "relative", "")]
    for name, after in result["after"].items():
        words, unit, lower = ROWS.get(name, (name, "", name.endswith(LOWER_IS_BETTER_LM_EVAL)))
        before, delta = result["before"][name], result["delta"][name]
        # none from an accuracy near 0 (a new task's before): it would measure the denominator, not the change
        relative = f"{delta / abs(before):+.1%}" if abs(before) >= (0.05 if unit == "points" else 1e-12) else ""
        if unit == "points":
            n = result.get("items", {}).get(name)
            note = (f"at chance for this model ({CHANCE[name]:.0%} ± {100 * half_interval(CHANCE[name], n):.0f} points "
                    f"over {n}): not a score" if at_chance(result, name)
                    else f"±{100 * half_interval(after, n):.1f} points at 95%, {n} items" if n else "")
            cells = (f"{before:.1%}", f"{after:.1%}", f"{100 * delta:+.1f} points")
        else:
            note, cells = "", (f"{before:.4f}", f"{after:.4f}", f"{delta:+.4f} {unit}".strip())
        rows.append((name, f"{words} {'↓' if lower else '↑'}", *cells, relative, note))
    rows.append(("forgetting", "the headline, below ↓", "", "", f"{result['forgetting']:+.4f} nats/token", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if 2 <= i <= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    ran = [p for p in HEADLINE_PROBES if p in result["after"]]
    headline = (f"forgetting {result['forgetting']:+.4f} nats/token: how much worse the tuned model predicts general "
                f"text than the initial model, the mean rise of {', '.join(ran)} (a fall counts as 0). For scale: "
                f"{lora[0]:+.4f} for {lora[1]}.")
    return "\n".join(lines) + "\n\n" + textwrap.fill(headline, 116)


def run_base_model(run_dir: str | Path, model_name_or_path: str | None = None) -> str:
    """The base model a run's adapter is evaluated on: `model_name_or_path` when given, else the one its
    arr_config.yaml names (the embedded default when it names none)."""
    saved = Path(run_dir) / run_folder.CONFIG
    config = yaml.safe_load(saved.read_text()) if saved.exists() else {}
    return model_name_or_path or config.get("model_name_or_path") or str(resources.default_model_path())


def reusable_evaluation(run_dir: str | Path, eval_args: EvalArgs, base_model: str) -> dict | None:
    """The evaluation kept in a run folder (eval.json) when it was made with these probe sizes (a size added since:
    its default) on this base model (one that does not say: the run's own), else None."""
    try:
        saved = json.loads((Path(run_dir) / run_folder.EVAL).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same_probes = {**vars(EvalArgs()), **saved.get("eval_args", {})} == vars(eval_args)
    return saved if same_probes and (saved.get("base_model") or run_base_model(run_dir)) == base_model else None


def load_run(run_dir: str | Path, model_name_or_path: str | None = None):
    """The PEFT model and tokenizer of a finished `arr train` run, with its initial model rebuilt as the run had it:
    the base (`run_base_model`) loaded with the run's dtype and quantization, and the adapter it started from
    (init_adapter) beside the trained one. Refused with one line when the rebuilt initial model's fingerprint is
    not the one the run recorded (a changed base or starting adapter), unless another base is asked for."""
    from .config import ModelArguments
    from .initial import load_tokenizer, load_trained

    run_dir = Path(run_dir)
    base = run_base_model(run_dir, model_name_or_path)
    saved = yaml.safe_load((run_dir / run_folder.CONFIG).read_text()) if (run_dir / run_folder.CONFIG).exists() else {}
    model_keys = {f: saved[f] for f in ModelArguments.__dataclass_fields__ if f in saved}
    model_args = ModelArguments(**{**model_keys, "model_name_or_path": base})
    tokenizer = load_tokenizer(str(run_dir) if (run_dir / "tokenizer_config.json").exists() else base)
    model = load_trained(model_args, base, run_dir)
    recorded = _recorded_initial_model(run_dir).get("fingerprint")
    if recorded and model_name_or_path is None and fingerprint(model).hexdigest()[:32] != recorded:
        raise ConfigError(f"{run_dir}: the initial model rebuilt from {base!r}"
                          + (f" and {model_args.init_adapter!r}" if model_args.init_adapter else "")
                          + " is not the one this run trained from (its weights changed); pass model_name_or_path= "
                            "to evaluate on another base")
    return model, tokenizer


def _recorded_initial_model(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / run_folder.METRICS).read_text()).get("initial_model", {})
    except (OSError, json.JSONDecodeError):
        return {}
