"""`ARRTrainer`: a `transformers.Trainer` whose `compute_loss` is the ARR objective.

It is a drop-in where a TRL `SFTTrainer` script stands: `ARRTrainer(model, args=ARRConfig(...), train_dataset=...,
processing_class=tokenizer, peft_config=LoraConfig(...), replay_dataset=...)`. Everything distributed (DDP, FSDP,
DeepSpeed), checkpointing, logging and mixed precision is the Trainer's, driven by accelerate. Set-up is a sequence of
named steps, in TRL's manner: `_prepare_model`, `_prepare_data`, then (after the Trainer's own set-up)
`_prepare_reference` and `_prepare_curvature`.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Iterable
from functools import partial

import torch
from accelerate.utils import reduce
from peft import PeftModel
from safetensors import SafetensorError
from torch.profiler import record_function
from transformers import Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, rotate_checkpoints

from . import run_folder
from .cache import reference_cache
from .chunked_loss import logits_head
from .config import ARRConfig, ModelArguments, cache_dir
from .curvature import adapted_layers, delta_weight, load_or_estimate
from .data import (Collator, MixedDataset, ReplayMixSampler, attention_width, load_sft_examples, replay_added,
                   replay_sequences_needed, rows_drawn, token_blocks)
from .batch import kl_sequences
from .errors import ARRError, ConfigError
from .evaluation import EvalArgs, report_args
from .objective import ARRObjective, LossParts, TokenCounts
from .initial import (INITIAL_ADAPTER, InitialModel, computes_in_float32, fingerprint, initial_head, is_quantized,
                      load_model, load_tokenizer, lora_keys, one_cpu_path, recordable_quantization_keys,
                      save_adapter, with_adapter)
from .reference import CachedReference, OnlineReference
from .self_replay import SELF, self_replay_rows
from .watch import ForgettingWatch

LOSS_PART_NAMES = LossParts._fields[1:]  # logged beside the Trainer's `loss`


def adapted_beta(beta: float, kl: float, target: float, rate: float) -> float:
    """One step of the adaptive KL controller: a proportional controller on log beta, as in the adaptive KL
    coefficient of PPO-style RLHF trainers (Ziegler et al. 2019; TRL's AdaptiveKLController, whose clip of 0.2 and
    horizon H correspond to rate = 0.2 / H here)."""
    return beta * (1 + rate * min(1.0, max(-1.0, kl / target - 1)))


class AdaptiveKL(TrainerCallback, ExportableState):
    """`kl_target`: moves beta toward the KL budget after every optimizer step. Its state (beta) is saved in every
    checkpoint's trainer_state.json and restored by a resumed run, by transformers itself (ExportableState)."""

    def __init__(self, beta: float, target: float, rate: float):
        self.beta, self.target, self.rate = beta, target, rate
        self.step_kl, self.beta_sum = 0.0, 0.0  # this process's share of the step's KL; betas since the last log

    def on_step_end(self, args, state, control, **kwargs):
        kl = torch.tensor(self.step_kl, device=args.device)
        kl = reduce(kl, reduction="sum").item()  # every process holds its share of the step mean: all see one beta
        self.beta_sum += self.beta
        self.beta, self.step_kl = adapted_beta(self.beta, kl, self.target, self.rate), 0.0

    def state(self) -> dict:  # (beta_sum is not kept: a resumed run's first log covers the steps since it resumed)
        return {"args": {"beta": self.beta, "target": self.target, "rate": self.rate}, "attributes": {}}


class RunComplete(Exception):
    """Raised at the start of a resumed run whose checkpoint is already at max_steps: there is no step left."""


