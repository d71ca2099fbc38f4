"""One fine-tune after another: what a sequence of tasks does to the earlier ones, per method.

    python -m experiments.sequence [OUTPUT_DIR] [--seeds 42 1 2] [--tasks date topic reverse] [--methods ...]
                                   [--task-items 50] [--knowledge-items 385] [--docs docs/results] [--ledger FILE]

Each task is learned from the previous task's adapter (`init_adapter`), in the order given, by `arr train` as a
user runs it: the bundled date task by the embedded recipe (24 steps of 8 at learning rate 1e-3), any other task from
its training file at the defaults for one's own data (3 epochs, learning rate 2e-4; 75 steps for 200 rows). The
default order goes from the task plain LoRA learns most exactly (date) to the one that needs the most drift from the
initial model (reverse), so that each later task has room to overwrite the earlier ones.
Methods (keys pinned, as in experiments/frontier.py):
  lora          plain LoRA, sequentially
  arr           the shipped ARR default at beta 1 (the default its published runs trained) with no earlier-task
                replay (lineage_replay: none)
  arr_lineage   the same with π₀'s answers to the earlier tasks' prompts in its replay (lineage_replay: prompts,
                half the replay rows)
  joint         plain LoRA on all tasks' training data mixed, for as many optimizer steps as plain LoRA's whole
                sequence at the same seed, at the defaults for one's own data: the upper bound of what can be kept
Per method and seed: R[i][j] = task j's exact match on its first --task-items held-out items after training task i
(j <= i; the joint run's one row after it trained), BWT = the mean over earlier tasks j of R[last][j] - R[j][j],
plasticity R[j][j] against LoRA's, the general forgetting after the last task against the original base (the
headline of evaluation.py on experiments/frontier.py's probe sizes), and the wall time of the whole sequence
against LoRA's. Writes OUTPUT_DIR/sequence.json, sequence.md and sequence.png (one heatmap of R per method, its
general forgetting in the title). Each finished (method, seed) is added to the ledger
(docs/results/ledger/sequence.jsonl, experiments/ledger.py) and read from it on the next call, on any machine;
finished runs in OUTPUT_DIR are reused too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from arr import run_folder
from arr.cache import write_atomically
from arr.config import build_config
from arr.compare import finished_run
from arr.keys import DEFAULT_RECIPE, embedded_recipe_applies, override, read_config
from arr.plots import t_interval
from arr.train import resolved_config
from experiments.frontier import PROBE_SIZES
from experiments.ledger import LEDGERS, Ledger, content_hash, run_identity
from experiments.tasks import TASKS, write_jsonl

_LORA = {"method": "lora", "ref_cache": "none", "replay_data": None}
METHODS = {
    "lora": _LORA,
    "arr": {"beta": 1.0, "lineage_replay": "none"},
    "arr_lineage": {"beta": 1.0, "lineage_replay": "prompts", "lineage_replay_share": 0.5},
    "joint": _LORA,
}
SEQUENTIAL = ("lora", "arr", "arr_lineage")


def task_files(out: Path, task: str) -> tuple[str | None, str]:
    """(training file, held-out file) of a task; the bundled date task trains from the recipe's own data."""
    test = write_jsonl(out / "tasks" / task / "test.jsonl", TASKS[task]("test"))
    train = None if task == "date" else write_jsonl(out / "tasks" / task / "train.jsonl", TASKS[task]("train"))
    return train, test


def resolved(keys: dict) -> dict:
    """The configuration `arr train key=value...` (no CONFIG.yaml) trains with `keys`: the embedded recipe's for the
    bundled task, the defaults for one's own data."""
    recipe = read_config(str(DEFAULT_RECIPE), []) if embedded_recipe_applies(None, keys) else {}
    return resolved_config(*build_config({**recipe, **keys}))


