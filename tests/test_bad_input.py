"""Every malformed input stops `arr train` with one line naming the file and line or the config key, exit status
2, no traceback, and nothing written."""

import shutil

import pytest
import yaml

from arr.cli import main
from conftest import replay_texts, sft_records, write_jsonl

GOOD = '{"prompt": "ok", "completion": "fine"}\n'
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
    overrides = [o.format(tmp=folder) for o in overrides]
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
