"""experiments/sequence.py's summary: BWT, what a method removes of LoRA's, plasticity, and the JSON shape."""

import json

import pytest

from arr import run_folder
from experiments.sequence import bwt, lora_steps, plot, summarise, table


def test_sequence_summary_pairs_each_method_with_lora_per_seed(tmp_path):
    lora = {"R": [[0.9], [0.5, 0.8], [0.3, 0.4, 0.7]], "forgetting": 0.2, "seconds": 100.0, "delta": {}}
    arr = {"R": [[0.8], [0.75, 0.8], [0.7, 0.75, 0.7]], "forgetting": 0.02, "seconds": 110.0, "delta": {}}
    joint = {"R": [[0.8, 0.7, 0.6]], "forgetting": 0.1, "seconds": 300.0, "delta": {}}
    results = {"lora": {1: lora, 2: lora}, "arr": {1: arr, 2: arr}, "joint": {1: joint, 2: joint}}
    summary = summarise(results, ["date", "topic", "reverse"], [1, 2], 50)
    assert bwt(lora["R"]) == pytest.approx(((0.3 - 0.9) + (0.4 - 0.8)) / 2)
    m = summary["methods"]["arr"]
    assert m["bwt"] == pytest.approx(((0.7 - 0.8) + (0.75 - 0.8)) / 2)
    assert m["bwt_removed"] == pytest.approx(1 - m["bwt"] / bwt(lora["R"]))
    assert m["forgetting_removed"] == pytest.approx(0.9)
    assert m["kept"] == pytest.approx((0.8 / 0.9 + 1 + 1) / 3)
    assert m["wall_ratio"] == pytest.approx(1.1)
    assert set(m) >= {"R", "bwt", "bwt_removed", "forgetting_removed", "kept", "ci", "wall_ratio", "config"}
    assert summary["methods"]["joint"]["bwt"] is None and summary["default"] in ("arr", "arr_lineage")
    assert "| arr |" in table(summary)
    plot(summary, tmp_path / "sequence.png")
    assert (tmp_path / "sequence.png").stat().st_size > 10_000


def test_joint_trains_as_many_steps_as_loras_whole_sequence(tmp_path):
    tasks = ["date", "topic"]
    for i, (task, steps) in enumerate(zip(tasks, (24, 75))):
        stage = tmp_path / "lora" / "seed1" / f"{i}_{task}"
        stage.mkdir(parents=True)
        for name in (run_folder.ADAPTER_CONFIG, run_folder.CONFIG):
            (stage / name).write_text("{}")
        if steps != 75:  # the last stage unfinished first
            (stage / run_folder.METRICS).write_text(json.dumps({"global_steps": steps}))
    with pytest.raises(SystemExit, match="plain LoRA's sequence at seed 1, which is not finished"):
        lora_steps(tmp_path, 1, tasks)
    (stage / run_folder.METRICS).write_text(json.dumps({"global_steps": 75}))
    assert lora_steps(tmp_path, 1, tasks) == 99
