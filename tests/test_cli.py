import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from arr.cli import main
from arr.keys import override, read_config
from conftest import replay_texts, sft_records, write_jsonl


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path, llama_dir):
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_records(16))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(replay_texts(40)))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(llama_dir), "sft_data": sft, "replay_data": str(corpus),
        "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
        "replay_seq_length": 16, "beta": 0.2, "replay_ratio": 0.25, "save_strategy": "no",
        "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"], "disable_tqdm": True,
    }))
    return {"sft": sft, "corpus": str(corpus), "config": str(config), "out": tmp_path / "out"}


@pytest.mark.parametrize("init", ["true", "pissa"])
def test_train_from_yaml_writes_adapter_config_and_metrics(files, capsys, llama_dir, init):
    code, out, err = run_cli(capsys, "train", files["config"], "learning_rate=0.01", "save_merged_model=true",
                             f"init_lora_weights={init}")
    assert code == 0, err
    done = out.strip().splitlines()[-1]  # the means over the run of the parts it trains: no Laplace here
    assert "means over the run: loss=" in done and "kl=" in done and "replay_ce=" in done and "laplace" not in done
    saved = yaml.safe_load((files["out"] / "arr_config.yaml").read_text())
    assert saved["learning_rate"] == 0.01 and saved["beta"] == 0.2 and saved["lora_target_modules"] == ["q_proj",
                                                                                                          "v_proj"]
    metrics = json.loads((files["out"] / "metrics.json").read_text())
    assert metrics["global_steps"] == 3 and len(metrics["history"]) == 3
    assert set(metrics["final"]) >= {"loss", "sft_ce", "kl", "replay_ce"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), files["out"])
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    # after PiSSA, the adapter converted to a LoRA of the original model: twice the rank, the same model as merged
    assert model.peft_config["default"].r == {"true": 4, "pissa": 8}[init]
    assert not [p for p in os.listdir(files["out"]) if p.startswith(".saving")]
    merged = AutoModelForCausalLM.from_pretrained(files["out"] / "merged")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_task_kl_beta_trains_the_task_rows_kl_as_a_part_of_its_own(files, capsys):
    """Mask-the-Target on the task's rows at a small weight beside the replay rows' KL: both KL parts are trained,
    logged and closed on; a run without task_kl_beta has no such part."""
    code, out, err = run_cli(capsys, "train", files["config"], "kl_on=all", "kl_mask_target=true", "task_kl_beta=0.1",
                             "learning_rate=0.05", "eval_after=none")
    assert code == 0, err
    assert "kl_task=" in out.strip().splitlines()[-1]
    metrics = json.loads((files["out"] / "metrics.json").read_text())
    assert metrics["trained_parts"] == ["sft_ce", "kl", "kl_task", "replay_ce"]
    assert all(h["kl_task"] > 0 and h["kl"] > 0 for h in metrics["history"][1:])  # (step 1: the adapter is still 0)
    for h in metrics["history"]:  # beta 0.2 (the config's) on the replay rows' KL, 0.1 on the task rows'
        assert h["loss"] == pytest.approx(h["sft_ce"] + 0.2 * h["kl"] + 0.1 * h["kl_task"] + h["replay_ce"], abs=1e-5)
    assert yaml.safe_load((files["out"] / "arr_config.yaml").read_text())["task_kl_beta"] == 0.1


