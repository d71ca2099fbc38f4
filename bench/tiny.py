"""A tiny randomly initialised model of one of the major architecture families (FAMILIES) with a small byte-level BPE
ChatML tokenizer, built in-process in a second: the tests' model, and bench.overhead's `tiny` (Llama)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Convert this date to ISO 8601: March 4, 2021. Answer: 2021-03-04",
    "Wikipedia is a free online encyclopedia written by volunteers.",
    "system user assistant hello world what is the capital of France? Paris.",
] * 20
# Each family's config class and what its tiny shape sets beyond the common fields: a head_dim where the default is
# the real model's (128, 256), a sliding window shorter than the tests' rows, and Gemma 2's final-logit softcap at the
# scale of these logits (|logit| < 0.5; a real Gemma 2's reach its cap of 30), so that each is in play.
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {"head_dim": 8}),
    "mistral": (MistralConfig, {"sliding_window": 16}),
    "gemma2": (Gemma2Config, {"head_dim": 8, "sliding_window": 16, "final_logit_softcapping": 0.3}),
    "gemma3": (Gemma3TextConfig, {"head_dim": 8, "sliding_window": 16,
                                  "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": (Phi3Config, {}),  # fused qkv_proj and gate_up_proj
}


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def tiny_model(kind: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)
    config_class, extra = FAMILIES[kind]
    config = config_class(**common, **extra)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
