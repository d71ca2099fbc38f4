"""experiments/ledger.py: a unit is named by what it learns, not where it ran, and the last line of a key wins."""

from experiments.ledger import Ledger, run_identity


def test_a_run_is_named_by_its_data_not_its_paths_and_the_last_line_wins(tmp_path):
    for folder, text in (("a", "row\n"), ("b", "row\n"), ("c", "other row\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_text(text)

    def key(folder, **more):
        return run_identity({"sft_data": str(tmp_path / folder / "train.jsonl"), "seed": 1, "output_dir": folder,
                             "init_adapter": "x", **more}, leave_out=("init_adapter",))

    assert key("a") == key("b") != key("c")
    assert set(key("a")) == {"sft_data", "seed"} and key("a", seed=2) != key("a")
    ledger = Ledger(tmp_path / "ledger" / "units.jsonl")
    assert ledger.get(key("a")) is None
    ledger.add(key("a"), {"forgetting": 0.1}, method="lora")
    ledger.add(key("c"), {"forgetting": 0.3})
    ledger.add(key("b"), {"forgetting": 0.2})
    assert ledger.get(key("a")) == {"forgetting": 0.2} and ledger.get(key("c")) == {"forgetting": 0.3}
