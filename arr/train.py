"""The training recipe, start to end (setup / train / save), as one readable function."""

from __future__ import annotations

import dataclasses
import json
import random
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
from transformers import TrainerCallback

from . import resources, run_folder
from .config import ARRConfig, DataArguments, ModelArguments, cache_dir
from .data import load_sft_examples, stream_replay_texts
from .errors import ARRError, ConfigError
from .evaluation import EvalArgs, evaluate_adapter, report_args, task_examples
from .initial import (ADAPTER_KEYS, is_quantized, load_model, load_tokenizer, read_adapter_config,
                      recordable_quantization_keys, save_adapter, with_adapter)
from .lineage import LINEAGE, earlier_prompts, has_training_data, lineage_scores, read_lineage
from .plots import draw_report
from .self_replay import SELF, read_prompts
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
    try:
        tokenizer = load_tokenizer(path)
        checked = before_model(tokenizer)
        model = load_model(model_args, path)
    except (OSError, ValueError, ImportError) as e:  # a missing folder, an unknown hub id, a broken config, no
        if isinstance(e, ARRError):                  # bitsandbytes
            raise
        reason = " ".join(str(e).split())
        raise ConfigError(f"model_name_or_path: cannot load {path!r}: {reason}") from None
    return tokenizer, model, checked


def resolved_config(model_args, data_args, config: ARRConfig) -> dict:
    """Every key of a run as resolved, in the form a config file takes back (`arr train RUN/arr_config.yaml`), with
    the `*_token` keys left out, so that no secret is written into a run folder. With init_adapter, its LoRA keys
    are that adapter's own, as training applied them (initial.check_adapter_keys)."""
    training = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if f.init and not f.name.endswith("_token")}
    record = json.loads(json.dumps(
        {**dataclasses.asdict(model_args), **(dataclasses.asdict(data_args) if data_args else {}), **training},
        default=lambda value: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)))
    if model_args.init_adapter is not None:
        adapter = read_adapter_config(model_args.init_adapter)
        for key, name in ADAPTER_KEYS.items():
            if adapter.get(name) is not None:
                record[key] = sorted(adapter[name]) if isinstance(adapter[name], list) else adapter[name]
    return record


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Interrupted(ARRError):
    """A signal stopped the run after a step; its newest checkpoint holds everything up to that step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum  # the shell's status of a process ended by that signal


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM (what a cluster scheduler or a preempted cloud machine sends before it kills a job)
    asks for a clean stop: the run ends its optimizer step, writes a checkpoint and returns; a second signal stops
    at once. Every process stops at the same step. A signal during the last step stops nothing: the run finishes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.stopped_at, self.previous = 0, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.request) for s in self.SIGNALS}

    def request(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        print(f"\nStopping after this step with a checkpoint ({signal_name(signum)} again to stop at once)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum
        if args.world_size > 1:  # the signal one process had, every process acts on
            signum = int(reduce(torch.tensor(float(signum), device=args.device), reduction="max").item())
        if signum and state.global_step < state.max_steps:
            self.signum, self.stopped_at = signum, state.global_step
            control.should_save = control.should_training_stop = True

    def restore(self):
        """The handlers from before training: a signal after it (while saving or reporting) acts as usual."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def check_inputs(data_args: DataArguments, config: ARRConfig, default_model: bool, resume: bool,
                 eval_args: EvalArgs) -> None:
    """What the run will read and where it will write, checked before anything is loaded or written, so that a bad
    one fails now and not after the training (the SFT data is read, tokenized, as the model loads)."""
    if resume:
        run_folder.check_resumable(config.output_dir, config.trained_keys())
    if data_args.eval_data is not None and (config.eval_after != "none" or config.probe_steps):
        task_examples(data_args.eval_data, eval_args.task_items)
    self_replay = config.uses_replay and data_args.replay_data == SELF
    if self_replay and config.self_replay_prompts is not None:
        read_prompts(config.self_replay_prompts)
    reference = (config.beta > 0 or bool(config.task_kl_beta)) and config.ref_cache != "none"
    curvature = config.laplace_lambda > 0
    folders = {"ref_cache_dir": reference and config.ref_cache_dir,
               "laplace_cache_dir": curvature and config.laplace_cache_dir}
    if (default_model or self_replay or config.eval_after != "none" or reference and not config.ref_cache_dir
            or curvature and not config.laplace_cache_dir):  # what is kept in $ARR_CACHE
        folders["$ARR_CACHE"] = cache_dir()
    for key, folder in folders.items():
        if folder:
            run_folder.check_writable(key, folder)


