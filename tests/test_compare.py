import contextlib
import io
import json
import subprocess
import sys
import types

import pytest
import yaml

import arr.compare
from arr.cli import main
from arr.compare import compare
from arr.evaluation import EvalArgs
from conftest import replay_texts, sft_records, write_jsonl

SMALL = EvalArgs(heldout_docs=3, knowledge_items=3, mmlu_items=3, chat_items=3, drift_prompts=2, drift_tokens=4,
                 task_items=3, batch_size=4)


def tiny_config(tmp_path, llama_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(replay_texts(40)))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(llama_dir), "sft_data": write_jsonl(tmp_path / "sft.jsonl", sft_records(16)),
        "replay_data": str(corpus), "max_steps": 2, "per_device_train_batch_size": 4, "replay_seq_length": 16,
        "beta": 0.2, "replay_ratio": 0.25, "save_strategy": "no", "lora_r": 4, "disable_tqdm": True,
        "laplace_samples": 4, "laplace_cache_dir": str(tmp_path / "curvature")}))
    return config


@pytest.fixture
def train_in_process(monkeypatch):
    """compare's `arr train` command runs in this process, not as a child that imports the stack again for every
    method (test_lineage's compare runs it as a child process)."""
    def run(command, **kwargs):
        assert command[:3] == [sys.executable, "-m", "arr"]
        printed, errors = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
            code = main(command[3:])
        return subprocess.CompletedProcess(command, code, printed.getvalue(), errors.getvalue())

    monkeypatch.setattr(arr.compare, "subprocess", types.SimpleNamespace(run=run))


