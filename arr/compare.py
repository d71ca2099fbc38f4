"""`arr compare`: train plain LoRA, KL only, replay only, ARR, adaptive ARR and Laplace on the same data and seed,
evaluate each with the probes of arr/evaluation.py against one shared "before", and write results.json, results.md
and results.png.

Each training run is its own `arr train` process, so its wall time and peak memory are its own. A method whose
folder already holds a finished run of the same configuration is not trained again, and its evaluation, kept in its
folder as `arr eval` keeps it (eval.json), is reused when it used the same probe sizes: adding a method to a
comparison costs one run, and comparing a subset of methods loses no other method's evaluation (results.json, .md
and .png list the methods of the latest call).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from . import run_folder
from .cache import write_atomically
from .config import NOT_RESULT_KEYS, build_config
from .evaluation import (
    EvalArgs,
    before_values,
    evaluate_adapter,
    format_table,
    headline_forgetting,
    initial_drift_answers,
    load_run,
    probes_that_run,
    reusable_evaluation,
    run_base_model,
)
from .initial import initial_model
from .keys import DEFAULT_RECIPE, METHODS as PRESETS, as_config, expand_method, override, read_config
from .plots import draw, draw_front, mean_point
from .lineage import lineage_scores, recorded_lineage
from .train import resolved_config

METHODS = {name: {"method": name} for name in PRESETS}  # every preset of config.py, under its own name
OBJECTIVE_KEYS = ("beta", "kl_on", "kl_direction", "kl_mask_target", "task_kl_beta", "replay_data", "replay_ratio",
                  "replay_mode", "kl_target", "laplace_lambda")
# --quick: 8 steps of 4 sequences, small probes, and the adaptive method left out (in 8 steps its controller barely
# moves beta off its start, so it repeats ARR). Its run time is in docs/RESULTS.md.
QUICK = {"train": {"max_steps": 8, "per_device_train_batch_size": 4},
         "eval": dict(heldout_docs=12, knowledge_items=16, mmlu_items=12, chat_items=16, drift_prompts=6,
                      drift_tokens=24, task_items=24),
         "methods": {name: keys for name, keys in METHODS.items() if name != "arr_adaptive"}}


def train_run(name: str, config_path: Path, overrides: dict, out: Path) -> dict:
    args = [override(k, v) for k, v in overrides.items()]
    proc = subprocess.run([sys.executable, "-m", "arr", "train", str(config_path), *args, f"output_dir={out}",
                           "overwrite_output_dir=true",  # a finished run of another configuration is replaced
                           "eval_after=none"],  # compare evaluates every method against one shared "before"
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training {name} failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return json.loads((out / run_folder.METRICS).read_text())


def finished_run(run_dir: Path, wanted: dict, defaults: dict) -> bool:
    """Whether `run_dir` holds a finished `arr train` run of the resolved configuration `wanted` (then it is
    reused). Keys in NOT_RESULT_KEYS may differ, and a key added to the config since has to hold its default."""
    if not run_folder.is_finished(run_dir):
        return False
    ran = {**defaults, **as_config(yaml.safe_load((run_dir / run_folder.CONFIG).read_text()))}
    return all(ran.get(k) == v for k, v in wanted.items() if k not in NOT_RESULT_KEYS)


def method_keys(overrides: dict, method_overrides: dict) -> dict:
    """The keys a comparison trains a method with, over its config file: its overrides, and the method's keys, which
    win."""
    return {**overrides, **expand_method(method_overrides)}


def compare(out_dir: str | Path, config_path: str | Path = DEFAULT_RECIPE, overrides: dict | None = None,
            methods: dict | None = None, eval_args: EvalArgs | None = None) -> dict:
    """Train (or reuse, when `out_dir/METHOD` already holds the same finished run) and evaluate each method (or
    reuse the evaluation in its folder made with the same probe sizes)."""
    out_dir, overrides, methods = Path(out_dir), overrides or {}, methods or METHODS
    eval_args = eval_args or EvalArgs()
    out_dir.mkdir(parents=True, exist_ok=True)
    results_json = out_dir / run_folder.RESULTS_JSON
    recipe, defaults = read_config(str(config_path), []), resolved_config(*build_config({}))
    own = {k: v for k, v in resolved_config(*build_config({**recipe, **overrides})).items() if k in RUN_KEYS}
    results, before = {"config": str(config_path), "overrides": overrides, "eval_args": vars(eval_args),
                       "run": own, "methods": {}}, None
    drift_answers = None
    for name, method_overrides in methods.items():
        run_dir, keys = out_dir / name, method_keys(overrides, method_overrides)
        wanted = resolved_config(*build_config({**recipe, **keys}))
        if finished_run(run_dir, wanted, defaults):
            print(f"== {name}: reusing the finished run in {run_dir}", flush=True)
            metrics = json.loads((run_dir / run_folder.METRICS).read_text())
        else:
            print(f"== {name}: training", flush=True)  # (arr train removes the replaced run's eval.json)
            metrics = train_run(name, Path(config_path), keys, run_dir)
        base_model = run_base_model(run_dir)
        saved = reusable_evaluation(run_dir, eval_args, base_model)
        if saved:
            print(f"== {name}: reusing its evaluation", flush=True)
            probes = {**saved, "forgetting": headline_forgetting(saved["delta"])}  # the headline as defined now
            before = before or probes["before"]
        else:
            print(f"== {name}: evaluating", flush=True)
            model, tokenizer = load_run(run_dir, base_model)
            if before is None:  # the initial model's, shared by every method and kept in $ARR_CACHE for every
                # later comparison on the same initial model (a frontier's other tasks and seeds)
                before, drift_answers = before_values(model, tokenizer, eval_args, cache=True)
            elif drift_answers is None and "behaviour_kl" in probes_that_run(eval_args):  # (before: a saved one)
                with initial_model(model):
                    drift_answers = initial_drift_answers(model, tokenizer, eval_args)
            probes = {**evaluate_adapter(model, tokenizer, eval_args, before, drift_answers), "base_model": base_model}
            chain = recorded_lineage(run_dir)  # compared on top of earlier runs: their tasks too
            if chain:
                probes["lineage"] = lineage_scores(model, tokenizer, chain, eval_args.task_items, eval_args.batch_size)
            write_atomically(run_dir / run_folder.EVAL, lambda tmp: tmp.write_text(json.dumps(probes, indent=2)))
        objective = {k: v for k, v in wanted.items() if k in OBJECTIVE_KEYS}
        results["methods"][name] = {
            "forgetting": probes["forgetting"], "task_score": probes["after"]["task_em"],
            "train_seconds": metrics["train_seconds"], "peak_mem_mb": metrics["peak_mem_mb"],
            "curvature_seconds": metrics.get("curvature", {}).get("seconds", 0.0),
            "objective": objective, "run": {k: wanted[k] for k in RUN_KEYS}, "probes": probes,
            **({"bwt": probes["lineage"]["bwt"]} if "lineage" in probes else {}),
            **family_and_strength(objective, {k: wanted[k] for k in RUN_KEYS if wanted[k] != own[k]}),
        }
        lora = next((m["forgetting"] for m in results["methods"].values()  # (at the same steps and seed)
                     if is_lora(m) and m["run"] == results["methods"][name]["run"]), None)
        print(format_table(probes, *[(lora, "plain LoRA in this comparison")] if lora is not None else []),
              flush=True)
        results_json.write_text(json.dumps(results, indent=2))  # after each method: nothing lost
    (out_dir / run_folder.RESULTS_MD).write_text(markdown_table(results))
    plot(results, out_dir / run_folder.RESULTS_PNG)
    return results


# Training keys that make a run a family of its own when they differ from the comparison's: "arr (48 steps, seed 1)".
RUN_KEYS = {"max_steps": "{} steps", "seed": "seed {}"}


def family_and_strength(objective: dict, setting: dict | None = None) -> dict:
    """Which method a configuration is, and the knob that sets how hard it holds the model (for the curves).
    `setting` holds the RUN_KEYS in which the run differs from the comparison's own; they name a family of their own."""
    suffix = f" ({', '.join(RUN_KEYS[k].format(v) for k, v in setting.items())})" if setting else ""
    kl_on, replay_on = objective["beta"] > 0 or bool(objective.get("task_kl_beta")), objective["replay_ratio"] > 0
    if objective["laplace_lambda"] > 0:
        family = "laplace" + "+kl" * kl_on + "+replay" * replay_on
        return {"family": family + suffix, "strength": ("laplace_lambda", objective["laplace_lambda"])}
    if objective["kl_target"] is not None:
        return {"family": "arr_adaptive" + suffix, "strength": ("kl_target", objective["kl_target"])}
    family = {(True, True): "arr", (True, False): "kl_only", (False, True): "replay_only", (False, False): "lora"}[
        (kl_on, replay_on)]
    knob = "replay_ratio" if family == "replay_only" else "beta"
    split = "+task_kl" if objective.get("task_kl_beta") is not None else ""  # a curve of its own beside beta's
    return {"family": family + split + suffix, "strength": None if family == "lora" else (knob, objective[knob])}


