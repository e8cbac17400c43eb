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



@pytest.mark.parametrize("dense_there", [False, True])
@pytest.mark.parametrize("op", ["conv2d", "linear"])
def test_mostly_zero_soft_mask_matches_reference_on_both_routes(op, dense_there, monkeypatch):
    """Late in CS (most of the mask exactly 0) the soft op runs the masked op over the rest, or, where
    that op would run a dense path anyway, the dense op on the soft-masked weight itself (already 0 off
    the mask: the soft mask's backward zeroes dw and ds there). Both against the float64 reference."""
    mod = importlib.import_module(f"sparseops.ops.soft_masked_{op}")
    calls = []
    monkeypatch.setattr(mod, "runs_dense", lambda *a: calls.append(1) or dense_there)
    g = torch.Generator().manual_seed(0)
    shape = (6, 4, 3, 3) if op == "conv2d" else (6, 12)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64) if op == "conv2d" else \
        torch.randn(3, 12, generator=g, dtype=torch.float64)
    w, b = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    s[s < 0.8] = -1e4  # about 80% of the mask exactly 0
    args = [t.requires_grad_() for t in (x, w, s, b)]
    fn = getattr(sparseops, f"soft_masked_{op}")
    ref = getattr(reference, f"soft_masked_{op}")
    with sparseops.backend(max_density=1.0):  # (the skip route at any density)
        got = fn(args[0], args[1], args[2], 3.0, 1.5, args[3])
    want = ref(args[0], args[1], args[2], 3.0, 1.5, args[3])
    torch.testing.assert_close(got, want)
    for a, b_ in zip(torch.autograd.grad(got.sum(), args), torch.autograd.grad(want.sum(), args), strict=True):
        torch.testing.assert_close(a, b_)
    assert calls  # (the route was asked for)
