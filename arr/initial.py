"""The initial model π₀, which the KL, the reference cache, self-generated replay, the Laplace curvature and the
report's "before" are all measured against; and the one place where models are loaded.

What π₀ is: the model as training starts, reached inside the trained PEFT model, without a second copy.
- The bare base, when the adapter is a no-op at the start (every LoRA B is zero: the standard init). π₀ is then the
  adapter switched off, for the whole run.
- The base plus a frozen snapshot of the starting adapter (INITIAL_ADAPTER), made active in the trained adapter's
  place, when the adapter is not a no-op at the start:
  - after an init that rewrote the base weights (PiSSA, OLoRA, CorDA, LoRA-GA: the base keeps W - s B0 A0, so only
    base + B0 A0 is the model training starts from);
  - when training continues from an existing adapter (`init_adapter`, or a `PeftModel` passed with a trained one).
Which one applies is read from the weights at set-up (`InitialModel`), not from the init's name.

- `initial_model(peft_model)`: π₀ inside a `with` block, through PEFT's public switches (everything but the training
  step uses it); `InitialModel.switched_to` is the same made cheap enough for every step (tests hold them equal).
- `fingerprint(peft_model)`: π₀'s identity, the key of every cache (reference, self-generated replay, curvature,
  the report's "before").
- `save_adapter`: the trained adapter in PEFT format, loadable on the user's base with plain PEFT.
- `load_model`, `load_tokenizer`, `with_adapter`, `load_trained`: dtype, attention implementation, bitsandbytes
  quantization (QLoRA) and the adapter, for training, evaluation and compare alike. A run's arr_config.yaml holds those keys, and its
  metrics.json π₀'s kind and fingerprint, so `arr eval` and `arr compare` rebuild the same π₀ and check that they did.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import (PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training,
                  set_peft_model_state_dict)
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from .errors import ConfigError

BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga")
INITIAL_ADAPTER = "arr_initial"  # the frozen snapshot of the starting adapter, when it is not a no-op
ADAPTER_CONFIG = "adapter_config.json"
# LoRA keys that an init_adapter's own config decides (a given value that differs from it is refused)
ADAPTER_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_target_modules": "target_modules",
                "use_rslora": "use_rslora", "use_dora": "use_dora"}


# ------------------------------------------------------------------------------------------------------- loading

def torch_dtype(name: str):
    """The torch dtype a dtype key names ("auto" as it is): ModelArguments has refused an unknown name."""
    return name if name == "auto" else getattr(torch, name)


def quantization_config(args):
    """bitsandbytes' config from the TRL-named keys of `args` (ModelArguments), or None for an unquantized base."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    compute = args.bnb_4bit_compute_dtype or (args.dtype if args.dtype != "auto" else "float32")
    return BitsAndBytesConfig(load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                              bnb_4bit_quant_type=args.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=torch_dtype(compute),
                              bnb_4bit_use_double_quant=args.use_bnb_nested_quant)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def quantization_settings(model) -> dict | None:
    """The model's quantization config as a dict (transformers holds an object, or a dict once reloaded), None when
    it has none."""
    quantization = getattr(model.config, "quantization_config", None)
    return quantization if quantization is None or isinstance(quantization, dict) else quantization.to_dict()


