"""The `arr` command. `arr train [CONFIG.yaml] [key=value ...]`: the YAML keys and the overrides are the fields of
`ModelArguments`, `DataArguments` and `ARRConfig` (arr/config.py); `arr train --help` lists them all.

Bad input of any kind prints one line, `arr: error: ...`, naming the key or the file and line, and exits with 2;
`--debug` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import traceback
import warnings
from pathlib import Path


from .errors import ARRError, ConfigError
from .keys import (
    DEFAULT_RECIPE,
    check_values,
    describe_keys,
    embedded_recipe_applies,
    expand_method,
    read_config,
    table,
    train_help,
)

# Each command's usage, for `arr --help` and the command's own --help. Nothing heavy (torch, transformers) is imported
# before the arguments are parsed, so that help and argument errors come back at once.
COMMANDS = {
    "train": """train [CONFIG.yaml] [key=value ...] [--resume] [--debug]
        Fine-tune. With neither a config nor sft_data: the embedded default recipe (arr/recipes/default.yaml),
        SmolLM2-135M-Instruct on the bundled date task, whose settings it prints; otherwise the defaults that
        `arr train --help` lists, with ARR's keys explained (`--help-all`: every Trainer option too).
        eval.KEY=VALUE sizes a probe of the report after training (arr eval --help lists them), e.g. a
        smaller eval.knowledge_items on a slow machine.
        e.g.  arr train my.yaml sft_data=my_task.jsonl beta=0.5 output_dir=runs/my-task""",
    "eval": """eval RUN_DIR [key=value ...] [--debug]
        What did the run forget and learn? General-capability probes with the adapter off (before) and on
        (after), on data the replay corpus never contains, and the new-task score. Writes RUN_DIR/eval.json.
        `arr eval --help` lists the probe sizes.
        e.g.  arr eval runs/my-task task_data=my_task_test.jsonl""",
    "compare": """compare [CONFIG.yaml] [key=value ...] [--quick] [--methods METHODS.yaml] [--debug]
        Train plain LoRA, KL only, replay only, ARR, adaptive ARR and Laplace with the same data and seed
        (CONFIG, by default the embedded recipe, plus your overrides), evaluate each, and write results.json,
        results.md and results.png to output_dir (default runs/compare). --quick: 8 steps of 4 sequences, small
        probes, no arr_adaptive (about 3 minutes on 2 CPU cores once the self-replay answers are cached; see
        docs/RESULTS.md). METHODS.yaml maps method names to config keys, e.g.
        `laplace_100: {method: laplace, laplace_lambda: 100}`; a method run at several strengths is drawn as a
        curve. eval.KEY=VALUE sets a probe option (arr eval --help lists them).
        e.g.  arr compare my.yaml --quick output_dir=runs/compare""",
}
USAGE = f"""usage: arr <command> [options]

Fine-tune causal language models with LoRA without forgetting (Approximate Regularized Replay).

commands:
{chr(10).join("  " + usage for usage in COMMANDS.values())}

