"""One fine-tune after another (arr/lineage.py): the lineage recorded, every earlier task scored, earlier-task
prompts in self-generated replay, and the refusals."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from arr.cli import main
from conftest import assert_one_error_line, chat, write_jsonl


def task_records(word: str, n: int) -> list[dict]:
    return [chat(f"Say {word} {i}.", f"{word} {i}") for i in range(n)]


@pytest.fixture
def tasks(tmp_path):
    """Three small tasks, each with training and held-out files."""
    return {name: (write_jsonl(tmp_path / f"{name}.jsonl", task_records(name, 12)),
                   write_jsonl(tmp_path / f"{name}_test.jsonl", task_records(name, 16)[12:]))
            for name in ("alpha", "beta", "gamma")}


def train(recipe, out, task, *keys):
    sft, test = task
    return main(["train", recipe, f"output_dir={out}", f"sft_data={sft}", f"eval_data={test}", *keys])


def test_a_sequence_records_its_lineage_scores_every_earlier_task_and_replays_their_prompts(
        recipe, tasks, tmp_path, capsys):
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    assert train(recipe, a, tasks["alpha"]) == 0
    assert train(recipe, b, tasks["beta"], f"init_adapter={a}") == 0
    capsys.readouterr()
    assert train(recipe, c, tasks["gamma"], f"init_adapter={b}") == 0
    out = capsys.readouterr().out
    lineage = yaml.safe_load((c / "arr_config.yaml").read_text())["lineage"]
    assert [e["run"] for e in lineage] == [str(b), str(a)]  # newest first, B's own lineage after it
    assert lineage[1]["sft_data"] == tasks["alpha"][0] and lineage[1]["task_data"] == tasks["alpha"][1]
    report = json.loads((c / "eval.json").read_text())["lineage"]
    report_a, report_b = (json.loads((run / "eval.json").read_text()) for run in (a, b))
    rows = {r["run"]: r for r in report["tasks"]}
    assert rows[str(b)]["learned"] == report_b["after"]["task_em"]  # right after it was learned: B's own report
    assert rows[str(a)]["learned"] == report_a["after"]["task_em"]
    # before this run is π₀ = B's model: A's task as B left it
    assert rows[str(b)]["task_nll_before"] == pytest.approx(report_b["after"]["task_nll"], abs=1e-4)
    assert report["bwt"] == pytest.approx(sum(r["after"] - r["learned"] for r in rows.values()) / 2)
    assert "| B |" in out and "| A |" in out and "Backward transfer" in out
    # half the self-replay rows are π₀'s answers to the earlier tasks' training prompts
    replay = json.loads((c / "metrics.json").read_text())["self_replay"]
    answers = json.loads(next((tmp_path / "cache" / "self_replay").glob(f"{replay['key']}*")).read_text())
    assert len(answers) == replay["rows"]

    # arr eval scores the lineage again from the run folder
    capsys.readouterr()
    assert main(["eval", str(c), "heldout_docs=2", "chat_items=2", "drift_prompts=2", "knowledge_items=0",
                 "mmlu_items=0", "task_items=4"]) == 0
    assert "Backward transfer" in capsys.readouterr().out

    # C's arr_config.yaml is a config again: it trains C once more, its lineage read anew from init_adapter
    d = tmp_path / "D"
    assert main(["train", str(c / "arr_config.yaml"), f"output_dir={d}", "eval_after=none"]) == 0
    assert yaml.safe_load((d / "arr_config.yaml").read_text())["lineage"] == lineage
    trained = [load_file(run / "adapter_model.safetensors") for run in (c, d)]
    assert trained[0].keys() == trained[1].keys() and all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_lineage_refusals(recipe, tasks, tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    assert train(recipe, a, tasks["alpha"]) == 0
    # earlier task data that has moved: one line naming it, and the way to continue without it
    moved = tmp_path / "moved.jsonl"
    shutil.move(tasks["alpha"][1], moved)
    capsys.readouterr()
    assert train(recipe, b, tasks["beta"], f"init_adapter={a}") == 2
    assert_one_error_line(2, capsys.readouterr().err, f"the task_data of earlier run {str(a)!r} has moved or gone")
    assert not b.exists()
    assert train(recipe, b, tasks["beta"], f"init_adapter={a}", "skip_missing_lineage=true") == 0
    assert json.loads((b / "eval.json").read_text())["lineage"]["tasks"] == []
    shutil.move(moved, tasks["alpha"][1])
    # a cycle: A written anew as a run continued from B, whose lineage names A
    capsys.readouterr()
    assert train(recipe, a, tasks["gamma"], f"init_adapter={b}", "overwrite_output_dir=true") == 2
    assert_one_error_line(2, capsys.readouterr().err, "is a cycle")
    assert (a / "adapter_config.json").is_file()
    # a folder that is a run still being written (no metrics.json yet)
    (b / "metrics.json").unlink()
    capsys.readouterr()
    assert train(recipe, tmp_path / "D", tasks["gamma"], f"init_adapter={b}") == 2
    assert_one_error_line(2, capsys.readouterr().err, "is not a finished arr train run")


def test_compare_on_top_of_an_earlier_run_scores_its_task(recipe, tasks, tmp_path):
    from arr.compare import compare
    from arr.evaluation import EvalArgs

    a = tmp_path / "A"
    assert train(recipe, a, tasks["alpha"], "eval_after=none") == 0
    sft, test = tasks["beta"]
    results = compare(tmp_path / "cmp", recipe, {"init_adapter": str(a), "sft_data": sft, "eval_data": test},
                      {"lora": {"method": "lora"}, "arr": {}},
                      EvalArgs(heldout_docs=2, chat_items=2, drift_prompts=2, drift_tokens=4, knowledge_items=0,
                               mmlu_items=0, task_items=4, task_data=test))
    for method in ("lora", "arr"):
        lineage = results["methods"][method]["probes"]["lineage"]
        assert [r["run"] for r in lineage["tasks"]] == [str(a)] and "bwt" in results["methods"][method]
        assert results["methods"][method]["peak_mem_mb"] > 100  # the child process's own peak RSS
        assert lineage["tasks"][0]["before"] == results["methods"]["lora"]["probes"]["lineage"]["tasks"][0]["before"]
