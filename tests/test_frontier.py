"""experiments/frontier.py: the shipped default it names, and the shares it pools."""

import hashlib
import json
import re

import pytest
from matplotlib.figure import Figure

from arr.config import NOT_RESULT_KEYS, build_config, read_config
from arr.keys import DEFAULT_RECIPE
from arr.resources import is_heldout_title
from arr.train import resolved_config
from experiments import frontier
from experiments.frontier import METHODS, shipped_default, summarise
from experiments.ledger import Ledger
from experiments.tasks import TASKS, write_jsonl


def test_the_named_default_is_the_shipped_configuration_key_for_key():
    name = shipped_default()
    assert name in METHODS
    recipe = read_config(str(DEFAULT_RECIPE), [])
    shipped, named = resolved_config(*build_config(recipe)), resolved_config(*build_config({**recipe, **METHODS[name]}))
    assert {k: v for k, v in named.items() if k not in NOT_RESULT_KEYS} == \
           {k: v for k, v in shipped.items() if k not in NOT_RESULT_KEYS}


@pytest.mark.parametrize("change, expected", [("beta: 1.0", "arr_self_replay_kl_top64_a48"),
                                              ("beta: 1.0\nreplay_mode: add", "arr_self_replay_kl_top64_a48_added"),
                                              ("", "arr_self_replay_kl_top64_a48_b3"),
                                              ("beta: 0.7", None)])
