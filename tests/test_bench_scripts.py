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


def test_bench_structured_search_runs(tmp_path):
    out = tmp_path / "structured.json"
    args = ["--images", "8", "--batch", "4", "--epochs", "2", "--levels", "1", "--steps", "1", "--out", str(out)]
    run = subprocess.run([sys.executable, "benchmarks/bench_structured_search.py", *args], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["scs"]["same_gates"] and data["imp"]["same_masks"] and data["imp-shrink"]["same_masks"]
    assert data["imp-shrink"]["max_weight_diff"] < 1e-3  # (batch norm statistics of removed channels aside)
    assert [r["round"] for r in data["scs"]["sparseops"]["rounds"]] == [0, 1]
    assert [r["level"] for r in data["imp"]["mask_multiply"]["levels"]] == [0, 1]


def test_gpu_thresholds_from_measurements():
    """bench_gpu.py's GPU-free part: measurements -> the `auto` backend's data for CUDA."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    rows = []
    for dtype, slow in (("float32", 1.0), ("bfloat16", 3.0)):  # bf16's sparse path relatively slower
        for sp in (0.5, 0.8, 0.9, 0.99):
            d = 1 - sp
            for provider, ms in (("prune", 1.0), ("triton", 4 * d * slow), ("cuda", 3 * d * slow),
                                 ("triton_block32", 2 * d)):
                rows.append(dict(op="masked_linear", provider=provider, shape=[64, 512, 512], dtype=dtype,
                                 sparsity=sp, mode="fwd+bwd", ms=ms, tile_density=d))
            for provider, ms in (("prune", 1.0), ("triton", 2 * d), ("cuda", 8 * d)):
                rows.append(dict(op="masked_conv2d", provider=provider, shape=[8, 64, 64, 16], dtype=dtype,
                                 sparsity=sp, mode="fwd+bwd", ms=ms))
    rows.append(dict(op="masked_linear", provider="triton", shape=[64, 512, 512], dtype="float32", sparsity=0.8,
                     mode="fwd", ms=0.0))  # forward-only rows do not count
    for zero, fused in ((0.0, 1.05), (0.9, 0.4)):
        rows += [dict(op="soft_masked_linear", provider="unfused", shape=[8, 8, 8], dtype="bfloat16",
                      sparsity=zero, mode="fwd+bwd", ms=1.0),
                 dict(op="soft_masked_linear", provider="fused", shape=[8, 8, 8], dtype="bfloat16",
                      sparsity=zero, mode="fwd+bwd", ms=fused)]
    cuda = bench_gpu.derive_thresholds(rows)
    # float32 wins (cuda at 3d < 1) up to d = 0.2; bfloat16 (9d) only up to 0.1: the smaller holds
    assert cuda["masked_linear_by_width"] == [[256, 0.1]] and cuda["masked_linear"] == 0.1
    assert cuda["masked_linear_block"] == 0.2  # 2d < 1 at d <= 0.2, not at 0.5
    assert {tuple(p) for p in cuda["kernels"]["masked_linear"]} == {(256, 0.5, "cuda"), (256, 0.2, "cuda"),
                                                                    (256, 0.1, "cuda"), (256, 0.01, "cuda")}
    assert cuda["masked_conv2d_by_plane"] == [[256, 0.2]] and cuda["kernels"]["masked_conv2d"][0][2] == "triton"
    assert cuda["fused"] == {"soft_masked_linear": False}  # it lost once (1.05 > 1.0)
    noisy = [dict(r, ms=0.5) if r["provider"] == "triton" and r["sparsity"] == 0.5 else r for r in rows
             if r["op"] == "masked_linear" and r["provider"] in ("prune", "triton")]
    # triton alone (4d, bf16 12d): bf16 loses from d = 0.1 on; its win at 0.5, past that loss, is ignored
    assert bench_gpu.derive_thresholds(noisy)["masked_linear"] == 0.01


def test_bench_untuned_runs(tmp_path):
    out = tmp_path / "untuned.md"
    args = ["--rounds", "1", "--shapes", "20x40x24", "--sparsities", "0.5", "0.95", "--out", str(out)]
    run = subprocess.run([sys.executable, "benchmarks/bench_untuned.py", *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "SPARSEOPS_CACHE_DIR": str(tmp_path), "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert {r["isa"] for r in results} == set(torch_isas()) and "cases below 0.95x" in out.read_text()
    for r in results:
        assert list(r["medians_ms"]) == ["40->24, 20 rows, 50% sparse", "40->24, 20 rows, 95% sparse"]
        assert set(r["medians_ms"]["40->24, 20 rows, 50% sparse"]) == {"dense", "prune", "torch CSR", "sparseops auto"}


def torch_isas():
    import torch
    return [i for i in torch.ops.sparseops._cpu_isa_supported() if i != "default"]


def test_bench_shrink_runs(tmp_path):
    """One tiny round of the shrink benchmark: the shrunk model and the one built at its widths have the same
    modules, tensors, hooks and aten ops per training step (the benchmark checks them before timing)."""
    import pytest

    pytest.importorskip("torch_pruning")
    out = tmp_path / "shrink"
    args = ["--models", "resnet20", "vgg16", "--removed", "0.5", "--threads", "1", "--rounds", "1", "--batch", "4",
            "--out", str(out)]
    run = subprocess.run([sys.executable, "benchmarks/bench_shrink.py", *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "SPARSEOPS_TUNE": "0", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["model"], r["removed"]) for r in rows] == [("resnet20", 0.5), ("vgg16", 0.5)]
    for r in rows:
        assert r["same"] == {"modules": True, "tensors": True, "hooks": True, "ops": True}
        assert r["hooks"] == 0 and r["params"]["shrunk"] == r["params"]["built"] < r["params"]["masked"]
    assert rows[1]["widths"][0] == [32, 3] and rows[1]["widths"][-1] == [10, 256]  # VGG-16: half of 64 and 512
    assert "| vgg16 | 50% | 1 |" in out.with_suffix(".md").read_text()


def test_bench_vgg_step_runs(tmp_path):
    args = ["--sparsity", "0.9", "--rounds", "1", "--warmup", "2", "--batch", "2"]
    run = subprocess.run([sys.executable, "benchmarks/bench_vgg_step.py", *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "SPARSEOPS_CACHE_DIR": str(tmp_path), "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "sparsity 0.900: mask multiply" in run.stdout and run.stdout.strip().endswith("x")