def train(run_dir: Path, keys: dict) -> dict:
    """One `arr train` with `keys`, reused when `run_dir` holds a finished run of the same configuration."""
    if not finished_run(run_dir, resolved(keys), resolved_config(*build_config({}))):
        args = [override(k, v) for k, v in keys.items()]
        proc = subprocess.run([sys.executable, "-m", "arr", "train", *args, f"output_dir={run_dir}",
                               "overwrite_output_dir=true", "eval_after=none", "disable_tqdm=true"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"training {run_dir} failed:\n{proc.stderr[-3000:]}")
        print(proc.stdout.strip().splitlines()[-1], flush=True)
    return json.loads((run_dir / run_folder.METRICS).read_text())


def scores(run_dir: Path, tests: list[str], items: int, general: dict | None) -> tuple[list[float], dict | None]:
    """The run's adapter on the original base (its lineage's adapters are not loaded: π₀ is the base): exact match on
    each held-out file, and with `general` (probe sizes) the general probes' before/after
    (evaluation.evaluate_adapter). Kept in the run folder, so that a rerun reads them back."""
    saved = run_dir / "sequence_scores.json"
    adapter = hashlib.sha256((run_dir / "adapter_model.safetensors").read_bytes()).hexdigest()  # a retrained run
    settings = {"tests": tests, "items": items, "general": general, "adapter": adapter}
    found = json.loads(saved.read_text()) if saved.is_file() else {}
    if found.get("settings") == settings:
        return found["row"], found["report"]
    from arr.config import ModelArguments
    from arr.evaluation import EvalArgs, evaluate_adapter, run_base_model, task_scores
    from arr.initial import load_tokenizer, load_trained

    base = run_base_model(run_dir)
    model = load_trained(ModelArguments(), base, run_dir).eval()
    tokenizer = load_tokenizer(str(run_dir))
    row = [task_scores(model, tokenizer, test, items, 16)["task_em"] for test in tests]
    report = evaluate_adapter(model, tokenizer, EvalArgs(**general_probes(general)),
                              cache_before=True) if general else None
    text = json.dumps({"settings": settings, "row": row, "report": report})
    write_atomically(saved, lambda tmp: tmp.write_text(text))
    return row, report


def unit_key(stages: list[dict], tests: list[str], items: int, general: dict) -> dict:
    """The ledger key of one method's sequence at one seed: what each stage trains with (seed included; not
    init_adapter, which the earlier stages of the unit name), the held-out files and the probes."""
    return {"experiment": "sequence", "stages": [run_identity(resolved(keys), ("init_adapter",)) for keys in stages],
            "tests": [content_hash(t) for t in tests], "task_items": items, "general": general_probes(general)}


def general_probes(general: dict) -> dict:
    """The probe sizes of the general probes after the last task (the tasks are scored on their own)."""
    return {**general, "task_items": 0}


def lora_steps(results: dict, seed: int) -> int:
    """The optimizer steps of plain LoRA's whole sequence at `seed`: what joint LoRA trains, so that it sees as many
    updates as the sequence it bounds."""
    if seed not in results.get("lora", {}):
        raise SystemExit(f"joint trains as many steps as plain LoRA's sequence at seed {seed}, which is not finished "
                         "in this folder or the ledger: run it first (--methods lora joint)")
    return sum(results["lora"][seed]["steps"])


def run(out: Path, seeds: list[int], tasks: list[str], methods: list[str], items: int, general: dict,
        ledger: Ledger, finished=lambda results: None) -> dict:
    """Every method's sequence at every seed, each (method, seed) read from `ledger` when recorded there and added
    to it when run; `finished(results)` after each."""
    out = out.resolve()
    files = {task: task_files(out, task) for task in tasks}
    tests = [files[t][1] for t in tasks]
    results = {}  # method -> seed -> {R, forgetting, seconds, steps, delta}
    for seed in seeds:
        for method in methods:
            folder = out / method / f"seed{seed}"
            if method == "joint":
                mixed = [r for t in tasks for r in TASKS[t]("train")]
                data = write_jsonl(out / "tasks" / "joint.jsonl", mixed)
                stages = {"joint": {**METHODS[method], "seed": seed, "sft_data": data,
                                    "max_steps": lora_steps(results, seed)}}
            else:
                stages = {f"{i}_{task}": {**METHODS[method], "seed": seed,
                                          **({"sft_data": files[task][0]} if files[task][0] else {})}
                          for i, task in enumerate(tasks)}
            key = unit_key(list(stages.values()), tests, items, general)
            unit = ledger.get(key)
            if unit is None:
                unit = run_unit(folder, stages, tests, items, general)
                ledger.add(key, unit, method=method)
            else:
                print(f"== seed {seed}, {method}: recorded in {ledger.path}", flush=True)
            print(f"== seed {seed}, {method}: R = {unit['R']}, forgetting {unit['forgetting']:+.4f}", flush=True)
            results.setdefault(method, {})[seed] = unit
            finished(results)
    return results


def run_unit(folder: Path, stages: dict, tests: list[str], items: int, general: dict) -> dict:
    """Train `stages` ({run folder name: keys}) in order, each from the previous one's adapter, and score each on the
    held-out files of the tasks learned so far (a joint run, the one stage, on all); the general probes after the
    last."""
    R, seconds, steps, previous = [], 0.0, [], None
    for i, (name, keys) in enumerate(stages.items()):
        run_dir = folder / name
        metrics = train(run_dir, {**keys, "init_adapter": str(previous) if previous else None})
        seconds += metrics["train_seconds"]
        steps.append(metrics["global_steps"])
        last = i == len(stages) - 1
        row, report = scores(run_dir, tests if len(stages) == 1 else tests[: i + 1], items, general if last else None)
        R.append(row)
        previous = run_dir
    return {"R": R, "forgetting": report["forgetting"], "seconds": seconds, "steps": steps, "delta": report["delta"]}


def bwt(R: list[list[float]]) -> float | None:
    return statistics.mean(R[-1][j] - R[j][j] for j in range(len(R) - 1)) if len(R) > 1 else None


def summarise(results: dict, tasks: list[str], seeds: list[int], items: int, probe_sizes: dict = PROBE_SIZES) -> dict:
    def with_ci(values):
        values = [v for v in values if v is not None]
        return (statistics.mean(values) if values else None), t_interval(values)

    from arr.config import ARRConfig

    summary = {"tasks": tasks, "seeds": seeds, "task_items": items, "probe_sizes": probe_sizes,
               "default": "arr_lineage" if ARRConfig().lineage_replay == "prompts" else "arr", "methods": {}}
    lora = results.get("lora", {})
    for method, per_seed in results.items():
        paired = [s for s in per_seed if s in lora]
        R = [[statistics.mean(per_seed[s]["R"][i][j] for s in per_seed) for j in range(len(row))]
             for i, row in enumerate(next(iter(per_seed.values()))["R"])]
        entry = {"R": R, "config": METHODS[method]}
        shares = {"bwt": [], "bwt_removed": [], "forgetting_removed": [], "kept": [], "wall_ratio": []}
        for s in paired:
            own, base = per_seed[s], lora[s]
            b, b_lora = bwt(own["R"]), bwt(base["R"])
            shares["bwt"].append(b)
            shares["bwt_removed"].append(None if b is None or not b_lora else 1 - b / b_lora)
            shares["forgetting_removed"].append(1 - own["forgetting"] / base["forgetting"] if base["forgetting"]
                                                else None)
            if method != "joint":
                diag = [own["R"][j][j] / base["R"][j][j] for j in range(len(tasks)) if base["R"][j][j]]
                shares["kept"].append(statistics.mean(diag) if diag else None)
            shares["wall_ratio"].append(own["seconds"] / base["seconds"] if own["seconds"] and base["seconds"]
                                        else None)  # (units recovered without their train time)
        entry["ci"] = {}
        for key, values in shares.items():
            entry[key], ci = with_ci(values)
            entry["ci"][key] = list(ci) if ci else None
        entry["forgetting"] = statistics.mean(r["forgetting"] for r in per_seed.values())
        summary["methods"][method] = entry
    return summary


def table(summary: dict) -> str:
    def pct(x, ci=None):
        return "–" if x is None else f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")

    rows = ["| method | BWT (EM) | BWT removed | general forgetting | forgetting removed | kept (R[j][j] / LoRA's) "
            "| wall × LoRA |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in summary["methods"].items():
        b = "–" if m["bwt"] is None else f"{m['bwt']:+.3f}"
        wall = "–" if m["wall_ratio"] is None else f"{m['wall_ratio']:.2f}"
        rows.append(f"| {name} | {b} | {pct(m['bwt_removed'], m['ci']['bwt_removed'])} | {m['forgetting']:+.4f} | "
                    f"{pct(m['forgetting_removed'], m['ci']['forgetting_removed'])} | "
                    f"{pct(m['kept'], m['ci']['kept'])} | {wall} |")
    rows += ["", "R[i][j]: task j's exact match after training task i (mean over seeds):", ""]
    for name, m in summary["methods"].items():
        rows.append(f"{name}: " + "; ".join(", ".join(f"{v:.2f}" for v in row) for row in m["R"]))
    return "\n".join(rows) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, methods = summary["tasks"], summary["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.4))
    for ax, (name, m) in zip(np.atleast_1d(axes), methods.items()):
        grid = np.full((len(m["R"]), len(tasks)), np.nan)
        for i, row in enumerate(m["R"]):
            grid[i, : len(row)] = row
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(m["R"])), ["all" if name == "joint" else f"after {t}" for t in tasks][: len(m["R"])])
        ax.set_title(f"{name}\ngeneral forgetting {m['forgetting']:+.3f}", fontsize=9)
        ax.set_xlabel("task scored (exact match)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/sequence")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["date", "topic", "reverse"], choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="which to run; they run in the order listed in choices, lora always and first (joint "
                             "trains as many steps as its sequence)")
    parser.add_argument("--task-items", type=int, default=50)
    parser.add_argument("--knowledge-items", type=int, default=PROBE_SIZES["knowledge_items"],
                        help="knowledge_mc's questions among the general probes after the last task (0: none)")
    parser.add_argument("--docs", default=None, help="also copy sequence.json/.md/.png into this folder")
    parser.add_argument("--ledger", default=str(LEDGERS / "sequence.jsonl"),
                        help="the finished (method, seed) units: read first, added to (experiments/ledger.py)")
    args = parser.parse_args()
    out = Path(args.out)
    methods = [m for m in METHODS if m in args.methods or m == "lora"]  # LoRA first: joint trains its steps
    general = {**PROBE_SIZES, "knowledge_items": args.knowledge_items}

    def write(results):  # after every (method, seed), so that a stopped sweep leaves what it measured
        summary = summarise(results, args.tasks, sorted({s for r in results.values() for s in r}), args.task_items,
                            general)
        (out / "sequence.json").write_text(json.dumps(summary, indent=2))
        (out / "sequence.md").write_text(table(summary))
        plot(summary, out / "sequence.png")
        return summary

    summary = write(run(out, args.seeds, args.tasks, methods, args.task_items, general, Ledger(args.ledger), write))
    print(table(summary))
    if args.docs:
        for name in ("sequence.json", "sequence.md", "sequence.png"):
            shutil.copy(out / name, Path(args.docs) / name)


if __name__ == "__main__":
    main()
