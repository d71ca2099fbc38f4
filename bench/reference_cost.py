"""What the on-line reference forward costs against a plain LoRA training step, and what switching the adapter off
for it costs, measured in one process on one batch.

    python -m bench.reference_cost [--shape qwen2.5-0.5b] [--batch-size 16] [--seq-length 68] [--iterations 20]

On a randomly initialised model of the shape (LoRA r16 on all linear layers, bf16 autocast on a GPU), each timed
`--iterations` times after 3 untimed ones, synchronised with the GPU:
  train step         forward and backward of plain LoRA (its loss from full logits)
  reference forward  the same batch under no_grad with the adapter switched off: by PeftModel.disable_adapter(), by
                     each adapter layer's public enable_adapters(False/True), and by arr.initial.InitialModel.switched_to
  switch alone       entering and leaving each context with nothing inside
Step time depends on the shape, not on the weights. seq 68 is the date task's row length (bench.overhead's data).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from arr.initial import InitialModel
from bench.random_model import SHAPES


@contextmanager
def adapters_off_public(layers: list[torch.nn.Module]):
    """InitialModel.switched_to through PEFT's public per-layer switch, `enable_adapters(False)` /
    `enable_adapters(True)`, which also clears and restores requires_grad on each layer's adapter weights."""
    enabled = [layer for layer in layers if not layer.disable_adapters]
    for layer in enabled:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in enabled:
            layer.enable_adapters(True)


def milliseconds(work, iterations: int) -> float:
    for _ in range(3):
        work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=68)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = SHAPES[args.shape]()
    model = get_peft_model(AutoModelForCausalLM.from_config(config).to(device),
                           LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    initial = InitialModel(model)
    layers = initial.layers
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_length), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def train_step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    def reference_forward(switch):
        def run():
            with torch.no_grad(), autocast, switch():
                model(input_ids=ids, logits_to_keep=1)
        return run

    def nothing(switch):
        def run():
            with switch():
                pass
        return run

    switches = {"PeftModel.disable_adapter()": model.disable_adapter,
                "each layer's enable_adapters()": lambda: adapters_off_public(layers),
                "InitialModel.switched_to (private flag)": initial.switched_to}
    train = milliseconds(train_step, args.iterations)
    print(f"{args.shape} on {device}, batch {args.batch_size} x {args.seq_length} tokens, {len(layers)} adapter "
          f"layers in {len(list(model.modules()))} modules")
    print(f"{'train step (LoRA)':46s} {train:8.2f} ms")
    for name, switch in switches.items():
        forward = milliseconds(reference_forward(switch), args.iterations)
        alone = milliseconds(nothing(switch), args.iterations)
        print(f"{'reference forward, ' + name:46s} {forward:8.2f} ms  ({forward / train:.2f} of a train step; "
              f"the switch alone {alone:.2f} ms)")


if __name__ == "__main__":
    main()
