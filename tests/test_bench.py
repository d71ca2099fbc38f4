import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_quick_prints_every_variant_and_workload_and_ends_with_the_json_ratios():
    """The benchmark's own plumbing (child processes, workloads, the cache build counted, the top-k error check, the
    JSON line), on the tiny model."""
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--quick", "--variants", "arr_topk", "--steps", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[1:3] for line in lines[:-1]] == [[w, v] for w in ("embedded", "epochs3")
                                                          for v in ("lora", "arr", "arr_topk")]
    embedded_arr, epochs3_arr = lines[1], lines[4]
    # the default caches the self-generated replay rows' reference in every run (a folder of its own) and counts it
    assert "of 24 steps" in embedded_arr and "cache built" in embedded_arr and "earlier run" in embedded_arr
    assert "of 87 steps" in epochs3_arr and "cache built" in epochs3_arr
    assert "top-k KL error" in lines[2] and "cache built" in lines[2]
    result = json.loads(lines[-1])
    assert result["model"] == "tiny" and result["path"] == "arr"
    assert set(result["workloads"]) == {"embedded", "epochs3"}
    assert result["wall_ratio"] == result["workloads"]["embedded"]["wall_ratio"] > 0.5
    assert all(0.9 < w["peak_mem_ratio"] < 2 for w in result["workloads"].values())
    assert all(0.5 < w["wall_ratio_cache_reused"] < w["wall_ratio"] for w in result["workloads"].values())