def test_train_ends_with_the_report_of_what_the_run_forgot_and_learned(files, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    held_out = write_jsonl(tmp_path / "test.jsonl", sft_records(30)[24:])
    code, out, err = run_cli(capsys, "train", files["config"], f"eval_data={held_out}")
    assert code == 0, err
    report = json.loads((files["out"] / "eval.json").read_text())
    assert set(report["after"]) >= {"heldout_nll", "chat_nll", "behaviour_kl", "task_nll", "task_em"}
    assert report["eval_args"]["task_items"] == 24 and report["eval_args"]["task_data"] == held_out
    assert report["forgetting"] == pytest.approx(sum(max(0.0, report["delta"][p]) for p in
                                                     ("heldout_nll", "chat_nll", "behaviour_kl")) / 3)
    # only the probes that ran are rows (no MMLU in the quick report); knowledge_mc sized for +-5 points at any accuracy
    assert "mmlu" not in report["after"] and report["items"]["knowledge_mc"] == 385
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "the task, exact match ↑" in rows["task_em"] and "nats/token" in rows["forgetting"]
    assert "For scale: +0.2481 for plain LoRA" in " ".join(out.split())
    last = out.strip().splitlines()[-1]
    assert last.startswith("done in ") and f"adapter in {files['out']}" in last and "eval.json" in last
    metrics = json.loads((files["out"] / "metrics.json").read_text())
    assert metrics["trained_parts"] == ["sft_ce", "kl", "replay_ce"]
    assert metrics["means"]["kl"] == pytest.approx(sum(h["kl"] for h in metrics["history"]) / 3)
    assert (files["out"] / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the initial model's values, kept probe by probe: four general probes and the task
    assert len(list((tmp_path / "cache" / "eval_before").iterdir())) == 5

    code, out, err = run_cli(capsys, "eval", str(files["out"]), *(f"{k}={v}" for k, v in report["eval_args"].items()
                                                                   if v not in (None, [])))
    assert code == 0 and "(the report in" in out  # the same settings: arr eval reuses it
    # on another base model it evaluates anew and says so in eval.json, which then is not the run's own report
    settings = [f"{k}={v}" for k, v in report["eval_args"].items() if v not in (None, [])]
    other = f"{saved_base(files['out'])}/."  # (another path to the same weights: what matters is that it differs)
    code, out, err = run_cli(capsys, "eval", str(files["out"]), f"model_name_or_path={other}", *settings)
    assert code == 0 and "(the report in" not in out
    assert json.loads((files["out"] / "eval.json").read_text())["base_model"] == other
    code, out, err = run_cli(capsys, "eval", str(files["out"]), *settings)
    assert code == 0 and "(the report in" not in out
    assert json.loads((files["out"] / "eval.json").read_text())["base_model"] == saved_base(files["out"])

    # another task file and another knowledge_mc size (eval.KEY=VALUE): those two probes alone are scored anew
    held_out_2 = write_jsonl(tmp_path / "test2.jsonl", sft_records(30)[20:])
    code, out, err = run_cli(capsys, "train", files["config"], f"eval_data={held_out_2}", "eval.knowledge_items=7",
                             "overwrite_output_dir=true")
    assert code == 0, err
    assert len(list((tmp_path / "cache" / "eval_before").iterdir())) == 7
    again = json.loads((files["out"] / "eval.json").read_text())
    assert again["before"]["heldout_nll"] == report["before"]["heldout_nll"] and again["items"]["knowledge_mc"] == 7

    code, out, err = run_cli(capsys, "train", files["config"], "eval_after=none", "overwrite_output_dir=true")
    assert code == 0 and "task_em" not in out and not (files["out"] / "eval.json").exists()
    assert not (files["out"] / "report.png").exists()


def saved_base(run_dir) -> str:
    return yaml.safe_load((run_dir / "arr_config.yaml").read_text())["model_name_or_path"]


def test_debug_shows_traceback(files, capsys):
    code, _, err = run_cli(capsys, "train", files["config"], "beta=-1", "--debug")
    assert code == 2 and "Traceback" in err and "beta must be >= 0" in err


def test_help_explains_every_option():
    from dataclasses import fields

    from transformers import TrainingArguments

    from arr.config import ARRConfig, DataArguments, ModelArguments
    from arr.keys import HELP_GROUPS

    env = {**os.environ, "COLUMNS": "200"}
    top = subprocess.run([sys.executable, "-m", "arr", "--help"], capture_output=True, text=True, env=env)
    assert top.returncode == 0 and "arr train" in top.stdout and top.stdout.count("e.g.  arr ") == 3
    trainer_keys = {f.name for f in fields(TrainingArguments)}
    own = [f.name for cls in (ModelArguments, DataArguments, ARRConfig) for f in fields(cls)
           if f.init and not f.name.startswith("_") and f.name not in trainer_keys]
    grouped = [key for keys in HELP_GROUPS.values() for key in keys]
    assert sorted(set(own) | {"method"}) == sorted(k for k in grouped if k in own or k == "method")
    assert len(grouped) == len(set(grouped))  # each key in one group
    short = subprocess.run([sys.executable, "-m", "arr", "train", "--help"], capture_output=True, text=True, env=env)
    assert short.returncode == 0 and "--help-all" in short.stdout
    assert list(HELP_GROUPS) == [line[:-1] for line in short.stdout.splitlines() if line.endswith(":") and
                                 not line.startswith(" ")]  # the groups, in order
    for key in own:
        assert f"\n  {key} (default: " in short.stdout, key
    assert "--adam_beta1" not in short.stdout  # a Trainer option only --help-all lists
    assert "KL(initial || trained)" in short.stdout
    every = subprocess.run([sys.executable, "-m", "arr", "train", "--help-all"], capture_output=True, text=True,
                           env=env)
    assert every.returncode == 0
    for cls in (ModelArguments, DataArguments, ARRConfig):
        for f in fields(cls):
            if f.init and not f.name.startswith("_"):
                assert f"--{f.name}" in every.stdout, f.name


def test_method_presets_expand_and_explicit_keys_win():
    from arr.config import build_config

    _, _, laplace = build_config({"method": "laplace"})
    assert (laplace.beta, laplace.replay_ratio, laplace.laplace_lambda) == (0.0, 0.0, 300.0)
    _, _, mixed = build_config({"method": "laplace", "beta": 0.5, "laplace_lambda": 3})
    assert (mixed.beta, mixed.replay_ratio, mixed.laplace_lambda) == (0.5, 0.0, 3.0)
    _, _, adaptive = build_config({"method": "arr_adaptive"})
    assert adaptive.kl_target is not None and adaptive.beta == 3.0 and adaptive.replay_ratio == 0.125  # from the default
    _, data, replay_only = build_config({"method": "replay_only"})
    assert (replay_only.beta, data.replay_data) == (0.0, None)  # Wikipedia's next-token CE, not self-replay's


def test_a_choice_on_the_command_line_is_the_word_given():
    """YAML reads `no` as false: `save_strategy=no`, as the Trainer's docs write it, must still mean "no"."""
    from arr.config import build_config

    values = read_config(None, ["save_strategy=no", "beta=no", "kl_on='all'", 'eval_after="none"'])
    assert values == {"save_strategy": "no", "beta": False, "kl_on": "all", "eval_after": "none"}
    assert build_config({"save_strategy": "no"})[2].save_strategy == "no"


def test_a_method_on_the_command_line_outranks_the_config_file(tmp_path):
    from arr.config import build_config, read_config

    config = tmp_path / "c.yaml"
    config.write_text("beta: 0.2\nreplay_ratio: 0.3\nlearning_rate: 0.01\n")
    _, _, plain = build_config(read_config(str(config), ["method=lora"]))
    assert (plain.beta, plain.replay_ratio, plain.learning_rate) == (0.0, 0.0, 0.01)
    _, _, laplace = build_config(read_config(str(config), ["method=laplace", "laplace_lambda=5"]))
    assert (laplace.beta, laplace.replay_ratio, laplace.laplace_lambda) == (0.0, 0.0, 5.0)
    config.write_text("method: laplace\nbeta: 0.2\n")  # inside one file, the keys beside the method win
    _, _, mixed = build_config(read_config(str(config), []))
    assert (mixed.beta, mixed.replay_ratio, mixed.laplace_lambda) == (0.2, 0.0, 300.0)


def test_the_defaults_a_run_uses_are_the_ones_help_shows(tmp_path, capsys, monkeypatch):
    """The embedded recipe (a demo sized for the bundled task) applies only with neither a config nor sft_data, and
    says what it sets; a user's own data, or an empty config, gets the defaults arr train --help lists."""
    from arr.keys import train_help
    from arr.errors import ARRError

    used = []

    def stop_before_training(model_args, data_args, config, resume=False, report_sizes=None):
        used.append(config)
        raise ARRError("stopped before training")

    monkeypatch.setattr("arr.train.run", stop_before_training)
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_records(4))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    run_keys = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "save_steps",
                "output_dir")
    help_text = train_help()
    for args in ([f"sft_data={sft}"], [str(empty)], [str(empty), f"sft_data={sft}"]):
        assert main(["train", *args]) == 2
        assert "recipe" not in capsys.readouterr().out
        config = used.pop()
        assert (config.learning_rate, config.max_steps, config.save_steps) == (2e-4, -1, 500)
        for key in run_keys:
            assert f"\n  {key} (default: {getattr(config, key)})\n" in help_text, key
    assert main(["train", "max_steps=3"]) == 2
    out = capsys.readouterr().out
    config = used.pop()
    recipe = yaml.safe_load((Path(__file__).parent.parent / "arr" / "recipes" / "default.yaml").read_text())
    assert (config.learning_rate, config.max_steps, config.lr_scheduler_type) == (1e-3, 3, "constant")
    assert out.startswith("No CONFIG.yaml and no sft_data: the embedded default recipe ")
    assert all(f"{key}={value}" in out for key, value in recipe.items())  # every setting that differs from --help's


