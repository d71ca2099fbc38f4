"""`arr compare`: train plain LoRA, KL only, replay only and ARR on the same data and seed, evaluate each with the
probes of arr/evaluation.py against one shared "before", and write results.json, results.md and results.png.

Each training run is its own `arr train` process, so its wall time and peak memory are its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from .evaluation import EvalArgs, evaluate_adapter, format_table, load_run, run_probes
from .resources import DEFAULT_RECIPE

METHODS = {  # method -> the objective keys it sets; everything else comes from the recipe and the overrides
    "lora": {"beta": 0.0, "replay_ratio": 0.0},
    "kl_only": {"replay_ratio": 0.0},
    "replay_only": {"beta": 0.0},
    "arr": {},
}
QUICK = {"train": {"max_steps": 8}, "eval": dict(heldout_docs=16, knowledge_items=24, mmlu_items=24,
                                                  chat_items=32, drift_prompts=6, drift_tokens=24, task_items=24)}


def train_run(name: str, config_path: Path, overrides: dict, out: Path) -> dict:
    args = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]
    proc = subprocess.run([sys.executable, "-m", "arr", "train", str(config_path), *args, f"output_dir={out}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training {name} failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return json.loads((out / "metrics.json").read_text())


def compare(out_dir: str | Path, config_path: str | Path = DEFAULT_RECIPE, overrides: dict | None = None,
            methods: dict | None = None, eval_args: EvalArgs | None = None) -> dict:
    out_dir, overrides, methods = Path(out_dir), overrides or {}, methods or METHODS
    eval_args = eval_args or EvalArgs()
    out_dir.mkdir(parents=True, exist_ok=True)
    results, before = {"config": str(config_path), "overrides": overrides, "eval_args": vars(eval_args),
                       "methods": {}}, None
    for name, method_overrides in methods.items():
        print(f"== {name}: training", flush=True)
        metrics = train_run(name, Path(config_path), {**overrides, **method_overrides}, out_dir / name)
        print(f"== {name}: evaluating", flush=True)
        model, tokenizer = load_run(out_dir / name)
        if before is None:
            with model.disable_adapter():
                before = run_probes(model.eval(), tokenizer, eval_args)
        probes = evaluate_adapter(model, tokenizer, eval_args, before=before)
        resolved = yaml.safe_load((out_dir / name / "arr_config.yaml").read_text())
        results["methods"][name] = {
            "forgetting": probes["forgetting"], "task_score": probes["after"]["task_em"],
            "train_seconds": metrics["train_seconds"], "peak_mem_mb": metrics["peak_mem_mb"],
            "objective": {k: resolved[k] for k in ("beta", "kl_on", "kl_direction", "replay_ratio")},
            "probes": probes,
        }
        print(format_table(probes), flush=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(markdown_table(results))
    plot(results, out_dir / "results.png")
    return results


def markdown_table(results: dict) -> str:
    methods = results["methods"]
    probe_names = list(next(iter(methods.values()))["probes"]["after"])
    head = "| method | beta | replay_ratio | forgetting ↓ | task EM ↑ | " + " | ".join(f"Δ {p}" for p in probe_names)
    head += " | train s | peak MB |"
    rows = [head, "|" + "---|" * (7 + len(probe_names))]
    for name, m in methods.items():
        deltas = " | ".join(f"{m['probes']['delta'][p]:+.4f}" for p in probe_names)
        rows.append(f"| {name} | {m['objective']['beta']} | {m['objective']['replay_ratio']} | {m['forgetting']:+.4f} "
                    f"| {m['task_score']:.3f} | {deltas} | {m['train_seconds']:.0f} | {m['peak_mem_mb']:.0f} |")
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, m in results["methods"].items():
        ax.scatter(m["forgetting"], m["task_score"], s=60)
        ax.annotate(name, (m["forgetting"], m["task_score"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("forgetting (nats/token, after − before; lower is better)")
    ax.set_ylabel("new-task exact match (higher is better)")
    ax.set_title("What each method learned vs. what it forgot")
    ax.axvline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