def run(model_args: ModelArguments, data_args: DataArguments, config: ARRConfig, resume: bool = False,
        report_sizes: dict | None = None) -> dict:
    """Fine-tune with ARR and write OUTPUT_DIR/{adapter files, arr_config.yaml, metrics.json}. Returns the metrics.
    `report_sizes`: EvalArgs sizes that replace eval_after's for the report (and probe_steps' rounds).
    Raises Interrupted when Ctrl-C or SIGTERM stopped it (a checkpoint is left to resume from)."""
    eval_args = report_args(data_args.eval_data, config.eval_after, bundled_task=data_args.sft_data is None,
                            sizes=report_sizes or {})
    check_inputs(data_args, config, model_args.model_name_or_path is None, resume, eval_args)
    folder = nullcontext()
    if config.local_process_index == 0:  # one process per machine makes the folder; the main one locks it
        folder = run_folder.claimed(config.output_dir, resume, config.overwrite_output_dir,
                                    lock=config.process_index == 0)
    with folder:
        return _run(model_args, data_args, config, resume, eval_args)


def _run(model_args: ModelArguments, data_args: DataArguments, config: ARRConfig, resume: bool,
         eval_args: EvalArgs) -> dict:
    tokenizer, model, sft = load_tokenizer_and_model(model_args, lambda tokenizer: load_sft_examples(
        data_args.sft_data or resources.date_task("train"), tokenizer, config.max_length, data_args.sft_format))

    def corpus(path: str | None):
        if path is None:
            return resources.wiki_replay_texts(seed=config.seed)
        return stream_replay_texts(path, data_args.replay_text_field, data_args.replay_split, config.seed,
                                   data_args.replay_config)

    chain = read_lineage(model_args.init_adapter, config.skip_missing_lineage)
    prompts = earlier_prompts(chain) if chain and config.lineage_replay == "prompts" else None
    if chain and config.lineage_replay == "data":  # rehearsal: a share of the earlier tasks' own examples
        earlier = [ex for entry in chain if has_training_data(entry)
                   for ex in load_sft_examples(entry["sft_data"] or resources.date_task("train"), tokenizer,
                                               config.max_length, entry["sft_format"])]
        sft = sft + random.Random(config.seed).sample(earlier, min(len(earlier),
                                                                   round(len(sft) * config.lineage_replay_share)))
    replay = None
    if config.uses_replay:
        replay = SELF if data_args.replay_data == SELF else corpus(data_args.replay_data)
    corpus_replay = None if data_args.replay_data == SELF else data_args.replay_data
    surrogate = corpus(data_args.laplace_data or corpus_replay) if config.laplace_lambda > 0 else None
    if model_args.init_adapter is None:
        model = with_adapter(model, lora_config(model_args), gradient_checkpointing=config.gradient_checkpointing,
                             seed=config.seed)
    else:
        model = with_adapter(model, init_adapter=model_args.init_adapter,
                             gradient_checkpointing=config.gradient_checkpointing)
    trainer = ARRTrainer(model=model, args=config, train_dataset=sft, processing_class=tokenizer,
                         replay_dataset=replay, curvature_dataset=surrogate, earlier_prompts=prompts,
                         eval_args=eval_args)
    interrupt = StopOnSignal()
    trainer.add_callback(interrupt)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    finally:
        interrupt.restore()
    seconds = time.perf_counter() - start
    if interrupt.stopped_at is not None:
        raise Interrupted(f"stopped by {signal_name(interrupt.signum)} after step {interrupt.stopped_at}; "
                          f"its checkpoint is in {config.output_dir}", interrupt.signum)

    return save_run(trainer, seconds, model_args, data_args, chain)


def trained_parts(trainer: ARRTrainer) -> list[str]:
    """The loss parts the run trains: a part of weight 0 (the replay CE of self-replay, the KL at beta 0) is
    measured and logged, not trained."""
    objective = trainer.objective
    weights = {"sft_ce": 1.0, "kl": objective.beta, "kl_task": objective.task_kl_beta or 0.0,
               "laplace": objective.laplace_lambda,
               "replay_ce": objective.replay_weight if trainer.args.uses_replay else 0.0}
    return [name for name in LOSS_PART_NAMES if weights[name] > 0]


def run_loss(trainer: ARRTrainer, history: list[dict], parts_history: list[dict]) -> float | None:
    """The mean loss over the run's steps: the Trainer's own train_loss, unless the run was resumed, whose
    train_loss covers only the steps since; then the logged windows' (exact at logging_steps 1, the default)."""
    own = next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None)
    return own if trainer.started_at_step == 0 or not parts_history else mean_loss(parts_history)


def mean_loss(parts_history: list[dict]) -> float | None:
    """The mean loss over the logged steps, each logged mean weighted by the steps of its window."""
    if not parts_history:
        return None
    steps = [h["step"] for h in parts_history]
    return sum(h["loss"] * (step - before) for h, step, before in zip(parts_history, steps, [0, *steps])) / steps[-1]