Set-ups for several processes or GPUs go through accelerate: `accelerate launch -m arr train CONFIG.yaml`.
"""


def wants_help(args: list[str]) -> bool:
    return "-h" in args or "--help" in args


def train_command(args: list[str]) -> int:
    if wants_help(args) or "--help-all" in args:
        print(train_help(every_option="--help-all" in args))
        return 0
    flags = {a for a in args if a in ("--resume", "--debug")}
    rest = [a for a in args if a not in flags]
    unknown_flags = [a for a in rest if a.startswith("--")]
    if unknown_flags:
        raise ConfigError(f"unknown flag {unknown_flags[0]!r}; options are key=value (see arr train --help)")
    config_path = rest[0] if rest and "=" not in rest[0] else None
    overrides = rest[1:] if config_path else rest
    values = read_config(config_path, overrides)
    report_sizes = eval_keys(values)
    check_values(expand_method(values), "train", "config key")  # before torch is imported
    check_values(report_sizes, "eval", "eval key")
    if report_sizes and values.get("eval_after") == "none" and not values.get("probe_steps"):
        raise ConfigError(f"eval key {next(iter(report_sizes))}: eval.* keys size the report after training and the "
                          "probe_steps rounds, and eval_after=none with no probe_steps runs neither")
    if "task_data" in report_sizes:
        raise ConfigError("eval key task_data: the report's held-out task examples are the config key eval_data")

    from .config import build_config

    # The recipe is a demo sized for the bundled task on 2 CPU cores (24 steps at a high constant learning rate):
    # a user's own data gets the defaults --help shows, and the demo says what it changes.
    if embedded_recipe_applies(config_path, values):
        recipe = read_config(str(DEFAULT_RECIPE), [])
        print(f"No CONFIG.yaml and no sft_data: the embedded default recipe {DEFAULT_RECIPE} (the bundled date task) "
              f"sets {', '.join(f'{k}={v}' for k, v in recipe.items())}; other keys are as arr train --help lists",
              flush=True)
        values = read_config(str(DEFAULT_RECIPE), overrides)
        eval_keys(values)
    model_args, data_args, config = build_config(values)
    typed = make_eval_args(report_sizes)
    report_sizes = {k: getattr(typed, k) for k in report_sizes}

    from .train import Interrupted, run

    try:
        metrics = run(model_args, data_args, config, resume="--resume" in flags, report_sizes=report_sizes)
    except Interrupted as e:
        resume = shlex.join(["arr", "train", *(a for a in args if a != "--resume"), "--resume"])
        print(f"arr: {e}; resume with: {resume}", file=sys.stderr)
        return e.exit_status
    if not config.should_log:  # only the main process reports
        return 0
    print(closing_lines(metrics, config.output_dir))
    return 0


def eval_keys(values: dict) -> dict:
    """The eval.KEY=VALUE entries of `values`, taken out and without their prefix."""
    return {k.removeprefix("eval."): values.pop(k) for k in list(values) if k.startswith("eval.")}


def closing_lines(metrics: dict, out: str) -> str:
    """The report's table and the line that ends `arr train`: the means over the run of the loss parts it trains."""
    from . import run_folder

    lines = []
    if "eval" in metrics:
        kept = metrics["eval"].get("kept_step")
        lines += ["\nWhat the run forgot and learned (adapter off = before, on = after"
                  + (f"; the adapter of step {kept}, the newest within forgetting_budget" if kept is not None else "")
                  + f"; {metrics['eval']['seconds']:.0f}s):", report_text(metrics["eval"]) + "\n"]
    budget = metrics.get("forgetting_budget") or {}
    if budget.get("crossed_at") is not None:
        lines.append(f"forgetting_budget {budget['budget']} was crossed at step {budget['crossed_at']}: the adapter "
                     f"written is step {budget['kept_step']}'s")
    means = ", ".join(f"{k}={v:.4f}" for k, v in metrics["means"].items())
    lines.append(f"done in {metrics['train_seconds']:.0f}s, {metrics['global_steps']} steps; means over the run: "
                 + means + f"; adapter in {out}, with {run_folder.CONFIG}, {run_folder.METRICS}"
                 + (f" and the report {run_folder.EVAL}, {run_folder.REPORT_PNG}" if "eval" in metrics else ""))
    return "\n".join(lines)


def make_eval_args(values: dict):
    from .config import parse_dataclasses
    from .evaluation import EvalArgs

    (eval_args,) = parse_dataclasses(values, (EvalArgs,), "eval key")
    return eval_args