def quantization_keys(model) -> dict:
    """The ModelArguments keys that load a bitsandbytes-quantized model as it was loaded ({} for another model): what
    quantization_config built, read back from the model's own config."""
    if not is_quantized(model):
        return {}
    quantization = quantization_settings(model)
    four_bit = bool(quantization.get("load_in_4bit"))
    # the 4-bit keys of an 8-bit model too: its fingerprint hashes the whole quantization config
    return {"load_in_4bit": four_bit, "load_in_8bit": not four_bit,
            "bnb_4bit_quant_type": quantization.get("bnb_4bit_quant_type", "fp4"),
            "bnb_4bit_compute_dtype": str(quantization.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch."),
            "use_bnb_nested_quant": bool(quantization.get("bnb_4bit_use_double_quant"))}


def recordable_quantization_keys(model) -> dict:
    """quantization_keys(model), refused with one line when they would rebuild another quantization: a model
    quantized from Python with bitsandbytes settings that have no key (llm_int8_threshold, bnb_4bit_quant_storage,
    skip modules, ...), which arr eval could not rebuild."""
    keys = quantization_keys(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if not keys or getattr(quantizer, "pre_quantized", False):  # a quantized checkpoint reloads with its own config
        return keys
    rebuilt = quantization_config(SimpleNamespace(**keys, dtype="auto")).to_dict()
    if other := {k: v for k, v in quantization_settings(model).items() if rebuilt.get(k) != v}:
        raise ConfigError(f"the base's bitsandbytes settings {other} have no arr key (only {', '.join(keys)}), so "
                          "arr eval could not rebuild it; save the adapter with trainer.save_model(DIR), or quantize "
                          "the base with those keys alone")
    return keys


def computes_in_float32(model) -> bool:
    """Whether the model's matmuls run in float32: for a quantized base its compute dtype, not `model.dtype`, which
    prepare_model_for_kbit_training makes float32 by upcasting the unquantized weights (8-bit layers compute in
    float16)."""
    quantization = quantization_keys(model)
    if quantization:
        return quantization["load_in_4bit"] and quantization["bnb_4bit_compute_dtype"] == "float32"
    return model.dtype == torch.float32


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(args, path: str):
    """The base model at `path` as `args` (ModelArguments) say: dtype, attention implementation, quantization. A
    quantized model goes on this process's GPU when there is one (as TRL's get_kbit_device_map)."""
    from transformers import AutoModelForCausalLM

    quantization = quantization_config(args)
    device_map = None
    if quantization is not None and torch.cuda.is_available():
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    return one_cpu_path(AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(args.dtype), quantization_config=quantization, device_map=device_map, **kwargs))


def one_cpu_path(model):
    """The model with each bitsandbytes layer computing on CPU as it does in training, in every mode, so that π₀ is
    one function in training, the reference cache, self-replay and the probes. bitsandbytes has no public switch for
    either path; its layers read these attributes (absent on other layers: nothing changes).
    - 4-bit, on a CPU with AVX512-BF16 (bitsandbytes 0.48+): in eval mode without gradients it repacks the weights with
      bfloat16 scales for good (SmolLM2's logits move 0.5%, with no gradient through the layer after), and fails on a
      layer narrower than a quantization block. A model already repacked is refused.
    - 8-bit, on any CPU: training multiplies by the dequantized weights, eval by int8 inputs (0.8% apart)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
                raise ConfigError("the 4-bit base was run in eval mode without gradients on this CPU before ARR got "
                                  "it, and bitsandbytes repacked its weights for inference (bfloat16 scales, no "
                                  "gradients through them): load it again and pass it to ARRTrainer before running it")
            module.support_avx512bf16_for_cpu = False
        state = getattr(module, "state", None)
        if type(state).__name__ == "MatmulLtState":
            state.__class__ = training_path_state(type(state))
    return model


@cache
def training_path_state(state_class: type) -> type:
    """bitsandbytes' MatmulLtState with `is_training` always true, whatever Linear8bitLt.forward sets from the
    module's mode: the matmul it picks by that flag on CPU (the flag decides nothing else for a quantized base)."""
    return type("TrainingPathState", (state_class,), {"is_training": property(lambda self: True,
                                                                             lambda self, value: None)})


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The PEFT config of an adapter folder (a PEFT adapter, or a finished `arr train` run), refused with one line
    when it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"config key init_adapter: no such folder {str(path)!r}")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config key init_adapter: {str(path)!r} holds no PEFT adapter ({ADAPTER_CONFIG} is "
                          "missing; a run still training or stopped has none yet)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"config key init_adapter: cannot read {folder / ADAPTER_CONFIG}: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"config key init_adapter: {str(path)!r} holds a {config.get('peft_type')} adapter; ARR "
                          "trains LoRA")
    return config


def check_adapter_keys(given: dict, init_adapter: str) -> None:
    """With `init_adapter` the adapter's own LoRA config applies: a LoRA key given (in the YAML or as key=value) that
    differs from it is refused, since it would be silently ignored."""
    config = read_adapter_config(init_adapter)
    for key, name in ADAPTER_KEYS.items():
        if key not in given:
            continue
        value, theirs = given[key], config.get(name)
        if key == "lora_target_modules":
            value = value[0] if isinstance(value, list) and len(value) == 1 else value
            same = value == theirs or (isinstance(value, list) and isinstance(theirs, list)
                                       and sorted(value) == sorted(theirs))
        else:
            same = value == theirs or (theirs is None and not value)
        if not same:
            raise ConfigError(f"config key {key}={value!r} does not match init_adapter {init_adapter!r} ({name}="
                              f"{theirs!r}); training continues that adapter, so leave {key} out or use its value")