def test_a_changed_default_names_its_method_or_none(tmp_path, change, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(DEFAULT_RECIPE.read_text() + change + "\n")
    assert shipped_default(recipe) == expected


def test_summary_pairs_every_method_with_lora_per_task_and_seed(tmp_path, monkeypatch):
    def method(forgetting, em, task_nll, knowledge):
        return {"forgetting": forgetting, "task_score": em, "train_seconds": 10.0,
                "probes": {"before": {"task_nll": 2.0}, "after": {"task_nll": task_nll},
                           "delta": {"knowledge_mc": knowledge}}}

    compared = []

    def fake_compare(out, overrides, methods, eval_args):  # one method a call; MER's task score differs per seed
        (name,) = methods
        compared.append((overrides["seed"], name))
        em = {42: 0.45, 1: 0.55}[overrides["seed"]]
        topic = "sft_data" in overrides  # where LoRA forgets and scores less than on date
        lora_forgetting, lora_em = (0.1, 0.1) if topic else (0.2, 0.5)
        return {"methods": {name: method(lora_forgetting, lora_em, 1.0, -0.04) if name == "lora"
                            else method(0.05, em, 1.5, -0.01)}}

    monkeypatch.setattr(frontier, "compare", fake_compare)
    ledger, names = Ledger(tmp_path / "ledger.jsonl"), ["lora", "mer_aisteer360_defaults"]
    frontier.run(tmp_path / "a", [42, 1], ["date", "topic"], names, ledger)
    assert compared == [(seed, name) for seed in (42, 1) for _ in ("date", "topic") for name in names]
    # another machine (its task files elsewhere): every unit recorded, the bundled task's and topic's
    frontier.run(tmp_path / "b", [42, 1], ["date", "topic"], names, ledger)
    assert len(compared) == 8
    frontier.run(tmp_path / "b", [42], ["date"], names, ledger, workload="epochs3")  # another workload: new units
    assert len(compared) == 10
    pooled = summarise(tmp_path / "b", [42, 1], ["date"], names, ledger)["methods"]["mer_aisteer360_defaults"]["pooled"]
    assert pooled["removed"]["mean"] == pytest.approx(0.75) and pooled["removed"]["half_width"] == pytest.approx(0)
    assert pooled["kept"]["mean"] == pytest.approx(1.0)
    # kept 0.9 and 1.1 over two seeds: standard deviation 0.1 * sqrt(2), a t interval of 12.706 * 0.1 each side
    assert pooled["kept"]["half_width"] == pytest.approx(12.706 * 0.1, rel=1e-3)
    assert pooled["nll_kept"]["mean"] == pytest.approx(0.5)  # (2.0 - 1.5) / (2.0 - 1.0)
    assert pooled["knowledge_delta"]["mean"] == pytest.approx(-0.01)
    # kept per task: 0.9 and 4.5 at seed 42, 1.1 and 5.5 at seed 1; of the EM summed: 0.9 / 0.6 and 1.1 / 0.6
    both = summarise(tmp_path / "b", [42, 1], ["date", "topic"], names, ledger)["methods"]["mer_aisteer360_defaults"]
    assert both["pooled"]["kept"]["mean"] == pytest.approx(3.0)
    assert both["pooled"]["kept_of_sums"]["mean"] == pytest.approx((0.9 + 1.1) / 0.6 / 2)
    # removed per task: 1 - 0.05 / 0.2 and 1 - 0.05 / 0.1; of the forgetting summed: 1 - 0.1 / 0.3
    assert both["pooled"]["removed"]["mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert both["pooled"]["removed_of_sums"]["mean"] == pytest.approx(1 - 0.1 / 0.3)
    shares_table = frontier.table(summarise(tmp_path / "b", [42, 1], ["date", "topic"], names, ledger))
    rows = [r for r in shares_table.split("Per-probe")[0].splitlines() if r.startswith("|")]
    assert len(rows) == 2 + 2 * 3 and {r.count("|") for r in rows} == {rows[0].count("|")}  # every row every column
    # pooled over tasks means over every task asked for: a task no seed ran leaves nothing pooled
    partial = summarise(tmp_path / "b", [42, 1], ["date", "topic", "reverse"], names, ledger)["methods"]["lora"]
    assert set(partial["per_task"]) == {"date", "topic"} and partial["pooled"] == {} and partial["pooled_seeds"] == 0


def test_a_share_where_lora_scored_or_forgot_nothing_is_undefined_and_the_summary_goes_on(tmp_path, monkeypatch):
    def fake_compare(out, overrides, methods, eval_args):  # LoRA: EM 0 on date at seed 1, forgetting 0 on topic at 42
        (name,) = methods
        topic, seed = "sft_data" in overrides, overrides["seed"]
        lora = (0.0 if topic and seed == 42 else 0.2, 0.0 if not topic and seed == 1 else 0.5)
        forgetting, em = lora if name == "lora" else (0.05, 0.25)
        return {"methods": {name: {"forgetting": forgetting, "task_score": em, "train_seconds": 10.0,
                                   "probes": {"before": {"task_nll": 2.0}, "after": {"task_nll": 1.0},
                                              "delta": {}}}}}

    monkeypatch.setattr(frontier, "compare", fake_compare)
    ledger, names = Ledger(tmp_path / "ledger.jsonl"), ["lora", "mer_aisteer360_defaults"]
    frontier.run(tmp_path, [42, 1], ["date", "topic"], names, ledger)
    summary = summarise(tmp_path, [42, 1], ["date", "topic"], names, ledger)
    mer = summary["methods"]["mer_aisteer360_defaults"]
    assert [mer["per_task"][t][k]["n"] for t in ("date", "topic") for k in ("removed", "kept")] == [2, 1, 1, 2]
    # pooled: seed 42 has every kept share (0.5 and 0.5), seed 1 every removed share (0.75 and 0.75)
    assert mer["pooled"]["kept"] == {"mean": pytest.approx(0.5), "ci": None, "half_width": None, "n": 1}
    assert mer["pooled"]["removed"] == {"mean": pytest.approx(0.75), "ci": None, "half_width": None, "n": 1}
    # of the sums every seed is defined: kept 0.5 / 1.0 at 42 and 0.5 / 0.5 at 1; removed 1 - 0.1 / 0.2, 1 - 0.1 / 0.4
    assert mer["pooled"]["kept_of_sums"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert mer["pooled"]["removed_of_sums"]["mean"] == pytest.approx((0.5 + 0.75) / 2)
    assert "knowledge_delta" not in mer["pooled"]  # the probe was off
    pooled_row = next(r for r in frontier.table(summary).splitlines() if r.startswith("| **mer_aisteer360_defaults"))
    assert "| 75.0% (n=1) |" in pooled_row and "| 50.0% (n=1) |" in pooled_row
    legends = []
    monkeypatch.setattr(Figure, "legend", lambda fig, handles, labels, **kw: legends.append(labels))
    frontier.plot({**summary, "default": "mer_aisteer360_defaults"}, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert legends == [["mer_aisteer360_defaults (shipped default)"]]


# sha256 of json.dumps([train, test]) of each task as the tasks drew them before the frontier split was added: the
# training runs of every frontier stay the same runs
SPLITS_BEFORE = {"date": "f2ff5a1b57554673", "topic": "a87daf447a42cd4f", "reverse": "f4ecc8d3143a61d3",
                 "catalogue": "1b096cd514ee60d5"}


@pytest.mark.parametrize("task", SPLITS_BEFORE)
def test_frontier_split_extends_test_never_meets_train_and_leaves_both_as_they_were(task):
    split = TASKS[task]
    train, test, frontier = split("train"), split("test"), split("frontier")
    assert hashlib.sha256(json.dumps([train, test]).encode()).hexdigest()[:16] == SPLITS_BEFORE[task]
    assert len(frontier) == 300 and frontier[:100] == test
    prompts = [json.dumps(r["messages"][0]) for r in frontier]
    assert len(set(prompts)) == 300 and not set(prompts) & {json.dumps(r["messages"][0]) for r in train}
    if task in ("topic", "catalogue"):  # articles of the replay split only: no probe's held-out title
        assert not any(is_heldout_title(t) for t in re.findall(r'"([^"]+)"|Title: ([^\n]+)', "\n".join(
            r["messages"][0]["content"] for r in frontier)) for t in t if t)


def test_a_task_file_is_rewritten_only_when_it_changes_and_then_whole(tmp_path):
    path = tmp_path / "task" / "train.jsonl"
    write_jsonl(path, [{"a": 1}])
    first = path.stat()
    write_jsonl(path, [{"a": 1}])
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    write_jsonl(path, [{"a": 2}])
    assert path.read_text() == '{"a": 2}\n' and path.stat().st_ino != first.st_ino  # renamed into place
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]
