"""The training recipe, start to end (setup / train / save), as one readable function."""

from __future__ import annotations

import dataclasses
import json
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from peft import LoraConfig
from accelerate.utils import reduce
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from . import resources, run_folder
from .config import ARRConfig, DataArguments, ModelArguments
from .data import load_sft_examples, stream_replay_texts
from .errors import ARRError, ConfigError
from .evaluation import EvalArgs, evaluate_adapter, report_args
from .plots import draw_report
from .reference import save_adapter
from .self_replay import SELF
from .trainer import LOSS_PART_NAMES, ARRTrainer
from .watch import ForgettingWatch, probe_rounds



def lora_config(model_args: ModelArguments) -> LoraConfig:
    init = model_args.init_lora_weights
    init = {"true": True, "false": False}.get(str(init).lower(), init)
    targets = model_args.lora_target_modules
    try:
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            use_rslora=model_args.use_rslora,
            use_dora=model_args.use_dora,
            init_lora_weights=init,
        )
    except ValueError as e:  # PEFT's word for settings that do not go together (an init that needs its own config)
        raise ConfigError(f"LoRA config: {' '.join(str(e).split())}") from None


def load_tokenizer_and_model(model_args: ModelArguments, before_model=lambda tokenizer: None):
    """Tokenizer, then `before_model(tokenizer)` (cheap data checks, so bad data fails fast), then the model."""
    path = model_args.model_name_or_path or str(resources.default_model_path())
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype, None)
    if not isinstance(dtype, (str, torch.dtype)):
        raise ConfigError(f"dtype: unknown dtype {model_args.dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        checked = before_model(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:  # a missing folder, an unreachable or unknown hub id, a broken config
        if isinstance(e, ARRError):
            raise
        reason = " ".join(str(e).split())
        raise ConfigError(f"model_name_or_path: cannot load {path!r}: {reason}") from None
    return tokenizer, model, checked


def resolved_config(model_args, data_args, config: ARRConfig) -> dict:
    training = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return json.loads(json.dumps(
        {**dataclasses.asdict(model_args), **(dataclasses.asdict(data_args) if data_args else {}), **training},
        default=str))


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Interrupted(ARRError):
    """Ctrl-C stopped the run after a step; its newest checkpoint holds everything up to that step."""


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) asks for a clean stop: the run ends its optimizer step, writes a checkpoint and returns; a
    second Ctrl-C stops at once. Every process stops at the same step."""

    def __init__(self):
        self.requested, self.previous = False, None

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if args.world_size > 1:
            requested = reduce(torch.tensor(float(requested), device=args.device), reduction="sum").item() > 0
        if requested:
            self.requested = control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run(model_args: ModelArguments, data_args: DataArguments, config: ARRConfig, resume: bool = False) -> dict:
    """Fine-tune with ARR and write OUTPUT_DIR/{adapter files, arr_config.yaml, metrics.json}. Returns the metrics.
    Raises Interrupted when Ctrl-C stopped it (a checkpoint is left to resume from)."""
    folder = nullcontext()
    if config.local_process_index == 0:  # one process per machine makes the folder; the main one locks it
        folder = run_folder.claimed(config.output_dir, resume, config.overwrite_output_dir,
                                    lock=config.process_index == 0)
    with folder:
        return _run(model_args, data_args, config, resume)


def _run(model_args: ModelArguments, data_args: DataArguments, config: ARRConfig, resume: bool) -> dict:
    tokenizer, model, sft = load_tokenizer_and_model(model_args, lambda tokenizer: load_sft_examples(
        data_args.sft_data or resources.date_task("train"), tokenizer, config.max_length, data_args.sft_format))

    def corpus(path: str | None):
        if path is None:
            return resources.wiki_replay_texts(seed=config.seed)
        return stream_replay_texts(path, data_args.replay_text_field, data_args.replay_split, config.seed,
                                   data_args.replay_config)

    replay = None
    if config.uses_replay:
        replay = SELF if data_args.replay_data == SELF else corpus(data_args.replay_data)
    corpus_replay = None if data_args.replay_data == SELF else data_args.replay_data
    surrogate = corpus(data_args.laplace_data or corpus_replay) if config.laplace_lambda > 0 else None
    eval_args = report_args(data_args.eval_data, "full" if config.eval_after == "full" else "quick",
                            bundled_task=data_args.sft_data is None)
    trainer = ARRTrainer(model=model, args=config, train_dataset=sft, processing_class=tokenizer,
                         peft_config=lora_config(model_args), replay_dataset=replay, curvature_dataset=surrogate,
                         eval_args=eval_args)
    interrupt = StopOnInterrupt()
    trainer.add_callback(interrupt)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - start
    if interrupt.requested:
        raise Interrupted(f"stopped by Ctrl-C after step {result.global_step}; its checkpoint is in "
                          f"{config.output_dir}")

    return save_run(trainer, seconds, model_args, data_args)


def trained_parts(trainer: ARRTrainer) -> list[str]:
    """The loss parts the run trains: a part of weight 0 (the replay CE of self-replay, the KL at beta 0) is
    measured and logged, not trained."""
    objective = trainer.objective
    weights = {"sft_ce": 1.0, "kl": objective.beta, "laplace": objective.laplace_lambda,
               "replay_ce": objective.replay_weight if trainer.args.uses_replay else 0.0}
    return [name for name in LOSS_PART_NAMES if weights[name] > 0]


def save_run(trainer: ARRTrainer, seconds: float | None = None, model_args: ModelArguments | None = None,
             data_args: DataArguments | None = None) -> dict:
    """Write OUTPUT_DIR/{adapter files, tokenizer, arr_config.yaml, metrics.json} and, unless `eval_after: none`,
    the report (eval.json, report.png) of a trained ARRTrainer; the adapter is the newest within `forgetting_budget`
    when the budget stopped the run. From Python (`trainer.save_run()`): the wall time is the Trainer's own
    `train_runtime`, and arr_config.yaml holds the model, LoRA and training keys but no data keys (the data may
    have been given as records). Returns the metrics."""
    config, tokenizer = trainer.args, trainer.processing_class
    history = trainer.state.log_history
    if seconds is None:
        seconds = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), 0.0)
    watch = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ForgettingWatch)), None)
    budget = watch.restore_within_budget() if watch else None
    parts = trained_parts(trainer)
    parts_history = [
        {"step": h["step"], **{k: h[k] for k in ("loss", *LOSS_PART_NAMES, "beta") if k in h}}
        for h in history if "sft_ce" in h
    ]
    metrics = {
        "train_seconds": round(seconds, 2),
        "peak_mem_mb": peak_memory_mb(),
        "global_steps": trainer.state.global_step,
        "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "replay_sequences": len(trainer.train_dataset.replay),
        "sft_examples": len(trainer.train_dataset.sft),
        "curvature": trainer.curvature_info,  # key, cache_hit, seconds of the Laplace curvature estimate
        "ref_cache": trainer.ref_cache_info,  # mode (auto resolved), rows, rows_drawn; key, cache_hit, seconds, mb
        "self_replay": trainer.self_replay_info,  # key, cache_hit, rows of the self-generated replay
        "trained_parts": parts,
        "means": {k: sum(h[k] for h in parts_history) / len(parts_history) for k in ("loss", *parts)}
        if parts_history else {},  # over the logged steps: the closing line
        "final": parts_history[-1] if parts_history else {},
        "history": parts_history,
        "probe_rounds": probe_rounds(history),  # probe_steps
        "forgetting_budget": budget,  # {"budget", "crossed_at", "kept_step"}: the last two set when it stopped the run
    }
    out = Path(config.output_dir)
    if trainer.is_world_process_zero():
        if model_args is None:
            model_args = model_arguments(trainer.model)
        saved_config = resolved_config(model_args, data_args, config)

        def write(tmp: Path):
            save_adapter(trainer.model, tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / run_folder.CONFIG).write_text(yaml.safe_dump(saved_config, sort_keys=False))
            (tmp / run_folder.METRICS).write_text(json.dumps(metrics, indent=2))

        for stale in (run_folder.EVAL, run_folder.REPORT_PNG):  # an overwritten run's report is not this run's
            (out / stale).unlink(missing_ok=True)
        run_folder.save_atomically(write, out, last=run_folder.ADAPTER_CONFIG)
        if config.eval_after != "none":
            metrics["eval"] = report(trainer.model, tokenizer, trainer.eval_args, out, budget)
            draw_report(metrics, out / run_folder.REPORT_PNG)
        if config.save_merged_model:  # last: merging takes the adapter out of the model
            merged = trainer.model.merge_and_unload()
            run_folder.save_atomically(lambda tmp: (merged.save_pretrained(tmp / run_folder.MERGED),
                                                    tokenizer.save_pretrained(tmp / run_folder.MERGED)),
                                       out, last=run_folder.MERGED)
    return metrics


def model_arguments(peft_model) -> ModelArguments:
    """The ModelArguments a PEFT model stands for (a run started from Python has none of its own)."""
    lora = peft_model.peft_config[peft_model.active_adapter]
    targets = lora.target_modules
    return ModelArguments(
        model_name_or_path=lora.base_model_name_or_path, dtype=str(peft_model.dtype).removeprefix("torch."),
        lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        lora_target_modules=[targets] if isinstance(targets, str) else sorted(targets), use_rslora=lora.use_rslora,
        use_dora=bool(lora.use_dora), init_lora_weights=str(lora.init_lora_weights).lower())


def report(peft_model, tokenizer, eval_args: EvalArgs, out: Path, budget: dict | None = None) -> dict:
    """What the run forgot and learned (evaluation.py's probes, adapter off and on), written to EVAL; the initial
    model's values are cached probe by probe."""
    start = time.perf_counter()
    result = evaluate_adapter(peft_model, tokenizer, eval_args, cache_before=True)
    result["seconds"] = round(time.perf_counter() - start, 2)
    if budget and budget["crossed_at"] is not None:
        result["kept_step"] = budget["kept_step"]  # the adapter measured: rolled back to this step
    (out / run_folder.EVAL).write_text(json.dumps(result, indent=2))
    return result
