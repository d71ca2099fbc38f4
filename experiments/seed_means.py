"""Averages an `arr compare` results.json over seeds, for the bar of issue 3.

    python -m experiments.seed_means [RESULTS_JSON]    (default docs/results/default.json)

Runs of the same objective and step count that differ only in seed (each method's "run" keys in results.json) are
one row: forgetting and task score averaged over the seeds, and the share of plain LoRA's
forgetting removed and of its task score kept, against LoRA averaged over the same seeds at the same steps and, for
runs of other lengths, at the comparison's own steps too. Only objectives run with more than one seed are printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

from arr.compare import is_lora


def seed_groups(methods: dict) -> dict:
    """{(objective, steps): {seed: (name, method)}}, the objective as a sorted tuple of its keys."""
    groups = {}
    for name, m in methods.items():
        key = (tuple(sorted(m["objective"].items())), m["run"]["max_steps"])
        groups.setdefault(key, {})[m["run"]["seed"]] = (name, m)
    return groups


def share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}"


def seed_table(results: dict) -> str:
    own = results["run"]
    groups = seed_groups(results["methods"])
    lora = {steps: runs for (_, steps), runs in groups.items() if is_lora(next(iter(runs.values()))[1])}
    rows = ["| method | steps | seeds | forgetting ↓ | task EM ↑ | removed | kept | removed, kept vs LoRA at the "
            "comparison's steps |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (_, steps), runs in groups.items():
        if len(runs) < 2:
            continue
        seeds = sorted(runs, key=lambda s: (s != own["seed"], s))  # the comparison's own seed first
        forgetting = mean(runs[s][1]["forgetting"] for s in seeds)
        score = mean(runs[s][1]["task_score"] for s in seeds)

        def versus_lora(base_steps):
            """(removed, kept) against LoRA at `base_steps` on the same seeds, or None where LoRA lacks a seed."""
            base = lora.get(base_steps, {})
            if not all(s in base for s in seeds):
                return None
            base_forgetting = mean(base[s][1]["forgetting"] for s in seeds)
            base_score = mean(base[s][1]["task_score"] for s in seeds)
            return share(base_forgetting - forgetting, base_forgetting), share(score, base_score)

        same = versus_lora(steps) or ("–", "–")
        other = versus_lora(own["max_steps"]) if steps != own["max_steps"] else None
        other = ", ".join(other) if other else "–"
        names = " + ".join(runs[s][0] for s in seeds)
        rows.append(f"| {names} | {'own' if steps == own['max_steps'] else steps} | {len(seeds)} | {forgetting:+.4f} | "
                    f"{score:.3f} | {same[0]} | {same[1]} | {other} |")
    return "\n".join(rows)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/default.json")
    print(seed_table(json.loads(path.read_text())))
