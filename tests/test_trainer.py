from typing import NamedTuple

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from arr import ARRConfig, ARRError, ARRTrainer, ConfigError
from arr.cache import ReferenceCache
from arr.data import Collator, load_sft_examples
from arr.initial import INITIAL_ADAPTER, initial_model
from arr.trainer import LOSS_PART_NAMES, check_packing
from conftest import replay_texts, sft_records
from test_initial import quantized_peft

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
STEPS = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
             logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=7)


def fresh_peft(model_dir, **lora):
    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**{**LORA, **lora}))


def adapter_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def move_adapter(model, std=0.05):
    """Every lora_B off zero (seeded), so that the KL and every gradient are not 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * std)


class Step(NamedTuple):
    batch: dict
    counts: torch.Tensor
    loss: torch.Tensor
    parts: torch.Tensor  # the logged parts (LOSS_PART_NAMES)
    grads: dict[str, torch.Tensor]


def one_step(trainer, rows) -> Step:
    """`rows` of the trainer's dataset as one micro-batch of a training step: collated and moved as the Trainer does,
    then the loss and its backward."""
    trainer.model.zero_grad()
    trainer._part_sums.zero_()
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    loss = trainer.compute_loss(trainer.model.train(), batch, num_items_in_batch=counts)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return Step(batch, counts, loss.detach(), trainer._part_sums.clone(), grads)


def assert_same_step(got: Step, expected: Step, rtol=1e-5, grad_rtol=1e-4):
    """The same token counts, loss, loss parts and gradients (of every trained weight)."""
    assert torch.equal(got.counts, expected.counts)
    torch.testing.assert_close(got.parts, expected.parts, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(got.loss, expected.loss, rtol=rtol, atol=1e-7)
    assert_same_gradients(got.grads, expected.grads, grad_rtol)


def assert_same_gradients(got: dict, expected: dict, rtol=1e-4):
    assert got.keys() == expected.keys() and len(expected) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("chunk", [1024, 0])
def test_beta0_no_replay_trains_exactly_like_plain_peft_trainer(model_dir, tokenizer, tmp_path, chunk):
    examples = load_sft_examples(sft_records(20), tokenizer, 64)
    plain = fresh_peft(model_dir)
    Trainer(model=plain, args=TrainingArguments(output_dir=str(tmp_path / "plain"), **STEPS),
            train_dataset=examples, data_collator=Collator(tokenizer.pad_token_id)).train()

    ours = fresh_peft(model_dir)
    config = ARRConfig(output_dir=str(tmp_path / "arr"), beta=0.0, replay_ratio=0.0, loss_chunk_size=chunk, **STEPS)
    trainer = ARRTrainer(ours, config,
                         train_dataset=sft_records(20), processing_class=tokenizer)
    trainer.train()
    expected, got = adapter_state(plain), adapter_state(ours)
    assert expected.keys() == got.keys()
    moved = max((e - adapter_state(fresh_peft(model_dir))[n]).abs().max().item() for n, e in expected.items())
    assert moved > 1e-3  # training really moved the adapter
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    plain_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(h["kl"] == 0 and h["replay_ce"] == 0 for h in trainer.state.log_history if "kl" in h)
    assert len(plain_losses) == 4


def test_arr_run_logs_parts_keeps_ratio_and_saved_adapter_reproduces_logits(llama_dir, tokenizer, tmp_path):
    config = ARRConfig(output_dir=str(tmp_path / "out"), beta=0.5, replay_ratio=0.25, replay_seq_length=16, **STEPS)
    trainer = ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    seen = []
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: seen.append(sum(r["is_replay"] for r in rows)) or collate(rows)
    trainer.train()
    assert len(seen) == 8 and sum(seen) == round(4 * 8 * 0.25)  # 4 steps x global batch 8 x 0.25
    assert [seen[i] + seen[i + 1] for i in range(0, 8, 2)] == [2, 2, 2, 2]
    history = [h for h in trainer.state.log_history if "kl" in h]
    assert len(history) == 4
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["kl"] > 0 and all(h["replay_ce"] > 0 and h["sft_ce"] > 0 for h in history)
    assert history[-1]["loss"] == pytest.approx(
        history[-1]["sft_ce"] + 0.5 * history[-1]["kl"] + history[-1]["replay_ce"], rel=1e-4)

    trainer.save_model(str(tmp_path / "adapter"))
    inputs = Collator(tokenizer.pad_token_id)(load_sft_examples(sft_records(3), tokenizer, 64))
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    trained = trainer.model.eval().cpu()  # the trainer moves it to the accelerator, if there is one
    with torch.no_grad():
        expected = trained(**inputs).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter")
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-6, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(llama_dir)(**inputs).logits
    assert (base - expected).abs().max() > 1e-3


@pytest.mark.parametrize("chunk,cache,split", [(1024, "none", {}), (0, "none", {}), (1024, "exact", {}),
                                               (1024, "none", {"kl_on": "all", "task_kl_beta": 0.3})])
def test_padding_free_batch_gives_the_padded_batchs_loss_and_gradients(llama_dir, tokenizer, tmp_path, chunk, cache,
                                                                       split):
    """Also with the KL split by row (task_kl_beta): packed rows hold task and replay tokens side by side."""
    padded, packed = (mixed_step(llama_dir, tokenizer, tmp_path / str(padding_free), padding_free=padding_free,
                                 loss_chunk_size=chunk, ref_cache=cache, **split) for padding_free in (False, True))
    if split:
        assert packed.parts[LOSS_PART_NAMES.index("kl_task")] > 1e-4
    # SFT rows of about 30 tokens share the replay row's width of 64 in pairs: 3 rows, not 4
    assert padded.batch["input_ids"].shape == (4, 64) and packed.batch["input_ids"].shape == (3, 64)
    assert_same_step(packed, padded)


def mixed_step(model_dir, tokenizer, out, **config) -> Step:
    """A step of 3 SFT rows and a replay row, the adapter moved off its start: the KL and replay CE are in play."""
    config = ARRConfig(output_dir=str(out), beta=0.5, replay_ratio=0.25, replay_seq_length=64,
                       ref_cache_dir=str(out.parent / "reference"),
                       use_cache=True,  # even then, a training step runs with no KV cache
                       **{**STEPS, **config})
    trainer = ARRTrainer(fresh_peft(model_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    move_adapter(trainer.model)
    rows = [trainer.train_dataset[i] for i in (0, 1, 2, len(trainer.train_dataset) - 1)]
    assert [r["is_replay"] for r in rows] == [False, False, False, True]
    step = one_step(trainer, rows)
    assert step.parts[LOSS_PART_NAMES.index("kl")] > 1e-4 and step.parts[LOSS_PART_NAMES.index("replay_ce")] > 0
    return step


class StepGradients(TrainerCallback):
    """Each optimizer step's gradients, as the optimizer gets them."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def trained(peft_model, tokenizer, out, **config):
    """ARR trained from an adapter moved off its start (the KL and its gradient are not 0 from step 1): the trainer,
    each step's logged loss, parts and gradient norm, and each step's gradients."""
    gradients = StepGradients()
    config = ARRConfig(output_dir=str(out), beta=0.5, kl_on="all", replay_ratio=0.25, replay_seq_length=64,
                       ref_cache_dir=str(out.parent / "reference"), **{**STEPS, **config})
    trainer = ARRTrainer(peft_model, config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset=replay_texts(40), callbacks=[gradients])
    move_adapter(trainer.model)
    trainer.train()
    logged = torch.tensor([[h[name] for name in ("loss", *LOSS_PART_NAMES, "grad_norm")]
                           for h in trainer.state.log_history if "kl" in h], dtype=torch.float64)
    return trainer, logged, gradients.steps


def checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("padding_free,chunk,cache,kwargs", [
    (False, 1024, "none", None), (True, 1024, "exact", None), (False, 0, "exact", None), (True, 0, "none", None),
    (False, 1024, "topk", {"use_reentrant": True})])
def test_gradient_checkpointing_gives_the_same_loss_parts_and_gradients(llama_dir, tokenizer, tmp_path, padding_free,
                                                                       chunk, cache, kwargs):
    """gradient_checkpointing: true, padded and packed, chunked and full logits, on-line and cached reference, with
    transformers' default (non-reentrant) checkpointing and the reentrant one: every step's loss parts and gradients
    are those of the run without it."""
    assert_checkpointing_changes_nothing(lambda: fresh_peft(llama_dir), tokenizer, tmp_path, padding_free=padding_free,
                                         loss_chunk_size=chunk, ref_cache=cache, gradient_checkpointing_kwargs=kwargs)


def assert_checkpointing_changes_nothing(peft_model, tokenizer, tmp_path, gradient_checkpointing_kwargs=None,
                                         **config):
    """Two steps of `peft_model()` with and without gradient checkpointing: the same loss parts and gradients."""
    (plain, plain_logged, plain_grads), (checkpointed, logged, grads) = (
        trained(peft_model(), tokenizer, tmp_path / str(on), max_steps=2, gradient_checkpointing=on,
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs if on else None, **config)
        for on in (False, True))
    assert checkpointing(checkpointed.model) and not checkpointing(plain.model)
    assert len(plain_logged) == len(plain_grads) == len(grads) == 2 and plain_logged[0][2] > 1e-4  # the KL is in play
    torch.testing.assert_close(logged, plain_logged, rtol=1e-5, atol=1e-7)
    for step, expected in zip(grads, plain_grads):
        assert_same_gradients(step, expected)
    return plain_logged


