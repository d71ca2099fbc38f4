"""Fixtures: tiny randomly initialised models (bench/tiny.py: Llama and Qwen2 here, every family in
test_architectures.py) saved as model folders, and small SFT and replay data."""

from __future__ import annotations

import json

import pytest
import yaml

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


@pytest.fixture
def recipe(tmp_path, llama_dir, monkeypatch):
    """A config of a few steps on the tiny model, with its own held-out task data and cache."""
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(llama_dir), "sft_data": write_jsonl(tmp_path / "sft.jsonl", sft_records(16)),
        "eval_data": write_jsonl(tmp_path / "test.jsonl", sft_records(30)[24:]),
        "replay_data": "self", "self_replay_max_new_tokens": 8, "max_steps": 3, "per_device_train_batch_size": 4,
        "beta": 1.0, "kl_on": "all", "replay_ratio": 0.25, "save_strategy": "no", "lora_r": 4, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 0.05, "disable_tqdm": True}))
    return str(config)


def assert_one_error_line(code, err, expected):
    """Exit 2 and one `arr: error:` line that says `expected` (the model's loading bar may come before it)."""
    errors = [line for line in err.splitlines() if line.startswith("arr: error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0] and err.strip().endswith(errors[0]), err