def with_adapter(model, peft_config=None, init_adapter: str | None = None, gradient_checkpointing: bool = False,
               seed: int | None = None) -> PeftModel:
    """`model` with a trainable LoRA adapter: a new one from `peft_config`, or the adapter in `init_adapter`, whose
    training then continues (π₀ = base + that adapter). A quantized base is first prepared as PEFT documents for
    k-bit training."""
    if is_quantized(model):
        init = str(getattr(peft_config, "init_lora_weights", True)).lower()
        if init.startswith(BASE_REWRITING_INITS):
            raise ConfigError(f"init_lora_weights={init!r} rewrites the base weights, which a quantized base cannot "
                              "hold exactly; use init_lora_weights=true with load_in_4bit/load_in_8bit")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if init_adapter is not None:
        read_adapter_config(init_adapter)
        try:
            return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another model
            reason = " ".join(str(e).split())[:300]
            raise ConfigError(f"config key init_adapter: {init_adapter!r} does not fit this base model "
                              f"({getattr(model, 'name_or_path', '')!r}): {reason}") from None
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)  # the LoRA init draws random numbers: same seed, same adapter
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:  # PEFT's word for a LoRA config that does not fit the model
        key = "lora_target_modules" if "target modules" in str(e).lower() else "peft_config"
        raise ConfigError(f"config key {key}: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------------------------------------------- what π₀ is

def adapter_layers(peft_model: PeftModel) -> list[torch.nn.Module]:
    """Every PEFT tuner layer and trained module copy (modules_to_save, trainable tokens)."""
    return [m for m in peft_model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def lora_keys(peft_model: PeftModel) -> dict:
    """The active adapter's LoRA keys, by their config keys (ADAPTER_KEYS, lora_dropout and init_lora_weights)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    keys = {key: getattr(config, name) for key, name in {**ADAPTER_KEYS, "lora_dropout": "lora_dropout"}.items()}
    if isinstance(keys["lora_target_modules"], (set, list)):  # (PEFT holds a set: no order)
        keys["lora_target_modules"] = sorted(keys["lora_target_modules"])
    return {**keys, "init_lora_weights": str(config.init_lora_weights).lower()}


def starts_as_base(peft_model: PeftModel) -> bool:
    """Whether the active adapter is a no-op now: every LoRA B (and DoRA's, whose magnitude is the base norm at
    B = 0) zero, and no trained module copy. The standard init is; PiSSA/OLoRA and a trained adapter are not."""
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return False  # copies start equal, but one loaded from a trained adapter does not: not worth telling apart
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            for weights in (getattr(module, "lora_B", {}), getattr(module, "lora_embedding_B", {})):
                if name in weights:
                    weight = weights[name].weight if isinstance(weights[name], torch.nn.Module) else weights[name]
                    if weight.detach().abs().max() > 0:
                        return False
    return True


class InitialModel:
    """π₀ of `peft_model`, set up once before training: a snapshot of the starting adapter when it is not a no-op
    (see the module's docstring). Refused, with the reason: a merged adapter (switching off a merged adapter
    unmerges it with rounding error); LoftQ; under a base-rewriting init, what PEFT's conversion to a plain LoRA of
    the original base drops or what the snapshot cannot hold (DoRA, LoRA on embeddings, trained module copies,
    trained biases) and a LoRA on the LM head (the chunked loss applies the initial head directly)."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model
        name = peft_model.active_adapter
        config = peft_model.peft_config[name]
        init = str(getattr(config, "init_lora_weights", True)).lower()
        if any(getattr(m, "merged", False) for m in peft_model.modules() if isinstance(m, BaseTunerLayer)):
            raise ConfigError("the adapter is merged into the base weights; unmerge it (unmerge_adapter()) before "
                              "training: its KL reference would be the base with rounding error")
        if init.startswith("loftq"):
            raise ConfigError(f"init_lora_weights={init!r} (adapter {name!r}) starts from a quantized approximation of "
                              "the base weights, which ARR does not set up; use init_lora_weights=true, pissa or olora")
        self.base_rewritten = init.startswith(BASE_REWRITING_INITS)
        if INITIAL_ADAPTER not in peft_model.peft_config and not starts_as_base(peft_model):
            if self.base_rewritten:
                self._check_convertible(config, init)
            self._snapshot(config)
        self.snapshot = INITIAL_ADAPTER if INITIAL_ADAPTER in peft_model.peft_config else None
        self.layers = adapter_layers(peft_model)  # the fast switch's list, made once

    @property
    def kind(self) -> str:
        return "base + initial adapter" if self.snapshot else "base"

    def check_checkpoint(self, checkpoint: str | Path) -> None:
        """Refuse to resume a checkpoint trained against another π₀: one that holds the snapshot (a run that
        started from init_adapter or a base-rewriting init) by a run that starts from the bare base, or the reverse;
        the Trainer would load its adapters into the wrong model without a word."""
        trained_against = "base + initial adapter" if (Path(checkpoint) / INITIAL_ADAPTER).is_dir() else "base"
        if trained_against != self.kind:
            raise ConfigError(f"--resume: {str(checkpoint)!r} trained against {trained_against} as the initial "
                              f"model, and this run's is {self.kind}; resume with the init_adapter and "
                              "init_lora_weights the run started with")

    def _check_convertible(self, config, init: str) -> None:
        model = self.peft_model
        unsupported = [what for what, present in (
            ("use_dora", config.use_dora), (f"bias={config.bias!r}", config.bias != "none"),
            ("modules_to_save", config.modules_to_save), ("trainable_token_indices", config.trainable_token_indices),
            ("a LoRA on an embedding", any(isinstance(m, LoraEmbedding) for m in model.modules())),
            ("a LoRA on the LM head", isinstance(model.get_output_embeddings(), BaseTunerLayer))) if present]
        if unsupported:
            raise ConfigError(f"init_lora_weights={init!r} with {', '.join(unsupported)}: the initial model or the "
                              "adapter converted for the original model would be wrong; use init_lora_weights=true there")

    def _snapshot(self, config) -> None:
        """A frozen copy of the active adapter as it is now, without dropout (the reference forward runs in train
        mode). Added with B = 0, so adding it leaves the base weights alone, then given the adapter's weights."""
        model, name = self.peft_model, self.peft_model.active_adapter
        config = copy.deepcopy(config)
        config.init_lora_weights, config.inference_mode, config.lora_dropout = True, True, 0.0
        model.add_adapter(INITIAL_ADAPTER, config)
        set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=name),
                                  adapter_name=INITIAL_ADAPTER)

    @contextmanager
    def switched_to(self):
        """`initial_model` made cheap enough for the reference forward of every training step. PEFT's context
        manager (and its set_adapter) also checks the model's status and resets requires_grad on every adapter
        weight, walking all modules on entry and exit (docs/PERFORMANCE.md measures what that costs per step). This
        sets only what PEFT's layers read in their forward, on a list made once: the flag `disable_adapters` (stored
        as `_disable_adapters` in the pinned peft) or, with a snapshot, each tuner layer's active adapter (stored as
        `_active_adapter`; trained module copies are switched off). requires_grad does not matter to a forward under
        no_grad. PEFT's public per-layer switch, `enable_adapters(False/True)`, also walks each layer's weights to
        reset requires_grad: bench.reference_cost measures all three, and the flag is the only one whose cost does
        not grow with the adapter. Tests hold this equal to `initial_model`, so a rename in peft fails there."""
        swapped = [m for m in self.layers if self.snapshot is not None and isinstance(m, BaseTunerLayer)]
        switched_off = [m for m in self.layers if not (self.snapshot is not None and isinstance(m, BaseTunerLayer))]
        flags, active = [m._disable_adapters for m in switched_off], [m._active_adapter for m in swapped]
        for m in switched_off:
            m._disable_adapters = True
        for m in swapped:
            m._active_adapter = [self.snapshot]
        try:
            yield
        finally:
            for m, flag in zip(switched_off, flags):
                m._disable_adapters = flag
            for m, names in zip(swapped, active):
                m._active_adapter = names


