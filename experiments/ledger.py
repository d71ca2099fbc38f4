"""The finished units of a long experiment, kept in a JSON-lines file under docs/results/ledger/ that is committed, so
that a sweep of many sessions goes on after its machine is replaced: run folders are a cache a new machine lacks,
the ledger is what a sweep skips and what its summary reads.

Each line is one unit: {"key": what was run, "result": what it gave, "recorded": when (UTC), ...provenance}. A key
names a run by what it learns, not where it ran (run_identity), so that the same unit on another machine or folder
matches, and a field added to ARR's or transformers' configuration since a unit was recorded matches it while it
holds its default (as compare.finished_run reuses a run folder). The bundled data and the embedded model are named by
the pinned package versions that ship them (Makefile), not hashed. Lines are only appended, and the last line of a
key wins: two sweeps running the same unit at once both run it.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from functools import cache
from pathlib import Path

from arr.config import NOT_RESULT_KEYS

LEDGERS = Path(__file__).resolve().parent.parent / "docs" / "results" / "ledger"
# Keys whose value may be a data file: a run is named by the file's content, which a new machine writes elsewhere
# (a folder, or a word such as replay_data's "self", is kept as it is).
DATA_KEYS = ("sft_data", "task_data", "replay_data", "laplace_data", "self_replay_prompts", "replay_config")


def content_hash(path: str | None) -> str | None:
    return None if path is None else "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_identity(resolved: dict, leave_out: tuple[str, ...] = ()) -> dict:
    """A resolved configuration (train.resolved_config, or EvalArgs' fields) as a ledger key: less the keys that do
    not change the result (arr.config.NOT_RESULT_KEYS) and `leave_out`, each data file as its content's hash."""
    def named(key, value):
        return content_hash(value) if key in DATA_KEYS and isinstance(value, str) and Path(value).is_file() else value

    return {k: named(k, v) for k, v in resolved.items() if k not in NOT_RESULT_KEYS and k not in leave_out}


@cache
def defaults() -> dict:
    """Every training key's and probe setting's default, as run_identity names them (seed: training's)."""
    from arr.config import build_config
    from arr.evaluation import EvalArgs
    from arr.train import resolved_config

    return json.loads(json.dumps({**vars(EvalArgs()), **run_identity(resolved_config(*build_config({})))}))


def matches(recorded, wanted) -> bool:
    """Whether a recorded key names the unit `wanted` names: equal, field by field, except that a field the recorded
    key lacks matches a wanted value that is the field's default."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return all(matches(recorded[k], v) if k in recorded else k in defaults() and v == defaults()[k]
                   for k, v in wanted.items())
    if isinstance(recorded, list) and isinstance(wanted, list):
        return len(recorded) == len(wanted) and all(map(matches, recorded, wanted))
    return recorded == wanted


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._parsed: tuple[tuple[int, int, int], list[dict]] | None = None  # (the file's version, its units)

    def entries(self) -> list[dict]:
        """Every unit, oldest first; a line cut short by a crash is left out (its unit runs again)."""
        return copy.deepcopy(self._units())

    def get(self, key: dict) -> dict | None:
        """The result of the last unit whose key matches `key`, or None."""
        wanted = json.loads(json.dumps(key))  # as it would read back: tuples are lists
        found = next((e["result"] for e in reversed(self._units()) if matches(e["key"], wanted)), None)
        return copy.deepcopy(found)

    def _units(self) -> list[dict]:
        """The file's units, parsed again only when it has changed (a summary looks up every unit of a sweep);
        shared between calls, so only copies leave the class."""
        if not self.path.is_file():
            return []
        stat = self.path.stat()
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._parsed is None or self._parsed[0] != version:
            units = []
            for line in self.path.read_text().splitlines():
                try:
                    units.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            self._parsed = version, units
        return self._parsed[1]

    def add(self, key: dict, result: dict, **provenance) -> None:
        """Append one unit, as whole writes to a file opened O_APPEND: two sweeps adding to the same ledger at once
        do not interleave their lines."""
        recorded = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = json.dumps({"key": key, "result": result, "recorded": recorded, **provenance}, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) != b"\n":
                line = "\n" + line  # after a line cut short
            data = memoryview(line.encode())
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
