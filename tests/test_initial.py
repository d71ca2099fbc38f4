"""The initial model π₀ (arr/initial.py): continuing from an existing adapter, QLoRA, and the refusals."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from arr import resources
from arr.cli import main
from arr.config import ARRConfig, ModelArguments
from arr.errors import ConfigError
from arr.evaluation import load_run
from arr.initial import (INITIAL_ADAPTER, InitialModel, computes_in_float32, fingerprint, initial_model, load_model,
                         recordable_quantization_keys, with_adapter)
from arr.run_folder import TRAINED_KEYS
from arr.trainer import ARRTrainer, check_head, check_packing
from bench.tiny import tiny_model
from conftest import assert_one_error_line, replay_texts, sft_records

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250]])


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_a_run_continued_from_another_starts_from_its_adapter_and_reports_against_it(recipe, tmp_path, capsys,
                                                                                       llama_dir):
    first, second = tmp_path / "A", tmp_path / "B"
    assert main(["train", recipe, f"output_dir={first}"]) == 0, capsys.readouterr().err
    assert main(["train", recipe, f"output_dir={second}", f"init_adapter={first}"]) == 0, capsys.readouterr().err
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["initial_model"]["kind"] == "base + initial adapter"
    assert metrics["history"][0]["kl"] < 1e-6  # π₀ is A's model: no KL at step 0 (no dropout)
    assert metrics["history"][-1]["kl"] > 1e-4
    report_a, report_b = (json.loads((run / "eval.json").read_text()) for run in (first, second))
    for probe, after_a in report_a["after"].items():  # B's before is A's after, on the same probes
        if probe != "behaviour_kl":  # (a KL to each run's own π₀: 0 before, by definition)
            assert report_b["before"][probe] == pytest.approx(after_a, abs=1e-4), probe
    assert report_b["delta"]["task_nll"] != 0
    assert yaml.safe_load((second / "arr_config.yaml").read_text())["init_adapter"] == str(first)

    # the saved adapter alone, on the plain base with plain PEFT, is B's trained model; arr eval rebuilds π₀ = A
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), second)
    rebuilt, _ = load_run(second)
    torch.testing.assert_close(logits(plain), logits(rebuilt), atol=0, rtol=0)
    with initial_model(rebuilt):
        torch.testing.assert_close(logits(rebuilt), logits(PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(llama_dir), first)), atol=0, rtol=0)
    assert fingerprint(rebuilt).hexdigest()[:32] == metrics["initial_model"]["fingerprint"]


def test_a_trained_peft_model_is_its_own_initial_model_and_saves_loadable(llama_dir, tokenizer, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(**LORA))
    with torch.no_grad():  # an adapter trained earlier: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    start = logits(model)
    config = ARRConfig(output_dir=str(tmp_path / "run"), beta=1.0, kl_on="all", replay_ratio=0.0, max_steps=2,
                       per_device_train_batch_size=4, learning_rate=0.05, save_strategy="no", report_to=[],
                       disable_tqdm=True, ref_cache="none")
    trainer = ARRTrainer(model, config, train_dataset=sft_records(16), processing_class=tokenizer)
    assert trainer.initial.snapshot == INITIAL_ADAPTER
    with torch.no_grad(), trainer.initial.switched_to():  # the fast switch, in train mode as in a step
        torch.testing.assert_close(model.train()(IDS).logits, start, atol=0, rtol=0)
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl[0] < 1e-6 < kl[-1]
    with initial_model(model):
        torch.testing.assert_close(logits(model), start, atol=0, rtol=0)
    trainer.save_model(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter" / INITIAL_ADAPTER).exists()
    saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(saved), logits(model), atol=0, rtol=0)

    with pytest.raises(ConfigError, match="got a PeftModel and a peft_config"):
        ARRTrainer(model, config, train_dataset=sft_records(16), processing_class=tokenizer,
                   peft_config=LoraConfig(**LORA))


def other_base_adapter(tmp_path, tokenizer) -> str:
    """An adapter of a model with other shapes (hidden 48 instead of 32)."""
    model = tiny_model("llama", len(tokenizer))
    config = model.config
    config.hidden_size, config.intermediate_size = 48, 96
    other = AutoModelForCausalLM.from_config(config)
    path = tmp_path / "other-adapter"
    get_peft_model(other, LoraConfig(**LORA)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "not an adapter", "another base", "another run's base",
                                  "another PEFT base", "rank", "targets", "init"])
def test_bad_init_adapter_is_one_line_and_writes_nothing(recipe, tmp_path, capsys, tokenizer, case):
    first = tmp_path / "A"
    if case in ("rank", "targets", "init", "another PEFT base"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(yaml.safe_load(open(recipe))["model_name_or_path"]),
                       LoraConfig(**LORA)).save_pretrained(first)
    if case == "another PEFT base":  # same shapes: only the name PEFT recorded tells the bases apart
        adapter_config = json.loads((first / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = "org/another-model"
        (first / "adapter_config.json").write_text(json.dumps(adapter_config))
    elif case == "not an adapter":
        first.mkdir()
    elif case == "another base":
        first = other_base_adapter(tmp_path, tokenizer)
    elif case == "another run's base":  # same shapes, but the run says it trained on another model
        assert main(["train", recipe, f"output_dir={first}", "max_steps=1", "eval_after=none",
                     f"model_name_or_path={yaml.safe_load(open(recipe))['model_name_or_path']}/."]) == 0
    extra, expected = {
        "missing": ([], "config key init_adapter: no such folder"),
        "not an adapter": ([], "holds no PEFT adapter (adapter_config.json is missing"),
        "another base": ([], "does not fit this base model"),
        "another run's base": ([], "/.', not on '"),
        "another PEFT base": ([], "was made for 'org/another-model' (its adapter_config.json's"),
        "rank": (["lora_r=8"], "config key lora_r=8 does not match init_adapter"),
        "targets": (["lora_target_modules=[q_proj]"], "config key lora_target_modules='q_proj' does not match"),
        "init": (["init_lora_weights=pissa"], "config key init_lora_weights: init_adapter's weights"),
    }[case]
    out = tmp_path / "B"
    capsys.readouterr()
    code = main(["train", recipe, f"output_dir={out}", f"init_adapter={first}", *extra])
    assert_one_error_line(code, capsys.readouterr().err, expected)
    assert not out.exists()


@pytest.mark.parametrize("path", ["/models/Qwen2.5-1.5B-Instruct/", "C:\\models\\Qwen2.5-1.5B-Instruct",
                                  "/hub/models--Qwen--Qwen2.5-1.5B-Instruct/snapshots/0a1b2c"])
def test_a_base_named_by_a_path_is_the_same_model_as_its_hub_id(path):
    """init_adapter's base check: a local copy, a Windows path and the hub cache's snapshot folder of a model all
    name the model of its hub id; "." names the folder it stands for."""
    from arr.config import model_name

    assert model_name(path) == model_name("Qwen/Qwen2.5-1.5B-Instruct") == "qwen2.5-1.5b-instruct"
    assert model_name(".") == os.path.basename(os.getcwd()).lower()


# ---------------------------------------------------------------------------------------------------------- QLoRA

def quantized_peft(llama_dir, seed=0):
    base = load_model(ModelArguments(load_in_4bit=True), str(llama_dir))
    return with_adapter(base, LoraConfig(**LORA), seed=seed)


def test_a_4bit_base_computing_in_bf16_is_held_to_bf16s_rounding(llama_dir):
    """prepare_model_for_kbit_training upcasts the unquantized weights, so a 4-bit base that computes in bf16 (the
    usual QLoRA) reports float32: computes_in_float32, which the packing and LM-head checks take their tolerance
    from, reads the compute dtype (the checks themselves: the SmolLM2 test below)."""
    bf16 = with_adapter(load_model(ModelArguments(load_in_4bit=True, dtype="bfloat16"), str(llama_dir)),
                        LoraConfig(**LORA))
    assert bf16.dtype == torch.float32 and not computes_in_float32(bf16)
    assert computes_in_float32(quantized_peft(llama_dir))
    assert not computes_in_float32(load_model(ModelArguments(dtype="bfloat16"), str(llama_dir)))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_is_one_function_in_eval_mode_and_in_training(llama_dir, bits):
    """On CPU bitsandbytes multiplied an 8-bit layer through int8 inputs in eval mode and through its dequantized
    weights in training; on a CPU with AVX512-BF16 it ran a 4-bit layer in eval mode without gradients through a
    repacked copy with bfloat16 scales (and failed on a layer narrower than a quantization block, as the tiny
    model's are): π₀ in the probes and the reference cache was not π₀ in training."""
    model = load_model(ModelArguments(**{f"load_in_{bits}bit": True}), str(llama_dir))
    with torch.no_grad():
        in_training = model.train()(IDS).logits
        torch.testing.assert_close(model.eval()(IDS).logits, in_training, atol=0, rtol=0)


def test_a_4bit_base_repacked_for_inference_before_arr_got_it_is_refused(tmp_path, tokenizer):
    from bitsandbytes.functional import has_avx512bf16
    from transformers import BitsAndBytesConfig

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit layers only on a CPU with AVX512-BF16")
    wide = tiny_model("llama", len(tokenizer))  # layers as wide as a quantization block (64), which it can repack
    wide.config.hidden_size, wide.config.intermediate_size, wide.config.head_dim = 128, 256, 32
    AutoModelForCausalLM.from_config(wide.config).save_pretrained(tmp_path / "wide")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "wide", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    assert all(hasattr(m, "support_avx512bf16_for_cpu") for m in base.modules() if type(m).__name__ == "Linear4bit")
    with torch.no_grad():
        base.eval()(IDS)
    with pytest.raises(ConfigError, match="bitsandbytes repacked its weights for inference"):
        ARRTrainer(base, ARRConfig(output_dir=str(tmp_path / "run"), report_to=[]), train_dataset=sft_records(8),
                   processing_class=tokenizer, peft_config=LoraConfig(**LORA))


def test_an_arr_command_prints_no_warning_of_a_bitsandbytes_kernel_arr_does_not_use():
    """(On a CPU with AVX512-BF16 bitsandbytes warns at import of its repacked path's missing hub kernel; elsewhere
    it never does.) The command fails before it imports bitsandbytes, which is then imported under its filters."""
    code = "from arr.cli import main; main(['eval', 'no-such-run']); import bitsandbytes"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "no-such-run" in imported.stderr and "gemm_4bit_forward" not in imported.stderr


@pytest.mark.slow
def test_smollm2_in_4bit_computing_in_bf16_passes_the_packing_and_head_checks():
    """Held to float32's tolerance, SmolLM2's logits moved by 0.4% with a sequence packed before and QLoRA in bf16
    was refused."""
    model = with_adapter(load_model(ModelArguments(load_in_4bit=True, dtype="bfloat16"),
                                    str(resources.default_model_path())), LoraConfig(**LORA))
    check_packing(model)
    check_head(model)


def trained_one_step(base, tokenizer, output_dir) -> ARRTrainer:
    """ARRTrainer on `base` from Python, as the README shows it, after one step (no report)."""
    config = ARRConfig(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=4, replay_seq_length=16,
                       report_to=[], disable_tqdm=True, eval_after="none", save_strategy="no")
    trainer = ARRTrainer(base, config, train_dataset=sft_records(8), processing_class=tokenizer,
                         replay_dataset=replay_texts(20), peft_config=LoraConfig(**LORA))
    trainer.train()
    return trainer


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_run_from_python_records_how_arr_eval_rebuilds_its_initial_model(llama_dir, tokenizer, tmp_path,
                                                                                     bits):
    """A base quantized by transformers itself (4 bits loaded in bf16, or 8 bits), trained through ARRTrainer and
    saved with save_run: its arr_config.yaml says how it was loaded (not the float32 that
    prepare_model_for_kbit_training leaves), so arr eval rebuilds the same quantized π₀ (load_run checks its
    fingerprint, which hashes the whole quantization config)."""
    from transformers import BitsAndBytesConfig

    quantization, dtype = ((BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16), "bfloat16") if bits == 4
                           else (BitsAndBytesConfig(load_in_8bit=True), "float32"))
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype),
                                                quantization_config=quantization)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = trained_one_step(base, tokenizer, tmp_path / "run")
    assert not [w for w in caught if "save_run() will refuse" in str(w.message)]
    trainer.save_run()
    recorded = yaml.safe_load((tmp_path / "run" / "arr_config.yaml").read_text())
    assert (recorded["dtype"], recorded["load_in_4bit"], recorded["load_in_8bit"]) == (dtype, bits == 4, bits == 8)
    if bits == 4:
        assert (recorded["bnb_4bit_quant_type"], recorded["bnb_4bit_compute_dtype"]) == ("nf4", "bfloat16")
    model, _ = load_run(tmp_path / "run")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")