class StepChecks(TrainerCallback):
    """The trainer's bookkeeping at the start of `train()` (a resumed run logs its loss parts over the steps since it
    resumed, as the Trainer logs its loss; a checkpoint at max_steps trains no further step, where the Trainer would
    train one more within the epoch) and, after every optimizer step, the check that the trained weights are finite:
    a NaN or infinite gradient or optimizer setting can leave finite losses behind it for a step, and an adapter of
    NaN would be saved as a finished run."""

    def __init__(self, trainer: "ARRTrainer"):
        self.trainer, self.params = trainer, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._part_sums.zero_()
        self.trainer._part_steps_logged = self.trainer.started_at_step = state.global_step
        self.params = [(n, p) for n, p in self.trainer.model.named_parameters() if p.requires_grad]
        if 0 < state.max_steps <= state.global_step:
            raise RunComplete

    def on_optimizer_step(self, args, state, control, **kwargs):
        broken = (~torch.stack([torch.isfinite(p).all() for _, p in self.params]).all()).float()
        if args.world_size > 1:  # every process stops together
            broken = reduce(broken, reduction="sum")
        if broken.item() > 0:
            name = next((n for n, p in self.params if not torch.isfinite(p).all()), "on another process")
            raise ARRError(f"non-finite weights after the optimizer step of step {state.global_step + 1} ({name}); "
                           "check learning_rate, weight_decay and the other optimizer settings")


