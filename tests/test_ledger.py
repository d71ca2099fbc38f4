"""experiments/ledger.py: a unit is named by what it learns, not where it ran; a field added since it was recorded
matches at its default; the last line of a key wins, and a line cut short by a crash is skipped."""

from experiments.ledger import Ledger, defaults, run_identity


def test_a_run_is_named_by_its_data_not_its_paths_and_the_last_line_wins(tmp_path):
    for folder, text in (("a", "row\n"), ("b", "row\n"), ("c", "other row\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_text(text)

    def key(folder, **more):
        return run_identity({"sft_data": str(tmp_path / folder / "train.jsonl"), "seed": 1, "output_dir": folder,
                             "init_adapter": "x", "replay_data": "self", **more}, leave_out=("init_adapter",))

    assert key("a") == key("b") != key("c")
    assert set(key("a")) == {"sft_data", "seed", "replay_data"} and key("a")["replay_data"] == "self"
    ledger = Ledger(tmp_path / "ledger" / "units.jsonl")
    assert ledger.get(key("a")) is None
    ledger.add(key("a"), {"forgetting": 0.1}, method="lora")
    ledger.add(key("c"), {"forgetting": 0.3})
    ledger.add(key("b"), {"forgetting": 0.2})
    assert ledger.get(key("a")) == {"forgetting": 0.2} and ledger.get(key("c")) == {"forgetting": 0.3}
    assert ledger.get(dict(reversed(key("c").items()))) == {"forgetting": 0.3}  # the order of fields is no matter
    assert ledger.get(key("a", seed=2)) is None


def test_a_field_added_since_matches_at_its_default_and_a_cut_line_is_skipped(tmp_path):
    ledger = Ledger(tmp_path / "units.jsonl")
    ledger.add({"run": {"seed": 1}}, {"forgetting": 0.1})
    assert defaults()["task_kl_beta"] is None and defaults()["learning_rate"] == 2e-4
    assert ledger.get({"run": {"seed": 1, "task_kl_beta": None}}) == {"forgetting": 0.1}
    assert ledger.get({"run": {"seed": 1, "task_kl_beta": 0.1}}) is None
    assert ledger.get({"run": {"seed": 1, "a_key_of_no_default": 0}}) is None
    with open(ledger.path, "a") as f:
        f.write('{"key": {"run": {"seed": 2}}, "res')  # a crash in the middle of a line
    assert ledger.get({"run": {"seed": 2}}) is None
    ledger.add({"run": {"seed": 2}}, {"forgetting": 0.2})
    assert ledger.get({"run": {"seed": 2}}) == {"forgetting": 0.2} and len(ledger.entries()) == 2


def test_a_read_follows_the_file_and_a_caller_cannot_change_what_it_holds(tmp_path):
    ledger, other = Ledger(tmp_path / "units.jsonl"), Ledger(tmp_path / "units.jsonl")
    ledger.add({"run": {"seed": 1}}, {"forgetting": 0.1})
    ledger.get({"run": {"seed": 1}})["forgetting"] = 9.0
    ledger.entries()[0]["result"]["forgetting"] = 9.0
    assert ledger.get({"run": {"seed": 1}}) == {"forgetting": 0.1}
    other.add({"run": {"seed": 2}}, {"forgetting": 0.2})  # another sweep's line
    assert ledger.get({"run": {"seed": 2}}) == {"forgetting": 0.2}
    replaced = tmp_path / "replaced.jsonl"  # a file of the same size put in its place (a git checkout)
    replaced.write_text(ledger.path.read_text().replace("0.1", "0.3"))
    replaced.replace(ledger.path)
    assert ledger.get({"run": {"seed": 1}}) == {"forgetting": 0.3}
