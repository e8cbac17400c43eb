"""Triton kernels (sparseops/triton/) against reference.py.

Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors (conftest.py sets it), in float64
and float32 on small shapes: odd sizes, empty rows, 0% and 100% sparsity, split reductions. With a
GPU the same tests run on CUDA tensors, and the `cuda`-marked ones add half precision, larger
shapes, opcheck and torch.compile (opcheck's fake-tensor test cannot run under the interpreter).
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import backend, reference
from sparseops.layout import BlockLayout, CsrLayout, block_layout, csr_layout

from conftest import random_mask

pytest.importorskip("triton")
kernels = pytest.importorskip("sparseops.triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the tl.dot kernels (block, fused soft mask) take float64 only under the interpreter
DOT64 = torch.float64 if DEV == "cpu" else torch.float32
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# numpy, under the interpreter, warns where the kernels compute exp(-z) = inf and then select 0
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def _leaf(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=DEV) * scale).requires_grad_()


def _check(out, inputs, ref_fn, dtype):
    """Values and every input gradient of `out` against `ref_fn` run on float64 copies of `inputs`.
    In half precision the absolute tolerance scales with the largest value: kernels that round an
    operand (the fused soft mask rounds w*m to the input dtype) err by about sqrt(K) ulps of the
    output's scale, also where an element cancels to near 0."""
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_inputs)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype), retain_graph=True)
    want = torch.autograd.grad(ref, ref_inputs, g)
    for a, r in zip((out, *got), (ref, *want), strict=True):
        tol = dict(TOL[dtype])
        if dtype in (torch.float16, torch.bfloat16):
            tol["atol"] *= max(1.0, float(r.abs().max()))
        torch.testing.assert_close(a.double(), r.detach(), **tol)
    return ref_inputs


