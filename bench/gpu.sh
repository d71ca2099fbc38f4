#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one command, on a machine with a CUDA GPU and this repository's
# dependencies: the trainer's and objective's equality tests on CUDA (reference cache = on-line reference, packed =
# padded, reference rows = every row, gradients against autograd), the reference forward's share of a LoRA step,
# and bench.overhead on randomly initialised models of the SmolLM2-135M and Qwen2.5-0.5B shapes (the real weights
# need not travel: step time and memory depend on the shape).
#
#     bench/gpu.sh TOKENIZER_DIR [OUT_DIR]     (TOKENIZER_DIR: any chat tokenizer, e.g. the SmolLM2 folder)
set -euo pipefail
tokenizer=$1
out=${2:-/tmp/arr-gpu}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_trainer.py tests/test_objective.py >"$out/tests.log" 2>&1 \
  || grep -E "^(E  |FAILED|tests/.*Error)" "$out/tests.log" | head -40  # the benches run even if a test fails
tail -1 "$out/tests.log"
for shape in smollm2-135m qwen2.5-0.5b; do
  python3 -m bench.random_model "$out/$shape" "$shape" "$tokenizer" >/dev/null
done
python3 -m bench.reference_cost --shape qwen2.5-0.5b --batch-size 16 --iterations 10
python3 -m bench.overhead --models "$out/smollm2-135m,$out/qwen2.5-0.5b" --batch-size 16 --steps 10 \
  --warmup-steps 3 --variants arr_kl_all,arr_online
