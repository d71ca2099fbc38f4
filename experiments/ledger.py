"""The finished units of a long experiment, kept in a JSON-lines file under docs/results/ledger/ that is committed, so
that a sweep of many sessions goes on after its machine is replaced: run folders are a cache a new machine lacks,
the ledger is what a sweep skips and what its summary reads.

Each line is one unit: {"key": what was run, "result": what it gave, "recorded": when (UTC)}. A key names a run by
what it learns, not where it ran (run_identity), so that the same unit on another machine or folder matches. Lines
are only appended; a later line with the same key wins.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from arr.compare import NOT_RESULT_KEYS

LEDGERS = Path(__file__).resolve().parent.parent / "docs" / "results" / "ledger"
# Keys whose value is a file: a run is named by the file's content, which a new machine writes elsewhere.
DATA_KEYS = ("sft_data", "task_data")


def content_hash(path: str | None) -> str | None:
    return None if path is None else "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_identity(resolved: dict, leave_out: tuple[str, ...] = ()) -> dict:
    """A resolved configuration (train.resolved_config, or EvalArgs' fields) as a ledger key: less the keys that do
    not change the result (compare.NOT_RESULT_KEYS) and `leave_out`, each data file as its content's hash."""
    return {k: content_hash(v) if k in DATA_KEYS else v for k, v in resolved.items()
            if k not in NOT_RESULT_KEYS and k not in leave_out}


def canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def entries(self) -> dict:
        """{canonical key: result}, the last line of each key winning."""
        if not self.path.is_file():
            return {}
        lines = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
        return {canonical(entry["key"]): entry["result"] for entry in lines}

    def get(self, key: dict) -> dict | None:
        return self.entries().get(canonical(key))

    def add(self, key: dict, result: dict, **provenance) -> None:
        """Append one unit. One write() of the whole line to a file opened O_APPEND: two sweeps adding to the same
        ledger at once cannot interleave their lines."""
        recorded = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = json.dumps({"key": key, "result": result, "recorded": recorded, **provenance}, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
