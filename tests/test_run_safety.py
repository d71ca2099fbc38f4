"""Nothing lost: a finished adapter is never overwritten by mistake, two runs never write one folder, Ctrl-C and SIGTERM
leave a checkpoint to resume from, a finished folder is readable by others as the umask allows, and a clean run prints
no warnings."""

import fcntl
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from arr.cli import main
from arr.data import read_jsonl
from conftest import sft_records, write_jsonl

ROOT = Path(__file__).parent.parent


@pytest.fixture
def config(tmp_path, llama_dir):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(llama_dir), "sft_data": write_jsonl(tmp_path / "sft.jsonl", sft_records(16)),
        "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4, "beta": 0.2,
        "kl_on": "all", "replay_ratio": 0.0, "save_strategy": "no", "lora_r": 4, "disable_tqdm": True}))
    return path


def one_error_line(capsys, args, expected):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("arr: error:") == 1 and expected in err.strip().splitlines()[-1], err
    assert "Traceback" not in err


def test_jsonl_with_a_byte_order_mark_is_read_as_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\\u00e9", "completion": "ok"}\n'.encode())
    assert read_jsonl(path) == [(1, {"prompt": "café", "completion": "ok"})]


def test_a_finished_adapter_is_not_overwritten_unless_asked(config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(config)]) == 0
    adapter = (out / "adapter_model.safetensors").read_bytes()
    one_error_line(capsys, ["train", str(config), "learning_rate=0.5"],
                   f"output_dir {str(out)!r} already holds a finished adapter; set overwrite_output_dir: true")
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert main(["train", str(config), "learning_rate=0.5", "overwrite_output_dir=true"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != adapter


def test_a_finished_run_folder_is_readable_under_the_umask_and_holds_no_lock(config, tmp_path):
    out, umask = tmp_path / "out", os.umask(0o027)
    try:
        assert main(["train", str(config)]) == 0
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["adapter_model.safetensors"] == 0o640  # safetensors alone would write 0600
    assert set(modes.values()) == {0o640} and ".arr.lock" not in modes


def test_a_second_run_on_the_same_folder_refuses_while_the_first_holds_it(config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".arr.lock", "a") as held:  # what a running arr train holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_error_line(capsys, ["train", str(config)], "is being written by another arr train")
    assert sorted(p.name for p in out.iterdir()) == [".arr.lock"]
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out / ".arr.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    one_error_line(capsys, ["train", str(config)], "is being written by another arr train")
    holder.kill()  # a killed run's lock goes with it
    holder.wait()
    assert main(["train", str(config)]) == 0 and (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_stops_with_a_checkpoint_and_the_printed_command_resumes_it(config, tmp_path, signum, name):
    """Ctrl-C, or SIGTERM (a scheduler's or a preempted machine's notice): exit status 128 + the signal."""
    out = tmp_path / "out"
    args = [str(config), "max_steps=300", "logging_steps=1", "learning_rate=1e-3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "arr", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    for line in proc.stdout:  # the first logged step: training is under way
        if "'loss'" in line:
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"arr: stopped by {name} after step ") and "resume with: arr train " in last, last
    checkpoints = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    step = int(last.split("after step ")[1].split(";")[0])
    assert checkpoints == [f"checkpoint-{step}"] and 1 <= step < 300
    assert not (out / "adapter_config.json").exists() and not (out / ".staging").exists()
    resume = shlex.split(last.split("resume with: ")[1])
    assert resume[:2] == ["arr", "train"] and resume[-1] == "--resume"
    done = subprocess.run([sys.executable, "-m", "arr", *resume[1:]], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "300 steps" in done.stdout.strip().splitlines()[-1]
    assert load_file(out / "adapter_model.safetensors")


def test_a_clean_run_prints_no_warning(config):
    done = subprocess.run([sys.executable, "-m", "arr", "train", str(config)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warn" not in done.stderr.lower() and "warn" not in done.stdout.lower(), done.stderr[-3000:]