@torch.no_grad()
def check_packing(model: torch.nn.Module) -> None:
    """Refuse padding_free for a model that does not keep packed sequences apart: a short sequence alone and packed
    after another must give the same logits (a model that ignores position_ids, or attends across them, would
    silently train on text from neighbouring rows). Half precision allows for its rounding."""
    device, was_training = next(model.parameters()).device, model.training
    vocab, positions = model.config.vocab_size, torch.arange(8, device=device)
    tokens = positions * (vocab // 8) + vocab // 16  # spread out, clear of the special tokens at the start
    model.eval()  # no dropout
    try:
        alone = model(input_ids=tokens[None], position_ids=positions[None], use_cache=False).logits[0].float()
        packed = model(input_ids=torch.cat([tokens.flip(0), tokens])[None], position_ids=positions.repeat(2)[None],
                       use_cache=False).logits[0, 8:].float()
    finally:
        model.train(was_training)
    change = ((alone - packed).abs().mean() / alone.abs().mean().clamp(min=1e-6)).item()
    if change > (1e-3 if computes_in_float32(model) else 2e-2):
        raise ARRError(f"padding_free: {type(model).__name__} does not keep packed sequences apart (its logits move "
                       f"by {change:.1%} with a sequence packed before); set padding_free: false")


@torch.no_grad()
def check_head(model: torch.nn.Module) -> None:
    """Refuse the chunked loss for a model whose logits are not its LM head on the decoder's final hidden states
    (with Gemma 2's softcap, which logits_head applies): a logit scale applied in the model's own forward (Cohere's
    logit_scale, Granite's logits_scaling, MiniCPM's hidden-state scaling) would be silently left out of the loss,
    the reference and the cache."""
    device, was_training = next(model.parameters()).device, model.training
    tokens = (torch.arange(8, device=device) * (model.config.vocab_size // 8) + model.config.vocab_size // 16)[None]
    captured = []
    hook = model.get_decoder().register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else
                                                     output.last_hidden_state))
    model.eval()
    try:
        logits = model(input_ids=tokens, use_cache=False).logits.float()
    finally:
        hook.remove()
        model.train(was_training)
    ours = logits_head(model)(captured[0]).float()
    change = ((ours - logits).abs().max() / logits.abs().max().clamp(min=1e-6)).item()
    if change > (1e-4 if logits.dtype == torch.float32 and computes_in_float32(model) else 2e-2):
        raise ARRError(f"loss_chunk_size: {type(model).__name__}'s logits are not its LM head on the final hidden "
                       f"states (they differ by {change:.1%}: a logit scale in its own forward); set loss_chunk_size: "
                       "0 to compute the loss from the model's own logits")


class ARRTrainer(Trainer):
    def __init__(
        self,
        model: str | torch.nn.Module,
        args: ARRConfig | None = None,
        train_dataset=None,
        processing_class=None,
        peft_config=None,
        replay_dataset: str | Iterable[str] | torch.Tensor | None = SELF,
        sft_format: str = "auto",
        curvature_dataset: str | Iterable[str] | torch.Tensor | None = None,
        earlier_prompts: list[list[dict]] | None = None,
        eval_args: EvalArgs | None = None,
        **kwargs,
    ):
        """`train_dataset`: a JSONL path, or records (list / `datasets.Dataset`) in a supported SFT format, or
        already tokenized rows with `input_ids` and `labels`. `replay_dataset`: "self" (the initial model's own
        answers to general prompts, see self_replay.py), a corpus path or hub id, an iterable of texts, or packed
        [n, seq_length] token blocks; needed when `args.replay_ratio > 0`. `curvature_dataset`: surrogate source
        text for the Laplace penalty, in the same forms but "self" (default: the replay corpus, when that is a path
        or packed blocks); needed when `args.laplace_lambda > 0`. `earlier_prompts`: conversations of earlier tasks
        whose answers by the initial model join self-generated replay (`lineage_replay: prompts`, arr/lineage.py).
        `eval_args`: the probes of the report `save_run` writes and of the in-training rounds (`probe_steps`);
        default: `evaluation.report_args()`, the quick sizes without a task score (`report_args("my_test.jsonl")`
        adds your task's)."""
        args = args or ARRConfig()
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        model, processing_class = self._prepare_model(model, processing_class, peft_config, args)
        try:  # said now, not after training: save_run refuses such a base, trainer.save_model does not
            recordable_quantization_keys(model)
        except ConfigError as error:
            warnings.warn(f"save_run() will refuse this run: {error}", stacklevel=2)
        self.initial = InitialModel(model)  # π₀, switched to for the reference forward of every step
        self.initial_model_info = {"kind": self.initial.kind, "fingerprint": fingerprint(model).hexdigest()[:32]}
        self.self_replay_info, self.self_replay_reference = {}, None
        self_replay = isinstance(replay_dataset, str) and replay_dataset == SELF
        replay_weight = args.replay_weight if args.replay_weight is not None else float(not self_replay)
        self.objective = ARRObjective(args.beta, args.kl_on, args.kl_direction, args.kl_mask_target, replay_weight,
                                      args.laplace_lambda, args.task_kl_beta)
        self.earlier_prompts = earlier_prompts
        dataset, self.replay_sampler, curvature_blocks = self._prepare_data(
            model, processing_class, train_dataset, replay_dataset, self_replay, curvature_dataset, sft_format, args)
        pad_id = processing_class.pad_token_id if processing_class.pad_token_id is not None \
            else processing_class.eos_token_id
        self._staging_dir = None  # set while a checkpoint is being written (see _save_checkpoint)
        super().__init__(model=model, args=args, train_dataset=dataset,
                         data_collator=kwargs.pop("data_collator", Collator(
                             pad_id, attention_width(model.config) if args.padding_free else None)),
                         processing_class=processing_class, **kwargs)
        if args.kl_target is not None:
            self.add_callback(AdaptiveKL(args.beta, args.kl_target, args.kl_adapt_rate))
        self.add_callback(StepChecks(self))
        self.eval_args = eval_args or report_args(eval_after=args.eval_after)
        # FSDP and DeepSpeed shard the LM head and gather it only inside their own forward: use full logits there.
        self.sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if self.initial.snapshot is not None and (self.sharded or args.laplace_lambda > 0):
            raise ConfigError("an adapter that is not zero at the start (init_adapter, a trained PeftModel, or an init "
                              "that rewrites the base weights) needs DDP or one process (the snapshot of the initial "
                              "adapter is kept and converted whole) and laplace_lambda 0 (the Laplace penalty measures "
                              "the adapter from zero, not from its initial value)")
        if is_quantized(model) and args.laplace_lambda > 0:
            raise ConfigError("laplace_lambda > 0 on a quantized base (load_in_4bit/load_in_8bit): the curvature of "
                              "quantized weights is not estimated exactly; use laplace_lambda 0 or an unquantized base")
        self.ref_cache, self.ref_cache_info = self._prepare_reference(model, Collator(pad_id), args, self_replay)
        self.curvature, self.curvature_info = self._prepare_curvature(model, curvature_blocks, args)
        if args.probe_steps:
            if self.sharded:
                raise ConfigError("probe_steps: the probes run on each process's whole model: use DDP or one "
                                  "process, not FSDP or DeepSpeed")
            self.add_callback(ForgettingWatch(self, self.eval_args, args.probe_steps, args.forgetting_budget))
        self.chunked_loss = args.loss_chunk_size > 0 and not self.sharded
        if self.chunked_loss:
            check_head(model)
        # compute_loss normalises by the token counts of the whole optimizer step (see _get_num_items_in_batch).
        self.loss_is_scaled_for_ga = True
        self._part_sums = torch.zeros(len(LOSS_PART_NAMES))
        self._part_steps_logged = self.started_at_step = 0  # started_at_step: the global step train() began at

    def save_run(self, seconds: float | None = None, model_args=None, data_args=None) -> dict:
        """After `train()`: the run folder `arr train` writes, in `args.output_dir`: the adapter and tokenizer,
        arr_config.yaml, metrics.json and (unless `eval_after: none`) the report, eval.json and report.png
        (train.save_run). Returns the metrics."""
        from .train import save_run

        return save_run(self, seconds, model_args, data_args)

    # ------------------------------------------------------------------------------------------------ set-up

    @staticmethod
    def _prepare_model(model, processing_class, peft_config, args: ARRConfig):
        """The PEFT model (loaded and wrapped when needed) and its tokenizer, and a check that the model keeps
        packed sequences apart. A PeftModel passed in is trained as it is: its adapter as it is now is π₀'s."""
        if isinstance(model, str):
            model = load_model(ModelArguments(model_name_or_path=model, dtype="auto"), model)
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path)
        if isinstance(model, PeftModel) and peft_config is not None:
            raise ConfigError("ARRTrainer got a PeftModel and a peft_config: the model already holds its adapter, so "
                              "the peft_config would be ignored; pass one of them")
        if not isinstance(model, PeftModel):
            if peft_config is None:
                raise TypeError("ARRTrainer trains a LoRA adapter: pass a PeftModel or a peft_config")
            model = with_adapter(model, peft_config, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
        one_cpu_path(model)  # (a model quantized by the caller)
        if args.padding_free and not is_deepspeed_zero3_enabled():  # ZeRO-3 weights are partitioned: no forward yet
            check_packing(model)
        return model, processing_class

    def _prepare_data(self, model, tokenizer, sft, replay_source, self_replay: bool, curvature_source, sft_format,
                      args: ARRConfig):
        """The SFT rows and replay pool as one MixedDataset, the sampler that interleaves them, and the surrogate
        blocks of the curvature estimate (read now, so that bad data fails before any output)."""
        if not (isinstance(sft, list) and sft and "input_ids" in sft[0]):
            sft = load_sft_examples(sft, tokenizer, args.max_length, sft_format)
        replay, sampler = None, None
        if args.uses_replay:
            if replay_source is None:
                raise ValueError("replay_ratio > 0 needs a replay_dataset")
            needed = replay_sequences_needed(len(sft), args)
            if self_replay:
                # the top-k reference of these rows comes with their generation when a cache of them alone may be read
                topk = args.ref_cache_topk if (self.objective.kl_rows() == ("replay",)
                                               and args.ref_cache in ("auto", "topk")) else None
                with args.main_process_first(desc="self-generated replay"):  # one process generates, the rest read
                    replay, self.self_replay_info, self.self_replay_reference = self_replay_rows(
                        model, tokenizer, needed, args, topk, self.earlier_prompts)
            else:
                replay = token_blocks(replay_source, tokenizer, args.replay_seq_length, needed, args.seed)
            sampler = ReplayMixSampler(len(sft), len(replay), args.global_batch, args.replay_ratio, args.seed,
                                       added=replay_added(args))
        blocks = None
        if args.laplace_lambda > 0:
            source = curvature_source
            if source is None and isinstance(replay_source, (str, torch.Tensor)) and not self_replay:
                source = replay_source  # (an iterable of texts has been used up by the replay packing)
            if source is None:
                raise ValueError("laplace_lambda > 0 needs a curvature_dataset (surrogate source text)")
            blocks = token_blocks(source, tokenizer, args.replay_seq_length, args.laplace_samples, args.seed)
        return MixedDataset(sft, replay), sampler, blocks

    def _prepare_reference(self, model, collate, args: ARRConfig, self_replay: bool):
        """The reference cache (ref_cache exact/topk, or auto resolved here) of the rows that hold KL positions,
        built once by the main process and read by the others and by later runs."""
        recorded, self.self_replay_reference = self.self_replay_reference, None  # (kept in the cache from here)
        kinds = self.objective.kl_rows()
        draws = dict(zip(("sft", "replay"), rows_drawn(len(self.train_dataset.sft), args)))
        rows, drawn = self.train_dataset.indices(kinds), sum(draws[kind] for kind in kinds)
        mode = args.ref_cache
        if mode == "auto":  # the build is a forward of every such row: worth it when later runs read it (the same
            # self-generated replay rows) or when the online reference would run on at least 1.5 times as many rows
            # (the margin keeps a single pass's rounded-up last step on-line)
            reused = self_replay and kinds == ("replay",)
            mode = "topk" if (reused or drawn >= 1.5 * len(rows)) and not self.sharded else "none"
        if mode == "none" or not rows:
            return None, {"mode": "none", "rows": len(rows), "rows_drawn": drawn}
        topk = args.ref_cache_topk if mode == "topk" else None
        computed = recorded if mode == "topk" else None  # (recorded only when the KL sits on replay rows alone)
        with args.main_process_first(desc="reference cache"):
            cache, info = reference_cache(model, self.train_dataset, collate, topk,
                                          args.ref_cache_dir or cache_dir() / "reference", rows, computed)
        if computed is not None and not info["cache_hit"]:
            info["built_while_generating"] = True
        return cache, {"mode": mode, "rows": len(rows), "rows_drawn": drawn, **info}

    def _prepare_curvature(self, model, blocks, args: ARRConfig):
        """The Laplace penalty's (dW function, Fisher) pairs, the Fisher estimated once and cached."""
        if args.laplace_lambda == 0:
            return None, {}
        if self.sharded:
            raise ARRError("laplace_lambda > 0 needs every LoRA weight whole on each process: use DDP, not "
                           "FSDP or DeepSpeed")
        with args.main_process_first(desc="curvature estimate"):  # one process estimates, the rest read the cache
            fisher, info = load_or_estimate(model, blocks, args.laplace_cache_dir or cache_dir() / "curvature")
        layers = adapted_layers(model)
        return [(partial(delta_weight, layers[name], model.active_adapter), f) for name, f in fisher.items()], info

    # ------------------------------------------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset=None):
        return self.replay_sampler or super()._get_train_sampler(train_dataset)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Per-part token counts (TokenCounts) of one optimizer step, summed over its micro-batches and (as
        the Trainer does for its own count) over all processes."""
        if not batch_samples:
            return None
        counts = sum(self.objective.count_tokens(b).as_tensor() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    # ------------------------------------------------------------------------------------------------- loss

    @property
    def adaptive_kl(self) -> AdaptiveKL | None:
        """The kl_target controller (a resumed run's is the one transformers restored from the checkpoint)."""
        return next((c for c in self.callback_handler.callbacks if isinstance(c, AdaptiveKL)), None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # No KV cache in a training step, even if args.use_cache asks for one: transformers keeps the sequences of a
        # packed batch apart only without one (masking_utils: position_ids, no attention mask, no past_key_values).
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "is_replay", "row")}
        model_inputs["use_cache"] = False
        counts = TokenCounts.from_tensor(num_items_in_batch) if num_items_in_batch is not None else None
        if self.adaptive_kl is not None:
            self.objective.beta = self.adaptive_kl.beta
        kl_positions = self.objective.positions(inputs).kl
        chunked = self.chunked_loss and not return_outputs
        peft_model = self.accelerator.unwrap_model(model)
        if chunked:
            model_inputs["logits_to_keep"] = 1  # the loss applies the head itself, chunk by chunk
        reference = self._reference(model, peft_model, inputs, model_inputs, kl_positions, chunked)
        with record_function("arr/forward"):
            outputs = self._forward(model, peft_model, model_inputs, chunked)
        head = logits_head(peft_model) if chunked else None
        # DDP averages gradients over processes, but the token counts are global: undo the average, as Trainer does.
        scale = 1
        if counts is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            scale = self.accelerator.num_processes
        # The Laplace penalty is once per optimizer step: a share of it in each micro-batch (and, scaled, process).
        curvature_share = 1 / (self.args.gradient_accumulation_steps * scale)
        with record_function("arr/loss"):
            parts = self.objective(outputs if chunked else outputs.logits, inputs, reference, head, counts,
                                   self.args.loss_chunk_size, self.curvature, curvature_share)
        loss = parts.total * scale
        if model.training:
            self._note_parts(parts._replace(laplace=parts.laplace * scale))
        return (loss, outputs) if return_outputs else loss

    def _forward(self, model, peft_model, model_inputs, chunked):
        """The trained model's forward: its outputs, or (chunked) the final hidden states from a hook on the
        decoder, the model itself computing logits for the last position only."""
        if not chunked:
            return model(**model_inputs)
        captured = []
        hook = peft_model.get_decoder().register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else
                                                         output.last_hidden_state))
        try:
            model(**model_inputs)
        finally:
            hook.remove()
        return captured[0]

    def _reference(self, model, peft_model, inputs, model_inputs, kl_positions, chunked):
        """The Reference of this batch: the cache's entries, or the initial model's forward over the rows that
        hold KL positions (all rows under FSDP/DeepSpeed, whose forward is collective and must run on every process
        alike, so it runs there even on a micro-batch without KL positions). None when the batch has no KL position."""
        collective = self.sharded and self.ref_cache is None and self.objective.needs_reference
        if not kl_positions.any() and not collective:
            return None
        if self.ref_cache is not None:
            if "row" not in inputs:
                raise ARRError("ref_cache needs the dataset index of every row (`row`): keep ARR's own collator")
            entries = self.ref_cache.positions(inputs["row"], inputs["labels"].shape[1], inputs.get("position_ids"))
            return CachedReference(self.ref_cache, entries, inputs["labels"].device)
        sub_inputs, take = (model_inputs, None) if self.sharded else kl_sequences(model_inputs, kl_positions)
        # DDP's forward prepares its gradient reduction; the reference needs none, so it runs on the model inside.
        forward_model = model if self.sharded else peft_model
        with record_function("arr/reference_forward"), torch.no_grad(), self.initial.switched_to():
            outputs = self._forward(forward_model, peft_model, sub_inputs, chunked)
        if not kl_positions.any():
            return None
        if not chunked:
            return OnlineReference(outputs.logits, take=take)
        return OnlineReference(outputs, logits_head(peft_model, initial_head(peft_model.get_output_embeddings())),
                               take)

    def _note_parts(self, parts: LossParts) -> None:
        """Stop on a non-finite part or total (beta = inf times a KL of 0 is NaN); keep each part for the logs, and
        the KL for the adaptive controller."""
        checked = torch.stack([t.detach().float().cpu() for t in (*parts[1:], parts.total)])  # the parts, the total
        if not torch.isfinite(checked).all():
            name, value = next((n, v) for n, v in zip((*LOSS_PART_NAMES, "loss"), checked.tolist())
                               if not math.isfinite(v))
            raise ARRError(f"non-finite loss at step {self.state.global_step + 1}: {name} = {value}; "
                           "lower learning_rate or check the data")
        values = checked[:-1]
        # Kept as each process's share of the step value, so that summing over processes gives the value: token
        # parts over global counts already are; a per-process mean or the (replicated) penalty is divided.
        token_parts = [name != "laplace" and self.args.average_tokens_across_devices for name in LOSS_PART_NAMES]
        shares = torch.where(torch.tensor(token_parts), values, values / self.args.world_size)
        self._part_sums += shares
        if self.adaptive_kl is not None:
            self.adaptive_kl.step_kl += shares[LOSS_PART_NAMES.index("kl")].item()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss part since the last log (summed over processes), and the mean beta the logged
        steps trained with, to the Trainer's logs."""
        steps = self.state.global_step - self._part_steps_logged
        if "loss" in logs and steps > 0:
            sums = self._part_sums.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs.update({name: round(v / steps, 6) for name, v in zip(LOSS_PART_NAMES, sums.tolist())})
            controller = self.adaptive_kl
            if controller is not None:
                logs["beta"], controller.beta_sum = round(controller.beta_sum / steps, 6), 0.0
            else:
                logs["beta"] = self.objective.beta
            self._part_sums.zero_()
            self._part_steps_logged = self.state.global_step
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's, except that after an init that rewrote the base weights a final save (not a checkpoint,
        which a resumed run loads back as it is) holds the adapter converted for the original model
        (initial.save_adapter) in place of the trained one and the snapshot, before any push to the Hub."""
        if self.initial.snapshot is None or _internal_call:
            return super().save_model(output_dir, _internal_call)
        super().save_model(output_dir, _internal_call=True)  # training args and tokenizer, as the Trainer writes them
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            shutil.rmtree(os.path.join(output_dir, INITIAL_ADAPTER), ignore_errors=True)
            save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs) -> TrainOutput:
        """The Trainer's, except that a checkpoint is refused when it trained against another initial model or with
        other keys than this run's (InitialModel.check_checkpoint, run_folder.check_resumed_keys), and resuming from
        one at max_steps trains nothing (StepChecks): the run is complete and its model is the checkpoint's."""
        if resume_from_checkpoint:
            checkpoint = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                          else resume_from_checkpoint)
            if checkpoint is not None:  # (none: the Trainer's own error says so)
                self.initial.check_checkpoint(checkpoint)
                run_folder.check_resumed_keys(checkpoint, self.trained_keys())
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        except RunComplete:
            self.is_in_train = False
            return TrainOutput(self.state.global_step, 0.0, {})  # (the Trainer's training_loss of no step)

    def trained_keys(self) -> dict:
        """What the run trains, as its checkpoints record it: the objective's and the optimisation's keys
        (ARRConfig.trained_keys) and the adapter's LoRA keys, whose changed values a resumed PEFT model would take
        without a word (its load_adapter keeps the adapter's config and loads the weights into it)."""
        return {**self.args.trained_keys(), **lora_keys(self.accelerator.unwrap_model(self.model))}

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint with the keys it trained with (run_folder.TRAINED_KEYS), written into `.staging/`
        and renamed into place once complete, so a crash never leaves a `checkpoint-N` that looks complete but is not
        (resume picks the newest one). The Trainer has no public hook for where a checkpoint is written, hence the two
        private methods overridden here."""
        run_dir = super()._get_output_dir(trial)
        staging = self._staging_dir = os.path.join(run_dir, run_folder.STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                run_folder.record_trained_keys(os.path.join(staging, name), self.trained_keys())
        except (OSError, SafetensorError) as e:  # a full disk: the checkpoints written before stay as they were
            shutil.rmtree(staging, ignore_errors=True)
            raise ARRError(f"cannot write {name} into {run_dir!r} ({' '.join(str(e).split())}); the checkpoints "
                           "before it are untouched") from None
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            os.rmdir(staging)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
