"""The layout of a run folder (`output_dir` of `arr train`, and the output folder of `arr compare`): every file name
in one place, and which files are final and which are being written.

A finished run holds the PEFT adapter, the tokenizer, CONFIG (the fully resolved config) and METRICS; all are
written into a temporary folder inside and moved into place with ADAPTER_CONFIG last, so a folder that has
ADAPTER_CONFIG holds a complete run. Checkpoints (`checkpoint-N`, the Trainer's layout) are written into STAGING and
renamed into place once complete. The report after training adds EVAL and REPORT_PNG, `arr eval` EVAL; `arr compare`
writes RESULTS_* and one run folder per method, each with its EVAL.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ARRError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's adapter config: written last
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG = "arr_config.yaml"
METRICS = "metrics.json"
EVAL = "eval.json"
REPORT_PNG = "report.png"  # the report drawn: before and after per probe, the loss parts and probe rounds over steps
MERGED = "merged"  # save_merged_model: the adapter merged into the base model
STAGING = ".staging"  # a checkpoint being written
TRAINED_KEYS = "arr_trained_keys.json"  # in each checkpoint: the keys it trained with (ARRTrainer.trained_keys)
LOCK = ".arr.lock"  # held (flock) by the `arr train` writing the folder, and removed when it ends
RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"


def is_finished(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a complete `arr train` run."""
    return all((Path(run_dir) / name).is_file() for name in (ADAPTER_CONFIG, CONFIG, METRICS))


def check_writable(key: str, folder: str | Path) -> None:
    """Refuse a folder the run will write into that it cannot (made now if needed, as the run would make it)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ConfigError(f"{key}: {str(folder)!r} is not writable ({e.strerror})") from None


def check_resumable(path: str, trained_keys: dict) -> None:
    """Refuse `--resume` where there is nothing to resume, saying what is there instead, and where the run's keys
    differ from those its newest checkpoint trained with."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(path)
    if is_finished(out):
        raise ConfigError(f"--resume: output_dir {path!r} holds a finished run, nothing to resume; evaluate it with "
                          f"arr eval {path}, or train it anew with overwrite_output_dir=true and no --resume")
    checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
    if checkpoint is None:
        there = ("does not exist" if not out.exists() else "is not a folder" if not out.is_dir()
                 else "holds no checkpoint")
        raise ConfigError(f"--resume: output_dir {path!r} {there}, nothing to resume; run without --resume to start")
    check_resumed_keys(checkpoint, trained_keys)


def _keys_json(trained_keys: dict) -> str:
    """TRAINED_KEYS's text: values JSON cannot hold (an enum, a path) as their str, so a record and a run compare."""
    return json.dumps(trained_keys, indent=1, default=str)


def record_trained_keys(checkpoint: str | Path, trained_keys: dict) -> None:
    """Write a checkpoint's TRAINED_KEYS (ARRTrainer.trained_keys)."""
    (Path(checkpoint) / TRAINED_KEYS).write_text(_keys_json(trained_keys), encoding="utf-8")


def check_resumed_keys(checkpoint: str | Path, trained_keys: dict) -> None:
    """Refuse to resume `checkpoint` with keys other than those it trained with, such as a default changed since,
    naming the values that resume it as it trained. `trained_keys`: ARRTrainer.trained_keys, or before the model
    loads ARRConfig.trained_keys (a key missing on either side is not compared). A checkpoint written before arr
    recorded its keys is resumed unchecked."""
    from .keys import override

    recorded = Path(checkpoint) / TRAINED_KEYS
    if not recorded.is_file():
        return
    try:
        then = json.loads(recorded.read_text(encoding="utf-8"))
        if not isinstance(then, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: cannot read {str(recorded)!r} ({e}); resume from an earlier checkpoint by "
                          "moving this one away") from None
    now = json.loads(_keys_json(trained_keys))
    changed = [key for key in then if key in now and now[key] != then[key]]
    if changed:
        def given(values):
            return " ".join(shlex.quote(override(key, values[key])) for key in changed)
        raise ConfigError(f"--resume: {str(checkpoint)!r} trained with {given(then)}, and this run has {given(now)}; "
                          f"pass {given(then)} to resume it as it trained (a run trains with one value of each key)")


@contextmanager
def claimed(path: str, resume: bool = False, overwrite: bool = False, lock: bool = True):
    """The output folder of one `arr train`, made if needed. Refused: a folder holding a finished run (unless
    `overwrite` or `resume`), one that cannot be written, and one another `arr train` is writing (`lock`: an
    exclusive flock on LOCK, which the operating system releases when its process ends, however it ends). When the
    run stops with an error before anything but the lock was written, the folders it made are removed."""
    out = Path(path).absolute()
    if (out / ADAPTER_CONFIG).is_file() and not (resume or overwrite):
        raise ConfigError(f"output_dir {path!r} already holds a finished adapter; set overwrite_output_dir: true to "
                          "replace it, or pass --resume to continue from its newest checkpoint")
    first_missing = next((p for p in [*reversed(out.parents), out] if not p.exists()), None)

    def remove_if_empty():
        if first_missing is not None and first_missing.exists() and set(os.listdir(out)) <= {LOCK}:
            shutil.rmtree(first_missing)

    handle = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
        if lock:
            handle = open(out / LOCK, "a")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"output_dir {path!r} is being written by another arr train; wait for it or choose "
                          "another output_dir") from None
    except OSError as e:
        remove_if_empty()
        raise ConfigError(f"output_dir: {path!r} is not writable ({e.strerror})") from None
    try:
        yield out
    except BaseException:
        remove_if_empty()
        raise
    finally:
        if handle is not None:  # the lock file goes with the run that made it, so that it does not travel with the
            (out / LOCK).unlink(missing_ok=True)  # folder; unlinked while held, so no other run holds it meanwhile
            handle.close()  # releases the lock


def save_atomically(write, directory: Path, last: str) -> None:
    """Run `write(tmp_dir)`, then move its files into `directory`, the file `last` at the end: a reader that sees
    `last` sees every other file complete. Used for the final adapter and the merged model. A write that fails (a
    full disk) leaves `directory` as it was. The files get the usual modes under the umask (safetensors writes 0600)."""
    from safetensors import SafetensorError

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        try:
            write(Path(tmp))
        except (OSError, SafetensorError) as e:
            raise ARRError(f"cannot save the run into {str(directory)!r} ({' '.join(str(e).split())}); what it "
                           "held before is untouched") from None
        umask = os.umask(0)
        os.umask(umask)
        for root, folders, files in os.walk(tmp):
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        names = sorted(os.listdir(tmp), key=lambda n: n == last)
        for name in names:
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(Path(tmp) / name, target)


def check_adapter(run_dir: Path) -> None:
    """Refuse a run whose adapter weights are not a whole safetensors file (a truncated copy, a damaged disk)."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(path, framework="pt") as weights:  # reads the header and checks the file covers it
            weights.keys()
    except (OSError, SafetensorError) as e:
        raise ARRError(f"{path}: not a readable adapter ({' '.join(str(e).split())})") from None
