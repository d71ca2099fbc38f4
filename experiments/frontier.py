"""The learning/forgetting frontier over several tasks and seeds: which objective keeps what the model knew *and*
learns each task as well as plain LoRA does.

    python -m experiments.frontier [OUTPUT_DIR] [--seeds 42 1 2 3 4] [--tasks date topic reverse catalogue]
                                   [--methods NAME ...] [--workload embedded|epochs3] [--docs docs/results]
                                   [--ledger FILE] [--summary-only]

For every seed (outer loop, so that a cut-short run still covers every task) and task (experiments/tasks.py) it runs
`arr compare` on the embedded recipe with the task's training data for each of the methods below, each method's keys
pinned so that a change of the shipped defaults does not change what a name means, and scores the task on its
`frontier` split (300 held-out items). Then, against plain LoRA at the same task, workload and seed: forgetting
removed = 1 - F / F_lora, task score kept = EM / EM_lora (exact match) and task NLL gain kept = (NLL_before - NLL) /
(NLL_before - NLL_lora) (the held-out answers' NLL, continuous), averaged over seeds with a 95% t interval and its
half-width, per task and pooled (the mean over tasks, per seed, then over the seeds that ran every task; beside it
removed and kept of the forgetting and the EM summed over tasks, where no one task dominates; a share is undefined
where LoRA's figure is not above 0, and a pooled mean leaves out a seed with an undefined share), the train
wall time relative to LoRA, and the per-probe deltas (knowledge_mc among them). `default` in frontier.json is the
method whose keys give the shipped configuration (shipped_default). Writes OUTPUT_DIR/frontier.json, frontier.md and
frontier.png (and copies them to --docs when given). Each evaluated (task, seed, method) is added to the ledger
(docs/results/ledger/frontier.jsonl, experiments/ledger.py), which the summary reads and the next call skips, on any
machine; finished runs and evaluations in OUTPUT_DIR are reused too (each TASK/seedN/results.json holds the last
method compared there, one a call). The `epochs3` workload (3 epochs of each task's 200 rows instead of the recipe's
24 steps) writes to TASK-epochs3 folders.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

from arr.compare import compare, method_keys
from arr.config import build_config, expand_method, read_config
from arr.evaluation import EvalArgs
from arr.plots import draw, draw_front, t_interval
from arr.keys import DEFAULT_RECIPE
from arr.train import resolved_config
from bench.overhead import WORKLOADS
from experiments.ledger import LEDGERS, Ledger, run_identity
from experiments.tasks import SIZES, TASKS, write_jsonl

# The headline probes at the sizes of the earlier frontier; the task on its whole frontier split; knowledge_mc at 385
# items, a 95% half-width of at most 5 points on its score whatever the score (1.96 * sqrt(0.5 * 0.5 / 385) = 0.050;
# the base scores 0.54 on these items; the paired delta, which counts only the items that flip, is narrower). MMLU is
# left out: a 135M model is at chance.
PROBE_SIZES = dict(heldout_docs=16, chat_items=32, drift_prompts=8, drift_tokens=24, knowledge_items=385,
                   mmlu_items=0, task_items=SIZES["frontier"])
_OBJECTIVE = dict(beta=1.0, kl_direction="forward", kl_mask_target=False, replay_weight=1.0, ref_cache="none",
                  replay_mode="replace")
_SELF = dict(replay_data="self", self_replay_temperature=0.0)
_TOP64 = dict(ref_cache="topk", ref_cache_topk=64)  # a reference cache of the top 64 log-probs per position
# self-generated replay held by the KL alone, at 1/8, the KL on the replay rows only
_SELF_REPLAY_KL = {**_OBJECTIVE, **_SELF, "kl_on": "replay", "replay_weight": 0.0, "replay_ratio": 0.125}
_A48 = {**_SELF_REPLAY_KL, "kl_mask_target": True, "replay_weight": None, "ref_cache": "auto",
        "ref_cache_topk": 64, "self_replay_max_new_tokens": 48}
METHODS = {
    # plain LoRA; the objective keys, which do nothing without KL and replay, pinned as its runs were trained
    "lora": {"method": "lora", "ref_cache": "none", "replay_data": None, "kl_on": "all", "kl_mask_target": False,
             "replay_weight": 1.0},
    # the default before this benchmark: KL everywhere, Wikipedia replay (CE and KL) at 1/16
    "arr_wiki_all": {**_OBJECTIVE, "kl_on": "all", "replay_data": None, "replay_ratio": 0.0625},
    # the same with Mask-the-Target on the response positions
    "arr_wiki_masked": {**_OBJECTIVE, "kl_on": "all", "kl_mask_target": True, "replay_data": None,
                        "replay_ratio": 0.0625},
    # self-generated replay under the KL alone (no CE on the greedy answers), Mask-the-Target, at 1/8
    "arr_self_kl_masked": {**_OBJECTIVE, **_SELF, "kl_on": "all", "kl_mask_target": True, "replay_weight": 0.0,
                           "replay_ratio": 0.125},
    # the same through a reference cache of the initial model's top 64 log-probs per position (plus the rest's mass)
    "arr_self_kl_masked_top64": {**_OBJECTIVE, **_SELF, "kl_on": "all", "kl_mask_target": True, "replay_weight": 0.0,
                                 "replay_ratio": 0.125, **_TOP64},
    # screened on the date task (seed 42) and dropped, see docs/RESULTS.md:
    # self-generated replay with CE on its greedy answers, KL only where the SFT CE does not train, at 1/8
    "arr_self_prompt": {**_OBJECTIVE, **_SELF, "kl_on": "prompt_and_replay", "replay_ratio": 0.125},
    # self-generated replay with CE on its greedy answers, Mask-the-Target everywhere, at 1/8
    "arr_self_masked": {**_OBJECTIVE, **_SELF, "kl_on": "all", "kl_mask_target": True, "replay_ratio": 0.125},
    # the shipped objective's replay with the KL on replay rows only (no KL on the task's rows, so the reference runs
    # on the replay rows alone: the cheapest placement, docs/PERFORMANCE.md), at 1/8
    "arr_self_replay_kl": _SELF_REPLAY_KL,
    # the same at beta 3: a stronger KL at no extra cost
    "arr_self_replay_kl_b3": {**_SELF_REPLAY_KL, "beta": 3.0},
    # the same as arr_self_replay_kl through a top-64 reference cache of the replay rows (no reference forward in
    # the steps), and that with answers of at most 48 tokens (replay rows a third shorter)
    "arr_self_replay_kl_top64": {**_SELF_REPLAY_KL, **_TOP64},
    # the same run as arr_self_replay_kl_top64 with answers of at most 48 tokens, its keys as the shipped
    # configuration writes them, so that shipped_default finds its variants (kl_mask_target does nothing without a KL
    # on the task's rows, replay_weight null is 0 with self-generated replay, ref_cache auto is the top-64 cache here);
    # at beta 1, the default before issue #28's frontier
    "arr_self_replay_kl_top64_a48": _A48,
    # candidates around it (issue #28): replay added on top of the task's 8 rows a step instead of in place of one
    "arr_self_replay_kl_top64_a48_added": {**_A48, "replay_mode": "add"},
    # more replay (in place), and a weaker and a stronger KL (beta 3: the shipped default, chosen by issue #28)
    "arr_self_replay_kl_top64_a48_r25": {**_A48, "replay_ratio": 0.25},
    "arr_self_replay_kl_top64_a48_r50": {**_A48, "replay_ratio": 0.5},
    "arr_self_replay_kl_top64_a48_b03": {**_A48, "beta": 0.3},
    "arr_self_replay_kl_top64_a48_b3": {**_A48, "beta": 3.0},
    # Mask-the-Target on the task's rows at a small weight of its own (task_kl_beta 0.1) beside the replay KL at 1
    "arr_self_replay_kl_top64_a48_mtt01": {**_A48, "kl_on": "all", "task_kl_beta": 0.1},
    # a peer's recipe: the defaults of the MER control in IBM's AISteer360 (branch MER,
    # aisteer360/algorithms/structural_control/mer, by one of the ARR paper's authors; whether the paper used exactly
    # these is not known): reverse KL over the full vocabulary, beta 0.01, one replay row per task row (on top of
    # the task's), LoRA r 32 / alpha 64, constant lr 1e-4. Two things ARR's keys cannot say as that code does: its
    # KL sits at every labelled position, kl_on all also takes the prompts'; its replay data is the user's, here the
    # packaged Wikipedia replay corpus with its CE.
    "mer_aisteer360_defaults": {**_OBJECTIVE, "kl_direction": "reverse", "beta": 0.01, "kl_on": "all",
                                "replay_data": None, "replay_ratio": 0.5, "replay_mode": "add", "lora_r": 32,
                                "lora_alpha": 64, "learning_rate": 1e-4, "lr_scheduler_type": "constant"},
}
DEFAULT_METHODS = ("lora", "arr_self_replay_kl_top64_a48", "arr_self_replay_kl_top64_a48_added",
                   "arr_self_replay_kl_top64_a48_b3", "mer_aisteer360_defaults")


def shipped_default(recipe: Path = DEFAULT_RECIPE) -> str | None:
    """The METHODS entry whose keys, over `recipe`, give the configuration `recipe` resolves to on every key any
    entry pins: the shipped default, read from arr/config.py's defaults and the embedded recipe. None when no entry
    matches, or when several do (their names would mean the same run)."""
    base = read_config(str(recipe), [])
    shipped = resolved_config(*build_config(base))
    keys = sorted({k for m in METHODS.values() for k in expand_method(m)})
    matches = [name for name, m in METHODS.items()
               if all(resolved_config(*build_config({**base, **m}))[k] == shipped[k] for k in keys)]
    return matches[0] if len(matches) == 1 else None


def folder(out: Path, task: str, workload: str) -> Path:
    return out / (task if workload == "embedded" else f"{task}-{workload}")


def unit_key(overrides: dict, method: str, eval_args: EvalArgs, task: str, workload: str) -> dict:
    """The ledger key of one method's run and evaluation on one (task, workload, seed): the embedded recipe resolved
    with `overrides` and the method's keys, as compare resolves it, and the probes' settings."""
    recipe = read_config(str(DEFAULT_RECIPE), [])
    resolved = resolved_config(*build_config({**recipe, **method_keys(overrides, METHODS[method])}))
    return {"experiment": "frontier", "task": task, "workload": workload, "run": run_identity(resolved),
            "eval": run_identity(vars(eval_args))}


def units(out: Path, seeds: list[int], tasks: list[str], workload: str):
    """(seed, task, the runs' overrides, the probes' settings) of every unit, its task's files written into `out`."""
    for seed in seeds:
        for task in tasks:
            bundled = task == "date"  # the recipe's own task
            data = {} if bundled else {"sft_data": write_jsonl(out / "tasks" / task / "train.jsonl",
                                                               TASKS[task]("train"))}
            test = write_jsonl(out / "tasks" / task / "frontier.jsonl", TASKS[task]("frontier"))
            yield seed, task, {**data, **WORKLOADS[workload], "seed": seed}, EvalArgs(**PROBE_SIZES, task_data=test)