# ---------------------------------------------------------------------------------------------
# Soft mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [0, 1, 1000, 5000])
def test_soft_mask(dtype, n):
    w, s = _leaf(n, dtype=dtype), _leaf(n, dtype=dtype, scale=5)
    with torch.no_grad():
        s[: n // 4] = -1e4  # saturated: exactly 0 mask, exactly 0 gradients
    with sparseops.backend("triton"):
        out = sparseops.soft_mask(w, s, 3.0, 1.5)
        l1 = sparseops.soft_mask_l1(s, 3.0, 1.5)
    _, s64 = _check(out, (w, s), lambda w, s: reference.soft_mask(w, s, 3.0, 1.5), dtype)
    torch.testing.assert_close(l1.double(), reference.soft_mask_l1(s64, 3.0, 1.5), **TOL[dtype])
    (ds,) = torch.autograd.grad(l1, s)
    (ds_ref,) = torch.autograd.grad(reference.soft_mask_l1(s64, 3.0, 1.5), s64)
    torch.testing.assert_close(ds.double(), ds_ref, **TOL[dtype])
    assert (out[: n // 4] == 0).all() and (ds[: n // 4] == 0).all()


def test_soft_mask_bad_input():
    w = torch.randn(3, 4, device=DEV)
    with sparseops.backend("triton"):
        with pytest.raises(ValueError, match="shape of w"):
            torch.ops.sparseops.triton_soft_mask(w, torch.randn(4, 3, device=DEV), 1.0, 1.0)
        with pytest.raises(TypeError, match="dtype of w"):
            torch.ops.sparseops.triton_soft_mask(w, torch.randn(3, 4, device=DEV, dtype=torch.float64), 1.0, 1.0)
        with pytest.raises(ValueError, match="beta must be finite"):
            torch.ops.sparseops.triton_soft_mask(w, w, float("nan"), 1.0)
        with pytest.raises(TypeError, match="s must be float32"):
            torch.ops.sparseops.triton_soft_mask_l1(torch.ones(3, dtype=torch.int64, device=DEV), 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Unstructured masked linear (CSR SpMM / SDDMM)

LINEAR_SHAPES = [(1, 1, 1), (3, 5, 7), (37, 29, 45), (300, 3, 20)]  # (M, N, K); the last splits dw over M


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_masked_linear(shape, sparsity, dtype):
    m, n, k = shape
    x, w, b = _leaf(m, k, dtype=dtype), _leaf(n, k, dtype=dtype), _leaf(n, dtype=dtype)
    mask = random_mask((n, k), sparsity).to(DEV)
    if n > 2:
        mask[1] = False  # an empty row
    with sparseops.backend("triton"):
        out = sparseops.masked_linear(x, w, mask, b)
    _check(out, (x, w, b), lambda x, w, b: reference.masked_linear(x, w, mask, b), dtype)


def test_masked_linear_leading_dims_int64_indices_and_split():
    x, w = _leaf(2, 150, 9), _leaf(4, 9)
    mask = random_mask((4, 9), 0.5).to(DEV)
    lay = csr_layout(mask)
    wide = CsrLayout(lay.mask, *(t.long() for t in lay.tensors()), lay.nnz, lay.source, lay.built_version)
    assert kernels.split_count(4, 300, x.device, 128) > 1  # dw's reduction over M=300 is split
    with sparseops.backend("triton"):
        out = sparseops.masked_linear(x, w, wide)
    _check(out, (x, w), lambda x, w: reference.masked_linear(x, w, mask), torch.float64)


def test_masked_linear_gradcheck():
    x, w, b = _leaf(3, 6), _leaf(4, 6), _leaf(4)
    mask = random_mask((4, 6), 0.5).to(DEV)
    with sparseops.backend("triton"):
        assert torch.autograd.gradcheck(lambda x, w, b: sparseops.masked_linear(x, w, mask, b), (x, w, b))


def test_masked_linear_bad_input():
    w = torch.randn(4, 6, device=DEV)
    rp, ci, trp, tci = csr_layout(random_mask((4, 6), 0.5).to(DEV)).tensors()
    with pytest.raises(ValueError, match="x must end in in_features=6"):
        torch.ops.sparseops.triton_masked_linear(torch.randn(3, 5, device=DEV), w, rp, ci, trp, tci, None)
    with pytest.raises(TypeError, match="x must have the dtype of w"):
        torch.ops.sparseops.triton_masked_linear(torch.randn(3, 6, device=DEV, dtype=torch.float64), w, rp, ci, trp, tci, None)
    with pytest.raises(ValueError, match="row_ptr must be 1-D with 5 entries"):
        torch.ops.sparseops.triton_masked_linear(torch.randn(3, 6, device=DEV), w, rp[:-1], ci, trp, tci, None)
    with pytest.raises(TypeError, match="col_idx must be int32 or int64"):
        torch.ops.sparseops.triton_masked_linear(torch.randn(3, 6, device=DEV), w, rp, ci.float(), trp, tci, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.sparseops.triton_masked_linear(torch.randn(3, 6, device=DEV), w, rp, ci, trp, tci, torch.randn(3, device=DEV))
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.sparseops.triton_masked_linear_backward(torch.randn(3, 5, device=DEV), torch.randn(3, 6, device=DEV), w,
                                          rp, ci, trp, tci, [True, True, False])


def test_triton_backend_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(kernels._common, "INTERPRET", False)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with sparseops.backend("triton"), pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        sparseops.masked_linear(torch.randn(1, 3), torch.randn(2, 3), mask)


# ---------------------------------------------------------------------------------------------
# Masked conv2d (implicit GEMM)

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation)
CONV_CASES = [
    (2, 3, 7, 6, 5, (3, 3), 1, 1, 1),
    (2, 3, 9, 8, 4, (2, 3), 2, (1, 0), 2),
    (1, 4, 5, 5, 3, (1, 1), 1, 0, 1),
    (2, 2, 16, 16, 1, (3, 3), 1, 1, 1),  # one output channel: dw's reduction is split over positions
    (0, 3, 5, 5, 2, (3, 3), 1, 1, 1),  # empty batch
]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_masked_conv2d(case, sparsity):
    nb, c, h, wd, co, k, stride, padding, dilation = case
    x, w, b = _leaf(nb, c, h, wd), _leaf(co, c, *k), _leaf(co)
    mask = random_mask(w.shape, sparsity).to(DEV)
    with sparseops.backend("triton"):
        out = sparseops.masked_conv2d(x, w, mask, b, stride, padding, dilation)
    _check(out, (x, w, b), lambda x, w, b: reference.masked_conv2d(x, w, mask, b, stride, padding, dilation),
           torch.float64)


def test_masked_conv2d_float32_channels_last():
    x = _leaf(2, 3, 6, 6, dtype=torch.float32).detach().to(memory_format=torch.channels_last).requires_grad_()
    w = _leaf(4, 3, 3, 3, dtype=torch.float32)
    mask = random_mask(w.shape, 0.5).to(DEV)
    with sparseops.backend("triton"):
        out = sparseops.masked_conv2d(x, w, mask, None, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _check(out, (x, w), lambda x, w: reference.masked_conv2d(x, w, mask, None, 1, 1), torch.float32)


def test_masked_conv2d_bad_input():
    x, w = torch.randn(1, 3, 5, 5, device=DEV), torch.randn(2, 3, 3, 3, device=DEV)
    tensors = csr_layout(torch.ones(2, 3, 3, 3, dtype=torch.bool, device=DEV)).tensors()
    conv = torch.ops.sparseops.triton_masked_conv2d
    with pytest.raises(ValueError, match="x has 4 channels but w expects 3"):
        conv(torch.randn(1, 4, 5, 5, device=DEV), w, *tensors, None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="stride must be positive"):
        conv(x, w, *tensors, None, [0, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(x, w, *tensors, None, [1, 1], [0, 0], [3, 3])
    with pytest.raises(ValueError, match="x must be 4-D"):
        conv(x[0], w, *tensors, None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.sparseops.triton_masked_conv2d_backward(torch.randn(1, 2, 4, 4, device=DEV), x, w, *tensors, [1, 1], [0, 0],
                                          [1, 1], [True, True, True])


# ---------------------------------------------------------------------------------------------
# Block-sparse masked linear


def _block_mask(n, k, block, keep_tiles, partial):
    """A mask whose kept entries fill a random `keep_tiles` fraction of the tiles (partly, if asked)."""
    tiles = torch.rand(-(-n // block), -(-k // block)) < keep_tiles
    mask = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (mask & (torch.rand(n, k) < 0.7) if partial else mask).to(DEV)


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape,block", [((37, 40, 50), 16), ((300, 70, 33), 32), ((5, 64, 64), 64)])
def test_masked_linear_block(shape, block, keep, partial):
    m, n, k = shape
    x, w, b = _leaf(m, k, dtype=DOT64), _leaf(n, k, dtype=DOT64), _leaf(n, dtype=DOT64)
    mask = _block_mask(n, k, block, keep, partial)
    lay = block_layout(mask, block)
    with sparseops.backend("triton"):
        out = sparseops.masked_linear(x, w, lay, b)
    _check(out, (x, w, b), lambda x, w, b: reference.masked_linear(x, w, mask, b), DOT64)


def test_block_layout():
    mask = _block_mask(40, 50, 16, 0.5, partial=True).cpu()
    mask[:16, :16] = False
    mask[0, 0] = True  # a tile with a single kept entry is kept
    lay = block_layout(mask, 16)
    tiles = torch.zeros(3, 4, dtype=torch.bool)
    for r in range(3):
        for c in range(4):
            tiles[r, c] = mask[16 * r:16 * r + 16, 16 * c:16 * c + 16].any()
    assert isinstance(lay, BlockLayout) and lay.tiles == int(tiles.sum()) and lay.nnz == int(mask.sum())
    assert lay.col_idx.tolist() == tiles.nonzero()[:, 1].tolist()
    assert lay.t_col_idx.tolist() == tiles.t().nonzero()[:, 1].tolist()
    assert lay.tile_density == pytest.approx(tiles.float().mean().item())
    assert block_layout(mask, 16) is lay and block_layout(mask, 32) is not lay  # cached per block size
    mask[39, 49] = not mask[39, 49]
    assert lay.stale and block_layout(mask, 16) is not lay
    with pytest.raises(ValueError, match="block must be one of"):
        block_layout(mask, 8)


def test_block_layout_elsewhere_runs_the_element_path():
    """On the CPU the block layout is served exactly (element CSR or dense), not refused."""
    x, w = torch.randn(7, 50, dtype=torch.float64), torch.randn(40, 50, dtype=torch.float64)
    mask = _block_mask(40, 50, 16, 0.5, partial=True).cpu()
    out = sparseops.masked_linear(x, w, block_layout(mask, 16))
    torch.testing.assert_close(out, reference.masked_linear(x, w, mask))


def test_block_composite_ops_opcheck():
    """The block and fused ops' CPU implementations (the Triton kernels' stand-ins elsewhere)."""
    x, w = torch.randn(5, 40, dtype=torch.float64), torch.randn(33, 40, dtype=torch.float64, requires_grad=True)
    mask = _block_mask(33, 40, 16, 0.5, partial=True).cpu()
    lay = block_layout(mask, 16)
    opcheck(torch.ops.sparseops.masked_linear_block.default, (x, w, mask, *lay.tensors(), 16, None))
    s = torch.randn(33, 40, dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.sparseops.soft_masked_linear.default, (x, w, s, 2.0, 1.5, torch.randn(33).double()))


# ---------------------------------------------------------------------------------------------
# Soft mask fused into the GEMM


@pytest.mark.parametrize("dtype", [DOT64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 29, 45), (70, 80, 90), (1100, 20, 30)])  # the last splits dw over M
def test_soft_masked_linear(shape, dtype):
    m, n, k = shape
    x, w, b = _leaf(m, k, dtype=dtype), _leaf(n, k, dtype=dtype), _leaf(n, dtype=dtype)
    s = _leaf(n, k, dtype=dtype, scale=3)
    with torch.no_grad():
        s[:, : k // 2] = -1e4  # whole tiles exactly 0: skipped, and their dw, ds must be exactly 0
    with sparseops.backend("triton"):
        out = sparseops.soft_masked_linear(x, w, s, 2.0, 1.5, b)
    _check(out, (x, w, s, b), lambda x, w, s, b: reference.soft_masked_linear(x, w, s, 2.0, 1.5, b), dtype)
    with sparseops.backend("triton"):
        dw, ds = torch.autograd.grad(sparseops.soft_masked_linear(x, w, s, 2.0, 1.5, b).sum(), (w, s))
    assert (dw[:, : k // 2] == 0).all() and (ds[:, : k // 2] == 0).all()


def test_soft_masked_linear_gradcheck_and_bad_input():
    x, w, s = _leaf(3, 5), _leaf(4, 5), _leaf(4, 5)
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


def test_soft_masked_linear_outside_triton_matches():
    x, w, s = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(sparseops.soft_masked_linear(x, w, s, 2.0, 1.5),
                               reference.soft_masked_linear(x, w, s, 2.0, 1.5))


# ---------------------------------------------------------------------------------------------
# Backend choice on GPUs (the tables are data; nothing measured means the dense fallback)


def test_gpu_choice_follows_the_measured_table(monkeypatch):
    assert backend.max_density("masked_linear", "no-such-device", (512, 512)) == 0.0
    monkeypatch.setitem(backend.thresholds(), "cuda", {"kernels": {"masked_linear": [[100, 0.05, "cuda"],
                                                                               [2000, 0.01, "triton"]]}})
    monkeypatch.setattr(backend, "has_kernel", lambda op, dev: True)
    dev = torch.device(DEV)
    assert backend.gpu_kernel("masked_linear", dev, (200, 200), 0.05) == "cuda"
    assert backend.gpu_kernel("masked_linear", dev, (4096, 4096), 0.01) == "triton"
    monkeypatch.setattr(backend, "has_kernel", lambda op, dev: False)  # only Triton here
    assert backend.gpu_kernel("masked_linear", dev, (200, 200), 0.05) == "triton"
    monkeypatch.setattr(backend, "triton_unavailable", lambda device: "not here")  # neither
    assert backend.gpu_kernel("masked_linear", dev, (200, 200), 0.05) is None


# ---------------------------------------------------------------------------------------------
# GPU only: half precision, larger shapes, opcheck, torch.compile


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_half_precision_and_large(dtype):
    x, w, b = _leaf(512, 768, dtype=dtype), _leaf(3072, 768, dtype=dtype), _leaf(3072, dtype=dtype)
    mask = random_mask((3072, 768), 0.95).cuda()
    for lay in (mask, block_layout(_block_mask(3072, 768, 32, 0.1, False), 32)):
        with sparseops.backend("triton"):
            out = sparseops.masked_linear(x, w, lay, b)
        m = lay if isinstance(lay, torch.Tensor) else lay.mask
        _check(out, (x, w, b), lambda x, w, b: reference.masked_linear(x, w, m, b), dtype)
    s = _leaf(3072, 768, dtype=dtype, scale=3)
    with sparseops.backend("triton"):
        out = sparseops.soft_masked_linear(x, w, s, 4.0, 1.0, b)
    _check(out, (x, w, s, b), lambda x, w, s, b: reference.soft_masked_linear(x, w, s, 4.0, 1.0, b), dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_conv_half_precision_and_large(dtype):
    """A CIFAR VGG layer (64->64 at 16x16, batch 16): CSR at 95%, 32x32 channel blocks per tap, fused soft mask."""
    x, w, b = _leaf(16, 64, 16, 16, dtype=dtype), _leaf(64, 64, 3, 3, dtype=dtype), _leaf(64, dtype=dtype)
    mask = random_mask(w.shape, 0.95).cuda()
    tiles = torch.rand(2, 2, 3, 3) < 0.3
    bmask = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1).cuda()
    for m, lay in ((mask, mask), (bmask, block_layout(bmask, 32))):
        with sparseops.backend("triton"):
            out = sparseops.masked_conv2d(x, w, lay, b, 1, 1)
        _check(out, (x, w, b), lambda x, w, b: reference.masked_conv2d(x, w, m, b, 1, 1), dtype)
    s = _leaf(64, 64, 3, 3, dtype=dtype, scale=3)
    with sparseops.backend("triton"):
        out = sparseops.soft_masked_conv2d(x, w, s, 4.0, 1.0, b, 1, 1)
    _check(out, (x, w, s, b), lambda x, w, s, b: reference.soft_masked_conv2d(x, w, s, 4.0, 1.0, b, 1, 1), dtype)


@pytest.mark.cuda
@needs_gpu
def test_gpu_opcheck_and_compile():
    x, w, b = torch.randn(9, 20, device="cuda"), torch.randn(12, 20, device="cuda", requires_grad=True), None
    mask = random_mask((12, 20), 0.5).cuda()
    s = torch.randn(12, 20, device="cuda", requires_grad=True)
    lay, blk = csr_layout(mask), block_layout(mask, 16)
    opcheck(torch.ops.sparseops.triton_soft_mask.default, (w, s, 2.0, 1.5))
    opcheck(torch.ops.sparseops.triton_soft_mask_l1.default, (s, 2.0, 1.5))
    opcheck(torch.ops.sparseops.triton_masked_linear.default, (x, w, *lay.tensors(), b))
    opcheck(torch.ops.sparseops.triton_masked_linear_block.default, (x, w, mask, *blk.tensors(), 16, b))
    opcheck(torch.ops.sparseops.triton_soft_masked_linear.default, (x, w, s, 2.0, 1.5, b))
    xc, wc = torch.randn(2, 3, 8, 8, device="cuda"), torch.randn(4, 3, 3, 3, device="cuda", requires_grad=True)
    cl = csr_layout(random_mask(wc.shape, 0.5).cuda())
    opcheck(torch.ops.sparseops.triton_masked_conv2d.default, (xc, wc, *cl.tensors(), None, [1, 1], [1, 1], [1, 1]))

    def f(x, w):
        return sparseops.masked_linear(x, w, lay).relu().sum()

    with sparseops.backend("triton"):
        eager = f(x, w)
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, w), eager)


def _soft_conv1d():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = sparseops.patch(torch.nn.Sequential(conv1d(5, 7)), mode="soft", s0=-0.2)
    return model[0]


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


@pytest.mark.slow
def test_kernels_compile_for_gpus():
    """Every kernel and autotune config through Triton's GPU compiler to a cubin for sm_80 and
    sm_90 (tests/triton_aot.py): what the interpreter cannot check, checked without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_aot.py")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "compiled" in run.stdout


# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, block)
CONV_BLOCK_CASES = [
    (2, 32, 6, 5, 20, (3, 3), 1, 1, 1, 16),  # C_out not a multiple of the block: a partial tile row
    (1, 16, 9, 8, 16, (2, 3), 2, (1, 0), 2, 16),
    (2, 32, 4, 4, 40, (1, 1), 1, 0, 1, 32),
    (1, 16, 12, 12, 2, (3, 3), 1, 1, 1, 16),  # one tile row: dw's reduction split over positions
]


@pytest.mark.parametrize("keep", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("case", CONV_BLOCK_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_masked_conv2d_block(case, keep):
    nb, c, h, wd, co, k, stride, padding, dilation, block = case
    x, w, b = _leaf(nb, c, h, wd, dtype=DOT64), _leaf(co, c, *k, dtype=DOT64), _leaf(co, dtype=DOT64)
    # channel-block structure per tap, partly pruned inside kept tiles
    tiles = torch.rand(-(-co // block), c // block, *k) < keep
    mask = tiles.repeat_interleave(block, 0)[:co].repeat_interleave(block, 1) & (torch.rand(w.shape) < 0.8)
    mask = mask.to(DEV)
    lay = block_layout(mask, block)
    assert lay.taps == k[0] * k[1]
    with sparseops.backend("triton"):
        out = sparseops.masked_conv2d(x, w, lay, b, stride, padding, dilation)
    _check(out, (x, w, b), lambda x, w, b: reference.masked_conv2d(x, w, mask, b, stride, padding, dilation), DOT64)


def test_conv_block_layout_rules():
    mask = torch.rand(8, 24, 3, 3) < 0.5
    with pytest.raises(ValueError, match="multiple of block"):
        block_layout(mask, 16)
    lay = block_layout(torch.ones(16, 16, 3, 3, dtype=torch.bool), 16)
    assert (lay.tiles, lay.taps, lay.tile_density) == (9, 9, 1.0)
    # the tap-major tiling: one tap of a 16x16 channel block pruned away removes exactly one tile
    m = torch.ones(16, 16, 3, 3, dtype=torch.bool)
    m[:, :, 1, 2] = False
    assert block_layout(m, 16).tiles == 8
    x, w = torch.randn(1, 16, 5, 5), torch.randn(16, 16, 3, 3)
    flat = block_layout(m.view(16, -1), 16)  # built from the 2-D view: tiles do not follow the taps
    with sparseops.backend("triton"), pytest.raises(ValueError, match="4-D conv mask"):
        sparseops.masked_conv2d(x.to(DEV), w.to(DEV), flat, None, 1, 1)
    # elsewhere (CPU, auto) a block layout runs the element path, exactly
    torch.testing.assert_close(sparseops.masked_conv2d(x, w, block_layout(m, 16), None, 1, 1),
                               reference.masked_conv2d(x, w, m, None, 1, 1))
    lay = block_layout(m, 16)
    for xx in (x, x.to(memory_format=torch.channels_last)):  # the fake follows x's memory format
        opcheck(torch.ops.sparseops.masked_conv2d_block.default,
                (xx.double(), w.double().requires_grad_(), m, *lay.tensors(), 16, None, [1, 1], [1, 1], [1, 1]))


@pytest.mark.parametrize("case", CONV_CASES[:4], ids=lambda c: "x".join(map(str, c[:5])))
def test_soft_masked_conv2d(case):
    nb, c, h, wd, co, k, stride, padding, dilation = case
    x, w, b = _leaf(nb, c, h, wd, dtype=DOT64), _leaf(co, c, *k, dtype=DOT64), _leaf(co, dtype=DOT64)
    s = _leaf(co, c, *k, dtype=DOT64, scale=3)
    with torch.no_grad():
        s[:, :, 0] = -1e4  # the first kernel row exactly 0: those tiles are skipped, their dw and ds exactly 0
    with sparseops.backend("triton"):
        out = sparseops.soft_masked_conv2d(x, w, s, 2.0, 1.5, b, stride, padding, dilation)
    _check(out, (x, w, s, b),
           lambda x, w, s, b: reference.soft_masked_conv2d(x, w, s, 2.0, 1.5, b, stride, padding, dilation), DOT64)
    with sparseops.backend("triton"):
        out = sparseops.soft_masked_conv2d(x, w, s, 2.0, 1.5, b, stride, padding, dilation)
    dw, ds = torch.autograd.grad(out.sum(), (w, s))
    assert (dw[:, :, 0] == 0).all() and (ds[:, :, 0] == 0).all()


def test_soft_masked_conv2d_layer_split_and_rules(monkeypatch):
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
