"""Every malformed input stops `arr train` (or `arr eval`) with one line naming the file and line or the config key,
exit status 2, no traceback, and nothing written (or, once a run has started, no adapter)."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from arr import ARRConfig, ARRError, ARRTrainer, DataArguments, ModelArguments
from arr.cli import main
from arr.config import INFINITY_MEANS_SOMETHING, build_config
from conftest import replay_texts, sft_records, write_jsonl

GOOD = '{"prompt": "ok", "completion": "fine"}\n'
BINARY = bytes(range(256)) * 4
CHAT = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'

# (files to write: name -> content, overrides, expected text in the error); {tmp} is the case's folder.
CASES = {
    "broken json line": ({"d.jsonl": GOOD + '{"messages": [}\n'}, ["sft_data={tmp}/d.jsonl"], "d.jsonl:2: invalid JSON"),
    "non-utf8 bytes": ({"d.jsonl": GOOD.encode() + b'{"prompt": "caf\xe9"}\n'}, ["sft_data={tmp}/d.jsonl"],
                       "d.jsonl:2: not valid UTF-8"),
    "no known fields": ({"d.jsonl": GOOD + '{"text": "x"}\n'}, ["sft_data={tmp}/d.jsonl"],
                        "d.jsonl:2: no known fields (keys: text)"),
    "messages not a list": ({"d.jsonl": '{"messages": "hi"}\n'}, ["sft_data={tmp}/d.jsonl"],
                            "d.jsonl:1: 'messages' must be a non-empty list"),
    "message without content": ({"d.jsonl": '{"messages": [{"role": "user"}]}\n'}, ["sft_data={tmp}/d.jsonl"],
                                "d.jsonl:1: message 0 needs a string 'content'"),
    "unknown role": ({"d.jsonl": CHAT.replace('"user"', '"robot"')}, ["sft_data={tmp}/d.jsonl"],
                     "d.jsonl:1: message 0 has unknown role 'robot'"),
    "empty assistant turn": ({"d.jsonl": CHAT.replace('"y"', '""')}, ["sft_data={tmp}/d.jsonl"],
                             "d.jsonl:1: assistant turn (message 1) is empty"),
    "no assistant turn": ({"d.jsonl": '{"messages": [{"role": "user", "content": "x"}]}\n'},
                          ["sft_data={tmp}/d.jsonl"], "d.jsonl:1: no assistant turn"),
    "no trainable token after truncation": ({"d.jsonl": '{"prompt": "' + "word " * 50 + '", "completion": "y"}\n'},
                                            ["sft_data={tmp}/d.jsonl", "max_length=8"],
                                            "d.jsonl:1: no trainable (assistant) token is left after truncation"),
    "alpaca output not a string": ({"d.jsonl": '{"instruction": "x", "output": 5}\n'}, ["sft_data={tmp}/d.jsonl"],
                                   "d.jsonl:1: alpaca records need string 'instruction' and 'output'"),
    "completion not a string": ({"d.jsonl": '{"prompt": "x", "completion": null}\n'}, ["sft_data={tmp}/d.jsonl"],
                                "d.jsonl:1: 'prompt' and 'completion' must be strings"),
    "record not an object": ({"d.jsonl": GOOD + "[1, 2]\n"}, ["sft_data={tmp}/d.jsonl"],
                             "d.jsonl:2: expected a JSON object, got list"),
    "forced format missing field": ({"d.jsonl": GOOD}, ["sft_data={tmp}/d.jsonl", "sft_format=messages"],
                                    "d.jsonl:1: 'messages' must be a non-empty list"),
    "empty sft file": ({"d.jsonl": ""}, ["sft_data={tmp}/d.jsonl"], "d.jsonl: no records: the file is empty"),
    "blank sft file": ({"d.jsonl": "\n  \n"}, ["sft_data={tmp}/d.jsonl"], "d.jsonl: no records"),
    "missing sft file": ({}, ["sft_data={tmp}/nope.jsonl"], "nope.jsonl: no such file"),
    ".json not a list": ({"d.json": '{"prompt": "x"}'}, ["sft_data={tmp}/d.json"],
                         "d.json: a .json SFT file must hold a list of records"),
    ".json invalid": ({"d.json": '[{"prompt": }]'}, ["sft_data={tmp}/d.json"], "d.json:1: invalid JSON"),
    "empty replay corpus": ({"r.txt": ""}, ["replay_data={tmp}/r.txt"], "r.txt: empty replay corpus file"),
    "whitespace replay corpus": ({"r.txt": "\n\n   \n\n"}, ["replay_data={tmp}/r.txt"],
                                 "r.txt: the replay corpus holds no text"),
    "replay record without text field": ({"r.jsonl": '{"body": "x"}\n'}, ["replay_data={tmp}/r.jsonl"],
                                         "r.jsonl: replay record 0 has no field 'text'"),
    "replay file of unknown kind": ({"r.csv": "a,b\n"}, ["replay_data={tmp}/r.csv"],
                                    "r.csv: replay corpus must be one kind of .txt, .jsonl, .json, .parquet file"),
    "replay shorter than one sequence": ({"r.txt": "tiny"}, ["replay_data={tmp}/r.txt", "replay_seq_length=5000"],
                                         "replay corpus is empty or shorter than one sequence of 5000 tokens"),
    "empty self-replay prompt file": ({"p.txt": "\n \n"}, ["replay_data=self", "self_replay_prompts={tmp}/p.txt"],
                                      "p.txt: no prompts: the file is empty"),
    "self-replay prompt record without prompt": ({"p.jsonl": '{"text": "x"}\n'},
                                                 ["replay_data=self", "self_replay_prompts={tmp}/p.jsonl"],
                                                 "p.jsonl:1: a self-replay prompt record needs a non-empty string"),
    "no self-replay answer tokens": ({}, ["self_replay_max_new_tokens=0"],
                                     "self_replay_max_new_tokens must be >= 1, got 0"),
    "lora rank 0": ({}, ["lora_r=0"], "config key lora_r must be >= 1, got 0"),
    "lora dropout 1": ({}, ["lora_dropout=1"], "config key lora_dropout must be in [0, 1), got 1"),
    "batch size 0": ({}, ["per_device_train_batch_size=0"], "config key per_device_train_batch_size must be >= 1"),
    "negative learning rate": ({}, ["learning_rate=-0.1"], "config key learning_rate must be >= 0, got -0.1"),
    "target modules that match nothing": ({}, ["lora_target_modules=[no_such_proj]"],
                                          "config key lora_target_modules: Target modules {'no_such_proj'} not found"),
    "unknown key": ({}, ["learning_rat=0.1"], "unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
    "float of wrong type": ({}, ["beta=abc"], "config key beta: invalid float value: 'abc'"),
    "int of wrong type": ({}, ["lora_r=four"], "config key lora_r: invalid int value: 'four'"),
    "negative beta": ({}, ["beta=-1"], "beta must be >= 0, got -1"),
    "replay_ratio 1": ({}, ["replay_ratio=1"], "replay_ratio must be in [0, 1), got 1"),
    "negative replay_ratio": ({}, ["replay_ratio=-0.1"], "replay_ratio must be in [0, 1), got -0.1"),
    "bad replay_mode": ({}, ["replay_mode=both"], "replay_mode must be one of replace, add, got 'both'"),
    "bad kl_on": ({}, ["kl_on=prompt"], "kl_on must be one of all, sft, replay, prompt_and_replay, got 'prompt'"),
    "KL on replay without replay": ({}, ["replay_ratio=0"], "kl_on=replay takes the KL on replay rows, and "
                                    "replay_ratio=0 draws none"),
    "task_kl_beta with one kind of KL row": ({}, ["task_kl_beta=0.1"], "config key task_kl_beta weighs the KL on "
                                             "the task's rows apart from the replay rows', and kl_on=replay"),
    "negative task_kl_beta": ({}, ["kl_on=all", "task_kl_beta=-1"], "task_kl_beta must be >= 0, got -1"),
    "task_kl_beta without replay rows": ({}, ["kl_on=all", "replay_ratio=0", "task_kl_beta=0.1"],
                                         "task_kl_beta weighs the KL on the task's rows apart from the replay rows', "
                                         "and replay_ratio=0 draws none"),
    "bad kl_direction": ({}, ["kl_direction=sideways"], "kl_direction must be one of forward, reverse"),
    "bad sft_format": ({}, ["sft_format=csv"], "sft_format must be one of auto, messages, alpaca"),
    "max_length too small": ({}, ["max_length=1"], "max_length must be >= 2, got 1"),
    "negative replay_weight": ({}, ["replay_weight=-2"], "replay_weight must be >= 0, got -2"),
    "unknown method": ({}, ["method=ewc"], "method must be one of lora, kl_only, replay_only, arr, arr_adaptive, "
                                           "laplace, got 'ewc'"),
    "kl_target without beta": ({}, ["kl_target=0.1", "beta=0"], "kl_target must be > 0 and needs a starting beta > 0"),
    "kl_adapt_rate 1": ({}, ["kl_adapt_rate=1"], "kl_adapt_rate must be in (0, 1), got 1"),
    "negative laplace_lambda": ({}, ["laplace_lambda=-1"], "laplace_lambda must be >= 0, got -1"),
    "no laplace samples": ({}, ["method=laplace", "laplace_samples=0"], "laplace_samples must be >= 1, got 0"),
    "empty laplace corpus": ({"s.txt": ""}, ["method=laplace", "laplace_data={tmp}/s.txt"],
                             "s.txt: empty replay corpus file"),
    "bad ref_cache": ({}, ["ref_cache=disk"], "ref_cache must be one of auto, none, exact, topk, got 'disk'"),
    "override without =": ({}, ["beta"], "override 'beta' is not key=value"),
    "unknown flag": ({}, ["--fast"], "unknown flag '--fast'"),
    "unknown dtype": ({}, ["dtype=float7"], "dtype: unknown dtype 'float7'"),
    "model path missing": ({}, ["model_name_or_path={tmp}/no-model"], "model_name_or_path: cannot load"),
    "output dir not writable": ({}, ["output_dir=/proc/arr-run"], "output_dir: '/proc/arr-run' is not writable"),
    "loftq lora init": ({}, ["init_lora_weights=loftq"],
                        "config key init_lora_weights: 'loftq' starts from a quantized approximation of the base "
                        "weights, which ARR does not set up; use true, pissa or olora"),
    "config not a mapping": ({"c.yaml": "- a\n- b\n"}, ["CONFIG={tmp}/c.yaml"],
                             "c.yaml: a config must be a mapping of key: value"),
    "config not yaml": ({"c.yaml": "a: [1\n"}, ["CONFIG={tmp}/c.yaml"], "c.yaml: not valid YAML"),
    "config file missing": ({}, ["CONFIG={tmp}/none.yaml"], "none.yaml: no such config file"),
    # every path the run reads: a folder, a binary file, a truncated file; every folder it writes: a file, /proc
    "sft_data a folder": ({}, ["sft_data={tmp}"], "case: a folder, not a file"),
    "sft_data binary": ({"d.jsonl": BINARY}, ["sft_data={tmp}/d.jsonl"], "d.jsonl:2: not valid UTF-8"),
    "sft_data truncated": ({"d.jsonl": GOOD + GOOD[:12]}, ["sft_data={tmp}/d.jsonl"], "d.jsonl:2: invalid JSON"),
    "eval_data a folder": ({}, ["eval_data={tmp}"], "config key eval_data: a folder, not a file:"),
    "eval_data binary": ({"e.jsonl": BINARY}, ["eval_data={tmp}/e.jsonl"], "e.jsonl:2: not valid UTF-8"),
    "eval_data truncated": ({"e.jsonl": GOOD + GOOD[:12]}, ["eval_data={tmp}/e.jsonl"], "e.jsonl:2: invalid JSON"),
    "eval_data without an answer": ({"e.jsonl": '{"messages": [{"role": "user", "content": "x"}]}\n'},
                                    ["eval_data={tmp}/e.jsonl"], "e.jsonl:1: no assistant turn"),
    "eval_data bad past the quick report's 24 items": (
        {"e.jsonl": GOOD * 30 + '{"messages": [{"role": "user", "content": "x"}]}\n'},
        ["eval_data={tmp}/e.jsonl", "eval.task_items=40"], "e.jsonl:31: no assistant turn"),
    "self-replay prompts binary": ({"p.txt": BINARY}, ["replay_data=self", "self_replay_prompts={tmp}/p.txt"],
                                   "p.txt:2: not valid UTF-8"),
    "self-replay prompts a folder": ({}, ["replay_data=self", "self_replay_prompts={tmp}"],
                                     "case: a folder, not a file"),
    "replay corpus binary": ({"r.txt": BINARY}, ["replay_data={tmp}/r.txt"], "r.txt: cannot read the replay corpus"),
    "replay folder of unlike files": ({"a.jsonl": '{"text": "x"}\n', "b.jsonl": '{"text": "y", "vocab": 1}\n'},
                                      ["replay_data={tmp}"], "case: cannot read the replay corpus"),
    "laplace corpus binary": ({"s.txt": BINARY}, ["method=laplace", "laplace_data={tmp}/s.txt"],
                              "s.txt: cannot read the replay corpus"),
    "output_dir a file": ({"f": "x"}, ["output_dir={tmp}/f"], "output_dir: '{tmp}/f' is not writable"),
    "ref_cache_dir not writable": ({}, ["ref_cache=topk", "ref_cache_dir=/proc/arr-cache"],
                                   "ref_cache_dir: '/proc/arr-cache' is not writable"),
    "ref_cache_dir inside a file": ({"f": "x"}, ["ref_cache=topk", "ref_cache_dir={tmp}/f/cache"],
                                    "ref_cache_dir: '{tmp}/f/cache' is not writable"),
    "laplace_cache_dir not writable": ({}, ["method=laplace", "laplace_cache_dir=/proc/arr-cache"],
                                       "laplace_cache_dir: '/proc/arr-cache' is not writable"),
    # values that would train garbage or nothing
    "infinite self-replay temperature": ({}, ["replay_data=self", "self_replay_temperature=inf"],
                                         "config key self_replay_temperature must be a finite number, got inf"),
    "max_steps 0": ({}, ["max_steps=0"], "config key max_steps must be >= 1, or -1 for num_train_epochs, got 0"),
    "zero epochs": ({}, ["max_steps=-1", "num_train_epochs=0"],
                    "config key num_train_epochs must be > 0 (with max_steps -1), got 0.0: the run would train "
                    "no step"),
    "negative seed": ({}, ["seed=-1"], "config key seed must be in [0, 2**32), got -1"),
    "seed too large": ({}, ["data_seed=4294967296"], "config key data_seed must be in [0, 2**32), got 4294967296"),
    "a key with no value": ({}, ["beta="], "override 'beta=' gives no value"),
    "an empty output_dir": ({}, ["output_dir="], "override 'output_dir=' gives no value"),
    "null for a key that needs a value": ({}, ["beta=null"], "config key beta needs a value, got none"),
    "an empty string for a path": ({"c.yaml": "output_dir: ''\n"}, ["CONFIG={tmp}/c.yaml"],
                                   "config key output_dir is empty; give a value"),
}


@pytest.fixture
def base(tmp_path, llama_dir):
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_records(8))
    (tmp_path / "corpus.txt").write_text("\n\n".join(replay_texts(20)))
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(llama_dir), "sft_data": sft, "replay_data": str(tmp_path / "corpus.txt"),
        "output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
        "replay_seq_length": 16, "save_strategy": "no", "disable_tqdm": True}))
    return config


def check_error(capsys, args, expected, out_dir, nothing_written=True):
    code = main(args)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert err.count("arr: error:") == 1 and lines[-1].startswith("arr: error:"), err
    assert expected in lines[-1], lines[-1]
    assert "Traceback" not in err
    if out_dir is None:  # the caller checks what is on disk
        return
    if nothing_written:
        assert not out_dir.exists()
    else:  # the run had started: no final adapter may appear
        assert not (out_dir / "adapter_config.json").exists()


@pytest.mark.parametrize("case", CASES)
def test_malformed_input(case, base, tmp_path, capsys):
    files, overrides, expected = CASES[case]
    folder = tmp_path / "case"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    overrides, expected = [o.format(tmp=folder) for o in overrides], expected.replace("{tmp}", str(folder))
    config = [o.split("=", 1)[1] for o in overrides if o.startswith("CONFIG=")]
    args = ["train", *(config or [str(base)]), *(o for o in overrides if not o.startswith("CONFIG="))]
    check_error(capsys, args, expected, tmp_path / "out")


def test_chat_data_with_a_tokenizer_without_chat_template(base, tmp_path, llama_dir, capsys):
    model = tmp_path / "no-template"
    shutil.copytree(llama_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = model / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace('"chat_template"', '"unused_template"'))
    data = tmp_path / "chat.jsonl"
    data.write_text(CHAT)
    check_error(capsys, ["train", str(base), f"model_name_or_path={model}", f"sft_data={data}"],
                "chat.jsonl:1: chat data needs a tokenizer with a chat template", tmp_path / "out")


def test_non_finite_loss_names_step_and_part(base, tmp_path, capsys):
    check_error(capsys, ["train", str(base), "learning_rate=1e30", "max_steps=3", "beta=0.5"],
                "non-finite loss at step 2: sft_ce = nan", tmp_path / "out", nothing_written=False)


@pytest.mark.parametrize("override, expected", [
    ("task_items=-1", "eval key task_items takes an integer >= 0, got -1"),
    ("task_data=nope.jsonl", "eval key task_data: no such file 'nope.jsonl'"),
    ("chat_items=many", "eval key chat_items: invalid int value: 'many'"),
    ("heldout_doc=3", "unknown eval key 'heldout_doc'; did you mean 'heldout_docs'?"),
])
def test_bad_eval_keys(tmp_path, capsys, override, expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    code = main(["eval", str(run), override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("arr: error:") == 1 and expected in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json"]


FLOAT_KEYS = [f.name for cls in (ModelArguments, DataArguments, ARRConfig) for f in dataclasses.fields(cls)
              if f.init and "float" in str(f.type)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ""])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_infinity_and_no_value(key, value, base, tmp_path, capsys):
    if key in INFINITY_MEANS_SOMETHING and value == "inf":
        return  # max_grad_norm=inf: no clipping, the norm still logged (test_infinity_where_it_means_something)
    expected = (f"override '{key}=' gives no value" if not value else
                f"config key {key} must be a finite number, got {float(value)}" if key != "lora_dropout" else
                f"config key lora_dropout must be in [0, 1), got {float(value)}")
    check_error(capsys, ["train", str(base), f"{key}={value}"], expected, tmp_path / "out")


def test_infinity_where_it_means_something():
    assert INFINITY_MEANS_SOMETHING == ("max_grad_norm",)
    assert build_config({"max_grad_norm": float("inf")})[2].max_grad_norm == float("inf")


COUNTS = {  # key -> its smallest value
    "lora_r": 1, "lora_alpha": 1, "max_length": 2, "replay_seq_length": 2, "replay_max_sequences": 1,
    "ref_cache_topk": 1, "laplace_samples": 1, "self_replay_max_new_tokens": 1, "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1, "save_steps": 0, "logging_steps": 0, "eval_steps": 0, "loss_chunk_size": 0,
    "dataloader_num_workers": 0, "seed": 0, "data_seed": 0, "max_steps": 1, "num_train_epochs": 0,
}


@pytest.mark.parametrize("key", COUNTS)
def test_every_count_refuses_what_is_below_its_range(key, base, tmp_path, capsys):
    """0 and negatives: each count's first value out of range is refused, naming the key and the value."""
    smallest = COUNTS[key]
    extra = ["max_steps=-1"] if key == "num_train_epochs" else []
    for value in {smallest - 1, -1} - ({-1} if key == "max_steps" else set()):  # max_steps -1: num_train_epochs
        check_error(capsys, ["train", str(base), *extra, f"{key}={value}"], f"{key} must be", tmp_path / "out")


