"""The choice of implementation (sparseops/backend.py): the backend context and its errors, the
break-even thresholds, the GPU kernel tables; and what is built for GPUs (the CUDA extension
registered, every Triton kernel compiling for sm_80/sm_90)."""
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sparseops
from sparseops import _library, backend

from conftest import TRITON, needs_triton, random_mask


def inputs(lead, K, N, sparsity, dtype=torch.float64, bias=True):
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype, requires_grad=True)
    b = torch.randn(N, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b, random_mask((N, K), sparsity)


def test_backend_errors(monkeypatch):
    x, w, b, mask = inputs((4,), 6, 5, 0.5)
    if backend.triton_unavailable(x.device) is None:  # the interpreter: turn it off for this test
        monkeypatch.setattr(importlib.import_module("sparseops.triton._common"), "INTERPRET", False)
    with pytest.raises(ValueError, match="one of"):
        with sparseops.backend("gpu"):
            pass
    with pytest.raises(ValueError, match="max_density"):
        with sparseops.backend(max_density=1.5):
            pass
    with sparseops.backend("triton"):
        with pytest.raises(NotImplementedError, match="Triton"):  # not installed, or CPU tensors
            sparseops.masked_linear(x, w, mask, b)
    with sparseops.backend("cuda"):
        with pytest.raises((NotImplementedError, ValueError), match="masked_linear"):
            sparseops.masked_linear(x, w, mask, b)


def test_threshold_follows_layer_width(monkeypatch):
    monkeypatch.setitem(backend.thresholds(), "cpu", {"masked_linear": 0.5,
                                                      "masked_linear_by_width": [[50, 0.0], [150, 0.2], [500, 0.6]]})
    assert backend.max_density("masked_linear", "cpu") == 0.5
    assert backend.max_density("masked_linear", "cpu", (10, 10)) == 0.0  # h = 5: below the table
    assert backend.max_density("masked_linear", "cpu", (200, 200)) == pytest.approx(0.1)  # h = 100
    assert backend.max_density("masked_linear", "cpu", (300, 300)) == pytest.approx(0.2)  # h = 150
    assert backend.max_density("masked_linear", "cpu", (4000, 4000)) == 0.5  # capped
    with sparseops.backend(max_density=0.9):
        assert backend.max_density("masked_linear", "cpu", (10, 10)) == 0.9

    calls = []

    class Recorder:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(torch.ops.sparseops, name)

    monkeypatch.setattr(importlib.import_module("sparseops.ops.masked_linear"), "lib", Recorder())
    for shape, density, expected in [((200, 200), 0.05, "masked_linear"),  # sparser than 0.1: sparse
                                     ((200, 200), 0.3, None),  # a small layer's fallback: plain autograd
                                     ((1024, 1024), 0.7, "masked_linear_dense")]:  # a big one's: the op
        w, x = torch.randn(shape, dtype=torch.float64), torch.randn(3, shape[1], dtype=torch.float64)
        mask = torch.rand(shape) < density
        calls.clear()
        torch.testing.assert_close(sparseops.masked_linear(x, w, mask), x @ (w * mask).t())
        assert calls[:1] == ([expected] if expected else []), (shape, density, calls)


@needs_triton
def test_triton_backend_refused_where_it_cannot_run(monkeypatch):
    kernels = pytest.importorskip("sparseops.triton")
    monkeypatch.setattr(kernels._common, "INTERPRET", False)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with sparseops.backend("triton"), pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        sparseops.masked_linear(torch.randn(1, 3), torch.randn(2, 3), mask)


def test_gpu_choice_follows_the_measured_table(monkeypatch):
    assert backend.max_density("masked_linear", "no-such-device", (512, 512)) == 0.0
    monkeypatch.setitem(backend.thresholds(), "cuda", {"kernels": {"masked_linear": [[100, 0.05, "cuda"],
                                                                               [2000, 0.01, "triton"]]}})
    monkeypatch.setattr(backend, "has_kernel", lambda op, dev: True)
    dev = torch.device(TRITON.device)
    assert backend.gpu_kernel("masked_linear", dev, (200, 200), 0.05) == "cuda"
    assert backend.gpu_kernel("masked_linear", dev, (4096, 4096), 0.01) == "triton"
    monkeypatch.setattr(backend, "has_kernel", lambda op, dev: False)  # only Triton here
    assert backend.gpu_kernel("masked_linear", dev, (200, 200), 0.05) == "triton"
    monkeypatch.setattr(backend, "triton_unavailable", lambda device: "not here")  # neither
    assert backend.gpu_kernel("masked_linear", dev, (200, 200), 0.05) is None


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None,
                    reason="CPU-only torch or no nvcc: the CUDA extension is not built here")
def test_cuda_extension_is_built_and_registered():
    assert _library.CUDA_EXTENSION_ERROR is None, _library.CUDA_EXTENSION_ERROR
    for op in ("soft_mask", "soft_mask_l1", "masked_linear_dense", "masked_linear", "masked_conv2d"):
        assert _library.has_kernel(op, "cuda"), op
    for op in ("soft_mask_backward", "soft_mask_l1_backward", "masked_linear_backward", "masked_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseops::{op}", "CUDA"), op
    archs = torch.ops.sparseops._cuda_arch_list()
    assert "8.0" in archs or "9.0" in archs, archs


@pytest.mark.slow
def test_kernels_compile_for_gpus():
    """Every kernel and autotune config through Triton's GPU compiler to a cubin for sm_80 and
    sm_90 (tests/triton_aot.py): what the interpreter cannot check, checked without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the package under test, also where nothing is installed (the GPU check runs on a bare checkout)
    root = os.path.dirname(os.path.dirname(os.path.abspath(sparseops.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_aot.py")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "compiled" in run.stdout

