"""pytest plugin of scripts/gpu_check.sh (`-p gpu_check_plugin`, with scripts/ on PYTHONPATH).

GPU_CHECK_AUTOTUNE_MAX=N keeps the first N configs of every Triton autotune space for the test
run: the tests check results, not speed, and with one config Triton neither compiles the others
nor benchmarks them for each new shape (every distinct key costs one do_bench per config). Every
config is still compiled for sm_80/sm_90 by tests/triton_aot.py (a subprocess, which this plugin
does not reach), and benchmarks/bench_gpu.py autotunes the full spaces. Unset, empty or "all":
nothing changes.

GPU_CHECK_RESULTS=PATH appends one line per test phase (when, outcome, node id) to PATH as each
test ends, in the controlling process (pytest-xdist's workers report there): a run stopped by its
time limit before pytest wrote its JUnit XML (which it writes at the very end) still says which
tests ran and how.

It wraps `triton.autotune` before sparseops.triton is imported (pytest loads -p plugins before
conftest.py and collection), so it needs no change in sparseops/triton.
"""
from __future__ import annotations

import os

_LIMIT = os.environ.get("GPU_CHECK_AUTOTUNE_MAX", "").strip().lower()
_TRIMMED: list[tuple[int, int]] = []  # (configs before, after) per autotune space
_RESULTS = {"file": None}


def _install(limit: int) -> None:
    try:
        import triton
        import triton.runtime.autotuner as autotuner
    except ImportError:  # no Triton: nothing to trim
        return
    original = autotuner.autotune

    def autotune(configs, key, *args, **kwargs):
        configs = list(configs)
        _TRIMMED.append((len(configs), min(len(configs), limit)))
        return original(configs[:limit], key, *args, **kwargs)

    autotune.__wrapped__ = original
    autotuner.autotune = autotune
    triton.autotune = autotune
    if hasattr(triton, "runtime") and hasattr(triton.runtime, "autotune"):
        triton.runtime.autotune = autotune


if _LIMIT not in ("", "all", "0"):
    _install(max(1, int(_LIMIT)))


def pytest_configure(config):
    path = os.environ.get("GPU_CHECK_RESULTS")
    if path and not hasattr(config, "workerinput"):  # not in an xdist worker
        _RESULTS["file"] = open(path, "a", buffering=1)  # noqa: SIM115  (line-buffered, open for the session)


def pytest_runtest_logreport(report):
    f = _RESULTS["file"]
    if f is None or (report.when != "call" and report.outcome == "passed"):
        return
    outcome = "xfailed" if getattr(report, "wasxfail", None) and report.skipped else report.outcome
    f.write(f"{report.when}\t{outcome}\t{report.nodeid}\n")


def pytest_unconfigure(config):
    if _RESULTS["file"] is not None:
        _RESULTS["file"].close()
        _RESULTS["file"] = None


def pytest_report_header(config):
    if _LIMIT in ("", "all", "0"):
        return "gpu_check: Triton autotune spaces in full"
    return f"gpu_check: Triton autotune spaces cut to their first {_LIMIT} config(s) (GPU_CHECK_AUTOTUNE_MAX)"


def pytest_terminal_summary(terminalreporter):
    if _TRIMMED:
        before = sum(b for b, _ in _TRIMMED)
        after = sum(a for _, a in _TRIMMED)
        terminalreporter.write_line(f"gpu_check: {len(_TRIMMED)} Triton autotune spaces, {before} configs cut to "
                                    f"{after} (GPU_CHECK_AUTOTUNE_MAX={_LIMIT})")
