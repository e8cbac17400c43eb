"""soft_masked_conv2d (conv2d(x, w*scale*sigmoid(beta*s), ...)) against reference.py: every
implementation through the `impl` fixture, then the fused Triton kernel's own tests."""
import importlib

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import reference

from cases import ALL_CONV_CASES, SMALL_CONV_CASES, conv_id
from conftest import TRITON, impl_params, needs_triton

DEV = TRITON.device  # Triton's tests run on CUDA tensors where a GPU exists, else under the interpreter
DOT64 = TRITON.dot64  # the tl.dot kernels (the fused soft mask) take float64 only under the interpreter
# numpy, under the interpreter, warns where the kernels compute exp(-z) = inf and then select 0
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------------------------------------
# Every implementation (cpu: soft_mask + GEMM; reference; triton: the mask fused into the GEMM; cuda)


@pytest.mark.parametrize("impl,case", impl_params(ALL_CONV_CASES, small=SMALL_CONV_CASES[:4], ids=conv_id),
                         indirect=["impl"])
def test_matches_reference(impl, case):
    nb, c, co, h, wd, k, stride, padding, dilation = case
    dtype = impl.dot64
    x, w, b = impl.leaf(nb, c, h, wd, dtype=dtype), impl.leaf(co, c, *k, dtype=dtype), impl.leaf(co, dtype=dtype)
    s = impl.leaf(co, c, *k, dtype=dtype, scale=3)
    with torch.no_grad():
        s[:, :, 0] = -1e4  # the first kernel row exactly 0: those tiles are skipped, their dw and ds exactly 0
    with impl.force():
        out = sparseops.soft_masked_conv2d(x, w, s, 2.0, 1.5, b, stride, padding, dilation)
    impl.check(out, (x, w, s, b),
               lambda x, w, s, b: reference.soft_masked_conv2d(x, w, s, 2.0, 1.5, b, stride, padding, dilation), dtype)
    with impl.force():
        out = sparseops.soft_masked_conv2d(x, w, s, 2.0, 1.5, b, stride, padding, dilation)
    dw, ds = torch.autograd.grad(out.sum(), (w, s))
    assert (dw[:, :, 0] == 0).all() and (ds[:, :, 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# Triton (sparseops/triton/soft_masked_conv2d.py) and the layer's fused path


@needs_triton
def test_soft_masked_conv2d_layer_split_and_rules(monkeypatch):
    kernels = pytest.importorskip("sparseops.triton")
    layer = sparseops.SoftMaskedConv2d(3, 4, 1, padding=1, padding_mode="reflect", s0=-0.1).to(DOT64).to(DEV)
    x = torch.randn(2, 3, 24, 24, dtype=DOT64, device=DEV)  # one tile, 1352 positions: dw's reduction splits
    assert kernels.split_count(1, 1352, x.device, kernels._common.SPLIT_BLOCK) > 1
    with monkeypatch.context() as m, sparseops.backend("triton"):
        m.setattr(importlib.import_module("sparseops.ops.soft_masked_conv2d"), "soft_mask", None)  # unfused calls it
        fused = layer(x)
    torch.testing.assert_close(fused, layer(x))
    fused.sum().backward()
    dw, ds = layer.weight.grad.clone(), layer.weight_score.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(dw, layer.weight.grad)
    torch.testing.assert_close(ds, layer.weight_score.grad)
    w, s = torch.randn(4, 2, 3, 3, dtype=DOT64, device=DEV), torch.randn(4, 2, 3, 3, dtype=DOT64, device=DEV)
    with sparseops.backend("triton"), pytest.raises(NotImplementedError, match="groups=1"):
        sparseops.soft_masked_conv2d(torch.randn(1, 4, 5, 5, dtype=DOT64, device=DEV), w, s, groups=2)
    torch.testing.assert_close(  # auto (no GPU measurements): soft_mask + F.conv2d, grouped included
        sparseops.soft_masked_conv2d(torch.randn(1, 4, 5, 5, dtype=DOT64, device=DEV), w, s, groups=2).shape,
        torch.Size([1, 4, 3, 3]))
    for xx in (x.cpu(), x.cpu().to(memory_format=torch.channels_last)):
        opcheck(torch.ops.sparseops.soft_masked_conv2d.default,
                (xx, layer.weight.detach().cpu(), layer.weight_score.detach().cpu().requires_grad_(), 2.0, 1.5, None,
                 [1, 1], [1, 1], [1, 1]))

