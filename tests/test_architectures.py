"""Every major architecture family (bench/tiny.py FAMILIES: Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3),
each a tiny randomly initialised model: the initial model, the chunked loss, packing and self-generated replay's
recorded reference hold on each. Gemma 2's final-logit softcapping is in play (its cap at the tiny logits' scale)."""

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from arr import ARRConfig, ARRTrainer
from arr.cache import reference_cache
from arr.chunked_loss import final_logit_softcap
from arr.data import Collator, MixedDataset, load_sft_examples
from arr.errors import ARRError
from arr.initial import initial_model
from bench.tiny import FAMILIES
from conftest import replay_texts, saved_tiny_model, sft_records
from test_trainer import STEPS, assert_same_step, fresh_peft, mixed_step, move_adapter, one_step, recording_self_replay


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory, tokenizer):
    return saved_tiny_model(request.param, tmp_path_factory, tokenizer)


def probe_inputs(tokenizer):
    batch = Collator(tokenizer.pad_token_id)(load_sft_examples(sft_records(3), tokenizer, 64))
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def test_the_reference_is_the_untouched_model_and_the_kl_is_0_at_step_0(family_dir, tokenizer, tmp_path):
    config = ARRConfig(output_dir=str(tmp_path), beta=0.5, kl_on="all", replay_ratio=0.25, replay_seq_length=64,
                       ref_cache="none", **STEPS)
    trainer = ARRTrainer(fresh_peft(family_dir), config, train_dataset=sft_records(20), processing_class=tokenizer,
                         replay_dataset=replay_texts(40))
    rows = [trainer.train_dataset[i] for i in (0, 1, len(trainer.train_dataset) - 1)]
    assert one_step(trainer, rows).parts[1].item() == pytest.approx(0.0, abs=1e-7)
    inputs, model = probe_inputs(tokenizer), trainer.model
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(family_dir).eval()(**inputs).logits
        move_adapter(model)  # the reference stays the untouched model, bit for bit, by both switches, once trained
        with trainer.initial.switched_to():  # (in train mode, as in a step)
            torch.testing.assert_close(model.train()(**inputs).logits, expected, atol=0, rtol=0)
        with initial_model(model.eval()):
            torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)
        assert (model(**inputs).logits - expected).abs().max() > 1e-3


def test_chunked_loss_and_the_reference_cache_give_the_full_logits_loss_and_gradients(family_dir, tokenizer,
                                                                                       tmp_path):
    """The chunked loss applies the LM head (and Gemma 2's softcap) itself, chunk by chunk, to the trained model's
    and the on-line reference's hidden states, as the cache build does: each equals the model's own logits."""
    def step(name, **config):
        return mixed_step(family_dir, tokenizer, tmp_path / name, kl_on="all", **config)

    full = step("full", loss_chunk_size=0, ref_cache="none")
    assert_same_step(step("chunked", loss_chunk_size=7, ref_cache="none"), full)
    assert_same_step(step("cached", loss_chunk_size=1024, ref_cache="exact"), full)
    model = AutoModelForCausalLM.from_pretrained(family_dir)
    cap = final_logit_softcap(model)
    if cap:  # the cap changes the logits, so leaving it out shows; a cache of other logits is never read
        inputs = probe_inputs(tokenizer)
        with torch.no_grad():
            uncapped = model.get_output_embeddings()(model.get_decoder()(**inputs).last_hidden_state)
            assert (model(**inputs).logits - uncapped).abs().max() > 0.05
        peft_model = fresh_peft(family_dir)
        dataset, keys = MixedDataset(load_sft_examples(sft_records(4), tokenizer, 64)), []
        for softcap in (cap, 2 * cap):
            peft_model.config.final_logit_softcapping = softcap
            keys.append(reference_cache(peft_model, dataset, Collator(tokenizer.pad_token_id), None,
                                        tmp_path / "reference")[1]["key"])
        assert keys[0] != keys[1]


def test_packing_keeps_sequences_apart(family_dir, tokenizer, tmp_path):
    """padding_free: the trainer's check passes, and a packed batch gives the padded batch's loss and gradients
    (sequences longer than the sliding window of Mistral and Gemma)."""
    padded, packed = (mixed_step(family_dir, tokenizer, tmp_path / str(on), kl_on="all", padding_free=on)
                      for on in (False, True))
    assert packed.batch["input_ids"].shape[0] < padded.batch["input_ids"].shape[0]
    assert padded.batch["attention_mask"].sum(1).max() > 16
    assert_same_step(packed, padded)


def test_self_generated_replay_records_the_reference_a_build_gives(family_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    recording_self_replay(family_dir, tokenizer, tmp_path / "run")


def test_a_logit_scale_in_the_models_own_forward_refuses_the_chunked_loss(tmp_path, tokenizer):
    """Cohere-style models scale their logits in their own forward, which the chunked loss (the head applied to the
    final hidden states) would leave out: refused with one line, and the full-logits path trains."""
    from transformers import CohereConfig

    config = CohereConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5, pad_token_id=0,
                          eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    args = ARRConfig(output_dir=str(tmp_path), beta=1.0, kl_on="all", replay_ratio=0.0, max_steps=1,
                     per_device_train_batch_size=4, save_strategy="no", report_to=[], disable_tqdm=True)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ARRError, match="logits are not its LM head.*set loss_chunk_size: 0"):
        ARRTrainer(model, args, train_dataset=sft_records(8), processing_class=tokenizer, peft_config=lora)
    args.loss_chunk_size = 0
    ARRTrainer(AutoModelForCausalLM.from_config(config), args, train_dataset=sft_records(8), processing_class=tokenizer,
               peft_config=lora).train()