def run(out: Path, seeds: list[int], tasks: list[str], methods: list[str], ledger: Ledger,
        workload: str = "embedded") -> None:
    """Each unit not in `ledger` by `arr compare` of its one method (so that a stopped sweep keeps every finished
    method; the initial model's probe values are cached across calls), added to the ledger when evaluated."""
    out = out.resolve()  # the task files' paths are part of each run's config: the same from any working directory
    for seed, task, overrides, eval_args in units(out, seeds, tasks, workload):
        for method in methods:
            key = unit_key(overrides, method, eval_args, task, workload)
            if ledger.get(key) is not None:
                print(f"==== seed {seed}, task {task}, workload {workload}, {method}: recorded", flush=True)
                continue
            print(f"==== seed {seed}, task {task}, workload {workload}, {method}", flush=True)
            results = compare(folder(out, task, workload) / f"seed{seed}", overrides=overrides,
                              methods={method: METHODS[method]}, eval_args=eval_args)
            result = results["methods"][method]
            ledger.add(key, {**result, "probes": {k: v for k, v in result["probes"].items() if k != "base_model"}},
                       method=method)  # (the base model's path on this machine)


def interval(values: list[float]) -> list[float] | None:
    ci = t_interval(values)
    return list(ci) if ci else None


def stats(values: list[float]) -> dict:
    """Mean, 95% t interval and its half-width (None for fewer than two values)."""
    ci = interval(values)
    return {"mean": statistics.mean(values), "ci": ci, "half_width": (ci[1] - ci[0]) / 2 if ci else None,
            "n": len(values)}


