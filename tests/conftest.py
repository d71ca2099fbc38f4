"""Fixtures: tiny randomly initialised models (bench/tiny.py: Llama and Qwen2 here, every family in
test_architectures.py) saved as model folders, and small SFT and replay data."""

from __future__ import annotations

import json

import pytest

from bench.tiny import make_tokenizer, tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def saved_tiny_model(kind: str, tmp_path_factory, tokenizer):
    """A saved tiny model folder (loaded by path like any hub model)."""
    path = tmp_path_factory.mktemp(f"tiny-{kind}")
    tiny_model(kind, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory, tokenizer):
    return saved_tiny_model(request.param, tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return saved_tiny_model("llama", tmp_path_factory, tokenizer)


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def sft_records(n: int = 24) -> list[dict]:
    return [chat(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(n)]


def replay_texts(n: int = 50) -> list[str]:
    return [f"Paragraph {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(n)]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)
