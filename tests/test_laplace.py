"""The Laplace (LaLoRA) penalty and its curvature, and the adaptive KL controller."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from arr import ARRConfig, ARRTrainer
from arr.curvature import adapted_layers, delta_weight, diagonal_fisher
from arr.objective import ARRObjective
from arr.trainer import adapted_beta
from conftest import replay_texts, sft_records
from test_trainer import STEPS, fresh_peft


def test_fisher_matches_per_sequence_gradients_of_the_plain_model(llama_dir):
    torch.manual_seed(1)
    blocks = torch.randint(3, 300, (5, 12))
    model = fresh_peft(llama_dir, lora_dropout=0.5)  # dropout must not touch the estimate (eval mode)
    model.train()
    fisher = diagonal_fisher(model, blocks)

    plain = AutoModelForCausalLM.from_pretrained(llama_dir)  # no PEFT: the initial model, by another route
    expected = {}
    for ids in blocks:
        plain.zero_grad()
        logits = plain(input_ids=ids[None]).logits[0, :-1]
        (-F.cross_entropy(logits, ids[1:], reduction="sum")).backward()
        for name, p in plain.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad.square() / (len(ids) - 1) / len(blocks)
    assert len(fisher) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, f in fisher.items():
        key = name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(f, expected[key], rtol=1e-4, atol=1e-10)
    assert model.training and not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_penalty_is_zero_at_init_quadratic_in_dW_and_has_the_hand_gradient(llama_dir):
    model = fresh_peft(llama_dir)
    layers = adapted_layers(model)
    torch.manual_seed(0)
    fishers = {n: torch.rand_like(m.get_base_layer().weight) for n, m in layers.items()}
    objective = ARRObjective(laplace_lambda=3.0)

    def penalty():
        return objective.laplace_penalty(zip([lambda m=m: delta_weight(m, "default") for m in layers.values()],
                                             fishers.values()))

    assert penalty().item() == 0.0  # standard init: B = 0, so dW = 0
    for m in layers.values():
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    first = penalty()
    first.backward()
    for m in layers.values():
        m.lora_B["default"].weight.data *= 2
    assert penalty().item() == pytest.approx(4 * first.item(), rel=1e-5)

    name, layer = next(iter(layers.items()))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]  # alpha / r = 2
    assert scaling == 2
    hand_grad = 3.0 * scaling * (fishers[name] * (scaling * (B / 2) @ A)) @ A.T  # d/dB of lambda/2 F (sBA)^2
    torch.testing.assert_close(B.grad, hand_grad.detach(), rtol=1e-5, atol=1e-8)


def laplace_trainer(llama_dir, tokenizer, tmp_path, lam, texts=None, **extra):
    config = ARRConfig(output_dir=str(tmp_path / f"out{lam}"), beta=0.0, replay_ratio=0.0, laplace_lambda=lam,
                       laplace_samples=6, replay_seq_length=16, laplace_cache_dir=str(tmp_path / "cache"),
                       **{**STEPS, **extra})
    return ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                      curvature_dataset=texts or replay_texts(40))


def test_laplace_training_logs_the_penalty_shrinks_the_update_and_caches_the_curvature(llama_dir, tokenizer,
                                                                                        tmp_path):
    weak = laplace_trainer(llama_dir, tokenizer, tmp_path, 1e-6)
    assert weak.curvature_info["cache_hit"] is False and weak.curvature_info["seconds"] > 0
    weak.train()
    strong = laplace_trainer(llama_dir, tokenizer, tmp_path, 1e4)
    assert strong.curvature_info["cache_hit"] is True  # same model and data: the estimate is reused
    strong.train()
    history = [h for h in strong.state.log_history if "laplace" in h]
    assert history[0]["laplace"] == 0.0 and history[-1]["laplace"] > 0  # dW = 0 during the first step
    assert history[-1]["loss"] == pytest.approx(history[-1]["sft_ce"] + history[-1]["laplace"], rel=1e-4)

    def weighted_update(trainer):
        return sum((f * delta().square()).sum().item() for delta, f in trainer.curvature)

    assert weighted_update(strong) < 0.1 * weighted_update(weak)
    other = laplace_trainer(llama_dir, tokenizer, tmp_path, 1.0, texts=[t.upper() for t in replay_texts(40)])
    assert other.curvature_info["cache_hit"] is False and other.curvature_info["key"] != weak.curvature_info["key"]


def test_adaptive_beta_rule():
    assert adapted_beta(1.0, kl=0.1, target=0.1, rate=0.2) == 1.0
    assert adapted_beta(1.0, kl=0.3, target=0.1, rate=0.2) == pytest.approx(1.2)  # clipped at +rate
    assert adapted_beta(1.0, kl=0.0, target=0.1, rate=0.2) == pytest.approx(0.8)
    assert adapted_beta(2.0, kl=0.15, target=0.1, rate=0.2) == pytest.approx(2.0 * 1.1)


def adaptive_trainer(llama_dir, tokenizer, out, **extra):
    config = ARRConfig(output_dir=str(out), beta=1.0, kl_on="all", kl_target=1e-4, replay_ratio=0.0,
                       **{**STEPS, "max_steps": 6, **extra})
    return ARRTrainer(fresh_peft(llama_dir), config, train_dataset=sft_records(20), processing_class=tokenizer)


def test_adaptive_kl_steers_beta_every_step_and_resumes_it(llama_dir, tokenizer, tmp_path):
    full = adaptive_trainer(llama_dir, tokenizer, tmp_path / "full")
    full.train()
    history = [h for h in full.state.log_history if "kl" in h]
    assert len(history) == 6 and history[0]["beta"] == 1.0
    for before, after in zip(history, history[1:]):
        # (the logged KL is rounded to 1e-6, 1% of the target here: beta is known to 0.2 x 0.5%)
        assert after["beta"] == pytest.approx(adapted_beta(before["beta"], before["kl"], 1e-4, 0.2), rel=2e-3)
    assert history[-1]["beta"] != 1.0

    first = adaptive_trainer(llama_dir, tokenizer, tmp_path / "cut", save_strategy="steps", save_steps=3)
    first.train()
    resumed = adaptive_trainer(llama_dir, tokenizer, tmp_path / "cut", save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert resumed.adaptive_kl.beta == pytest.approx(full.adaptive_kl.beta, rel=1e-5)
    assert resumed.adaptive_kl.beta != 1.0
