"""The layout of a run folder (`output_dir` of `arr train`, and the output folder of `arr compare`): every file name
in one place, and which files are final and which are being written.

A finished run holds the PEFT adapter, the tokenizer, CONFIG (the fully resolved config) and METRICS; all are
written into a temporary folder inside and moved into place with ADAPTER_CONFIG last, so a folder that has
ADAPTER_CONFIG holds a complete run. Checkpoints (`checkpoint-N`, the Trainer's layout) are written into STAGING and
renamed into place once complete. `arr eval` adds EVAL; `arr compare` writes RESULTS_* and one run folder per method.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's adapter config: written last
CONFIG = "arr_config.yaml"
METRICS = "metrics.json"
EVAL = "eval.json"
MERGED = "merged"  # save_merged_model: the adapter merged into the base model
REF_CACHE = "ref_cache"  # the reference log-prob cache (ref_cache: exact / topk)
STAGING = ".staging"  # a checkpoint being written
RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"


def is_finished(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a complete `arr train` run."""
    return all((Path(run_dir) / name).is_file() for name in (ADAPTER_CONFIG, CONFIG, METRICS))


def save_atomically(write, directory: Path, last: str) -> None:
    """Run `write(tmp_dir)`, then move its files into `directory`, the file `last` at the end: a reader that sees
    `last` sees every other file complete. Used for the final adapter and the merged model."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        write(Path(tmp))
        names = sorted(os.listdir(tmp), key=lambda n: n == last)
        for name in names:
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(Path(tmp) / name, target)