# What each (task, seed) pair gives against plain LoRA's run of the same pair: the shares of the headline, None where
# undefined (and, for the pooled shares of sums, the method's and LoRA's forgetting and task score themselves).
SHARES = ("removed", "kept", "nll_kept", "knowledge_delta")


def ratio(value: float, lora_value: float) -> float | None:
    """value over LoRA's; None unless LoRA's is above 0 (a pair where LoRA forgot, scored or learnt nothing has no
    share; dropping it favours neither side only as far as such pairs are rare, which the table's n= shows)."""
    return value / lora_value if lora_value > 0 else None


def share_removed(forgetting: float, lora_forgetting: float) -> float | None:
    """The share of LoRA's forgetting removed, 1 - F / F_lora; None where that ratio is."""
    left = ratio(forgetting, lora_forgetting)
    return None if left is None else 1 - left


def shares(m: dict, lora: dict) -> dict:
    before, after, lora_after = m["probes"]["before"], m["probes"]["after"], lora["probes"]["after"]
    return {"removed": share_removed(m["forgetting"], lora["forgetting"]),
            "kept": ratio(m["task_score"], lora["task_score"]),
            "nll_kept": ratio(before["task_nll"] - after["task_nll"], before["task_nll"] - lora_after["task_nll"]),
            "knowledge_delta": m["probes"]["delta"].get("knowledge_mc"),
            "forgetting": m["forgetting"], "lora_forgetting": lora["forgetting"],
            "task_score": m["task_score"], "lora_task_score": lora["task_score"]}


