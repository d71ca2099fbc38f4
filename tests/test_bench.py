import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_quick_prints_every_variant_and_ends_with_the_json_ratios():
    """The benchmark's own plumbing (child processes, the top-k error check, the JSON line), on the tiny model."""
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--quick", "--variants", "arr_topk", "--steps", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["lora", "arr_chunked", "arr_topk"]
    assert "top-k KL error" in lines[2] and "cache" in lines[2]
    result = json.loads(lines[-1])
    assert result["model"] == "tiny" and result["path"] == "arr_chunked"
    assert result["wall_ratio"] > 0.5 and 0.9 < result["peak_mem_ratio"] < 2
