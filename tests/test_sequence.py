"""experiments/sequence.py: its summary (BWT, what a method removes of LoRA's, plasticity, the JSON shape), its ledger
keys and the reuse of finished stages."""

import json
from types import SimpleNamespace

import pytest
import yaml

from arr import run_folder
from experiments import sequence
from experiments.ledger import Ledger
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


def test_joint_trains_as_many_steps_as_loras_whole_sequence():
    with pytest.raises(SystemExit, match="plain LoRA's sequence at seed 1, which is not finished"):
        lora_steps({"lora": {2: {"steps": [24, 75]}}}, 1)
    assert lora_steps({"lora": {1: {"steps": [24, 75]}}}, 1) == 99


def test_a_stage_is_keyed_by_what_arr_train_trains_it_with(tmp_path):
    """Without a config file, `arr train` takes the embedded recipe for the bundled task alone."""
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    bundled, own = sequence.resolved({"seed": 1}), sequence.resolved({"seed": 1, "sft_data": str(data)})
    assert (bundled["learning_rate"], bundled["max_steps"]) == (1e-3, 24)
    assert (own["learning_rate"], own["max_steps"], own["num_train_epochs"]) == (2e-4, -1, 3.0)


def test_units_in_the_ledger_are_read_on_another_machine_and_new_ones_added(tmp_path, monkeypatch):
    """A (method, seed) recorded in the ledger is not run again from another output folder (a new machine), a joint
    run is keyed by LoRA's recorded steps, and other probe sizes are another unit."""
    trained = []

    def fake_run_unit(folder, stages, tests, items, general):
        trained.append((folder.parent.name, stages))
        steps = [keys.get("max_steps", 10 * (i + 1)) for i, keys in enumerate(stages.values())]
        return {"R": [[0.5] * (i + 1) for i in range(len(stages))], "forgetting": 0.1, "seconds": 5.0,
                "steps": steps, "delta": {}}

    monkeypatch.setattr(sequence, "run_unit", fake_run_unit)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    general = {"heldout_docs": 4}
    first = sequence.run(tmp_path / "a", [1], ["date", "topic"], ["lora", "joint"], 5, general, ledger)
    assert [method for method, _ in trained] == ["lora", "joint"]
    assert trained[1][1]["joint"]["max_steps"] == 30 and first["joint"][1]["steps"] == [30]
    assert sequence.run(tmp_path / "b", [1], ["date", "topic"], ["lora", "joint"], 5, general, ledger) == first
    assert len(trained) == 2 and len(ledger.path.read_text().splitlines()) == 2
    sequence.run(tmp_path / "b", [1], ["date", "topic"], ["lora"], 5, {"heldout_docs": 8}, ledger)
    assert len(trained) == 3


def test_a_stage_folder_is_reused_only_when_it_holds_the_same_configuration(tmp_path, monkeypatch):
    """A finished run of other keys in a stage's folder is trained again, not recorded under this stage's key."""
    run_dir, keys = tmp_path / "0_date", {**sequence.METHODS["lora"], "seed": 1, "init_adapter": None}
    run_dir.mkdir()
    (run_dir / run_folder.ADAPTER_CONFIG).write_text("{}")
    (run_dir / run_folder.METRICS).write_text(json.dumps({"global_steps": 24, "train_seconds": 1.0}))
    (run_dir / run_folder.CONFIG).write_text(yaml.safe_dump(sequence.resolved(keys)))
    trained = []
    monkeypatch.setattr(sequence.subprocess, "run", lambda args, **kw: trained.append(args) or
                        SimpleNamespace(returncode=0, stdout="done", stderr=""))
    assert sequence.train(run_dir, keys)["global_steps"] == 24 and trained == []
    sequence.train(run_dir, {**keys, "seed": 2})
    assert len(trained) == 1 and "seed=2" in trained[0]