def test_a_quantization_no_key_can_rebuild_is_refused_by_save_run_with_nothing_written(llama_dir, tokenizer, tmp_path):
    """An 8-bit base with its own outlier threshold: arr eval would rebuild it at the default threshold and refuse
    the run as changed weights, so save_run names the setting and writes nothing."""
    from transformers import BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0))
    with pytest.warns(UserWarning, match=r"save_run\(\) will refuse this run: .*'llm_int8_threshold': 5.0"):
        trainer = trained_one_step(base, tokenizer, tmp_path / "run")  # told before training
    with pytest.raises(ConfigError, match=r"settings \{'llm_int8_threshold': 5.0\} have no arr key"):
        trainer.save_run()
    assert not (tmp_path / "run" / "arr_config.yaml").exists()

    # a checkpoint saved quantized reloads with its own settings, whatever keys load it: recordable as it is
    AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=5.0)).save_pretrained(tmp_path / "quantized")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")
    assert reloaded.config.quantization_config.llm_int8_threshold == 5.0
    assert recordable_quantization_keys(reloaded)["load_in_8bit"]


def test_qlora_reference_is_the_quantized_model_with_the_adapter_off_and_training_saves_a_loadable_adapter(
        llama_dir, tokenizer, tmp_path):
    model = quantized_peft(llama_dir)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    with torch.no_grad(), model.disable_adapter():
        expected = model.eval()(IDS).logits
    config = ARRConfig(output_dir=str(tmp_path / "run"), beta=1.0, kl_on="all", replay_ratio=0.25,
                       replay_seq_length=16, max_steps=3, per_device_train_batch_size=4, learning_rate=0.05,
                       save_strategy="steps", save_steps=1, report_to=[], disable_tqdm=True, ref_cache="none")
    trainer = ARRTrainer(model, config, train_dataset=sft_records(16), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    assert trainer.initial.kind == "base"
    with torch.no_grad(), trainer.initial.switched_to():
        torch.testing.assert_close(model.train()(IDS).logits, expected, atol=0, rtol=0)
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl[0] < 1e-6 < kl[-1]
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_model(ModelArguments(load_in_4bit=True), str(llama_dir)),
                                         tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-6, rtol=0)

    # resumed from the checkpoint of step 1, the run ends where the uninterrupted one did
    again = quantized_peft(llama_dir)
    resumed = ARRTrainer(again, ARRConfig(**{**config.to_dict(), "output_dir": str(tmp_path / "run")}),
                         train_dataset=sft_records(16), processing_class=tokenizer, replay_dataset=replay_texts(40))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    torch.testing.assert_close(logits(again), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("keys, expected", [
    (["load_in_4bit=true", "save_merged_model=true"], "config key save_merged_model: a quantized base"),
    (["load_in_4bit=true", "load_in_8bit=true"], "config keys load_in_4bit and load_in_8bit: choose one"),
    (["load_in_4bit=true", "bnb_4bit_quant_type=nf3"], "config key bnb_4bit_quant_type must be one of nf4, fp4"),
    (["load_in_4bit=true", "init_lora_weights=pissa"], "rewrites the base weights, which a quantized base cannot"),
    (["load_in_4bit=true", "method=laplace"], "laplace_lambda > 0 on a quantized base"),
])
def test_qlora_refuses_what_cannot_be_right(recipe, tmp_path, capsys, keys, expected):
    out = tmp_path / "run"
    code = main(["train", recipe, f"output_dir={out}", "replay_data=null", *keys])
    assert_one_error_line(code, capsys.readouterr().err, expected)
    assert not out.exists()


def test_a_merged_adapter_is_refused(llama_dir):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(**LORA))
    model.merge_adapter()
    with pytest.raises(ConfigError, match="the adapter is merged into the base weights"):
        InitialModel(model)