@contextmanager
def initial_model(peft_model: PeftModel):
    """π₀ inside the block, through PEFT's public switches: the adapter switched off (disable_adapter()), or the
    snapshot of the starting adapter active in its place (see `InitialModel`)."""
    if INITIAL_ADAPTER not in peft_model.peft_config:
        with peft_model.disable_adapter():
            yield
        return
    active = peft_model.active_adapter
    peft_model.set_adapter(INITIAL_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(active)  # trainable again, the snapshot frozen


def initial_head(head: torch.nn.Module) -> torch.nn.Module:
    """π₀'s LM head, callable directly: `head` itself unless PEFT wraps it (a LoRA on lm_head, or a trained copy
    through modules_to_save / trainable_token_indices). Toggling the whole model's adapters with disable_adapter()
    walks every module, which is too slow to do per loss chunk."""
    if isinstance(head, BaseTunerLayer):
        return head.get_base_layer()
    if isinstance(head, AuxiliaryTrainingWrapper):
        return head.original_module
    return head


SUM_CHUNK = 2**24  # elements summed at a time: 128 MB of float64, where a whole 8B embedding would take 4 GB


def tensor_digest(named_tensors, digest=None):
    """A hash of tensors that changes with any fine-tune or checkpoint swap, cheap even for a 7B model: each
    tensor's name, shape, float64 sum and a strided sample (not every byte). The dtype is left out, so that the
    float32 copies PEFT's k-bit preparation makes of a bf16 model's norms hash as the originals do. The sum is taken
    SUM_CHUNK elements at a time (torch's sum(dtype=float64) copies the whole tensor too); a tensor of one chunk
    sums exactly as one call does, and a longer one agrees with it to the 11 digits hashed, as far as tested."""
    digest = digest or hashlib.sha256()
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        total = sum(chunk.double().sum().item() for chunk in tensor.reshape(-1).split(SUM_CHUNK))
        digest.update(f"{name}{tuple(tensor.shape)}{total:.10e}".encode())
        digest.update(tensor.flatten()[::4099].float().cpu().numpy().tobytes())
    return digest


def fingerprint(peft_model: PeftModel):
    """π₀'s identity as a running digest (hashlib), the start of every cache key: the weights other than the
    trained adapter's (so the snapshot's, when there is one) and the quantization, which changes the outputs
    without changing the stored weights."""
    trained = f".{peft_model.active_adapter}."
    digest = tensor_digest((n, p) for n, p in peft_model.named_parameters() if not ("lora_" in n and trained in n))
    quantization = quantization_settings(peft_model)
    if quantization is not None:
        digest.update(json.dumps(quantization, sort_keys=True, default=str).encode())
    return digest


def save_adapter(peft_model: PeftModel, folder: str | os.PathLike) -> None:
    """The trained adapter in PEFT format, for `PeftModel.from_pretrained(base, folder)`. After a base-rewriting init
    PEFT converts it (`path_initial_model_for_weight_conversion`) into a plain LoRA of twice the rank that applies to
    the original base; the snapshot itself is never saved."""
    name = peft_model.active_adapter
    snapshot = peft_model.peft_config.get(INITIAL_ADAPTER)
    rewritten = snapshot is not None and str(peft_model.peft_config[name].init_lora_weights).lower().startswith(
        BASE_REWRITING_INITS)
    if not rewritten:
        peft_model.save_pretrained(folder, selected_adapters=[name])
        return
    was_training = peft_model.training
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[INITIAL_ADAPTER])  # into tmp/INITIAL_ADAPTER
        initial = os.path.join(tmp, "initial")  # PEFT loads it under its folder's name, then deletes that adapter
        os.rename(os.path.join(tmp, INITIAL_ADAPTER), initial)
        peft_model.save_pretrained(folder, selected_adapters=[name], path_initial_model_for_weight_conversion=initial)
    peft_model.train(was_training)  # (PEFT's load_adapter for the conversion left the model in eval mode)


def load_trained(args, path: str, adapter: str | os.PathLike) -> PeftModel:
    """A trained adapter on the base at `path` loaded as `args` (ModelArguments) say, with π₀ rebuilt as training had
    it: the quantized base prepared as for training, and the adapter training started from (`args.init_adapter`)
    beside the trained one as the frozen snapshot."""
    model = load_model(args, path)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, adapter)
    if args.init_adapter:
        read_adapter_config(args.init_adapter)
        model.load_adapter(args.init_adapter, adapter_name=INITIAL_ADAPTER, is_trainable=False)
        model.set_adapter("default")
    return model