def sums(one_seed: list[dict], key: str) -> tuple[float, float]:
    """The method's `key` and LoRA's, each summed over one seed's tasks (their shares() dicts): in a share of the sums
    a task where LoRA forgets or scores little counts for little, where in the mean of the per-task shares it can
    dominate."""
    return sum(sh[key] for sh in one_seed), sum(sh[f"lora_{key}"] for sh in one_seed)


def defined_stats(values: list[float | None]) -> dict | None:
    """stats() of the values that are defined (a share is undefined where LoRA's figure is 0), None if none is."""
    values = [v for v in values if v is not None]
    return stats(values) if values else None


def summarise(out: Path, seeds: list[int], tasks: list[str], methods: list[str], ledger: Ledger,
              workload: str = "embedded") -> dict:
    """frontier.json's content from the units of `ledger` (their task files written into `out`)."""
    tasks = list(dict.fromkeys(tasks))  # a task named twice would count twice in the pooled means
    runs = {}  # (task, seed) -> {method: result}
    for seed, task, overrides, eval_args in units(out.resolve(), seeds, tasks, workload):
        for method in methods:
            result = ledger.get(unit_key(overrides, method, eval_args, task, workload))
            if result is not None:
                runs.setdefault((task, seed), {})[method] = result
    summary = {"tasks": tasks, "seeds": seeds, "workload": workload, "default": shipped_default(),
               "probe_sizes": PROBE_SIZES, "methods": {}}
    for name in methods:
        per_task, by_seed, walls = {}, {}, []
        for task in tasks:
            found = [(seed, runs[task, seed]) for seed in seeds if (task, seed) in runs]
            pairs = [(seed, r[name], shares(r[name], r["lora"])) for seed, r in found if name in r and "lora" in r]
            if not pairs:
                continue
            walls += [m["train_seconds"] / runs[task, seed]["lora"]["train_seconds"] for seed, m, _ in pairs]
            per_task[task] = {
                **{k: figure for k in SHARES if (figure := defined_stats([sh[k] for _, _, sh in pairs]))},
                "seeds": [seed for seed, _, _ in pairs],
                "forgetting": statistics.mean(m["forgetting"] for _, m, _ in pairs),
                "task_score": statistics.mean(m["task_score"] for _, m, _ in pairs),
                "delta": {p: statistics.mean(m["probes"]["delta"][p] for _, m, _ in pairs)
                          for p in pairs[0][1]["probes"]["delta"]}}
            for seed, _, sh in pairs:
                by_seed.setdefault(seed, []).append(sh)
        complete = [v for v in by_seed.values() if len(v) == len(tasks)]  # seeds that ran every task
        per_seed = {k: [None if any(sh[k] is None for sh in v) else statistics.mean(sh[k] for sh in v)
                        for v in complete] for k in SHARES}
        per_seed["removed_of_sums"] = [share_removed(*sums(v, "forgetting")) for v in complete]
        per_seed["kept_of_sums"] = [ratio(*sums(v, "task_score")) for v in complete]
        pooled = {k: figure for k, values in per_seed.items() if (figure := defined_stats(values))}
        summary["methods"][name] = {"per_task": per_task, "pooled": pooled, "pooled_seeds": len(complete),
                                    "wall_ratio": statistics.mean(walls) if walls else None, "config": METHODS[name]}
    return summary


