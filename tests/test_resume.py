"""A run killed with SIGKILL mid-training and resumed ends with the same adapter as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors.torch import load_file

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from arr import ARRConfig, ARRTrainer
    from conftest import replay_texts, sft_records

    model_dir, out, mode = sys.argv[1:4]

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # checkpoint-4 is on disk, step 5 is done but not saved
                os.kill(os.getpid(), signal.SIGKILL)

    config = ARRConfig(output_dir=out, max_steps=8, save_steps=2, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, learning_rate=1e-2, beta=0.5, replay_ratio=0.25,
                       replay_seq_length=16, seed=11, report_to="none", disable_tqdm=True)
    trainer = ARRTrainer(AutoModelForCausalLM.from_pretrained(model_dir), config, train_dataset=sft_records(20),
                         processing_class=AutoTokenizer.from_pretrained(model_dir),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1,
                                                target_modules="all-linear"),
                         replay_dataset=replay_texts(40), callbacks=[KillAtStep()] if mode == "kill" else None)
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    trainer.save_model(os.path.join(out, "final"))
""")


def run(script: Path, model_dir, out, mode):
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    return subprocess.run([sys.executable, str(script), str(model_dir), str(out), mode], env=env,
                          capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(llama_dir, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    full = run(script, llama_dir, tmp_path / "full", "full")
    assert full.returncode == 0, full.stderr[-2000:]

    killed = run(script, llama_dir, tmp_path / "resumed", "kill")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"] and not (tmp_path / "resumed" / "final").exists()

    resumed = run(script, llama_dir, tmp_path / "resumed", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    start = load_file(tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors")
    assert max((expected[k] - start[k]).abs().max().item() for k in expected) > 1e-3  # steps 3..8 moved it
    assert not (tmp_path / "resumed" / ".staging").exists()
