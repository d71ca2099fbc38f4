"""Tasks beyond the bundled date normalisation, for checking that a setting carries across kinds of task. Each has
200 training and 100 test examples in chat format, generated deterministically from the packaged Wikipedia records
of the replay split (so the held-out titles of the probes stay unseen), and a larger held-out split `frontier` (300:
the test split and 200 more, none in train) for experiments/frontier.py, drawn after the first 300 so that train and
test stay as they were. (The reverse task's words are one-word titles of any split, held-out ones included, as its
train split has always drawn them; a word list says nothing of a title's description.)

- date (arr.resources.date_task): rewrite a date into ISO 8601; terse answers far from chat, the bundled task.
- topic: name the topic (one of 11) of an article from its title and description; classification with free-text
  labels, where the answer must come out exactly as one label.
- reverse: write 4-6 given words in reverse order; an algorithmic rewrite the model cannot do unprompted, which needs
  the most drift from the initial model.
- catalogue: rewrite an article's title, topic and description into one line of a fixed house style; a practitioner's
  formatting job (copy, reorder, lower-case the description's first letter, end with a full stop) that a chat model
  answers in prose instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from arr import resources
from arr.cache import write_atomically

SIZES = {"train": 200, "test": 100, "frontier": 300}  # frontier starts where test does
EXAMPLES = SIZES["train"] + SIZES["frontier"]


def write_jsonl(path: Path, records: list[dict]) -> str:
    """`records` as JSON lines at `path`, its path returned. An unchanged file is left alone and a changed one is
    replaced whole, so sweeps running side by side never read one half-written."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if not path.is_file() or path.read_text() != text:
        write_atomically(path, lambda tmp: tmp.write_text(text))
    return str(path)


def _split_task(examples: list[dict], split: str) -> list[dict]:
    if split not in SIZES:
        raise ValueError(f"split must be one of {', '.join(SIZES)}, got {split!r}")
    start = 0 if split == "train" else SIZES["train"]
    return examples[start: start + SIZES[split]]


def _sample_records(name: str) -> list[dict]:
    """EXAMPLES distinct topical records: the first 300 as the tasks always drew them, then more from the rest."""
    records = _topical_records()
    chosen = random.Random(name).sample(records, 300)
    titles = {r["title"] for r in chosen}
    rest = [r for r in records if r["title"] not in titles]
    return chosen + random.Random(f"{name}-more").sample(rest, EXAMPLES - 300)


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _topical_records() -> list[dict]:
    return [r for r in resources.wiki_split("replay")
            if r.get("description") and r.get("topic") not in (None, "Uncategorized")]


def topic_task(split: str = "train") -> list[dict]:
    """Name the topic (one of 11) of a Wikipedia article from its title and description; train and test never share
    an article."""
    topics = sorted({r["topic"] for r in _topical_records()})
    chosen = _sample_records("arr-topic-task")
    return _split_task([_chat(f"Which topic is the Wikipedia article \"{r['title']}\" ({r['description']}) about? "
                              f"Choose one of: {', '.join(topics)}. Answer with the topic only.", r["topic"])
                        for r in chosen], split)


def reverse_task(split: str = "train") -> list[dict]:
    """Write 4 to 6 given words in reverse order. Words are one-word Wikipedia titles; train and test are different
    random lists."""
    words = sorted({r["title"].lower() for r in resources.wiki_records()
                    if r["title"].isalpha() and 3 <= len(r["title"]) <= 8})
    rng = random.Random("arr-reverse-task")
    examples, train = [], set()
    while len(examples) < EXAMPLES:
        chosen = rng.sample(words, rng.randint(4, 6))
        if len(examples) >= SIZES["train"] and tuple(chosen) in train:
            continue  # (never so far: a held-out list is never a training list)
        if len(examples) < SIZES["train"]:
            train.add(tuple(chosen))
        examples.append(_chat(f"Reverse the order of these words: {' '.join(chosen)}", " ".join(reversed(chosen))))
    return _split_task(examples, split)


def catalogue_task(split: str = "train") -> list[dict]:
    """One catalogue line in the house style `Title [Topic]: description.` (the description's first letter lower
    case, a full stop at the end) from an article's title, topic and description given in any order."""
    chosen = _sample_records("arr-catalogue-task")
    rng = random.Random("arr-catalogue-order")
    examples = []
    for r in chosen:
        description = r["description"].strip().rstrip(".")
        fields = [f"Title: {r['title']}", f"Topic: {r['topic']}", f"Description: {description}"]
        rng.shuffle(fields)
        line = f"{r['title']} [{r['topic']}]: {description[:1].lower()}{description[1:]}."
        examples.append(_chat("Write the catalogue line for this article in our house style.\n" + "\n".join(fields),
                              line))
    return _split_task(examples, split)


TASKS = {"date": resources.date_task, "topic": topic_task, "reverse": reverse_task, "catalogue": catalogue_task}