def table(summary: dict) -> str:
    def pct(s: dict | None, seeds: int, signed: bool = False) -> str:
        if not s:
            return "–"
        value = f"{100 * s['mean']:+.1f}" if signed else f"{100 * s['mean']:.1f}%"
        if s["ci"]:
            value += f" [{100 * s['ci'][0]:.0f}, {100 * s['ci'][1]:.0f}] ±{100 * s['half_width']:.1f}"
        return value if s["n"] == seeds else f"{value} (n={s['n']})"  # fewer seeds where a share is undefined

    rows = [f"Workload {summary['workload']}; shipped default: {summary['default']}. Shares of plain LoRA's, mean "
            "over seeds [95% t interval] ±half-width, in points; pooled: the mean over tasks per seed, over the seeds "
            "that ran every task; of sums: the tasks' forgetting or EM summed per seed, against LoRA's sum.", "",
            "| method | task | seeds | forgetting ↓ | task EM ↑ | removed | removed of sums | kept (EM) | "
            "kept of sums (EM) | task-NLL gain kept | Δ knowledge_mc (points) | wall × LoRA |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in summary["methods"].items():
        for task, t in m["per_task"].items():
            n = len(t["seeds"])
            rows.append(f"| {name} | {task} | {n} | {t['forgetting']:+.4f} | {t['task_score']:.3f} | "
                        f"{pct(t.get('removed'), n)} | | {pct(t.get('kept'), n)} | | {pct(t.get('nll_kept'), n)} | "
                        f"{pct(t.get('knowledge_delta'), n, True)} | |")
        p, n = m["pooled"], m["pooled_seeds"]
        wall = "–" if m["wall_ratio"] is None else f"{m['wall_ratio']:.2f}"
        rows.append(f"| **{name}** | **pooled** | {n} | | | {pct(p.get('removed'), n)} | "
                    f"{pct(p.get('removed_of_sums'), n)} | {pct(p.get('kept'), n)} | {pct(p.get('kept_of_sums'), n)} | "
                    f"{pct(p.get('nll_kept'), n)} | {pct(p.get('knowledge_delta'), n, True)} | {wall} |")
    probes = sorted({p for m in summary["methods"].values() for t in m["per_task"].values() for p in t["delta"]})
    rows += ["", "Per-probe deltas (after − before, mean over seeds):", "",
             "| method | task | " + " | ".join(f"Δ {p}" for p in probes) + " |", "|---|---|" + "---:|" * len(probes)]
    for name, m in summary["methods"].items():
        for task, t in m["per_task"].items():
            rows.append(f"| {name} | {task} | " + " | ".join(f"{t['delta'].get(p, float('nan')):+.4f}"
                                                              for p in probes) + " |")
    return "\n".join(rows) + "\n"


def plot(summary: dict, path: Path) -> None:
    """One panel per task and a pooled one: each method's mean (forgetting removed, task score kept) against plain
    LoRA, with its 95% intervals as error bars, and the Pareto front of the means. The legend marks the shipped
    default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*summary["tasks"], "pooled"]
    # each panel its own scale: kept is a ratio to LoRA's EM, in the hundreds where LoRA scores near 0 (reverse)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    names = [n for n in summary["methods"] if n != "lora"]
    for ax, panel in zip(axes, panels):
        means = {}
        for i, name in enumerate(names):
            m = summary["methods"][name]
            t = m["pooled"] if panel == "pooled" else m["per_task"].get(panel)
            if not t or "removed" not in t or "kept" not in t:
                continue
            removed, kept = t["removed"], t["kept"]
            x, y = 100 * removed["mean"], 100 * kept["mean"]
            point = {"x": x, "y": y,
                     "xerr": [[x - 100 * removed["ci"][0]], [100 * removed["ci"][1] - x]] if removed["ci"] else None,
                     "yerr": [[y - 100 * kept["ci"][0]], [100 * kept["ci"][1] - y]] if kept["ci"] else None}
            label = f"{name} (shipped default)" if name == summary["default"] else name
            draw(ax, point, plt.cm.tab10(i), "os^DvP*Xh"[i % 9], label=label if panel == panels[0] else None)
            means[name] = (x, y)
        draw_front(ax, means)
        if means:  # limits from the means: a two-seed 95% interval may span the whole scale
            xs, ys = zip(*means.values())
            ax.set_xlim(min(xs) - 8, max(xs) + 8)
            ax.set_ylim(min(*ys, 100) - 10, max(*ys, 100) + 10)
        ax.axhline(100, color="grey", lw=0.5)
        ax.set_title(panel)
        ax.set_xlabel("forgetting removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("task score kept (% of LoRA)")
    handles, labels = axes[0].get_legend_handles_labels()
    columns = min(5, max(1, len(labels)))  # in rows of five: one row of nine entries runs off the figure
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.02 + 0.06 * math.ceil(len(labels) / columns), 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the whole legend, whatever its rows
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/frontier")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--workload", default="embedded", choices=list(WORKLOADS),
                        help="embedded: the recipe's 24 steps; epochs3: 3 epochs of the task's rows")
    parser.add_argument("--summary-only", action="store_true", help="summarise the units in the ledger, run none")
    parser.add_argument("--ledger", default=str(LEDGERS / "frontier.jsonl"),
                        help="the finished (task, seed, method) units: read first, added to (experiments/ledger.py)")
    parser.add_argument("--docs", default=None, help="also copy frontier.json/.md/.png into this folder")
    args = parser.parse_args()
    out = Path(args.out)
    methods = args.methods if "lora" in args.methods else ["lora", *args.methods]
    ledger = Ledger(args.ledger)
    if not args.summary_only:
        run(out, args.seeds, args.tasks, methods, ledger, args.workload)
    summary = summarise(out, args.seeds, args.tasks, methods, ledger, args.workload)
    stem = "frontier" if args.workload == "embedded" else f"frontier-{args.workload}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{stem}.md").write_text(table(summary))
    plot(summary, out / f"{stem}.png")
    print(table(summary))
    if args.docs:
        for suffix in (".json", ".md", ".png"):
            shutil.copy(out / f"{stem}{suffix}", Path(args.docs) / f"{stem}{suffix}")


if __name__ == "__main__":
    main()
