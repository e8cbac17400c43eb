"""The whole-search benchmark and the plot script run (tiny settings; benchmarks are not tests, so
no time is asserted)."""
import json
import os
import subprocess
import sys

import sparseops

ROOT = os.path.dirname(os.path.dirname(sparseops.__file__))


def test_bench_search_and_plot_run(tmp_path):
    out = tmp_path / "search.json"
    args = ["--levels", "1", "--steps", "1", "--batch", "4", "--cs-epochs", "2", "--repeats", "1", "--out", str(out)]
    run = subprocess.run([sys.executable, "benchmarks/bench_search.py", *args], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["level"] for r in data["imp"]["sparseops"]] == [0, 1]
    assert data["imp"]["sparseops"][1]["sparsity"] == data["imp"]["mask_multiply"][1]["sparsity"]
    assert [r["beta"] for r in data["cs"]] == [1.0, 200.0]
    plot = subprocess.run([sys.executable, "benchmarks/plot.py", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert out.with_suffix(".png").stat().st_size > 10_000 and "whole search" in out.with_suffix(".md").read_text()
