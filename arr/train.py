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
from .evaluation import EVAL_AFTER, EvalArgs, evaluate_adapter, task_examples
from .initial import load_model, load_tokenizer, save_adapter, with_adapter
from .lineage import LINEAGE, earlier_prompts, lineage_scores, read_lineage
from .self_replay import SELF, read_prompts
from .trainer import LOSS_PART_NAMES, ARRTrainer



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
    training = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return json.loads(json.dumps(
        {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **training}, default=str))


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


def check_inputs(data_args: DataArguments, config: ARRConfig, default_model: bool, resume: bool) -> None:
    """What the run will read and where it will write, checked before anything is loaded or written, so that a bad
    one fails now and not after the training (the SFT data is read, tokenized, as the model loads)."""
    if resume:
        run_folder.check_resumable(config.output_dir)
    if data_args.eval_data is not None and config.eval_after != "none":
        task_examples(data_args.eval_data, EVAL_AFTER[config.eval_after].get("task_items", EvalArgs.task_items))
    self_replay = config.uses_replay and data_args.replay_data == SELF
    if self_replay and config.self_replay_prompts is not None:
        read_prompts(config.self_replay_prompts)
    reference, curvature = config.beta > 0 and config.ref_cache != "none", config.laplace_lambda > 0
    folders = {"ref_cache_dir": reference and config.ref_cache_dir,
               "laplace_cache_dir": curvature and config.laplace_cache_dir}
    if (default_model or self_replay or config.eval_after != "none" or reference and not config.ref_cache_dir
            or curvature and not config.laplace_cache_dir):  # what is kept in $ARR_CACHE
        folders["$ARR_CACHE"] = cache_dir()
    for key, folder in folders.items():
        if folder:
            run_folder.check_writable(key, folder)


def run(model_args: ModelArguments, data_args: DataArguments, config: ARRConfig, resume: bool = False) -> dict:
    """Fine-tune with ARR and write OUTPUT_DIR/{adapter files, arr_config.yaml, metrics.json}. Returns the metrics.
    Raises Interrupted when Ctrl-C or SIGTERM stopped it (a checkpoint is left to resume from)."""
    check_inputs(data_args, config, model_args.model_name_or_path is None, resume)
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

    chain = read_lineage(model_args.init_adapter, config.skip_missing_lineage)
    prompts = earlier_prompts(chain) if chain and config.lineage_replay == "prompts" else None
    if chain and config.lineage_replay == "data":  # rehearsal: a share of the earlier tasks' own examples
        earlier = [ex for entry in chain if entry["sft_data"] is not None or "missing" not in entry
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
                         replay_dataset=replay, curvature_dataset=surrogate, earlier_prompts=prompts)
    interrupt = StopOnSignal()
    trainer.add_callback(interrupt)
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=True if resume else None)
    finally:
        interrupt.restore()
    seconds = time.perf_counter() - start
    if interrupt.stopped_at is not None:
        raise Interrupted(f"stopped by {signal_name(interrupt.signum)} after step {interrupt.stopped_at}; "
                          f"its checkpoint is in {config.output_dir}", interrupt.signum)

    parts_history = [
        {"step": h["step"], **{k: h[k] for k in ("loss", *LOSS_PART_NAMES, "beta") if k in h}}
        for h in trainer.state.log_history if "sft_ce" in h
    ]
    metrics = {
        "train_seconds": round(seconds, 2),
        "peak_mem_mb": peak_memory_mb(),
        "global_steps": result.global_step,
        "train_loss": result.training_loss,
        "replay_sequences": len(trainer.train_dataset.replay),
        "sft_examples": len(trainer.train_dataset.sft),
        "curvature": trainer.curvature_info,  # key, cache_hit, seconds of the Laplace curvature estimate
        "ref_cache": trainer.ref_cache_info,  # mode (auto resolved), rows, rows_drawn; key, cache_hit, seconds, mb
        "self_replay": trainer.self_replay_info,  # key, cache_hit, rows of the self-generated replay
        "initial_model": trainer.initial_model_info,  # what π₀ is: kind and fingerprint (arr eval checks it)
        "final": parts_history[-1] if parts_history else {},
        "history": parts_history,
    }
    out = Path(config.output_dir)
    if trainer.is_world_process_zero():
        def write(tmp: Path):
            save_adapter(trainer.model, tmp)
            tokenizer.save_pretrained(tmp)
            record = {**resolved_config(model_args, data_args, config), **({LINEAGE: chain} if chain else {})}
            (tmp / run_folder.CONFIG).write_text(yaml.safe_dump(record, sort_keys=False))
            (tmp / run_folder.METRICS).write_text(json.dumps(metrics, indent=2, allow_nan=False))

        (out / run_folder.EVAL).unlink(missing_ok=True)  # an overwritten run's report is not this run's
        run_folder.save_atomically(write, out, last=run_folder.ADAPTER_CONFIG)
        if config.eval_after != "none":
            metrics["eval"] = report(trainer.model, tokenizer, data_args, config, chain)
        if config.save_merged_model:  # last: merging takes the adapter out of the model
            merged = trainer.model.merge_and_unload()
            run_folder.save_atomically(lambda tmp: (merged.save_pretrained(tmp / run_folder.MERGED),
                                                    tokenizer.save_pretrained(tmp / run_folder.MERGED)),
                                       out, last=run_folder.MERGED)
    return metrics


def report(peft_model, tokenizer, data_args: DataArguments, config: ARRConfig, chain: list[dict]) -> dict:
    """What the run forgot and learned (evaluation.py's probes, adapter off and on), written to EVAL. The task's
    held-out examples: `eval_data`, or the bundled date task's test split when training on the bundled task. With
    a lineage, every earlier task too (lineage.lineage_scores)."""
    sizes = EVAL_AFTER[config.eval_after]
    has_task = data_args.eval_data is not None or data_args.sft_data is None
    args = EvalArgs(**{**sizes, "task_data": data_args.eval_data, **({} if has_task else {"task_items": 0})})
    start = time.perf_counter()
    result = evaluate_adapter(peft_model, tokenizer, args, cache_before=True)
    if chain:
        result[LINEAGE] = lineage_scores(peft_model, tokenizer, chain, args.task_items, args.batch_size)
    result["seconds"] = round(time.perf_counter() - start, 2)
    (Path(config.output_dir) / run_folder.EVAL).write_text(json.dumps(result, indent=2))
    return result