def test_compare_writes_results_table_and_plot(tmp_path, llama_dir, monkeypatch, train_in_process):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    results = compare(tmp_path / "cmp", tiny_config(tmp_path, llama_dir), {"learning_rate": 0.01}, eval_args=SMALL)
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["methods"]) == {"lora", "kl_only", "replay_only", "arr", "arr_adaptive", "laplace"}
    for name, m in saved["methods"].items():
        assert {"forgetting", "task_score", "train_seconds", "peak_mem_mb", "probes", "objective"} <= set(m)
        assert m["train_seconds"] >= 0 and 0 <= m["task_score"] <= 1  # (peak_mem_mb: test_lineage's child process)
        assert m["probes"]["before"] == saved["methods"]["lora"]["probes"]["before"]  # one shared baseline
    objective = {n: (m["objective"]["beta"], m["objective"]["replay_ratio"]) for n, m in saved["methods"].items()}
    assert objective == {"lora": (0.0, 0.0), "kl_only": (0.2, 0.0), "replay_only": (0.0, 0.25), "arr": (0.2, 0.25),
                         "arr_adaptive": (0.2, 0.25), "laplace": (0.0, 0.0)}
    assert saved["methods"]["laplace"]["objective"]["laplace_lambda"] == 300.0
    assert saved["methods"]["laplace"]["family"] == "laplace"
    assert saved["run"] == saved["methods"]["laplace"]["run"] == {"max_steps": 2, "seed": 42}
    assert saved["methods"]["arr_adaptive"]["strength"] == ["kl_target", 0.1]
    table = (tmp_path / "cmp" / "results.md").read_text().splitlines()
    assert table[0].startswith("| method | beta | kl_on | task_kl_beta | kl_direction | replay_ratio | kl_target | "
                               "laplace_lambda | forgetting ↓ | task EM ↑ | removed | kept |")
    assert len(table) == 8 and table[2].startswith("| lora | 0.0 | all | – | forward | 0.0 |")
    assert saved["methods"]["kl_only"]["objective"]["kl_on"] == "all"  # without replay the KL sits on the task's rows
    png = (tmp_path / "cmp" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eval_command_prints_before_after_delta(tmp_path, llama_dir, capsys):
    config = tiny_config(tmp_path, llama_dir)
    assert main(["train", str(config), f"output_dir={tmp_path / 'run'}", "learning_rate=0.05"]) == 0
    sizes = [f"{k}={v}" for k, v in vars(SMALL).items() if v is not None]
    assert main(["eval", str(tmp_path / "run"), *sizes]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert rows["probe"].split()[:3] == ["probe", "measures", "(↓"] and "the task, exact match ↑" in rows["task_em"]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["before"]["behaviour_kl"] == 0 and result["after"]["behaviour_kl"] > 0
    assert result["delta"]["chat_nll"] == result["after"]["chat_nll"] - result["before"]["chat_nll"]
    assert main(["eval", str(tmp_path / "run"), "heldout_doc=3"]) == 2
    assert "did you mean 'heldout_docs'" in capsys.readouterr().err


def test_compare_reuses_finished_runs_and_evaluations(tmp_path, llama_dir, capsys, monkeypatch, train_in_process):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    config = tiny_config(tmp_path, llama_dir)
    methods = {"lora": {"beta": 0.0, "replay_ratio": 0.0}}
    first = compare(tmp_path / "cmp", config, {}, methods, SMALL)
    again = compare(tmp_path / "cmp", config, {}, {**methods, "arr": {}}, SMALL)
    out = capsys.readouterr().out
    assert "== lora: reusing the finished run" in out and "== lora: reusing its evaluation" in out
    assert "== arr: training" in out
    assert again["methods"]["lora"] == json.loads(json.dumps(first["methods"]["lora"]))
    assert again["methods"]["arr"]["probes"]["before"] == again["methods"]["lora"]["probes"]["before"]
    # each evaluation stays in its method's folder: comparing a subset loses none of the others
    compare(tmp_path / "cmp", config, {}, {"arr": {}}, SMALL)
    capsys.readouterr()
    both = compare(tmp_path / "cmp", config, {}, {**methods, "arr": {}}, SMALL)
    out = capsys.readouterr().out
    assert out.count("reusing its evaluation") == 2 and "evaluating" not in out
    assert json.loads(json.dumps(both["methods"])) == json.loads(json.dumps(again["methods"]))
    changed = compare(tmp_path / "cmp", config, {"learning_rate": 0.02}, methods, SMALL)  # a new config retrains
    out = capsys.readouterr().out
    assert "== lora: training" in out and "== lora: evaluating" in out  # and its old evaluation is not read
    assert changed["methods"]["lora"]["probes"]["after"] != first["methods"]["lora"]["probes"]["after"]
    # another comparison on the same initial model (a frontier's next task or seed) reads its "before" from the cache
    import arr.evaluation

    scored, run_probe = [], arr.evaluation.run_probe
    monkeypatch.setattr(arr.evaluation, "run_probe",
                        lambda name, *args, **kwargs: scored.append(name) or run_probe(name, *args, **kwargs))
    other = compare(tmp_path / "cmp2", config, {"learning_rate": 0.02}, methods, SMALL)
    assert sorted(scored) == sorted(arr.evaluation.probes_that_run(SMALL)) != []  # the "after" half only
    assert other["methods"]["lora"]["probes"]["before"] == changed["methods"]["lora"]["probes"]["before"]


def test_strength_sweeps_are_grouped_into_curves_in_table_and_plot(tmp_path):
    from arr.compare import family_and_strength, markdown_table, plot

    base = {"beta": 1.0, "kl_on": "all", "kl_direction": "forward", "replay_ratio": 0.125, "kl_target": None,
            "laplace_lambda": 0.0}
    objectives = {"lora": {**base, "beta": 0.0, "replay_ratio": 0.0}, "arr": base,
                  "laplace_10": {**base, "beta": 0.0, "replay_ratio": 0.0, "laplace_lambda": 10.0},
                  "laplace_100": {**base, "beta": 0.0, "replay_ratio": 0.0, "laplace_lambda": 100.0},
                  "adaptive": {**base, "kl_target": 0.1}}
    families = {n: family_and_strength(o) for n, o in objectives.items()}
    assert family_and_strength({**base, "laplace_lambda": 100.0, "replay_ratio": 0.0}, {"max_steps": 48}) == {
        "family": "laplace+kl (48 steps)", "strength": ("laplace_lambda", 100.0)}
    assert family_and_strength(base, {"max_steps": 48, "seed": 1})["family"] == "arr (48 steps, seed 1)"
    assert family_and_strength({**base, "task_kl_beta": 0.1}) == {"family": "arr+task_kl", "strength": ("beta", 1.0)}
    assert families == {"lora": {"family": "lora", "strength": None},
                        "arr": {"family": "arr", "strength": ("beta", 1.0)},
                        "laplace_10": {"family": "laplace", "strength": ("laplace_lambda", 10.0)},
                        "laplace_100": {"family": "laplace", "strength": ("laplace_lambda", 100.0)},
                        "adaptive": {"family": "arr_adaptive", "strength": ("kl_target", 0.1)}}
    probes = {"after": {"heldout_nll": 1.0}, "delta": {"heldout_nll": 0.5}}
    results = {"methods": {n: {"forgetting": 0.4 - 0.1 * i, "task_score": 0.5 + 0.1 * i, "train_seconds": 1,
                               "peak_mem_mb": 2, "objective": objectives[n], **families[n], "probes": probes,
                               "run": {"max_steps": 24, "seed": 42}} for i, n in enumerate(objectives)}}
    at_48, at_48_s1 = {"max_steps": 48, "seed": 42}, {"max_steps": 48, "seed": 1}
    results["methods"]["lora_48"] = {**results["methods"]["lora"], "family": "lora (48 steps)", "forgetting": 0.8,
                                     "run": at_48}
    results["methods"]["arr_48"] = {**results["methods"]["arr"], "family": "arr (48 steps)", "run": at_48}
    results["methods"]["lora_48_s1"] = {**results["methods"]["lora"], "family": "lora (48 steps, seed 1)",
                                        "forgetting": 0.2, "task_score": 0.6, "run": at_48_s1}
    results["methods"]["arr_48_s1"] = {**results["methods"]["arr"], "family": "arr (48 steps, seed 1)",
                                       "run": at_48_s1}
    task_kl = {**base, "task_kl_beta": 0.1}
    results["methods"]["arr_task_kl"] = {**results["methods"]["arr"], "objective": task_kl,
                                         **family_and_strength(task_kl)}
    table = markdown_table(results).splitlines()
    assert table[0].startswith("| method | beta | kl_on | task_kl_beta | kl_direction | replay_ratio | kl_target | "
                               "laplace_lambda | forgetting ↓ | task EM ↑ | removed | kept |")
    # against LoRA at the same steps: laplace_100 removes 1 - 0.1 / 0.4 of LoRA's forgetting, keeps 0.8 / 0.5
    assert table[5] == ("| laplace_100 | 0.0 | all | – | forward | 0.0 | – | 100.0 | +0.1000 | 0.800 | 75.0% | "
                        "160.0% | +0.5000 | 1 | 2 |")
    assert table[3].split(" | ")[3] == "–" and table[11].split(" | ")[3] == "0.1"  # task_kl_beta
    assert table[2].split(" | ")[10:12] == ["0.0%", "100.0%"]  # lora against itself
    assert table[8].split(" | ")[10:12] == ["62.5%", "120.0%"]  # arr at 48 steps against lora at 48 (0.3 / 0.8)
    assert table[10].split(" | ")[10:12] == ["-50.0%", "100.0%"]  # and with seed 1 against lora's seed 1 (0.2 / 0.6)
    plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_seed_means_average_each_objective_over_seeds_against_lora_on_the_same_seeds():
    from experiments.seed_means import seed_table

    base = {"beta": 1.0, "kl_on": "all", "kl_direction": "forward", "replay_ratio": 0.0625, "kl_target": None,
            "laplace_lambda": 0.0}
    lora = {**base, "beta": 0.0, "replay_ratio": 0.0}

    def run(objective, family, steps, seed, forgetting, score):
        return {"objective": objective, "family": family, "run": {"max_steps": steps, "seed": seed},
                "forgetting": forgetting, "task_score": score}

    methods = {"lora": run(lora, "lora", 24, 42, 0.2, 1.0), "lora_seed1": run(lora, "lora (seed 1)", 24, 1, 0.4, 0.8),
               "arr": run(base, "arr", 24, 42, 0.01, 0.9), "arr_seed1": run(base, "arr (seed 1)", 24, 1, 0.05, 0.7),
               "lora_48": run(lora, "lora (48 steps)", 48, 42, 0.5, 0.5),
               "lora_48_s1": run(lora, "lora (48 steps, seed 1)", 48, 1, 0.7, 0.7),
               "arr_48": run(base, "arr (48 steps)", 48, 42, 0.03, 0.6),
               "arr_48_s1": run(base, "arr (48 steps, seed 1)", 48, 1, 0.03, 0.6),
               "kl_only": run({**base, "replay_ratio": 0.0}, "kl_only", 24, 42, 0.0, 0.5),  # one seed: not printed
               "arr_72": run(base, "arr (72 steps)", 72, 42, 0.03, 0.6),  # no LoRA at 72 steps
               "arr_72_s1": run(base, "arr (72 steps, seed 1)", 72, 1, 0.03, 0.6)}
    rows = seed_table({"run": {"max_steps": 24, "seed": 42}, "methods": methods}).splitlines()[2:]
    assert rows == [
        "| lora + lora_seed1 | own | 2 | +0.3000 | 0.900 | 0.0% | 100.0% | – |",
        "| arr + arr_seed1 | own | 2 | +0.0300 | 0.800 | 90.0% | 88.9% | – |",  # 1 - 0.03 / 0.3, 0.8 / 0.9
        "| lora_48 + lora_48_s1 | 48 | 2 | +0.6000 | 0.600 | 0.0% | 100.0% | -100.0%, 66.7% |",
        "| arr_48 + arr_48_s1 | 48 | 2 | +0.0300 | 0.600 | 95.0% | 100.0% | 90.0%, 66.7% |",
        "| arr_72 + arr_72_s1 | 72 | 2 | +0.0300 | 0.600 | – | – | 90.0%, 66.7% |"]
