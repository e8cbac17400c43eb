"""soft_masked_linear (x @ (w*scale*sigmoid(beta*s))^T + bias) against reference.py: every
implementation through the `impl` fixture, then the fused Triton GEMM's own tests."""
import importlib

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import reference

from cases import SOFT_LINEAR_SHAPES
from conftest import TRITON, needs_triton

DEV = TRITON.device  # Triton's tests run on CUDA tensors where a GPU exists, else under the interpreter
DOT64 = TRITON.dot64  # the tl.dot kernels (the fused soft mask) take float64 only under the interpreter
# numpy, under the interpreter, warns where the kernels compute exp(-z) = inf and then select 0
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _dtype(impl, dtype):
    return impl.dot64 if dtype == "dot64" else dtype


# ---------------------------------------------------------------------------------------------
# Every implementation (cpu: soft_mask + GEMM; reference; triton: the mask fused into the GEMM; cuda)


@pytest.mark.parametrize("dtype", ["dot64", torch.float32])
@pytest.mark.parametrize("shape", SOFT_LINEAR_SHAPES)  # the last splits dw over M
def test_matches_reference(impl, shape, dtype):
    dtype = _dtype(impl, dtype)
    m, n, k = shape
    x, w, b = impl.leaf(m, k, dtype=dtype), impl.leaf(n, k, dtype=dtype), impl.leaf(n, dtype=dtype)
    s = impl.leaf(n, k, dtype=dtype, scale=3)
    with torch.no_grad():
        s[:, : k // 2] = -1e4  # whole tiles exactly 0: skipped, and their dw, ds must be exactly 0
    with impl.force():
        out = sparseops.soft_masked_linear(x, w, s, 2.0, 1.5, b)
    impl.check(out, (x, w, s, b), lambda x, w, s, b: reference.soft_masked_linear(x, w, s, 2.0, 1.5, b), dtype)
    with impl.force():
        dw, ds = torch.autograd.grad(sparseops.soft_masked_linear(x, w, s, 2.0, 1.5, b).sum(), (w, s))
    assert (dw[:, : k // 2] == 0).all() and (ds[:, : k // 2] == 0).all()


@pytest.mark.parametrize("dtype", ["dot64", torch.float32])
def test_below_the_cut_the_mask_is_exactly_zero_and_so_are_dw_and_ds(impl, dtype):
    # beta * s below -63 ln 2 (-43.7), where sigmoid is still normal (down to -87.3) or subnormal
    dtype = _dtype(impl, dtype)
    x, w = impl.leaf(5, 24, dtype=dtype), impl.leaf(6, 24, dtype=dtype)
    s = impl.leaf(6, 24, dtype=dtype)
    with torch.no_grad():
        s[:, 8:] = torch.linspace(-11.0, -25.0, 16, dtype=dtype)  # beta 4: z from -44 to -100
    with impl.force():
        out = sparseops.soft_masked_linear(x, w, s, 4.0, 1.5)
    impl.check(out, (x, w, s), lambda x, w, s: reference.soft_masked_linear(x, w, s, 4.0, 1.5), dtype)
    dw, ds = torch.autograd.grad(out.sum(), (w, s), retain_graph=True)
    assert (dw[:, 8:] == 0).all() and (ds[:, 8:] == 0).all() and torch.isfinite(ds).all()


# ---------------------------------------------------------------------------------------------
# Triton (sparseops/triton/soft_masked_linear.py) and the layers' fused path


@needs_triton
def test_triton_gradcheck_and_bad_input():
    x, w, s = TRITON.leaf(3, 5), TRITON.leaf(4, 5), TRITON.leaf(4, 5)
    with sparseops.backend("triton"):
        if DEV == "cpu":
            assert torch.autograd.gradcheck(lambda x, w, s: sparseops.soft_masked_linear(x, w, s, 2.0, 1.5), (x, w, s))
        else:
            with pytest.raises(TypeError, match="float64 is not supported"):
                sparseops.soft_masked_linear(x, w, s, 1.0)
        with pytest.raises(ValueError, match="s must have the shape of w"):
            sparseops.soft_masked_linear(x, w, s.t(), 1.0)
    with pytest.raises(TypeError, match="beta must be a Python number"):
        sparseops.soft_masked_linear(x, w, s, torch.tensor(1.0))



def test_outside_triton_matches():
    x, w, s = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(sparseops.soft_masked_linear(x, w, s, 2.0, 1.5),
                               reference.soft_masked_linear(x, w, s, 2.0, 1.5))



def test_composite_op_opcheck():
    """The fused op's CPU implementation (the Triton kernel's stand-in elsewhere)."""
    x, w = torch.randn(5, 40, dtype=torch.float64), torch.randn(33, 40, dtype=torch.float64, requires_grad=True)
    s = torch.randn(33, 40, dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.sparseops.soft_masked_linear.default, (x, w, s, 2.0, 1.5, torch.randn(33).double()))


def _soft_conv1d():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = sparseops.patch(torch.nn.Sequential(conv1d(5, 7)), mode="soft", s0=-0.2)
    return model[0]


@needs_triton
@pytest.mark.parametrize("make", [lambda: sparseops.SoftMaskedLinear(7, 5, s0=-0.2), _soft_conv1d],
                         ids=["linear", "conv1d"])
def test_soft_masked_layers_run_the_fused_gemm(make, monkeypatch):
    layer = make().to(DOT64).to(DEV)
    x = torch.randn(6, 7, dtype=DOT64, device=DEV)
    with monkeypatch.context() as m, sparseops.backend("triton"):
        m.setattr(importlib.import_module("sparseops.ops.soft_masked_linear"), "soft_mask", None)  # unfused calls it
        fused = layer(x)
    torch.testing.assert_close(fused, layer(x))  # the unfused path (soft_mask + GEMM)
    fused.sum().backward()
    dw, ds = layer.weight.grad.clone(), layer.weight_score.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(dw, layer.weight.grad)
    torch.testing.assert_close(ds, layer.weight_score.grad)

