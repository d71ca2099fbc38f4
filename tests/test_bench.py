import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_quick_prints_every_variant_and_ends_with_the_json_ratios():
    """The benchmark's own plumbing (child processes, the cache build counted, the top-k error check, the JSON line),
    on the tiny model's embedded workload."""
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--quick", "--variants", "arr_topk", "--steps", "3",
                           "--workloads", "embedded"],  # (epochs3: the memory test below)
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[1:3] for line in lines[:-1]] == [["embedded", v] for v in ("lora", "arr", "arr_topk")]
    # the default caches the self-generated replay rows' reference in every run (a folder of its own) and counts it
    assert "of 24 steps" in lines[1] and "cache built" in lines[1] and "earlier run" in lines[1]
    assert "top-k KL error" in lines[2] and "cache built" in lines[2]
    result = json.loads(lines[-1])
    assert result["model"] == "tiny" and result["path"] == "arr" and set(result["workloads"]) == {"embedded"}
    assert result["wall_ratio"] == result["workloads"]["embedded"]["wall_ratio"] > 0.5
    assert 0.9 < result["peak_mem_ratio"] < 2 and 0.5 < result["wall_ratio_cache_reused"] < result["wall_ratio"]


def test_allocation_peak_is_the_most_torch_held_at_once():
    from bench.overhead import AllocationPeak

    recorder = AllocationPeak()
    a, b = torch.ones(2**20), torch.ones(2**21)  # 4 MB and 8 MB held together
    del a, b
    c = torch.ones(2**20)
    recorder.mark()  # c, 4 MB, is held across the mark
    d = torch.ones(2**20)
    assert 12 <= recorder.stop() < 12.5
    before, after = recorder.phase_peaks
    assert 12 <= before < 12.5 and 8 <= after < 8.5
    del c, d


def test_overhead_memory_prints_each_runs_allocated_peak_and_its_ratio():
    """--memory's allocation runs beside the timed ones, on the epochs3 workload."""
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--quick", "--memory", "--workloads", "epochs3",
                           "--steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    timed = [line for line in lines if "timed" in line]
    # 3 epochs of the recipe's 200 rows: 75 steps of 8 task rows, 87 with one row in 8 replay, whose cache is built
    assert "of 75 steps" in timed[0] and "of 87 steps" in timed[1] and "cache built" in timed[1]
    peaks = [line for line in lines if "allocated peak" in line]
    assert [line.split()[2] for line in peaks] == ["lora", "arr"] and "x1.000" in peaks[0]
    result = json.loads(lines[-1])
    assert set(result["workloads"]) == {"epochs3"} and 0.9 < result["peak_mem_ratio"] < 2
    assert 0.5 < result["wall_ratio_cache_reused"] < result["wall_ratio"]
    ratio = result["alloc_peak_ratio"]
    mb = [float(line.split("allocated peak")[1].split()[0]) for line in peaks]
    assert ratio == pytest.approx(mb[1] / mb[0], rel=0.05) and ratio > 1  # (printed MB are rounded)