@pytest.mark.parametrize("chunk", [1024, 0])
def test_bf16_trains_and_its_loss_parts_match_float32(llama_dir, tokenizer, tmp_path, chunk):
    """bf16: true (mixed precision: autocast, float32 weights; on CPU with use_cpu: true, the Trainer's rule) trains,
    and every step's loss and loss parts are within 1% (relative) of float32's, the tolerance README states."""
    _, expected, _ = trained(fresh_peft(llama_dir), tokenizer, tmp_path / "float32", loss_chunk_size=chunk)
    assert_bf16_within_1_percent(fresh_peft(llama_dir), tokenizer, tmp_path / "bf16", expected, loss_chunk_size=chunk)
    assert expected[-1, 1] < expected[0, 1] - 0.05  # the SFT CE falls: it trains


def assert_bf16_within_1_percent(peft_model, tokenizer, out, expected, **config):
    """`peft_model` trained with bf16: true for as many steps as `expected` logged in float32: every step's loss and
    loss parts within 1% of those."""
    bf16, logged, _ = trained(peft_model, tokenizer, out, bf16=True, use_cpu=not torch.cuda.is_available(),
                              max_steps=len(expected), **config)
    assert bf16.accelerator.mixed_precision == "bf16" and len(logged) == len(expected)
    columns = [1 + LOSS_PART_NAMES.index(name) for name in ("sft_ce", "kl", "replay_ce")]  # those these runs train
    parts, expected = logged[:, [0, *columns]], expected[:, [0, *columns]]  # and the loss
    torch.testing.assert_close(parts, expected, rtol=1e-2, atol=0)
    assert (parts / expected - 1).abs().max() > 1e-5  # bf16 really rounded


def test_gradient_checkpointing_and_bf16_combine_with_qlora(llama_dir, tokenizer, tmp_path):
    """On a 4-bit base (load_in_4bit, LoRA on q_proj and v_proj), as on a float32 one: gradient checkpointing
    changes no loss part or gradient, and bf16's loss parts are within 1% of those without it."""
    expected = assert_checkpointing_changes_nothing(lambda: quantized_peft(llama_dir), tokenizer, tmp_path)
    assert_bf16_within_1_percent(quantized_peft(llama_dir), tokenizer, tmp_path / "bf16", expected)