def test_resume_with_nothing_to_resume(base, tmp_path, capsys):
    out = tmp_path / "out"
    check_error(capsys, ["train", str(base), "--resume"],
                f"--resume: output_dir {str(out)!r} does not exist, nothing to resume; run without --resume", out)
    out.mkdir()
    check_error(capsys, ["train", str(base), "--resume"],
                f"--resume: output_dir {str(out)!r} holds no checkpoint, nothing to resume", out, nothing_written=False)
    assert list(out.iterdir()) == []
    assert main(["train", str(base), "eval_after=none"]) == 0
    finished = {p.name: p.read_bytes() for p in out.iterdir()}
    check_error(capsys, ["train", str(base), "--resume"],
                f"--resume: output_dir {str(out)!r} holds a finished run, nothing to resume; evaluate it with arr eval",
                None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished


def test_a_full_disk_while_saving_leaves_the_previous_adapter(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["train", str(base), "eval_after=none"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(model, folder):  # what safetensors raises when the disk fills up halfway through the file
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("arr.train.save_adapter", disk_full)
    check_error(capsys, ["train", str(base), "eval_after=none", "overwrite_output_dir=true", "learning_rate=0.5"],
                f"cannot save the run into {str(out)!r} (Error while serializing: I/O error: No space left on device "
                "(os error 28)); what it held before is untouched", None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no .saving- folder left either


@pytest.fixture
def finished_run(base, tmp_path):
    assert main(["train", str(base), "eval_after=none"]) == 0
    return tmp_path / "out"


def test_eval_of_a_truncated_adapter(finished_run, capsys):
    weights = finished_run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = main(["eval", str(finished_run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("arr: error:") == 1 and "Traceback" not in err, err
    assert err.strip().startswith(f"arr: error: {weights}: not a readable adapter (Error while deserializing header")
    assert not (finished_run / "eval.json").exists()


def test_eval_of_a_nan_adapter_is_an_error_not_a_score(finished_run, capsys, monkeypatch, tmp_path):
    """max(0, nan) is 0: a NaN model would otherwise report no forgetting at all."""
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    weights = finished_run / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    code = main(["eval", str(finished_run), "heldout_docs=2", "knowledge_items=0", "mmlu_items=0", "chat_items=2",
                 "drift_prompts=2", "drift_tokens=4", "task_items=0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("arr: error:") == 1 and "Traceback" not in err, err
    assert "arr: error: probe heldout_nll is nan with the adapter on: the model's outputs are not finite" in err
    assert not (finished_run / "eval.json").exists()


def test_non_finite_weights_after_an_optimizer_step_stop_the_run(llama_dir, tmp_path):
    """A NaN optimizer setting (refused as a key, set here behind the config's back) leaves the step's losses
    finite and the weights NaN: the run stops at that step, before any adapter is saved."""
    config = ARRConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, beta=0.0,
                       replay_ratio=0.0, report_to="none", disable_tqdm=True, save_strategy="no")
    config.weight_decay = float("nan")
    trainer = ARRTrainer(AutoModelForCausalLM.from_pretrained(llama_dir), config, train_dataset=sft_records(8),
                         processing_class=AutoTokenizer.from_pretrained(llama_dir),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    with pytest.raises(ARRError, match=r"non-finite weights after the optimizer step of step 1 \(base_model\.model\."
                                       r".*lora_[AB]\.default\.weight\); check learning_rate, weight_decay"):
        trainer.train()


def test_a_full_disk_while_writing_a_checkpoint(base, tmp_path, capsys, monkeypatch):
    out, save_checkpoint = tmp_path / "out", Trainer._save_checkpoint

    def disk_full_at_step_2(trainer, model, trial):  # safetensors' error when the disk fills up halfway through
        if trainer.state.global_step < 2:
            return save_checkpoint(trainer, model, trial)
        folder = Path(trainer._get_output_dir(trial)) / "checkpoint-2"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(Trainer, "_save_checkpoint", disk_full_at_step_2)
    check_error(capsys, ["train", str(base), "max_steps=3", "save_strategy=steps", "save_steps=1"],
                f"cannot write checkpoint-2 into {str(out)!r} (Error while serializing: I/O error: No space left on "
                "device (os error 28)); the checkpoints before it are untouched", out, nothing_written=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # whole; no staging folder, no lock
    assert load_file(out / "checkpoint-1" / "adapter_model.safetensors")
