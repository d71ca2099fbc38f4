"""The keys of `arr train` and `arr eval` without torch or transformers: their help, the reading of a config and its
key=value overrides, and the checks of key names and value types, so that `--help` and argument errors come back at
once. The keys' types, defaults and help are a table, keys.json, generated from the dataclasses of arr/config.py and
arr/evaluation.py (`python -m arr.keys`; tests/test_cli.py fails when it is stale). Only arguments that pass these
checks go on to the full typed parsing (arr.config.parse_dataclasses).
"""

from __future__ import annotations

import ast
import difflib
import json
import textwrap
from functools import cache
from pathlib import Path

import yaml

from . import run_folder
from .errors import ConfigError
from .lineage import LINEAGE

KEYS_FILE = Path(__file__).with_name("keys.json")
DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"  # `arr train` with no config and no sft_data
REGENERATE = "python -m arr.keys"

# `method: NAME` in a config (or `method=NAME`) is shorthand for these keys; keys given beside it win.
# Without replay the KL can only sit on the task's own rows: those presets say so (kl_on: all), so that a beta given
# beside them means a KL there.
METHODS = {
    "lora": {"beta": 0.0, "replay_ratio": 0.0, "kl_on": "all"},  # plain LoRA SFT
    "kl_only": {"replay_ratio": 0.0, "kl_on": "all"},
    "replay_only": {"beta": 0.0, "replay_data": None},  # the next-token CE of Wikipedia replay (greedy self-replay
    # answers would only sharpen the model under a CE alone)
    "arr": {},  # KL + replay at the shipped defaults
    "arr_adaptive": {"kl_target": 0.1},  # ARR with beta steered to a KL budget (see kl_target)
    "laplace": {"beta": 0.0, "replay_ratio": 0.0, "kl_on": "all", "laplace_lambda": 300.0},  # LaLoRA alone
}

