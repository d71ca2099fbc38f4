"""Two CPU processes (torch.distributed with gloo, launched by torchrun) give the per-step losses of one process at
the same global batch, replay interleaving included: under FSDP, and under DDP with every loss part, the Laplace
penalty and the adaptive beta (which every process must update identically) besides the KL and the replay (one DDP
run covers both: the parts only add terms to the same step). Replay rows are twice as long as the SFT rows, so
padding_free packs them differently in one micro-batch of 8 and in two of 4."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import replay_texts, sft_records, write_jsonl


FSDP = {"fsdp": "full_shard auto_wrap",
        "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "use_orig_params": True}}


LAPLACE_ADAPTIVE = {"laplace_lambda": 100.0, "laplace_samples": 4, "kl_target": 0.001}


@pytest.mark.parametrize("engine", ["fsdp", "ddp_laplace_adaptive"])
def test_two_gloo_processes_match_one_process(tmp_path, llama_dir, engine):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_records(40))
    (tmp_path / "corpus.txt").write_text("\n\n".join(replay_texts(80)))
    base = dict(model_name_or_path=str(llama_dir), sft_data=sft, replay_data=str(tmp_path / "corpus.txt"),
                max_steps=4, learning_rate=1e-2, replay_seq_length=64, beta=0.5, replay_ratio=0.25,
                save_strategy="no", lora_r=4, lora_dropout=0.0, disable_tqdm=True, seed=5, use_cpu=True)
    runs = {"one": (8, [sys.executable, "-m", "arr"]),
            "two": (4, [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "arr"])}  # a free port each time
    history = {}
    for name, (batch, launcher) in runs.items():
        config = tmp_path / f"{name}.yaml"
        extra = FSDP if engine == "fsdp" and name == "two" else {}
        if engine == "ddp_laplace_adaptive":
            extra = {**LAPLACE_ADAPTIVE, "laplace_cache_dir": str(tmp_path / f"curvature-{name}")}
        config.write_text(yaml.safe_dump({**base, **extra, "per_device_train_batch_size": batch,
                                          "output_dir": str(tmp_path / name)}))
        proc = subprocess.run([*launcher, "train", str(config)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("done in") == 1  # only the main process reports
        history[name] = json.loads((tmp_path / name / "metrics.json").read_text())["history"]
    assert len(history["one"]) == len(history["two"]) == 4
    keys = ("loss", "sft_ce", "kl", "replay_ce") + (("laplace", "beta") if engine == "ddp_laplace_adaptive" else ())
    for one, two in zip(history["one"], history["two"]):
        for key in keys:
            assert two[key] == pytest.approx(one[key], abs=1e-4), key
    assert history["one"][-1]["kl"] > 0 and history["one"][-1]["replay_ce"] > 0
    if engine == "ddp_laplace_adaptive":
        assert history["one"][-1]["laplace"] > 0 and history["one"][-1]["beta"] != 0.5
