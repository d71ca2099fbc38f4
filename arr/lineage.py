"""A run's lineage: the earlier runs it continues, one fine-tune after another (`init_adapter` = a finished run
folder, whose own arr_config.yaml records its lineage in turn), each with its task.

What it is for:
- the report scores every earlier task with the adapter off (before this run: π₀, which holds the earlier tasks) and
  on (after), beside its score right after it was learned (that run's own report), and sums them up as backward
  transfer (BWT: the mean over earlier tasks of after - right after learned, in exact match);
- replay holds π₀ on the earlier tasks' inputs (`lineage_replay`): π₀'s own answers to their training prompts join
  the self-generated replay rows, held by the KL as the general ones are (no earlier labels needed), or the earlier
  training examples themselves are rehearsed with the new task's.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import run_folder
from .errors import ConfigError

LINEAGE = "lineage"  # the arr_config.yaml key


def read_lineage(init_adapter: str | None, skip_missing: bool = False, output_dir: str | None = None) -> list[dict]:
    """The lineage of a run started from `init_adapter`, newest first: [] unless it is a finished `arr train` run
    (a plain PEFT adapter has no recorded task). Each entry: {run, sft_data, sft_format, task_data, learned} with
    `learned` the task's scores in that run's own report (eval.json; {} when it has none). A task file that has
    moved is refused with one line unless `skip_missing` (its task is then left out); a cycle (a lineage that names
    a run twice, or names `output_dir`, the run about to be written) is refused."""
    if init_adapter is None or not (Path(init_adapter) / run_folder.CONFIG).is_file():
        return []
    if not run_folder.is_finished(init_adapter):
        raise ConfigError(f"config key init_adapter: {init_adapter!r} is not a finished arr train run (its "
                          f"{run_folder.METRICS} is missing)")
    folder = Path(init_adapter)
    config = yaml.safe_load((folder / run_folder.CONFIG).read_text()) or {}
    entry = {"run": str(folder.absolute()), "sft_data": config.get("sft_data"),
             "sft_format": config.get("sft_format", "auto"),
             "task_data": config.get("eval_data") if config.get("sft_data") else None, "learned": {}}
    try:
        report = json.loads((folder / run_folder.EVAL).read_text())
        entry["learned"] = {k: report["after"][k] for k in ("task_em", "task_nll") if k in report["after"]}
        entry["learned"]["task_items"] = report.get("eval_args", {}).get("task_items")
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    chain = [entry, *config.get(LINEAGE, [])]
    runs = [e["run"] for e in chain] + ([str(Path(output_dir).absolute())] if output_dir else [])
    if len(set(runs)) < len(runs):
        raise ConfigError(f"config key init_adapter: the lineage of {init_adapter!r} is a cycle (it names "
                          f"{next(r for r in runs if runs.count(r) > 1)!r} twice); start from another run")
    for earlier in chain:
        for key in ("sft_data", "task_data"):
            path = earlier[key]
            if path is not None and not Path(path).is_file():
                if not skip_missing:
                    raise ConfigError(f"lineage: the {key} of earlier run {earlier['run']!r} has moved or gone "
                                      f"({path!r}); put it back, or set skip_missing_lineage: true to continue "
                                      "without that task")
                earlier[key] = None
                earlier["missing"] = earlier.get("missing", []) + [key]
    return chain


def recorded_lineage(run_dir: str | Path) -> list[dict]:
    """The lineage a finished run recorded in its arr_config.yaml when it trained."""
    config = yaml.safe_load((Path(run_dir) / run_folder.CONFIG).read_text()) or {}
    return config.get(LINEAGE, [])


def has_training_data(entry: dict) -> bool:
    """Whether an earlier run's training examples can be read: its file, or the bundled date task."""
    return entry["sft_data"] is not None or "missing" not in entry


def has_task(entry: dict) -> bool:
    """Whether an earlier run's task can be scored: held-out data, or the bundled date task."""
    return entry["task_data"] is not None or (entry["sft_data"] is None and "missing" not in entry)


def earlier_prompts(chain: list[dict]) -> list[list[dict]]:
    """The earlier tasks' training prompts (each conversation before its answer), interleaved task by task."""
    from .evaluation import task_examples

    per_task = [[turns for turns, _ in task_examples(entry["sft_data"], None, split="train")]
                for entry in chain if has_training_data(entry)]
    return [task[i] for i in range(max(map(len, per_task), default=0)) for task in per_task if i < len(task)]


def lineage_scores(peft_model, tokenizer, chain: list[dict], items: int, batch_size: int) -> dict:
    """Every earlier task's exact match and answer NLL before this run (π₀) and after it, beside its value right
    after it was learned; and BWT over the tasks whose learned value is known."""
    from .evaluation import task_scores
    from .initial import initial_model

    rows = []
    for entry in chain:
        if not has_task(entry):
            continue
        with initial_model(peft_model):
            before = task_scores(peft_model, tokenizer, entry["task_data"], items, batch_size)
        after = task_scores(peft_model, tokenizer, entry["task_data"], items, batch_size)
        rows.append({"run": entry["run"], "task_data": entry["task_data"], "learned": entry["learned"].get("task_em"),
                     "before": before["task_em"], "after": after["task_em"],
                     "task_nll_before": before["task_nll"], "task_nll_after": after["task_nll"]})
    known = [r["after"] - r["learned"] for r in rows if r["learned"] is not None]
    return {"tasks": rows, "bwt": sum(known) / len(known) if known else None}


def format_lineage(scores: dict) -> str:
    rows = ["| earlier task (run) | learned | before this run | after this run |", "|---|---:|---:|---:|"]
    for r in scores["tasks"]:
        learned = "n/a" if r["learned"] is None else f"{r['learned']:.3f}"
        rows.append(f"| {Path(r['run']).name} | {learned} | {r['before']:.3f} | {r['after']:.3f} |")
    bwt = scores["bwt"]
    rows.append("" if bwt is None else
                f"Backward transfer {bwt:+.3f} exact match: the earlier tasks' mean change since each was learned")
    return "\n".join(rows).rstrip()
