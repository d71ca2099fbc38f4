"""A run stopped mid-training (SIGKILL, Ctrl-C, SIGTERM) and resumed ends with the same adapter, and logs the same
loss parts, as an uninterrupted one."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from arr import ARRConfig, ARRTrainer
from arr.cli import main
from arr.errors import ConfigError
from arr.run_folder import TRAINED_KEYS
from arr.train import StopOnSignal, mean_loss
from conftest import assert_one_error_line, sft_records, write_jsonl
from test_trainer import fresh_peft

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


# ------------------------------------------------------------- arr train stopped by Ctrl-C or SIGTERM, and resumed

@pytest.fixture(scope="module")
def stop_config(tmp_path_factory, llama_dir):
    folder = tmp_path_factory.mktemp("stop")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(llama_dir), "sft_data": write_jsonl(folder / "sft.jsonl", sft_records(24)),
        "output_dir": str(folder / "full"), "max_steps": 3, "per_device_train_batch_size": 4, "beta": 0.5,
        "kl_on": "all", "replay_ratio": 0.0, "learning_rate": 1e-2, "lora_r": 4, "save_strategy": "no",
        "eval_after": "none", "disable_tqdm": True}))
    assert main(["train", str(config)]) == 0
    return config


def finished(out: Path):
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    return metrics, load_file(out / "adapter_model.safetensors")


def assert_same_run(got, expected):
    (metrics, adapter), (want_metrics, want_adapter) = got, expected
    history, want_history = metrics["history"], want_metrics["history"]
    assert [h["step"] for h in history] == [h["step"] for h in want_history] == [1, 2, 3]
    for h, want in zip(history, want_history):
        assert h == pytest.approx(want, abs=1e-6), (h, want)
    assert metrics["train_loss"] == pytest.approx(want_metrics["train_loss"], abs=1e-6)
    assert metrics["train_loss"] == pytest.approx(sum(h["loss"] for h in want_history) / 3, abs=1e-6)
    assert max((adapter[k] - want_adapter[k]).abs().max().item() for k in want_adapter) <= 1e-6


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("at_step", [1, 2, 3])
def test_a_stopped_run_resumes_to_the_uninterrupted_one(stop_config, tmp_path, capsys, monkeypatch, signum,
                                                        at_step):
    """The signal arrives during step `at_step` of 3: the run ends that step, writes its checkpoint and exits with
    128 + the signal, and the printed command resumes it to the uninterrupted run's logged loss parts and adapter.
    During the last step it stops nothing: the run finishes."""
    out = tmp_path / "out"
    on_step_end, sent = StopOnSignal.on_step_end, []

    def signal_during_step(self, args, state, control, **kwargs):
        if state.global_step == at_step and not sent:
            sent.append(os.kill(os.getpid(), signum))  # the handler runs now, as on a real signal mid-step
        return on_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnSignal, "on_step_end", signal_during_step)
    args = ["train", str(stop_config), f"output_dir={out}"]
    code = main(args)
    err = capsys.readouterr().err
    assert sent and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
    expected = finished(stop_config.parent / "full")
    if at_step == 3:
        assert code == 0 and not list(out.glob("checkpoint-*"))
        assert_same_run(finished(out), expected)
        return
    name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[signum]
    last = err.strip().splitlines()[-1]
    assert code == 128 + signum and last.startswith(f"arr: stopped by {name} after step {at_step}; "), err
    assert last.endswith(f"resume with: {shlex.join(['arr', *args, '--resume'])}")
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{at_step}"]
    assert not (out / "adapter_config.json").exists()
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert_same_run(finished(out), expected)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no lock, staging or .saving-


def test_resuming_a_checkpoint_at_max_steps_trains_no_further_step(stop_config, tmp_path):
    """A run killed after its checkpoint at the last step but before its final save: --resume saves it as it is."""
    out = tmp_path / "out"
    assert main(["train", str(stop_config), f"output_dir={out}", "save_strategy=steps", "save_steps=3"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "arr_config.yaml"):
        (out / name).unlink()
    assert main(["train", str(stop_config), f"output_dir={out}", "save_strategy=steps", "save_steps=3",
                 "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["global_steps"] == 3
    assert_same_run(finished(out), finished(stop_config.parent / "full"))


def test_a_checkpoint_is_resumed_only_with_the_keys_it_trained_with(stop_config, tmp_path, capsys, llama_dir,
                                                                    tokenizer):
    """Each checkpoint records the keys that say what it trains. --resume with other values (a default changed
    since, a key typed anew) is refused before anything is loaded, naming the values that resume it as it trained;
    ARRTrainer.train refuses them too, the adapter's LoRA keys among them. With those values it resumes to the
    uninterrupted run."""
    out = tmp_path / "out"
    args = ["train", str(stop_config), f"output_dir={out}", "save_strategy=steps", "save_steps=2"]
    assert main(args) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "arr_config.yaml"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoint-3")  # killed after step 2's checkpoint: step 3 is trained again
    checkpoint = out / "checkpoint-2"
    recorded = json.loads((checkpoint / TRAINED_KEYS).read_text())
    assert (recorded["beta"], recorded["learning_rate"], recorded["seed"], recorded["kl_on"]) == (0.5, 1e-2, 42, "all")
    assert (recorded["lora_r"], recorded["lora_alpha"]) == (4, 32) and recorded["lora_target_modules"] == sorted(
        recorded["lora_target_modules"])  # (a set in PEFT: sorted, so that it compares)
    on_disk = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()

    code = main([*args, "beta=3.0", "learning_rate=0.02", "lr_scheduler_type=cosine", "loss_chunk_size=64",
                 "max_steps=4", "--resume"])  # (loss_chunk_size and max_steps may change)
    err = capsys.readouterr().err
    assert "Loading" not in err
    then = "beta=0.5 learning_rate=0.01 lr_scheduler_type=linear"
    assert_one_error_line(code, err, f"arr: error: --resume: {str(checkpoint)!r} trained with {then}, and this run "
                          f"has beta=3.0 learning_rate=0.02 lr_scheduler_type=cosine; pass {then} to resume it as it "
                          "trained (a run trains with one value of each key)")
    assert sorted(p.name for p in out.rglob("*")) == on_disk
    # in Python, an adapter that loads into the same shapes but scales them otherwise (PEFT would load it silently)
    config = ARRConfig(output_dir=str(out), beta=0.5, kl_on="all", replay_ratio=0.0, learning_rate=1e-2,
                       per_device_train_batch_size=4, report_to="none")
    model = fresh_peft(llama_dir, r=4, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear")
    with pytest.raises(ConfigError, match="trained with lora_alpha=32, and this run has lora_alpha=64; pass"):
        ARRTrainer(model, config, train_dataset=sft_records(8), processing_class=tokenizer).train(
            resume_from_checkpoint=True)

    assert main([*args, "--resume"]) == 0
    assert_same_run(finished(out), finished(stop_config.parent / "full"))


def test_the_run_mean_loss_weights_each_logged_window_by_its_steps():
    """Logged every 2 steps over 5: windows of 2, 2 and 1 step."""
    history = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 2.0}, {"step": 5, "loss": 4.0}]
    assert mean_loss(history) == pytest.approx((2 * 1.0 + 2 * 2.0 + 4.0) / 5)
    assert mean_loss([]) is None
