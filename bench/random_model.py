"""Save a randomly initialised model of a known shape, for timing where the real weights cannot travel.

    python -m bench.random_model OUT_DIR SHAPE TOKENIZER_DIR     (SHAPE: smollm2-135m or qwen2.5-0.5b)

Step time and memory depend on the shape, not on the weights, so `python -m bench.overhead --models OUT_DIR` on such
a folder times what the real model would cost (its top-k KL error, which depends on the weights, means nothing).
The tokenizer is copied from TOKENIZER_DIR; with a vocabulary smaller than the shape's, the extra rows of the
embedding and head are never read but still cost their full share of the loss.
"""

from __future__ import annotations

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

# The published configurations of SmolLM2-135M-Instruct and Qwen2.5-0.5B-Instruct (shape fields only).
SHAPES = {
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_theta=100000.0),
    "qwen2.5-0.5b": lambda: Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0),
}


def main(out_dir: str, shape: str, tokenizer_dir: str) -> None:
    if shape not in SHAPES:
        sys.exit(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    AutoModelForCausalLM.from_config(SHAPES[shape]()).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