# `arr train --help`: ARR's own keys, grouped (every own key is in one group: tested), before the Trainer's.
HELP_GROUPS = {
    "objective": ("method", "beta", "kl_on", "kl_mask_target", "task_kl_beta", "kl_direction", "kl_target",
                  "kl_adapt_rate", "loss_chunk_size", "ref_cache", "ref_cache_topk", "ref_cache_dir"),
    "replay": ("replay_data", "replay_ratio", "replay_mode", "replay_weight", "replay_seq_length",
               "replay_max_sequences", "self_replay_prompts", "self_replay_max_new_tokens", "self_replay_temperature",
               "replay_text_field", "replay_split", "replay_config", "padding_free", "lineage_replay",
               "lineage_replay_share", "skip_missing_lineage"),
    "Laplace": ("laplace_lambda", "laplace_samples", "laplace_data", "laplace_cache_dir"),
    "model": ("model_name_or_path", "dtype", "attn_implementation", "load_in_4bit", "load_in_8bit",
              "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "use_bnb_nested_quant"),
    "LoRA": ("init_adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora",
             "init_lora_weights"),
    "data": ("sft_data", "sft_format", "max_length", "eval_data"),
    "run": ("output_dir", "overwrite_output_dir", "eval_after", "learning_rate", "max_steps", "num_train_epochs",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "save_steps", "logging_steps",
            "save_merged_model"),
    "watching forgetting": ("probe_steps", "forgetting_budget"),
}
METHOD_HELP = "A preset of objective keys (keys given beside it win): " + ", ".join(METHODS) + "."

# The value types checked here, as HfArgumentParser parses them (argparse's wording); other types pass on to it.
TRUTHY, FALSY = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


def check_bool(text: str) -> None:
    if text.lower() not in TRUTHY + FALSY:  # transformers' string_to_bool, and its message
        raise ValueError(f"Truthy value expected: got {text} but expected one of yes/no, true/false, t/f, y/n, 1/0 "
                         "(case insensitive).")


CHECKS = {"int": int, "float": float, "bool": check_bool}


@cache
def table() -> dict:
    """{"train": {key: row}, "eval": {key: row}}; a row holds the key's type, and its default and help where a
    --help prints them."""
    return json.loads(KEYS_FILE.read_text(encoding="utf-8"))


def key_table() -> dict:
    """The table, from the live dataclasses (imports torch and transformers)."""
    import dataclasses
    import typing

    from .config import CONFIG_CLASSES, field_choices
    from .evaluation import EvalArgs

    def rows(classes, shown):
        out = {}
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if not f.init:
                    continue
                types = [t for t in typing.get_args(hints[f.name]) or [hints[f.name]] if t is not type(None)]
                kind = types[0].__name__ if len(types) == 1 and types[0] in (int, float, bool, str) else "other"
                out[f.name] = {"type": kind}
                if choices := field_choices(f.name, hints[f.name]):
                    out[f.name]["choices"] = choices
                if f.name in shown:
                    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    out[f.name].update(default=str(default), help=f.metadata.get("help", ""))
        return out

    eval_keys = [f.name for f in dataclasses.fields(EvalArgs)]
    return {"train": rows(CONFIG_CLASSES, {k for keys in HELP_GROUPS.values() for k in keys}),
            "eval": rows([EvalArgs], eval_keys)}


def describe_keys(rows: dict) -> str:
    """`  key (default: value)` and the key's help, wrapped, for each row: the lines of a --help."""
    lines = []
    for key, row in rows.items():
        lines += [f"  {key} (default: {row['default']})", textwrap.fill(row["help"], 116, initial_indent=" " * 6,
                                                                          subsequent_indent=" " * 6)]
    return "\n".join(lines)


def train_help(every_option: bool = False) -> str:
    """`arr train --help`: each group's keys with their defaults and meanings, then (with `every_option`) every
    Trainer option, as HfArgumentParser prints them."""
    rows = table()["train"]
    lines = ["usage: arr train [CONFIG.yaml] [key=value ...] [eval.KEY=VALUE ...] [--resume] [--debug] [--help-all]",
             "", "Every key is a YAML key of CONFIG.yaml and a key=value override (YAML syntax for the value). "
             "eval.KEY=VALUE, on the command line, sizes a probe of the report after training (arr eval --help lists "
             "the keys)."]
    for group, keys in HELP_GROUPS.items():
        lines += ["", f"{group}:"]
        for key in keys:
            if key == "method":
                lines += ["  method (default: none)", textwrap.fill(METHOD_HELP, 116, initial_indent=" " * 6,
                                                                       subsequent_indent=" " * 6)]
                continue
            lines.append(describe_keys({key: rows[key]}))
    if not every_option:
        lines += ["", "Every transformers.TrainingArguments option works too (ARRConfig extends it): "
                      "arr train --help-all lists them all."]
        return "\n".join(lines)
    from .config import dataclass_parser

    return "\n".join(lines) + "\n\nall options:\n" + dataclass_parser().format_help()


def read_config(path: str | None, overrides: list[str]) -> dict:
    """The keys of a YAML config with key=value overrides on top. A `method` among the overrides outranks the
    file's keys with its preset (and the overrides beside it outrank the preset)."""
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config must be a mapping of key: value")
        probe_key = next((k for k in values if str(k).startswith("eval.")), None)
        if probe_key is not None:
            raise ConfigError(f"{path}: {probe_key} is an eval key; give eval.* keys on the command line")
        if is_run_record(Path(path)):
            values = as_config(values)
    given = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not key=value")
        if not raw.strip():
            raise ConfigError(f"override {override!r} gives no value")
        key = key.strip()
        try:
            given[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            given[key] = raw
        if isinstance(given[key], bool) and "choices" in table()["train"].get(key, {}):
            given[key] = raw.strip()  # the word: YAML reads save_strategy=no as false
    if "method" in given:
        return {**expand_method(values), **expand_method(given)}
    return {**values, **given}


def override(key: str, value) -> str:
    """`key=value` as read_config reads it back (YAML, which quotes what it would read otherwise: 'no', 1.0e-06)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return f"{key}={text.removesuffix('...').strip()}"  # (a scalar's document ends with ...)


def embedded_recipe_applies(config_path: str | None, values: dict) -> bool:
    """Whether `arr train` trains the embedded recipe: with neither a CONFIG.yaml nor sft_data (the bundled task's
    demo; one's own data gets the defaults --help shows)."""
    return config_path is None and values.get("sft_data") is None


def is_run_record(path: Path) -> bool:
    """Whether `path` is the arr_config.yaml of a run folder (beside its adapter)."""
    return path.name == run_folder.CONFIG and (path.parent / run_folder.ADAPTER_CONFIG).is_file()


def as_config(recorded: dict) -> dict:
    """A run's resolved keys (its arr_config.yaml) as config keys that train it again. Left out: its lineage
    (init_adapter reads it again) and overwrite_output_dir (a rerun replaces no finished run unless asked). An
    accelerator_config that arr_config.yaml files written before 2026-12-05 hold as the object's repr,
    AcceleratorConfig(split_batches=False, ...), becomes its mapping."""
    values = {k: v for k, v in recorded.items() if k not in (LINEAGE, "overwrite_output_dir")}
    accelerator = values.get("accelerator_config")
    if isinstance(accelerator, str) and accelerator.startswith("AcceleratorConfig("):
        try:
            call = ast.parse(accelerator, mode="eval").body
            values["accelerator_config"] = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError, AttributeError):
            raise ConfigError(f"config key accelerator_config: cannot read {accelerator!r}") from None
    return values


def expand_method(values: dict) -> dict:
    """Replace a `method` key by the keys it stands for (see METHODS); explicit keys win."""
    values = dict(values)
    method = values.pop("method", None)
    if method is None:
        return values
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return {**METHODS[method], **values}


def check_choice(kind: str, key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{kind} {key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_known_keys(values: dict, known, kind: str) -> None:
    """Refuse a key that is not in `known`, suggesting the nearest known one."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {kind} {key!r}{hint}")


def check_values(values: dict, command: str, kind: str) -> None:
    """The errors of the full parsing that the table can tell, with the same one-line message: an unknown key, an
    int, float or bool key whose value is not one, and a value that is not one of its key's choices."""
    rows = table()[command]
    check_known_keys(values, list(rows), kind)
    for key, value in values.items():
        if "choices" in rows[key] and isinstance(value, bool):
            raise ConfigError(f"{kind} {key} must be one of {', '.join(rows[key]['choices'])}, got {value}: YAML "
                              "reads an unquoted no, yes, off or on as a boolean; quote it")
        if "choices" in rows[key] and isinstance(value, str):
            check_choice(kind, key, value, rows[key]["choices"])
        check = CHECKS.get(rows[key]["type"])
        if check is None or value is None or value == "" or isinstance(value, (list, dict)):
            continue  # the full parsing's own checks
        try:
            check(str(value))
        except ValueError as e:
            message = str(e) if check is check_bool else f"invalid {check.__name__} value: {str(value)!r}"
            raise ConfigError(f"{kind} {key}: {message}") from None


if __name__ == "__main__":
    KEYS_FILE.write_text(json.dumps(key_table(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {KEYS_FILE}")