def test_padding_free_refuses_a_model_that_lets_packed_sequences_see_each_other(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    check_packing(model)

    class IgnoresPositions(torch.nn.Module):  # a model with no packing support: one causal sequence, positions 0..N
        config, dtype = model.config, model.dtype

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, position_ids, use_cache):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    with pytest.raises(ARRError, match="does not keep packed sequences apart.*padding_free: false"):
        check_packing(IgnoresPositions())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_init_keeps_the_initial_model_as_reference_and_saves_an_adapter_for_the_original_model(
        llama_dir, tokenizer, tmp_path, init):
    inputs = Collator(tokenizer.pad_token_id)(load_sft_examples(sft_records(3), tokenizer, 64))
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    untouched = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        expected = untouched(**inputs).logits
    model = fresh_peft(llama_dir, init_lora_weights=init, lora_dropout=0.1)
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(base_weight, untouched.model.layers[0].self_attn.q_proj.weight)  # the init rewrote it
    config = ARRConfig(output_dir=str(tmp_path / "run"), beta=1.0, kl_on="all", replay_ratio=0.25,
                       replay_seq_length=16, ref_cache="none", **STEPS)
    trainer = ARRTrainer(model, config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    assert trainer.initial.snapshot == INITIAL_ADAPTER
    assert all(not p.requires_grad for n, p in model.named_parameters() if INITIAL_ADAPTER in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    with torch.no_grad():  # at step 0 the reference (both switches) is the untouched model, not the residual base
        with trainer.initial.switched_to():  # in train mode, as in a step: no dropout
            torch.testing.assert_close(model.train()(**inputs).logits, expected, atol=1e-4, rtol=0)
        with initial_model(model.eval()):
            torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-4, rtol=0)
        with model.disable_adapter():  # what "adapter off" alone would have been
            assert (model(**inputs).logits - expected).abs().max() > 1e-2
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl[0] < 2e-4 < kl[-1]  # at step 1 only the trained adapter's dropout (0.1) moves the model off the reference
    assert all(not p.requires_grad for n, p in model.named_parameters() if INITIAL_ADAPTER in n)
    with torch.no_grad():
        trained = model.eval()(**inputs).logits
    assert (trained - expected).abs().max() > 1e-3  # training moved the model
    trainer.save_model(str(tmp_path / "adapter"))  # converted: a plain LoRA of twice the rank, on the original model
    saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter").eval()
    assert saved.peft_config["default"].r == 2 * LORA["r"] and not (tmp_path / "adapter" / INITIAL_ADAPTER).exists()
    with torch.no_grad():
        torch.testing.assert_close(saved(**inputs).logits, trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("lora,config,reason", [
    ({"use_dora": True}, {}, "with use_dora: the initial model or the adapter converted"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, {}, "with a LoRA on an embedding"),
    ({}, {"laplace_lambda": 1.0, "replay_seq_length": 16}, "and laplace_lambda 0"),
])
def test_base_rewriting_init_refuses_what_it_cannot_keep_exact(llama_dir, tokenizer, tmp_path, lora, config, reason):
    model = fresh_peft(llama_dir, init_lora_weights="pissa", **lora)
    with pytest.raises(ConfigError, match=reason):
        ARRTrainer(model, ARRConfig(output_dir=str(tmp_path), **config, **STEPS), train_dataset=sft_records(4),
                   processing_class=tokenizer, replay_dataset=replay_texts(4), curvature_dataset=replay_texts(4))
    assert not any(tmp_path.iterdir())


def test_loftq_init_is_refused_with_the_reason(llama_dir, tokenizer, tmp_path):
    model = fresh_peft(llama_dir)
    model.peft_config["default"].init_lora_weights = "loftq"  # (a real LoftQ init needs a quantized base)
    with pytest.raises(ConfigError, match="init_lora_weights='loftq'.*quantized approximation"):
        ARRTrainer(model, ARRConfig(output_dir=str(tmp_path), **STEPS), train_dataset=sft_records(4),
                   processing_class=tokenizer, replay_dataset=replay_texts(4))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("chunk", [1024, 0])
def test_reference_cache_trains_like_the_online_reference_and_is_invalidated_by_data(llama_dir, tokenizer, tmp_path,
                                                                                     chunk):
    def run(out, cache, records=20, **extra):
        config = ARRConfig(output_dir=str(tmp_path / out), beta=0.5, replay_ratio=0.25, replay_seq_length=16,
                           ref_cache=cache, ref_cache_dir=str(tmp_path / "reference"), loss_chunk_size=chunk,
                           **{**STEPS, "kl_on": "all", **extra})
        trainer = ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(records),
                             processing_class=tokenizer, replay_dataset=replay_texts(40))
        trainer.train()
        return trainer, [h["kl"] for h in trainer.state.log_history if "kl" in h]

    online, online_kl = run("online", "none")
    exact, exact_kl = run("cached", "exact")
    assert exact.ref_cache_info["cache_hit"] is False and exact.ref_cache.topk is None
    assert online_kl[-1] > 0
    assert exact_kl == pytest.approx(online_kl, rel=1e-4, abs=1e-7)
    for name, value in adapter_state(online.model).items():
        torch.testing.assert_close(adapter_state(exact.model)[name], value, atol=1e-5, rtol=0)
    again, _ = run("cached", "exact")
    built = {k: v for k, v in exact.ref_cache_info.items() if k != "mb"}  # (a hit does not size the file)
    assert again.ref_cache_info == {**built, "cache_hit": True, "seconds": 0.0}
    other_data, _ = run("cached", "exact", records=21)
    assert other_data.ref_cache_info["cache_hit"] is False
    topk, topk_kl = run("topk", "topk", ref_cache_topk=8)
    assert topk.ref_cache.topk == 8 and topk_kl[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < topk_kl[1] <= exact_kl[1] * 1.01  # the coarsened KL is a lower bound
    # kl_on=replay: the cache holds the replay rows only, and trains as the online reference does
    _, replay_online_kl = run("replay_online", "none", kl_on="replay")
    replay_cached, replay_cached_kl = run("replay_cached", "exact", kl_on="replay")
    assert replay_cached.ref_cache_info["rows"] == len(replay_cached.train_dataset.replay)
    assert replay_online_kl[-1] > 0 and replay_cached_kl == pytest.approx(replay_online_kl, rel=1e-4, abs=1e-7)


def test_added_replay_trains_every_task_row_of_every_step_with_replay_on_top(llama_dir, tokenizer, tmp_path):
    """replay_mode=add at 1/4: each step of global batch 8 (2 micro-batches of 4) trains 8 task rows, as plain LoRA,
    and 8/3 replay rows on top (round(s * 8/3) after s steps); the reference cache's draws count them."""
    config = ARRConfig(output_dir=str(tmp_path / "out"), beta=0.5, replay_ratio=0.25, replay_mode="add",
                       replay_seq_length=16, ref_cache="none", **STEPS)
    trainer = ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    seen = []  # (task rows, replay rows) of each micro-batch
    collate = trainer.data_collator
    def count(items):
        rows = [r for item in items for r in (item if isinstance(item, list) else [item])]
        seen.append((sum(not r["is_replay"] for r in rows), sum(r["is_replay"] for r in rows)))
        return collate(items)
    trainer.data_collator = count
    trainer.train()
    task, replay = zip(*seen[:8])  # (accelerate's loader reads one micro-batch ahead in the second epoch)
    assert [task[i] + task[i + 1] for i in range(0, 8, 2)] == [8, 8, 8, 8]
    assert [replay[i] + replay[i + 1] for i in range(0, 8, 2)] == [3, 2, 3, 3]  # round(8/3 s) - round(8/3 (s-1))
    assert trainer.ref_cache_info["rows_drawn"] == 11  # kl_on replay (the default): round(4 x 8 / 3) replay rows


@pytest.mark.parametrize("epochs,max_steps,extra,mode,drawn,rows", [
    (3, -1, {"kl_on": "all"}, "topk", 72, 18 + 18), (1, -1, {"kl_on": "all"}, "none", 24, 18 + 6),
    (1, 2, {"kl_on": "all"}, "none", 16, 18 + 4),
    # the KL on replay rows only (the default), of a corpus: a pool as large as its draws stays on-line even over 3
    # epochs; a pool of 2 drawn 6 times is cached, those 2 rows alone
    (3, -1, {}, "none", 18, 18), (1, -1, {"replay_max_sequences": 2}, "topk", 6, 2)])
def test_ref_cache_auto_builds_a_topk_cache_only_when_rows_are_drawn_more_than_once(
        llama_dir, tokenizer, tmp_path, epochs, max_steps, extra, mode, drawn, rows):
    # 18 SFT rows at 1/4 replay, global batch 8: an epoch is 3 steps, 24 draws, of the 18 SFT rows and 6 replay rows
    config = ARRConfig(output_dir=str(tmp_path), replay_ratio=0.25, replay_seq_length=16,
                       ref_cache_dir=str(tmp_path / "reference"),
                       **{**STEPS, "max_steps": max_steps, "num_train_epochs": epochs, **extra})
    trainer = ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(18), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    info = trainer.ref_cache_info
    assert info["mode"] == mode and (trainer.ref_cache is not None) == (mode == "topk")
    assert (info["rows_drawn"], info["rows"]) == (drawn, rows)
    if mode == "topk":
        cache, dataset = trainer.ref_cache, trainer.train_dataset
        cached = range(len(dataset)) if config.kl_on == "all" else range(len(dataset.sft), len(dataset))
        assert cache.topk == config.ref_cache_topk and len(cache.offsets) == len(dataset)
        assert len(cache.logp) == sum(len(dataset[i]["input_ids"]) - 1 for i in cached)  # every prediction, once


@pytest.mark.parametrize("padding_free,chunk", [(False, 1024), (True, 1024), (False, 0)])
def test_reference_runs_on_the_rows_with_kl_positions_only_and_gives_the_full_batchs_loss(
        llama_dir, tokenizer, tmp_path, padding_free, chunk):
    """kl_on=replay: the initial model's forward runs on the replay sequence only (one of eight rows; packed, its 64
    tokens without the SFT sequences that share its row), and loss and gradients equal those of a reference over
    every row."""
    config = ARRConfig(output_dir=str(tmp_path), beta=0.5, kl_on="replay", replay_ratio=0.25, replay_seq_length=64,
                       loss_chunk_size=chunk, padding_free=padding_free, ref_cache="none", **STEPS)
    trainer = ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    move_adapter(trainer.model)
    assert trainer.objective.replay_weight == 1.0  # a corpus's replay CE counts by default
    batch = trainer._prepare_inputs(
        trainer.data_collator([trainer.train_dataset[i] for i in (*range(7), len(trainer.train_dataset) - 1)]))
    counts = trainer._get_num_items_in_batch([batch], trainer.args.device)
    rows_seen = []
    hook = trainer.model.get_decoder().register_forward_hook(lambda m, a, kw, out: rows_seen.append(
        tuple(kw.get("input_ids", a[0] if a else None).shape)), with_kwargs=True)

    def step(every_row):
        trainer.sharded = every_row  # what FSDP/DeepSpeed get: the reference forward on every row
        rows_seen.clear()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model.train(), batch, num_items_in_batch=counts)
        loss.backward()
        return loss, list(rows_seen), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    subset_loss, subset_rows, subset_grads = step(False)
    full_loss, full_rows, full_grads = step(True)
    # a micro-batch without KL positions: no reference forward, except under FSDP/DeepSpeed, where every process
    # must run the same (collective) forwards
    sft_only = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    for sharded, forwards in ((False, 1), (True, 2)):
        trainer.sharded = sharded
        rows_seen.clear()
        trainer.compute_loss(trainer.model.train(), sft_only)
        assert len(rows_seen) == forwards
    hook.remove()
    shape = tuple(batch["input_ids"].shape)
    assert full_rows == [shape, shape]  # reference forward first, then the trained one
    assert subset_rows == [(1, 64 if padding_free else shape[1]), shape] and (shape[0] == 8) != padding_free
    assert shape[1] > 64 or not padding_free  # packed, the replay sequence shares its row with SFT sequences
    torch.testing.assert_close(subset_loss, full_loss, rtol=1e-5, atol=1e-7)
    assert full_grads.keys() == subset_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(subset_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_self_generated_replay_rows_are_the_initial_models_answers_cached_and_trained(
        llama_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffName a colour.\n\nWhat is two plus two?\nSay hello.\n")

    def trainer(out):
        config = ARRConfig(output_dir=str(tmp_path / out), beta=0.5, kl_on="prompt_and_replay", replay_ratio=0.25,
                           self_replay_prompts=str(prompts), self_replay_max_new_tokens=6, **STEPS)
        return ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                          replay_dataset="self")

    first = trainer("a")
    assert first.self_replay_info["cache_hit"] is False and first.self_replay_info["rows"] == 3
    assert first.ref_cache_info["mode"] == "none"  # the KL also on SFT rows, each drawn about once: on-line
    assert first.objective.replay_weight == 0.0  # by default the KL alone holds self-generated answers
    replay = list(first.train_dataset.replay)
    from arr.evaluation import chat_prompt_ids, greedy_answers
    answers = greedy_answers(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), tokenizer,
                             ["Name a colour.", "What is two plus two?", "Say hello."], 6, 2)
    for row, prompt, answer in zip(replay, ["Name a colour.", "What is two plus two?", "Say hello."], answers):
        context = chat_prompt_ids(tokenizer, prompt)
        assert row["input_ids"] == context + answer and len(answer) > 0
        assert row["labels"] == [-100] * len(context) + answer  # the answer trains, the prompt does not
    second = trainer("b")
    assert second.self_replay_info["cache_hit"] is True and list(second.train_dataset.replay) == replay
    first.train()
    history = [h for h in first.state.log_history if "replay_ce" in h]
    assert len(history) == 4 and all(h["replay_ce"] > 0 for h in history) and history[-1]["kl"] > 0

    # the KL on these rows alone (the default): ref_cache auto caches their top-k reference in $ARR_CACHE once, and a
    # run on other SFT data, whose replay rows are the same, reads the same entries
    def replay_kl(out, records):
        config = ARRConfig(output_dir=str(tmp_path / out), beta=0.5, replay_ratio=0.25,
                           self_replay_prompts=str(prompts), self_replay_max_new_tokens=6, **STEPS)
        return ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(records),
                          processing_class=tokenizer, replay_dataset="self")

    built, read = replay_kl("c", 20), replay_kl("d", 21)
    assert built.ref_cache_info["mode"] == "topk" and built.ref_cache_info["rows"] == 3
    assert built.ref_cache_info["cache_hit"] is False and read.ref_cache_info["cache_hit"] is True
    assert (tmp_path / "cache" / "reference" / f"{built.ref_cache_info['key']}.safetensors").is_file()
    predictions = [len(row["input_ids"]) - 1 for row in replay]  # each replay row's entries, one after the other
    starts = [0, predictions[0], predictions[0] + predictions[1]]
    assert built.ref_cache.offsets[20:].tolist() == read.ref_cache.offsets[21:].tolist() == starts
    assert len(read.ref_cache.logp) == sum(predictions) and torch.equal(read.ref_cache.logp, built.ref_cache.logp)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_self_replay_generation_records_the_reference_cache_a_build_would_give(llama_dir, tokenizer, tmp_path,
                                                                              monkeypatch, temperature):
    """The first run of a model generates its replay answers and, from the same decoding, the top-k reference of
    those rows (the KL on them alone, the default): no build; the entries equal a build's from full forwards, and a
    later run reads them."""
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    first = recording_self_replay(llama_dir, tokenizer, tmp_path / "a", temperature)
    second = recording_self_replay(llama_dir, tokenizer, tmp_path / "b", temperature)
    assert second.self_replay_info["cache_hit"] is True and second.ref_cache_info["cache_hit"] is True
    assert "built_while_generating" not in second.ref_cache_info
    assert torch.equal(second.ref_cache.logp, first.ref_cache.logp)


