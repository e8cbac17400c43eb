"""scripts/gpu_check.sh's GPU-free parts (CI also runs the whole script with --dry-run): its syntax,
the summary parser on a sample JUnit XML, per-test log and benchmark JSON, the autotune cap of its
pytest plugin, and bench_gpu.py's budget bookkeeping."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
if not os.path.exists(os.path.join(SCRIPTS, "gpu_check.sh")):  # tests copied alone (scripts/smoke_wheel.sh)
    pytest.skip("needs the source tree's scripts/ and benchmarks/", allow_module_level=True)


def _import(folder, name):
    sys.path.insert(0, os.path.join(ROOT, folder))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_script_syntax_and_usage():
    assert subprocess.run(["bash", "-n", os.path.join(SCRIPTS, "gpu_check.sh")]).returncode == 0
    run = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh")], capture_output=True, text=True)
    assert run.returncode == 2 and "--dry-run" in run.stdout  # no OUT_DIR: usage


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="gpu_check" tests="5">
<testcase classname="tests.test_a" name="test_ok" time="0.1" />
<testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_b" name="test_setup" time="0.1"><error message="fixture">y</error></testcase>
<testcase classname="tests.test_b" name="test_gpu" time="0.0"><skipped message="needs a GPU" /></testcase>
<testcase time="0.001" />
</testsuite></testsuites>
"""


def _rows():
    rows = []
    for shape, dense, block in (([8192, 3072, 768], 2.0, 1.0), ([8192, 768, 3072], 2.0, 0.5), ([128, 512, 512], 1.0, 4.0)):
        for provider, ms in (("dense", dense), ("triton_block32", block)):
            rows.append(dict(op="masked_linear", provider=provider, shape=shape, dtype="bfloat16", sparsity=0.95,
                             mode="fwd+bwd", ms=ms))
    rows.append(dict(op="masked_linear", provider="torch_bsr", shape=[8192, 3072, 768], dtype="bfloat16",
                     sparsity=0.95, mode="fwd", ms=0.5))
    rows.append(dict(op="masked_linear", provider="dense", shape=[8192, 3072, 768], dtype="bfloat16",
                     sparsity=0.95, mode="fwd", ms=1.0))
    rows += [dict(op="soft_masked_linear", provider=p, shape=[8192, 3072, 768], dtype="bfloat16", sparsity=0.0,
                  mode="fwd+bwd", ms=ms) for p, ms in (("dense", 1.0), ("fused", 1.25))]
    rows.append(dict(op="soft_mask", provider="triton", shape=[1 << 24], dtype="bfloat16", mode="fwd+bwd", ms=0.1,
                     bandwidth=3.9e12, of_peak=0.81))
    return rows


def test_summary_from_sample_outputs(tmp_path):
    summary = _import("scripts", "gpu_summary")
    (tmp_path / "stages.tsv").write_text("build\tok\t80\tCPU and CUDA extensions\ntests\tfailed\t100\tpytest exit 1\n")
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "gpu_check.log").write_text("collected 758 items / 393 deselected / 365 selected\n")
    meta = dict(device="NVIDIA H200", torch="2.11.0", complete=False, skipped_count=3, errors=["cuda fwd: boom"])
    (tmp_path / "gpu-h200.json").write_text(json.dumps(dict(meta=meta, rows=_rows())))
    text = summary.summary(tmp_path, exit_code=1)
    assert "NVIDIA H200" in text and "tests    failed" in text
    assert "tests: 1 passed, 1 failed, 1 errors, 1 skipped (4 run of 365 selected; junit.xml)" in text
    assert "FAILED tests.test_a::test_bad" in text and "FAILED tests.test_b::test_setup" in text
    assert "3 groups not measured, 1 errors" in text
    # masked_linear over the two target shapes only: geomean(2/1, 2/0.5) = 2.83x (not the 128-row layer's 0.25x)
    block = next(line for line in text.splitlines() if "triton_block32" in line)
    assert "targets" in block and "2.83x" in block and "0.25x" not in block
    assert any("torch_bsr" in line and "fwd " in line and "2.00x" in line for line in text.splitlines())
    assert any("soft_masked_linear" in line and "0:0.80x" in line for line in text.splitlines())
    assert "3900 GB/s" in text and "81% of the datasheet peak" in text
    assert text.rstrip().splitlines()[-1].startswith("gpu_check: FAILED (exit 1)")
    # the CLI writes the same into summary.txt; with nothing at all it still prints
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "gpu_summary.py"), str(tmp_path)], check=True,
                   capture_output=True)
    assert (tmp_path / "summary.txt").read_text().startswith("== sparseops GPU check")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no junit.xml" in summary.summary(empty)


def test_summary_prefers_per_test_lines_when_pytest_was_stopped(tmp_path):
    summary = _import("scripts", "gpu_summary")
    (tmp_path / "tests.tsv").write_text("call\tpassed\tt.py::a\ncall\tfailed\tt.py::b\nsetup\tskipped\tt.py::c\n"
                                        "call\tpassed\tt.py::d\nteardown\tfailed\tt.py::d\nsetup\tfailed\tt.py::e\n")
    counts = summary.read_results(tmp_path / "tests.tsv")
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 2, 1)
    text = summary.summary(tmp_path)
    assert "tests: 1 passed, 1 failed, 2 errors, 1 skipped (5 run; tests.tsv" in text


def test_autotune_cap_plugin():
    """GPU_CHECK_AUTOTUNE_MAX cuts every autotune space of sparseops' Triton kernels (found by type,
    whatever their files are called) without touching sparseops/triton."""
    code = ("import importlib, pkgutil, triton, gpu_check_plugin\n"
            "import sparseops.triton as t\n"
            "n = [len(v.configs) for m in pkgutil.iter_modules(t.__path__)\n"
            "     for v in vars(importlib.import_module(t.__name__ + '.' + m.name)).values()\n"
            "     if isinstance(v, triton.runtime.Autotuner)]\n"
            "print(len(n), max(n), len(gpu_check_plugin._TRIMMED))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # under it: 1 config anyway
    env.update(GPU_CHECK_AUTOTUNE_MAX="1", PYTHONPATH=os.pathsep.join([SCRIPTS, ROOT]))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if "No module named 'triton'" in run.stderr:
        return  # nothing to cap
    assert run.returncode == 0, run.stderr[-2000:]
    spaces, most, trimmed = map(int, run.stdout.split())
    assert spaces > 0 and most == 1 and trimmed >= spaces


def test_bench_budget_bookkeeping():
    bench_gpu = _import("benchmarks", "bench_gpu")
    run = bench_gpu._Run()
    assert run.begin("masked_linear", (8, 8, 8), "bf16", 0.9)
    run.end([dict(ms=1.0)])
    assert not run.begin("masked_linear", (8, 8, 8), "bf16", 0.9)  # measured already: not again, not skipped
    assert run.skipped == [] and len(run.rows) == 1
    run.deadline = time.monotonic() - 1
    assert not run.begin("masked_linear", (8, 8, 16), "bf16", 0.9) and run.expired()
    assert run.skipped == ["masked_linear (8, 8, 16) bf16 0.9"]