def test_compare_and_eval_help(capsys):
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: arr compare [CONFIG.yaml]") and "--quick" in out
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: arr eval RUN_DIR [key=value ...]")
    assert "\n  heldout_docs (default: 24)\n" in out and "\n  model_name_or_path (default: " in out
    assert "--heldout_docs" not in out and "--" not in out.split("keys (each given as key=value):")[1]


@pytest.mark.parametrize("args, error", [
    (["--help"], None), (["compare", "--help"], None), (["train", "--help"], None), (["eval", "--help"], None),
    (["nope"], "unknown command 'nope'"), (["train", "--fast"], "unknown flag '--fast'"),
    (["eval"], "arr eval needs a run directory"), (["eval", "beta=1"], "arr eval needs a run directory"),
    (["train", "beta"], "beta: no such config file"), (["train", "beta=1", "lr"], "override 'lr' is not key=value"),
    (["train", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["train", "learning_rat=0.1"], "unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
    (["train", "beta=abc"], "config key beta: invalid float value: 'abc'"),
    (["train", "lora_r=four"], "config key lora_r: invalid int value: 'four'"),
    (["train", "use_dora=maybe"], "config key use_dora: Truthy value expected: got maybe"),
    (["train", "method=ewc"], "method must be one of lora"),
    (["train", "{run}/c.yaml", "beta=0.1"], "unknown config key 'bta'; did you mean 'beta'?"),
    (["eval", "{run}", "heldout_doc=3"], "unknown eval key 'heldout_doc'; did you mean 'heldout_docs'?"),
    (["eval", "{run}", "chat_items=many"], "eval key chat_items: invalid int value: 'many'"),
    (["train", "kl_on=bad"], "config key kl_on must be one of all, sft, replay, prompt_and_replay, got 'bad'"),
    (["train", "lr_scheduler_type=x"], "config key lr_scheduler_type must be one of linear, cosine,"),
    (["train", "{run}/no.yaml"], "config key save_strategy must be one of no, steps, epoch, best, got False: YAML "
                                 "reads an unquoted no"),
    (["compare", "kl_on=bad"], "config key kl_on must be one of all"), (["compare", "betta=1"], "unknown config key 'betta'"),
    (["compare", "eval.chat_items=many"], "eval key chat_items: invalid int value: 'many'"),
    (["train", "eval.knowledge_item=3"], "unknown eval key 'knowledge_item'; did you mean 'knowledge_items'?"),
    (["train", "eval_after=none", "eval.chat_items=3"], "eval key chat_items: eval.* keys size the report after "
                                                        "training and the probe_steps rounds, and eval_after=none "
                                                        "with no probe_steps runs neither"),
    (["train", "eval.task_data=x.jsonl"], "eval key task_data: the report's held-out task examples are the config "
                                          "key eval_data"),
    (["train", "eval_after=none", "probe_steps=2", "eval.chat_items=x"], "eval key chat_items: invalid int value"),
    (["train", "{run}/eval.yaml"], "{run}/eval.yaml: eval.chat_items is an eval key; give eval.* keys on the command "
                                   "line"),
])
def test_help_and_argument_errors_import_nothing_heavy(tmp_path, args, error):
    """They come back at once: the command checks its arguments against keys.json before importing torch or
    transformers, with the one-line error of the full parsing."""
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "c.yaml").write_text("bta: 0.5\n")
    (tmp_path / "no.yaml").write_text("save_strategy: no\n")
    (tmp_path / "eval.yaml").write_text("eval.chat_items: 3\n")
    code = ("import sys; from arr.cli import main; code = main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)); sys.exit(code)")
    args = [a.format(run=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert proc.returncode == (0 if error is None else 2)
    assert error is None or f"arr: error: {error.format(run=tmp_path)}" in proc.stderr, proc.stderr


def test_keys_json_is_the_live_dataclasses():
    from arr.keys import REGENERATE, key_table, table

    assert table() == key_table(), f"arr/keys.json is stale: regenerate it with `{REGENERATE}`"


@pytest.mark.parametrize("command, values", [
    ("train", {"beta": "abc"}), ("train", {"lora_r": "four"}), ("train", {"lora_r": 1.5}),
    ("train", {"use_dora": "maybe"}), ("train", {"bf16": 2}), ("train", {"max_steps": True}),
    ("train", {"learning_rat": 0.1}), ("eval", {"chat_items": "many"}), ("eval", {"heldout_doc": 3}),
    ("train", {"kl_on": "bad"}), ("train", {"lr_scheduler_type": "x"}), ("train", {"sft_format": "csv"}),
])
def test_the_cheap_checks_say_what_the_full_parsing_says(command, values):
    from arr.config import CONFIG_CLASSES, parse_dataclasses
    from arr.errors import ConfigError
    from arr.evaluation import EvalArgs
    from arr.keys import check_values

    kind = {"train": "config key", "eval": "eval key"}[command]
    with pytest.raises(ConfigError) as cheap:
        check_values(values, command, kind)
    with pytest.raises(ConfigError) as full:
        parse_dataclasses(values, CONFIG_CLASSES if command == "train" else (EvalArgs,), kind)
    assert str(cheap.value) == str(full.value)


def test_a_run_record_is_a_config_again_and_holds_no_secret(tmp_path):
    from arr.config import build_config
    from arr.train import resolved_config

    record = resolved_config(*build_config({"output_dir": str(tmp_path), "hub_token": "hf_secret", "seed": 7}))
    assert "hub_token" not in record and "hf_secret" not in json.dumps(record)
    assert resolved_config(*build_config(record)) == record
    # a run folder's arr_config.yaml as written before 2026-12-05: the accelerator config as its repr, which no
    # parser took back; its lineage and overwrite_output_dir are not keys for a rerun
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "arr_config.yaml").write_text(yaml.safe_dump({**record, "overwrite_output_dir": True, "lineage": [], (
        "accelerator_config"): "AcceleratorConfig(split_batches=False, dispatch_batches=None, even_batches=True, "
        "use_seedable_sampler=True, non_blocking=False, gradient_accumulation_kwargs=None, use_configured_state=False)"}))
    assert read_config(str(run / "arr_config.yaml"), []) == {k: v for k, v in record.items()
                                                             if k != "overwrite_output_dir"}
    # any other YAML is read as written: a lineage key there is an unknown key
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"seed": 1, "lineage": []}))
    assert read_config(str(tmp_path / "mine.yaml"), []) == {"seed": 1, "lineage": []}


@pytest.mark.parametrize("value", [None, True, "all", "no", "1.0", 1e-8, 0.0002, 3, float("inf"), ["q_proj", "v_proj"],
                                   {"min_lr": 1e-6}])
def test_an_override_reads_back_as_the_value_it_was_made_from(value):
    """key=value as refusals suggest it and compare passes it: YAML that read_config reads back unchanged, words
    like 'no' and nested floats like 1e-06 included (YAML 1.1 would read them as a bool and a string)."""
    assert read_config(None, [override("key", value)])["key"] == value