def recording_self_replay(model_dir, tokenizer, out, temperature=0.0):
    """A trainer whose self-generated replay (the KL on it alone, the default: a top-k reference cache of those rows)
    records its reference while it generates, or reads it from $ARR_CACHE; recorded, the entries equal a build's
    from full forwards of the rows."""
    prompts = out.parent / "prompts.txt"
    prompts.write_text("Name a colour.\nWhat is two plus two, and why?\nSay hello to everyone in the room now.\n")
    config = ARRConfig(output_dir=str(out), beta=0.5, replay_ratio=0.25, ref_cache_topk=8,
                       self_replay_prompts=str(prompts), self_replay_max_new_tokens=6,
                       self_replay_temperature=temperature, **STEPS)
    trainer = ARRTrainer(fresh_peft(model_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset="self")
    info = trainer.ref_cache_info
    assert info["mode"] == "topk" and info["cache_hit"] == trainer.self_replay_info["cache_hit"]
    if info["cache_hit"]:
        return trainer
    assert info["built_while_generating"] is True and info["seconds"] > 0
    rows = trainer.train_dataset.indices(("replay",))
    built = ReferenceCache.build(trainer.model, trainer.train_dataset, Collator(tokenizer.pad_token_id), 8, rows)
    recorded = trainer.ref_cache
    assert recorded.offsets[rows].tolist() == (built["lengths"].cumsum(0) - built["lengths"]).tolist()
    for name in ("logp", "tail", "label_logp"):
        torch.testing.assert_close(getattr(recorded, name), built[name], rtol=0, atol=1e-4)
    assert (recorded.idx == built["idx"]).float().mean() > 0.99  # (near-ties may swap places)
    return trainer


def test_self_replay_of_a_model_whose_decoding_cannot_continue_a_prefill_gets_its_reference_cache_built(
        llama_dir, tokenizer, tmp_path, monkeypatch):
    """A cache implementation of the model's own: generate() cannot continue a prefill; the answers are generated as
    usual and the reference cache is built by a forward pass."""
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    model = fresh_peft(llama_dir)
    model.generation_config.cache_implementation = "static"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\nSay hello.\n")
    config = ARRConfig(output_dir=str(tmp_path / "out"), beta=0.5, replay_ratio=0.25, self_replay_prompts=str(prompts),
                       self_replay_max_new_tokens=4, **STEPS)
    trainer = ARRTrainer(model, config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset="self")
    assert trainer.self_replay_info["cache_hit"] is False and trainer.ref_cache_info["mode"] == "topk"
    assert trainer.ref_cache_info["cache_hit"] is False and "built_while_generating" not in trainer.ref_cache_info
