"""`ARRTrainer`: a `transformers.Trainer` whose `compute_loss` is the ARR objective.

It is a drop-in where a TRL `SFTTrainer` script stands: `ARRTrainer(model, args=ARRConfig(...), train_dataset=...,
processing_class=tokenizer, peft_config=LoraConfig(...), replay_dataset=...)`. Everything distributed (DDP, FSDP,
DeepSpeed), checkpointing, logging and mixed precision is the Trainer's, driven by accelerate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from functools import partial

import torch
from peft import PeftModel, get_peft_model
from torch.profiler import record_function
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .config import ARRConfig, cache_dir
from .curvature import adapted_layers, delta_weight, load_or_estimate
from .data import Collator, MixedDataset, ReplayMixSampler, load_sft_examples, token_blocks
from .errors import ARRError
from .objective import ARRObjective, LossParts, TokenCounts, continuation_mask, count_tokens
from .reference import (adapter_layers, adapters_off, check_reference_is_initial, initial_head, reference_cache,
                        reference_logits)

LOSS_PART_NAMES = ("sft_ce", "kl", "replay_ce", "laplace")
STATE_FILE = "arr_state.json"  # ARR's own state in a checkpoint: the adaptive beta


def adapted_beta(beta: float, kl: float, target: float, rate: float) -> float:
    """One step of the adaptive KL controller: a proportional controller on log beta, as in the adaptive KL
    coefficient of PPO-style RLHF trainers (Ziegler et al. 2019; TRL's AdaptiveKLController, whose clip of 0.2 and
    horizon H correspond to rate = 0.2 / H here)."""
    return beta * (1 + rate * min(1.0, max(-1.0, kl / target - 1)))


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
    if change > (1e-3 if model.dtype == torch.float32 else 2e-2):
        raise ARRError(f"padding_free: {type(model).__name__} does not keep packed sequences apart (its logits move "
                       f"by {change:.1%} with a sequence packed before); set padding_free: false")


class _StepEnd(TrainerCallback):
    """Hands the end of every optimizer step to the trainer (where the adaptive beta is updated)."""

    def __init__(self, trainer: ARRTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_of_step()


class ARRTrainer(Trainer):
    def __init__(
        self,
        model: str | torch.nn.Module,
        args: ARRConfig | None = None,
        train_dataset=None,
        processing_class=None,
        peft_config=None,
        replay_dataset: str | Iterable[str] | torch.Tensor | None = None,
        sft_format: str = "auto",
        curvature_dataset: str | Iterable[str] | torch.Tensor | None = None,
        **kwargs,
    ):
        """`train_dataset`: a JSONL path, or records (list / `datasets.Dataset`) in a supported SFT format, or
        already tokenized rows with `input_ids` and `labels`. `replay_dataset`: a corpus path or hub id, an iterable
        of texts, or packed [n, seq_length] token blocks; needed when `args.replay_ratio > 0`.
        `curvature_dataset`: surrogate source text for the Laplace penalty, in the same forms (default: the replay
        corpus, when that is a path or packed blocks); needed when `args.laplace_lambda > 0`."""
        args = args or ARRConfig()
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if peft_config is not None and not isinstance(model, PeftModel):
            set_seed(args.seed)  # the LoRA init draws random numbers: same seed, same adapter
            model = get_peft_model(model, peft_config)
        if not isinstance(model, PeftModel):
            raise TypeError("ARRTrainer trains a LoRA adapter: pass a PeftModel or a peft_config")
        check_reference_is_initial(model)
        if args.padding_free and not is_deepspeed_zero3_enabled():  # ZeRO-3 weights are partitioned: no forward yet
            check_packing(model)
        self.adapter_layers = adapter_layers(model)  # switched off for the reference forward of every step
        tokenizer = processing_class

        sft = train_dataset
        if sft is None:
            raise ValueError("train_dataset is required")
        if not (isinstance(sft, list) and sft and "input_ids" in sft[0]):
            sft = load_sft_examples(sft, tokenizer, args.max_length, sft_format)

        self.replay_sampler = None
        replay = None
        if args.uses_replay:
            if replay_dataset is None:
                raise ValueError("replay_ratio > 0 needs a replay_dataset")
            global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            schedule = ReplayMixSampler(len(sft), 1, global_batch, args.replay_ratio, args.seed)
            total_steps = args.max_steps if args.max_steps > 0 else math.ceil(schedule.steps_per_epoch
                                                                               * args.num_train_epochs)
            needed = max(1, schedule.replay_before(total_steps))  # replay sequences the whole run draws
            if args.replay_max_sequences is not None:
                needed = min(needed, args.replay_max_sequences)
            replay = token_blocks(replay_dataset, tokenizer, args.replay_seq_length, needed, args.seed)
            self.replay_sampler = ReplayMixSampler(len(sft), len(replay), global_batch, args.replay_ratio, args.seed)

        if args.laplace_lambda > 0:  # read the surrogate text now, so that bad data fails before any output
            source = curvature_dataset
            if source is None and isinstance(replay_dataset, (str, torch.Tensor)):
                source = replay_dataset  # (an iterable of texts has been used up by the replay packing)
            if source is None:
                raise ValueError("laplace_lambda > 0 needs a curvature_dataset (surrogate source text)")
            blocks = token_blocks(source, tokenizer, args.replay_seq_length, args.laplace_samples, args.seed)

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._staging_dir = None  # set while a checkpoint is being written (see _save_checkpoint)
        super().__init__(model=model, args=args, train_dataset=MixedDataset(sft, replay),
                         data_collator=kwargs.pop("data_collator", Collator(pad_id, args.padding_free)),
                         processing_class=tokenizer, **kwargs)
        self.objective = ARRObjective(args.beta, args.kl_on, args.kl_direction, args.replay_weight,
                                      args.laplace_lambda)
        self.add_callback(_StepEnd(self))
        self.ref_cache, self.ref_cache_info = None, {}
        if args.ref_cache != "none" and self.objective.needs_reference:
            topk = args.ref_cache_topk if args.ref_cache == "topk" else None
            with args.main_process_first(desc="reference cache"):  # one process builds it, the rest read it
                self.ref_cache, self.ref_cache_info = reference_cache(
                    model, self.train_dataset, Collator(pad_id), topk, os.path.join(args.output_dir, "ref_cache"))
        self._step_kl, self._beta_sum = torch.zeros(()), 0.0
        self.curvature, self.curvature_info = None, {}
        if args.laplace_lambda > 0:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                raise ARRError("laplace_lambda > 0 needs every LoRA weight whole on each process: use DDP, not "
                               "FSDP or DeepSpeed")
            with args.main_process_first(desc="curvature estimate"):  # one process estimates, the rest read the cache
                fisher, self.curvature_info = load_or_estimate(
                    model, blocks[: args.laplace_samples], args.laplace_cache_dir or cache_dir() / "curvature")
            layers = adapted_layers(model)
            self.curvature = [(partial(delta_weight, layers[name], model.active_adapter), f)
                              for name, f in fisher.items()]
        # FSDP and DeepSpeed shard the LM head and gather it only inside their own forward: use full logits there.
        self.chunked_loss = args.loss_chunk_size > 0 and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        # compute_loss normalises by the token counts of the whole optimizer step (see _get_num_items_in_batch).
        self.loss_is_scaled_for_ga = True
        self._part_sums = torch.zeros(len(LOSS_PART_NAMES))
        self._part_steps_logged = 0

    # ------------------------------------------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset=None):
        return self.replay_sampler or super()._get_train_sampler(train_dataset)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Per-part token counts [sft, kl, replay] of one optimizer step, summed over its micro-batches and (as
        the Trainer does for its own count) over all processes."""
        if not batch_samples:
            return None
        counts = sum(count_tokens(b, self.args.kl_on).as_tensor() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    # ------------------------------------------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, is_replay, mask = inputs["labels"], inputs["is_replay"], continuation_mask(inputs)
        # No KV cache in a training step, even if args.use_cache asks for one: transformers keeps the sequences of a
        # packed batch apart only without one (masking_utils: position_ids, no attention mask, no past_key_values).
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "is_replay", "row")}
        model_inputs["use_cache"] = False
        counts = TokenCounts.from_tensor(num_items_in_batch) if num_items_in_batch is not None else None
        ref_cached = None
        if self.ref_cache is not None:
            if "row" not in inputs:
                raise ARRError("ref_cache needs the dataset index of every row (`row`): keep ARR's own collator")
            cache, device = self.ref_cache, labels.device
            ref_cached = (cache.positions(inputs["row"], labels.shape[1], inputs.get("position_ids")).to(device),
                          lambda entries: cache.lookup(entries, device))
        if self.chunked_loss and not return_outputs:
            outputs, parts = None, self._chunked_loss_parts(model, model_inputs, labels, mask, is_replay, counts,
                                                            ref_cached)
        else:
            ref_logits = None
            if self.objective.needs_reference and ref_cached is None:
                ref_logits = reference_logits(model, self.adapter_layers, model_inputs)
            outputs = model(**model_inputs)
            parts = self.objective(outputs.logits, labels, mask, is_replay, ref_logits, counts, ref_cached)
        loss = parts.total
        if counts is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # DDP averages gradients over processes, but the counts are global: undo the average, as Trainer does.
            loss = loss * self.accelerator.num_processes
        penalty = torch.zeros(())
        if self.curvature is not None:  # once per optimizer step: a share in each of its micro-batches
            penalty = self.objective.weight_penalty(*zip(*self.curvature))
            penalty = penalty / self.args.gradient_accumulation_steps
            loss = loss + penalty
        if model.training:
            values = torch.stack([p.detach().float().cpu() for p in (*parts[1:], penalty)])
            if not torch.isfinite(values).all():
                name, value = next((n, v) for n, v in zip(LOSS_PART_NAMES, values.tolist()) if not math.isfinite(v))
                raise ARRError(f"non-finite loss at step {self.state.global_step + 1}: {name} = {value}; "
                               "lower learning_rate or check the data")
            # Kept as each process's share of the step value, so that summing over processes gives the value: token
            # parts over global counts already are; a per-process mean or the (replicated) penalty is divided.
            shares = values / self.args.world_size
            if self.args.average_tokens_across_devices:
                shares[:3] = values[:3]
            self._part_sums += shares
            self._step_kl += shares[1]
        return (loss, outputs) if return_outputs else loss

    def _chunked_loss_parts(self, model, model_inputs, labels, mask, is_replay, counts, ref_cached) -> LossParts:
        """Forward through the (possibly wrapped) model with logits for the last position only, take the final
        hidden states from a hook on the decoder, and let the objective apply the LM head chunk by chunk."""
        peft_model = self.accelerator.unwrap_model(model)
        captured = []
        hook = peft_model.get_decoder().register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else
                                                         output.last_hidden_state))
        try:
            ref_hidden = None
            if self.objective.needs_reference and ref_cached is None:
                with record_function("arr/reference_forward"), torch.no_grad(), adapters_off(self.adapter_layers):
                    model(**model_inputs, logits_to_keep=1)
                ref_hidden = captured.pop()
            with record_function("arr/forward"):
                model(**model_inputs, logits_to_keep=1)
            hidden = captured.pop()
        finally:
            hook.remove()
        head = peft_model.get_output_embeddings()
        with record_function("arr/chunked_loss"):
            return self.objective.forward_hidden(hidden, head, labels, mask, is_replay, ref_hidden, initial_head(head),
                                                 counts, self.args.loss_chunk_size, ref_cached)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss part since the last log (summed over processes) to the Trainer's logs."""
        steps = self.state.global_step - self._part_steps_logged
        if "loss" in logs and steps > 0:
            sums = self._part_sums.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs.update({name: round(v / steps, 6) for name, v in zip(LOSS_PART_NAMES, sums.tolist())})
            logs["beta"] = round(self._beta_sum / steps, 6)  # the mean beta the logged steps trained with
            self._part_sums.zero_()
            self._beta_sum = 0.0
            self._part_steps_logged = self.state.global_step
        super().log(logs, start_time)

    def end_of_step(self) -> None:
        """After each optimizer step: note the beta it used, then move beta toward the KL target (if one is set).
        Every process sees the same step-wide KL, so beta stays identical across processes."""
        self._beta_sum += self.objective.beta
        if self.args.kl_target is not None:
            kl = self._step_kl.to(self.args.device)
            if self.args.world_size > 1:
                kl = self.accelerator.reduce(kl, reduction="sum")  # each process holds its share of the step mean
            self.objective.beta = adapted_beta(self.objective.beta, kl.item(), self.args.kl_target,
                                               self.args.kl_adapt_rate)
        self._step_kl.zero_()

    # ------------------------------------------------------------------------------------------- checkpoints

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(state):
            with open(state) as f:
                self.objective.beta = json.load(f)["beta"]

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging folder and renamed into place once complete, so a
        crash never leaves a `checkpoint-N` that looks complete but is not (resume picks the newest one)."""
        run_dir = super()._get_output_dir(trial)
        self._staging_dir = os.path.join(run_dir, ".staging")
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            with open(os.path.join(run_dir, ".staging", name, STATE_FILE), "w") as f:
                json.dump({"beta": self.objective.beta}, f)
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(run_dir, ".staging", name), final)
            os.rmdir(os.path.join(run_dir, ".staging"))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