def is_lora(method: dict) -> bool:
    """Whether a results.json method is plain LoRA, at any steps and seed: the baseline of "removed" and "kept"."""
    return method["family"].startswith("lora")


def markdown_table(results: dict) -> str:
    """One row per method. "removed" and "kept" compare it with plain LoRA (the method family "lora") trained with
    the same run keys (steps and seed): the share of LoRA's forgetting it removes and of LoRA's task score it keeps,
    the two halves of the bar in docs/RESULTS.md."""
    methods = results["methods"]
    probe_names = list(next(iter(methods.values()))["probes"]["after"])
    lora = {tuple(m["run"].items()): m for m in methods.values() if is_lora(m)}
    head = ("| method | beta | kl_on | task_kl_beta | kl_direction | replay_ratio | kl_target | laplace_lambda | "
            "forgetting ↓ | task EM ↑ | removed | kept | " + " | ".join(f"Δ {p}" for p in probe_names) +
            " | train s | peak MB |")
    rows = [head, "|" + "---|" * (14 + len(probe_names))]
    for name, m in methods.items():
        o, base = m["objective"], lora.get(tuple(m["run"].items()))
        removed = f"{1 - m['forgetting'] / base['forgetting']:.1%}" if base and base["forgetting"] > 0 else "–"
        kept = f"{m['task_score'] / base['task_score']:.1%}" if base and base["task_score"] > 0 else "–"
        deltas = " | ".join(f"{m['probes']['delta'][p]:+.4f}" for p in probe_names)
        rows.append(f"| {name} | {o['beta']} | {o['kl_on']} | {'–' if o.get('task_kl_beta') is None else o['task_kl_beta']} | "
                    f"{o['kl_direction']} | {o['replay_ratio']} | "
                    f"{o['kl_target'] if o['kl_target'] else '–'} | {o['laplace_lambda'] or '–'} | "
                    f"{m['forgetting']:+.4f} | {m['task_score']:.3f} | {removed} | {kept} | {deltas} | "
                    f"{m['train_seconds']:.0f} | {m['peak_mem_mb']:.0f} |")
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    """Task score against forgetting. Runs that differ only in seed are one mean point with 95% intervals; a method run
    at several strengths is a curve (each point labelled with its strength); a family run at other steps has hollow
    markers in its colour; the Pareto front of the means is dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = {}  # (base family, run suffix) -> {(strength, objective): [the same method over seeds]}
    for m in results["methods"].values():
        family = re.sub(r"(, )?seed \d+", "", m.get("family", "")).replace(" ()", "")
        base, _, suffix = family.partition(" (")
        strength = m["strength"][1] if m.get("strength") else None
        same_objective = (strength, json.dumps(m["objective"], sort_keys=True))  # only seeds are averaged
        groups.setdefault((base, suffix.rstrip(")")), {}).setdefault(same_objective, []).append(m)
    bases = list(dict.fromkeys(base for base, _ in groups))
    suffixes = list(dict.fromkeys(suffix for _, suffix in groups if suffix))
    fig, ax = plt.subplots(figsize=(9, 5))
    means = {}
    for (base, suffix), by_strength in groups.items():
        color, marker = plt.cm.tab10(bases.index(base) % 10), "osD^vP*Xh"[bases.index(base) % 9]
        points = []
        for (strength, _), members in sorted(by_strength.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
            point = mean_point([m["forgetting"] for m in members], [m["task_score"] for m in members])
            draw(ax, point, color, marker, filled=not suffix)
            points.append((point["x"], point["y"]))
            means[f"{base}|{suffix}|{strength}"] = points[-1]
            if strength is not None and len({k for k, _ in by_strength}) > 1:
                ax.annotate(f"{strength:g}", points[-1], textcoords="offset points", xytext=(4, 4), fontsize=7)
        if len(points) > 1 and len({strength for strength, _ in by_strength}) == len(points):  # a sweep: a curve
            ax.plot(*zip(*points), color=color, lw=1.2, ls="-" if not suffix else ":")
    draw_front(ax, means, x_higher_is_better=False)
    xs, ys = zip(*means.values())  # limits from the means: a two-seed 95% interval may span the whole scale
    pad_x, pad_y = 0.08 * (max(xs) - min(xs) or 1), 0.08 * (max(ys) - min(ys) or 1)
    ax.set_xlim(min(0, min(xs)) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    handles = [Line2D([], [], color=plt.cm.tab10(i % 10), marker="osD^vP*Xh"[i % 9], ls="", label=base)
               for i, base in enumerate(bases)]
    handles += [Line2D([], [], color="grey", marker="o", markerfacecolor="white", ls="", label=f"hollow: {suffix}")
                for suffix in suffixes]
    handles += [Line2D([], [], color="grey", ls="--", label="Pareto front of the means")]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: it hid points
    ax.set_xlabel("forgetting (nats/token, after − before; lower is better)")
    ax.set_ylabel("new-task exact match (higher is better)")
    ax.set_title("What each method learned vs. what it forgot (mean over seeds, 95% intervals)")
    ax.axvline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