def eval_command(args: list[str]) -> int:
    from . import run_folder

    if wants_help(args):
        print(f"usage: arr {COMMANDS['eval']}\n\nkeys (each given as key=value):\n  model_name_or_path (default: the "
              "run's own base model, from its arr_config.yaml)\n" + describe_keys(table()["eval"]))
        return 0
    rest = [a for a in args if a != "--debug"]
    if not rest or "=" in rest[0]:
        raise ConfigError("arr eval needs a run directory (the output_dir of arr train)")
    run_dir, overrides = Path(rest[0]), read_config(None, rest[1:])
    if not (run_dir / run_folder.ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{run_dir}: no adapter here ({run_folder.ADAPTER_CONFIG} is missing)")
    model_path = overrides.pop("model_name_or_path", None)
    check_values(overrides, "eval", "eval key")  # before torch is imported
    eval_args = make_eval_args(overrides)

    from .cache import write_atomically
    from .evaluation import evaluate_adapter, load_run, reusable_evaluation, run_base_model
    from .lineage import lineage_scores, recorded_lineage

    base_model = run_base_model(run_dir, model_path)
    saved = reusable_evaluation(run_dir, eval_args, base_model)
    if saved:
        print(f"(the report in {run_dir / run_folder.EVAL}, made with these probe settings on {base_model})")
        print(report_text(saved))
        return 0
    run_folder.check_adapter(run_dir)
    model, tokenizer = load_run(run_dir, base_model)
    result = {**evaluate_adapter(model, tokenizer, eval_args, cache_before=True), "base_model": base_model}
    chain = recorded_lineage(run_dir)
    if chain:
        result["lineage"] = lineage_scores(model, tokenizer, chain, eval_args.task_items, eval_args.batch_size)
    write_atomically(run_dir / run_folder.EVAL, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    print(report_text(result))
    return 0


def report_text(result: dict) -> str:
    """The report's table, and the earlier tasks' when the run continues earlier ones."""
    from .evaluation import format_table
    from .lineage import format_lineage

    return format_table(result) + ("\n\n" + format_lineage(result["lineage"]) if "lineage" in result else "")


def compare_command(args: list[str]) -> int:
    if wants_help(args):
        print(f"usage: arr {COMMANDS['compare']}")
        return 0
    quick = "--quick" in args
    rest = [a for a in args if a not in ("--quick", "--debug")]
    methods = None
    if "--methods" in rest:
        at = rest.index("--methods")
        if at + 1 >= len(rest):
            raise ConfigError("--methods needs a YAML file mapping method names to their config keys")
        methods = read_config(rest.pop(at + 1), [])
        rest.pop(at)
        for name, keys in methods.items():
            if not isinstance(keys, dict):
                raise ConfigError(f"--methods: method {name!r} must map to config keys, got {keys!r}")
    config_path = rest.pop(0) if rest and "=" not in rest[0] else str(DEFAULT_RECIPE)
    overrides = read_config(None, rest)
    out_dir = overrides.pop("output_dir", "runs/compare")
    probe_keys = eval_keys(overrides)
    base = {**read_config(config_path, []), **overrides}
    for keys in (methods or {"": {}}).values():  # fail fast on a bad key or value, at once where the table tells
        check_values(expand_method({**base, **expand_method(keys)}), "train", "config key")
    check_values(probe_keys, "eval", "eval key")
    from .config import build_config

    for keys in (methods or {"": {}}).values():
        build_config({**base, **expand_method(keys)})

    from .compare import QUICK, compare

    if quick:
        overrides, probe_keys = {**QUICK["train"], **overrides}, {**QUICK["eval"], **probe_keys}
        methods = methods or QUICK["methods"]
    compare(out_dir, config_path, overrides, methods, make_eval_args(probe_keys))
    print(f"wrote {out_dir}/results.json, results.md, results.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"train": train_command, "eval": eval_command, "compare": compare_command}
    if command not in commands:
        print(f"arr: error: unknown command {command!r} (see arr --help)", file=sys.stderr)
        return 2
    # transformers deprecated a property that peft still reads on every model it wraps: harmless, and not ours to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # On a CPU with AVX512-BF16, bitsandbytes warns when peft imports it that the hub kernel of its repacked 4-bit CPU
    # path is not installed: ARR keeps 4-bit layers off that path (initial.one_cpu_path), so the line would only alarm.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())
    try:
        return commands[command](rest)
    except KeyboardInterrupt:
        print("arr: interrupted", file=sys.stderr)
        return 130
    except ARRError as e:
        if debug:
            traceback.print_exc()
        print(f"arr: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
