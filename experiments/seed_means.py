"""Averages an `arr compare` results.json over seeds, for the bar of issue 3.

    python -m experiments.seed_means [RESULTS_JSON]    (default docs/results/default.json)

Runs of the same objective and step count that differ only in seed (a method "arr" and its "arr_seed1", whose family
reads "arr (seed 1)") are one row: forgetting and task score averaged over the seeds, and the share of plain LoRA's
forgetting removed and of its task score kept, against LoRA averaged over the same seeds at the same steps and, for
runs of other lengths, at the comparison's own steps too. Only objectives run with more than one seed are printed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from statistics import mean


def run_setting(family: str) -> tuple[str | None, str | None]:
    """("48", "1") for the family "arr (48 steps, seed 1)"; None for a key at the comparison's own value."""
    suffix = re.search(r" \((.*)\)$", family)
    parts = suffix.group(1).split(", ") if suffix else []
    steps = next((p.removesuffix(" steps") for p in parts if p.endswith(" steps")), None)
    seed = next((p.removeprefix("seed ") for p in parts if p.startswith("seed ")), None)
    return steps, seed


def seed_groups(methods: dict) -> dict:
    """{(objective, steps): {seed: (name, method)}}, the objective as a sorted tuple of its keys."""
    groups = {}
    for name, m in methods.items():
        steps, seed = run_setting(m["family"])
        groups.setdefault((tuple(sorted(m["objective"].items())), steps), {})[seed] = (name, m)
    return groups


def share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}"


def seed_table(results: dict) -> str:
    groups = seed_groups(results["methods"])
    lora = {steps: runs for (objective, steps), runs in groups.items()
            if dict(objective)["beta"] == 0 and dict(objective)["replay_ratio"] == 0
            and not dict(objective)["laplace_lambda"]}
    rows = ["| method | steps | seeds | forgetting ↓ | task EM ↑ | removed | kept | removed, kept vs LoRA at the "
            "comparison's steps |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (objective, steps), runs in groups.items():
        if len(runs) < 2:
            continue
        seeds = sorted(runs, key=lambda s: (s is not None, str(s)))  # the comparison's own seed first
        forgetting = mean(runs[s][1]["forgetting"] for s in seeds)
        score = mean(runs[s][1]["task_score"] for s in seeds)
        against = []
        for base_steps in dict.fromkeys((steps, None)):
            base = lora.get(base_steps, {})
            if all(s in base for s in seeds):
                base_forgetting = mean(base[s][1]["forgetting"] for s in seeds)
                base_score = mean(base[s][1]["task_score"] for s in seeds)
                against.append((share(base_forgetting - forgetting, base_forgetting), share(score, base_score)))
        same = against[0] if against else ("–", "–")
        other = ", ".join(against[1]) if len(against) > 1 else "–"
        names = " + ".join(runs[s][0] for s in seeds)
        rows.append(f"| {names} | {steps or 'own'} | {len(seeds)} | {forgetting:+.4f} | {score:.3f} | {same[0]} | "
                    f"{same[1]} | {other} |")
    return "\n".join(rows)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/default.json")
    print(seed_table(json.loads(path.read_text())))