def save_run(trainer: ARRTrainer, seconds: float | None = None, model_args: ModelArguments | None = None,
             data_args: DataArguments | None = None, lineage: list[dict] | None = None) -> dict:
    """Write OUTPUT_DIR/{adapter files, tokenizer, arr_config.yaml, metrics.json} and, unless `eval_after: none`,
    the report (eval.json, report.png) of a trained ARRTrainer; the adapter is the newest within `forgetting_budget`
    when the budget stopped the run. From Python (`trainer.save_run()`): the wall time is the Trainer's own
    `train_runtime`, and arr_config.yaml holds the model, LoRA and training keys but no data keys (the data may
    have been given as records). `lineage`: the earlier runs this one continues (lineage.read_lineage), recorded in
    arr_config.yaml and scored in the report. Returns the metrics."""
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
        "train_loss": run_loss(trainer, history, parts_history),
        "replay_sequences": len(trainer.train_dataset.replay),
        "sft_examples": len(trainer.train_dataset.sft),
        "curvature": trainer.curvature_info,  # key, cache_hit, seconds of the Laplace curvature estimate
        "ref_cache": trainer.ref_cache_info,  # mode (auto resolved), rows, rows_drawn; key, cache_hit, seconds, mb
        "self_replay": trainer.self_replay_info,  # key, cache_hit, rows of the self-generated replay
        "initial_model": trainer.initial_model_info,  # what π₀ is: kind and fingerprint (arr eval checks it)
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
            record = {**saved_config, **({LINEAGE: lineage} if lineage else {})}
            (tmp / run_folder.CONFIG).write_text(yaml.safe_dump(record, sort_keys=False))
            (tmp / run_folder.METRICS).write_text(json.dumps(metrics, indent=2, allow_nan=False))

        for stale in (run_folder.EVAL, run_folder.REPORT_PNG):  # an overwritten run's report is not this run's
            (out / stale).unlink(missing_ok=True)
        run_folder.save_atomically(write, out, last=run_folder.ADAPTER_CONFIG)
        if config.eval_after != "none":
            metrics["eval"] = report(trainer.model, tokenizer, trainer.eval_args, out, budget, lineage)
            draw_report(metrics, out / run_folder.REPORT_PNG)
        if config.save_merged_model:  # last: merging takes the adapter out of the model
            merged = trainer.model.merge_and_unload()
            run_folder.save_atomically(lambda tmp: (merged.save_pretrained(tmp / run_folder.MERGED),
                                                    tokenizer.save_pretrained(tmp / run_folder.MERGED)),
                                       out, last=run_folder.MERGED)
    return metrics


def model_arguments(peft_model) -> ModelArguments:
    """The ModelArguments a PEFT model stands for (a run started from Python has none of its own), so that arr eval
    rebuilds the same initial model: its dtype, and for a quantized model its quantization and the dtype it was
    loaded in (config.dtype: prepare_model_for_kbit_training upcasts its other weights to float32; bitsandbytes
    models refuse .to(dtype), which leaves config.dtype stale on others)."""
    lora = peft_model.peft_config[peft_model.active_adapter]
    targets = lora.target_modules
    dtype = (getattr(peft_model.config, "dtype", None) if is_quantized(peft_model) else None) or peft_model.dtype
    return ModelArguments(
        model_name_or_path=lora.base_model_name_or_path, dtype=str(dtype).removeprefix("torch."),
        **recordable_quantization_keys(peft_model),
        lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        lora_target_modules=[targets] if isinstance(targets, str) else sorted(targets), use_rslora=lora.use_rslora,
        use_dora=bool(lora.use_dora), init_lora_weights=str(lora.init_lora_weights).lower())


def report(peft_model, tokenizer, eval_args: EvalArgs, out: Path, budget: dict | None = None,
           lineage: list[dict] | None = None) -> dict:
    """What the run forgot and learned (evaluation.py's probes, adapter off and on), written to EVAL; the initial
    model's values are cached probe by probe. With a lineage, every earlier task too (lineage.lineage_scores)."""
    start = time.perf_counter()
    result = evaluate_adapter(peft_model, tokenizer, eval_args, cache_before=True)
    if lineage:
        result[LINEAGE] = lineage_scores(peft_model, tokenizer, lineage, eval_args.task_items, eval_args.batch_size)
    result["seconds"] = round(time.perf_counter() - start, 2)
    if budget and budget["crossed_at"] is not None:
        result["kept_step"] = budget["kept_step"]  # the adapter measured: rolled back to this step
    (out / run_folder.EVAL).write_text(json.dumps(result, indent=2))
    return result
