"""Forgetting watched while training (probe_steps) and the budget that stops a run (forgetting_budget), on a tiny
model that first learns the probes' general text, so that plain LoRA at a high learning rate on a narrow task makes
it really forget; and the run folder an ARRTrainer writes from Python (save_run)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from peft.utils import load_peft_weights
from safetensors.torch import load_file
from transformers import TrainerCallback

from arr import ARRConfig, ARRTrainer
from arr import evaluation as ev
from bench.tiny import make_tokenizer, tiny_model
from conftest import sft_records, write_jsonl


@pytest.fixture(scope="module")
def knowing_dir(tmp_path_factory):
    """A tiny Llama trained (all weights) on the general text the probes read: it has something to forget."""
    tokenizer, model = make_tokenizer(), tiny_model("llama", 400)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=False) for q, a in ev.chat_exchanges(16, 0)]
    texts += [d[:300] for d in ev.heldout_documents(12, 0)]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:96] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(60):
        for i in torch.randperm(len(rows))[:8].tolist():
            ids = torch.tensor([rows[i]])
            (model(input_ids=ids, labels=ids).loss / 8).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("knowing")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Recorder(TrainerCallback):
    """What a logger of report_to receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def small_probes(tmp_path) -> ev.EvalArgs:
    task = write_jsonl(tmp_path / "task_test.jsonl", sft_records(30)[24:])
    return ev.EvalArgs(heldout_docs=12, max_doc_tokens=64, knowledge_items=8, mmlu_items=0, chat_items=16,
                       drift_prompts=2, drift_tokens=8, task_items=4, task_data=task)


def lora_trainer(tmp_path, model_dir, **keys) -> ARRTrainer:
    """Plain LoRA at a high learning rate on a narrow task: the run made to forget."""
    args = ARRConfig(**{"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4, "learning_rate": 3e-2,
                        "lr_scheduler_type": "constant", "beta": 0.0, "replay_ratio": 0.0, "kl_on": "all",
                        "save_strategy": "no", "disable_tqdm": True, "seed": 3, **keys})
    return ARRTrainer(model=str(model_dir), args=args, train_dataset=sft_records(24), replay_dataset=None,
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                      eval_args=small_probes(tmp_path))


def test_probe_rounds_reach_the_loggers_and_the_run_folder_written_from_python(tmp_path, monkeypatch, knowing_dir):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    trainer = lora_trainer(tmp_path, knowing_dir, max_steps=4, probe_steps=2)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    metrics = trainer.save_run()
    logged = [log for log in recorder.logs if "forgetting" in log]
    assert len(logged) == 2
    assert set(logged[0]) >= {"forgetting", "probe/heldout_nll", "probe/chat_nll", "probe/task_em"}
    assert "probe/knowledge_mc" not in logged[0]  # (the multiple-choice probes are left to the report)
    rounds = metrics["probe_rounds"]
    assert [r["step"] for r in rounds] == [2, 4] and rounds[0]["forgetting"] == logged[0]["forgetting"]
    assert 0 < rounds[0]["forgetting"] < rounds[1]["forgetting"]  # it forgets as it trains
    out = tmp_path / "run"
    report = json.loads((out / "eval.json").read_text())  # the same probes on the same final model as round 2
    assert report["forgetting"] == pytest.approx(rounds[1]["forgetting"], abs=1e-6)
    saved = yaml.safe_load((out / "arr_config.yaml").read_text())
    assert saved["model_name_or_path"] == str(knowing_dir) and saved["lora_r"] == 8 and saved["probe_steps"] == 2
    assert json.loads((out / "metrics.json").read_text())["probe_rounds"] == rounds
    assert metrics["trained_parts"] == ["sft_ce"] and set(metrics["means"]) == {"loss", "sft_ce"}
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]  # a round leaves its step's own loss log in place
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "adapter_config.json").is_file()


def test_the_budget_stops_the_run_and_rolls_back_across_a_resume(tmp_path, monkeypatch, knowing_dir):
    monkeypatch.setenv("ARR_CACHE", str(tmp_path / "cache"))
    first = lora_trainer(tmp_path, knowing_dir, max_steps=4, probe_steps=2, forgetting_budget=1000.0)
    first.train()  # stopped here (as if killed): rounds 2 and 4, each within budget, left checkpoints
    rounds = {h["step"]: h["forgetting"] for h in first.state.log_history if "forgetting" in h}
    assert sorted(rounds) == [2, 4] and (tmp_path / "run" / "checkpoint-4").is_dir()
    assert rounds[2] < rounds[4]
    budget = (rounds[2] + rounds[4]) / 2  # a tighter budget for the resumed run: round 2 within it, round 4 over

    resumed = lora_trainer(tmp_path, knowing_dir, max_steps=12, probe_steps=2, forgetting_budget=budget)
    resumed.train(resume_from_checkpoint=True)
    metrics = resumed.save_run()
    seen = {r["step"]: r["forgetting"] for r in metrics["probe_rounds"]}  # the first run's rounds, then the new ones
    crossed = metrics["forgetting_budget"]["crossed_at"]
    assert crossed > 4 and seen[crossed] > budget and metrics["global_steps"] == crossed == max(seen)
    kept = max(step for step, value in seen.items() if value <= budget)  # 2 (the first run's), unless a later round
    assert metrics["forgetting_budget"] == {"budget": budget, "crossed_at": crossed, "kept_step": kept}
    out = tmp_path / "run"
    final, saved = load_file(out / "adapter_model.safetensors"), load_peft_weights(str(out / f"checkpoint-{kept}"))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    report = json.loads((out / "eval.json").read_text())
    assert report["kept_step"] == kept and report["forgetting"] == pytest.approx(seen[kept], abs=1e-6)


def test_two_processes_stop_together_and_keep_the_initial_adapter(tmp_path, knowing_dir):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(knowing_dir), "sft_data": write_jsonl(tmp_path / "sft.jsonl", sft_records(24)),
        "method": "lora", "learning_rate": 3e-2, "max_steps": 8, "per_device_train_batch_size": 2, "lora_r": 8,
        "output_dir": str(tmp_path / "run"), "probe_steps": 2, "forgetting_budget": 1e-9, "save_strategy": "no",
        "disable_tqdm": True, "use_cpu": True}))
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "arr", "train", str(config)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ARR_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("crossed forgetting_budget") == 1  # one line, from the main process
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_steps"] == 2  # both processes stopped at the first round (a disagreement would hang)
    assert metrics["forgetting_budget"] == {"budget": 1e-9, "crossed_at": 2, "kept_step": 0}
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["kept_step"] == 0 and report["forgetting"] == 0.0  # the adapter as it started changes nothing
    assert "the adapter written is step 0's" in proc.stdout