@pytest.mark.slow
def test_qlora_on_smollm2_runs_the_default_objective_and_its_report(tmp_path, capsys):
    """The shipped default (self-generated replay with its reference recorded while generating, the cached KL) on
    the embedded SmolLM2 in 4 bits; the adapter loads on the quantized base with plain PEFT and arr eval rebuilds the
    same quantized π₀ (its fingerprint matches)."""
    out = tmp_path / "run"
    code = main(["train", f"output_dir={out}", "load_in_4bit=true", "max_steps=2", "eval_after=none",
                 "disable_tqdm=true"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ref_cache"]["mode"] == "topk" and metrics["history"][0]["kl"] < 1e-4
    model, _ = load_run(out)  # raises if the rebuilt π₀'s fingerprint differs
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert os.path.getsize(out / "adapter_model.safetensors") > 0


def test_the_fingerprint_sums_a_long_tensor_a_chunk_at_a_time_to_the_same_digits(monkeypatch):
    """No float64 copy of a whole tensor (4 GB for an 8B model's embedding), and the digest recorded by a one-call
    sum (earlier runs' metrics.json) is the same."""
    from arr import initial
    from bench.overhead import AllocationPeak

    weights = torch.randn(2**22, generator=torch.Generator().manual_seed(0))  # 16 MB; 32 MB as float64
    whole = initial.tensor_digest([("w", weights)]).hexdigest()
    monkeypatch.setattr(initial, "SUM_CHUNK", 2**16)
    recorder = AllocationPeak()
    chunked = initial.tensor_digest([("w", weights)]).hexdigest()
    assert recorder.stop() < 2 and chunked == whole


def test_a_checkpoint_resumes_only_against_the_initial_model_it_trained_against(llama_dir, tokenizer, tmp_path):
    """A checkpoint of a PiSSA run (π₀: the residual base and the snapshot of the starting adapter) resumed by a run
    from the standard init, whose π₀ is the bare base: the Trainer would load its adapters into that model without
    a word, so it is refused, naming the keys to give."""
    config = ARRConfig(output_dir=str(tmp_path / "run"), beta=1.0, kl_on="all", replay_ratio=0.0, ref_cache="none",
                       max_steps=1, save_strategy="steps", save_steps=1, per_device_train_batch_size=2,
                       report_to="none", disable_tqdm=True)
    def peft(init):
        return get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(**LORA, init_lora_weights=init))

    ARRTrainer(peft("pissa"), config, train_dataset=sft_records(4), processing_class=tokenizer).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert json.loads((checkpoint / TRAINED_KEYS).read_text())["init_lora_weights"] == "pissa"
    resumed = ARRTrainer(peft(True), config, train_dataset=sft_records(4), processing_class=tokenizer)
    with pytest.raises(ConfigError, match=rf"^--resume: {str(checkpoint)!r} trained against base \+ initial adapter as "
                                          r"the initial model, and this run's is base; resume with the init_adapter"):
        resumed.train(resume_from_checkpoint=True)
