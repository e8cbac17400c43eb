"""CUDA kernels: built whenever a CUDA torch and nvcc are present; run only with a GPU."""
import math
import shutil

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import _library, backend, reference
from sparseops.layout import csr_layout

from conftest import random_mask

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (2e-2, 1e-2)}


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("n", [1, 1000, 3072 * 768 + 5])
def test_soft_mask_cuda_matches_reference(dtype, n):
    rtol, atol = TOL[dtype]
    w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    s = (torch.randn(n, device="cuda") * 5).to(dtype).requires_grad_()
    out = sparseops.soft_mask(w, s, 3.0, 1.5)
    w64, s64 = w.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref = reference.soft_mask(w64, s64, 3.0, 1.5)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=rtol * 10, atol=atol * 10)
    # the sum is returned in s's dtype: past float16's 65504 it is inf there, as in torch; check it in float32
    l1 = sparseops.soft_mask_l1(s if n * 1.5 < 60000 or dtype != torch.float16 else s.float(), 3.0, 1.5)
    torch.testing.assert_close(l1.double(), reference.soft_mask_l1(s64, 3.0, 1.5), rtol=rtol * 10, atol=1e-3)


@pytest.mark.cuda
@needs_gpu
def test_soft_mask_cuda_opcheck_and_bad_input():
    w = torch.randn(33, 17, device="cuda", requires_grad=True)
    s = torch.randn(33, 17, device="cuda", requires_grad=True)
    opcheck(torch.ops.sparseops.soft_mask.default, (w, s, 2.0, 1.5))
    opcheck(torch.ops.sparseops.soft_mask_l1.default, (s, 2.0, 1.5))
    with pytest.raises(ValueError, match="device"):
        sparseops.soft_mask(w, s.cpu(), 1.0)
    with pytest.raises(ValueError, match="beta"):
        sparseops.soft_mask(w, s, float("nan"))


@pytest.mark.cuda
@needs_gpu
def test_masked_linear_on_cuda_uses_the_dense_fallback():
    if "cuda" not in backend.thresholds():  # nothing measured on a GPU yet: auto must not pick a sparse kernel
        assert backend.max_density("masked_linear", "cuda", (7, 12)) == 0.0
    x = torch.randn(5, 12, device="cuda", requires_grad=True)
    w = torch.randn(7, 12, device="cuda", requires_grad=True)
    mask = torch.rand(7, 12, device="cuda") > 0.5
    y = sparseops.masked_linear(x, w, mask)
    torch.testing.assert_close(y, reference.masked_linear(x, w, mask))
    y.sum().backward()
    assert torch.all(w.grad[~mask] == 0)


# ---------------------------------------------------------------------------------------------
# masked_linear / masked_conv2d CUDA kernels (csrc/cuda/masked_linear.cu, masked_conv2d.cu), called
# through torch.ops.sparseops.* with the layout's index tensors moved to the GPU. Inputs are made in
# the test dtype and the reference runs in float64 on the CPU on exactly those (rounded) values, so
# the only errors are the kernels' accumulation (fp32; fp64 for double) and one final rounding:
# float64 1e-10; float32 1e-4 (sums of up to a few hundred terms); float16 and bfloat16 a few units
# of their last place (2^-11, 2^-8) relative.
SPARSE_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-3),
              torch.bfloat16: (1.6e-2, 1e-2)}
INDEX_DTYPES = [torch.int32, torch.int64]


def cuda_layout(mask, index_dtype=torch.int32):
    """The CSR of `mask` (CPU-built, as the Python layer does) as CUDA index tensors of index_dtype."""
    return tuple(t.to(device="cuda", dtype=index_dtype) for t in csr_layout(mask).tensors())


def _leaves(dtype, *shapes):
    """Random CPU tensors in dtype, and CUDA copies that require grad."""
    cpu = [torch.randn(*s, dtype=torch.float64).to(dtype) for s in shapes]
    return cpu, [t.cuda().requires_grad_() for t in cpu]


def _compare_grads(outs, leaves, ref, ref_leaves, mask, dtype, w_index=1):
    """Backpropagates one random grad through both and compares every gradient."""
    rtol, atol = SPARSE_TOL[dtype]
    g = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
    outs.backward(g.cuda())
    ref.backward(g.double())
    for mine, theirs in zip(leaves, ref_leaves, strict=True):
        assert mine.grad.dtype == dtype and mine.grad.shape == mine.shape
        torch.testing.assert_close(mine.grad.cpu().double(), theirs.grad, rtol=rtol, atol=atol)
    dw = leaves[w_index].grad.cpu()
    assert bool((dw.reshape(mask.shape)[~mask] == 0).all()), "dw must be exactly zero at pruned entries"


# (leading dims of x = M, in_features K, out_features N)
LINEAR_SHAPES = [((1,), 1, 1), ((1,), 64, 33), ((7,), 1, 5), ((6,), 9, 1), ((3,), 5, 7), ((129,), 257, 63),
                 ((2, 3), 17, 33), ((4099,), 3, 2)]  # the last: few kept entries, long rows (SDDMM splits)


def check_linear_cuda(lead, K, N, sparsity, dtype, index_dtype=torch.int32, bias=True, mask=None):
    mask = random_mask((N, K), sparsity) if mask is None else mask
    shapes = [(*lead, K), (N, K)] + ([(N,)] if bias else [])
    cpu, leaves = _leaves(dtype, *shapes)
    y = torch.ops.sparseops.masked_linear(leaves[0], leaves[1], *cuda_layout(mask, index_dtype),
                                          leaves[2] if bias else None)
    assert y.is_cuda and y.dtype == dtype and y.shape == (*lead, N) and y.is_contiguous()
    ref_leaves = [t.double().requires_grad_() for t in cpu]
    ref = reference.masked_linear(ref_leaves[0], ref_leaves[1], mask, ref_leaves[2] if bias else None)
    rtol, atol = SPARSE_TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=rtol, atol=atol)
    _compare_grads(y, leaves, ref, ref_leaves, mask, dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", list(SPARSE_TOL))
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_masked_linear_cuda_matches_reference(shape, sparsity, dtype):
    check_linear_cuda(*shape, sparsity, dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_linear_cuda_index_dtypes_and_empty_rows(dtype, index_dtype):
    check_linear_cuda((129,), 257, 63, 0.6, dtype, index_dtype)
    mask = torch.rand(40, 50) < 0.3
    mask[::3] = False  # empty rows of W: those outputs are just the bias
    mask[:, 1::4] = False  # empty columns: those inputs get zero gradient (empty rows of W^T)
    check_linear_cuda((37,), 50, 40, 0.0, dtype, index_dtype, mask=mask)
    check_linear_cuda((5,), 50, 40, 0.0, dtype, index_dtype, bias=False, mask=mask)


@pytest.mark.cuda
@needs_gpu
def test_masked_linear_cuda_backward_output_mask_and_empty_shapes():
    op = torch.ops.sparseops.masked_linear_backward
    x, w = torch.randn(6, 9, device="cuda"), torch.randn(4, 9, device="cuda")
    mask = random_mask((4, 9), 0.5)
    lay = cuda_layout(mask)
    g = torch.randn(6, 4, device="cuda")
    full = op(g, x, w, *lay, [True, True, True])
    for need in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
        got = op(g, x, w, *lay, need)
        for n, t, ref in zip(need, got, full, strict=True):
            assert t.is_cuda and t.dtype == w.dtype
            if n:
                torch.testing.assert_close(t, ref)
            else:
                assert t.shape == (0,)
    for lead, K, N in [((0,), 5, 4), ((2, 0), 5, 4), ((3,), 0, 4), ((3,), 5, 0)]:
        x = torch.randn(*lead, K, device="cuda", requires_grad=True)
        w = torch.randn(N, K, device="cuda", requires_grad=True)
        b = torch.randn(N, device="cuda", requires_grad=True)
        y = torch.ops.sparseops.masked_linear(x, w, *cuda_layout(torch.ones(N, K, dtype=torch.bool)), b)
        assert y.shape == (*lead, N)
        torch.testing.assert_close(y, reference.masked_linear(x, w, torch.ones(N, K, dtype=torch.bool,
                                                                                device="cuda"), b))
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
        assert not x.grad.any() and not w.grad.any()  # no kept weight meets a row of x


@pytest.mark.cuda
@needs_gpu
def test_sparse_cuda_kernels_are_deterministic_and_do_not_sync():
    x, w = torch.randn(300, 70, device="cuda"), torch.randn(50, 70, device="cuda")
    lay = cuda_layout(random_mask((50, 70), 0.7))
    g = torch.randn(300, 50, device="cuda")
    xc, wc = torch.randn(2, 3, 9, 8, device="cuda"), torch.randn(4, 3, 3, 3, device="cuda")
    lay_c = cuda_layout(random_mask(wc.shape, 0.5))
    gc = torch.randn(2, 4, 5, 8, device="cuda")
    conv_args = ([2, 1], [1, 1], [1, 1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the ops raises
    try:
        torch.ops.sparseops.masked_linear(x, w, *lay, None)
        first = torch.ops.sparseops.masked_linear_backward(g, x, w, *lay, [True, True, True])
        second = torch.ops.sparseops.masked_linear_backward(g, x, w, *lay, [True, True, True])
        torch.ops.sparseops.masked_conv2d(xc, wc, *lay_c, None, *conv_args)
        first_c = torch.ops.sparseops.masked_conv2d_backward(gc, xc, wc, *lay_c, *conv_args, [True, True, True])
        second_c = torch.ops.sparseops.masked_conv2d_backward(gc, xc, wc, *lay_c, *conv_args, [True, True, True])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first + first_c, second + second_c, strict=True):
        assert torch.equal(a, b), "the backward kernels must be bitwise deterministic"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_linear_cuda_opcheck(dtype):
    x = torch.randn(2, 5, 13, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(11, 13, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(11, device="cuda", dtype=dtype, requires_grad=True)
    lay = cuda_layout(random_mask((11, 13), 0.6))
    opcheck(torch.ops.sparseops.masked_linear.default, (x, w, *lay, b))
    opcheck(torch.ops.sparseops.masked_linear.default, (x, w, *lay, None))
    g = torch.randn(2, 5, 11, device="cuda", dtype=dtype)
    for need in ([True, True, True], [True, False, False], [False, True, False]):
        opcheck(torch.ops.sparseops.masked_linear_backward.default, (g, x.detach(), w.detach(), *lay, need))


@pytest.mark.cuda
@needs_gpu
def test_masked_linear_cuda_bad_input():
    op = torch.ops.sparseops.masked_linear
    x, w = torch.randn(4, 6, device="cuda"), torch.randn(5, 6, device="cuda")
    lay = cuda_layout(random_mask((5, 6), 0.5))
    rp, ci, trp, tci = lay
    cases = [
        ((x.double(), w, *lay, None), TypeError, "x must have the dtype of w"),
        ((x.int(), w.int(), *lay, None), TypeError, "float32, float64, float16 or bfloat16"),
        ((x, w, *lay, torch.randn(5, device="cuda").half()), TypeError, "bias must have the dtype of w"),
        ((x.cpu(), w, *lay, None), ValueError, "x is on cpu"),
        ((x, w, rp.cpu(), ci, trp, tci, None), ValueError, "layout is on cpu"),
        ((x, w, *lay, torch.randn(5)), ValueError, "bias is on cpu"),
        ((torch.randn(4, 7, device="cuda"), w, *lay, None), ValueError, "features"),
        ((x, w, rp[:-1], ci, trp, tci, None), ValueError, "row_ptr"),
        ((x, w, rp, ci, trp, tci[:-1], None), ValueError, "t_col_idx"),
        ((x, w, rp.float(), ci, trp, tci, None), TypeError, "int32 or int64"),
        ((x, w, rp.long(), ci, trp, tci, None), TypeError, "one dtype"),
        ((x, w, *lay, torch.randn(4, device="cuda")), ValueError, "bias must have shape"),
        ((torch.randn((), device="cuda"), w, *lay, None), ValueError, "x must have at least one dimension"),
    ]
    for args, exc, words in cases:
        with pytest.raises(exc, match=words):
            op(*args)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.sparseops.masked_linear_backward(torch.randn(3, 5, device="cuda"), x, w, *lay, [True, True, True])


CONV_CASES = [  # (N, C_in, C_out, H, W, kernel, stride, padding, dilation), as in test_conv.py and more
    (2, 3, 4, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 4, 5, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2
    (2, 3, 4, 9, 8, (3, 2), (2, 1), (0, 2), (2, 1)),  # asymmetric kernel, stride, padding, dilation
    (1, 2, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),
    (70, 3, 6, 5, 4, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilation 2; several 256-position tiles
    (2, 5, 33, 3, 11, (2, 3), (1, 3), (1, 0), (1, 1)),
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 40, 3, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1)),  # rows of W longer than one 256-entry chunk
    (2, 3, 300, 5, 4, (1, 1), (1, 1), (0, 0), (1, 1)),  # rows of W^T longer than one chunk
    (8, 1, 1, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1)),  # few kept entries, many positions (dw splits)
]


def check_conv_cuda(case, sparsity, dtype, index_dtype=torch.int32, channels_last=False, bias=True):
    n, cin, cout, h, w_, k, s, p, d = case
    mask = random_mask((cout, cin, *k), sparsity)
    shapes = [(n, cin, h, w_), (cout, cin, *k)] + ([(cout,)] if bias else [])
    cpu, leaves = _leaves(dtype, *shapes)
    xin = leaves[0].to(memory_format=torch.channels_last) if channels_last else leaves[0]
    y = torch.ops.sparseops.masked_conv2d(xin, leaves[1], *cuda_layout(mask, index_dtype),
                                          leaves[2] if bias else None, list(s), list(p), list(d))
    assert y.is_cuda and y.dtype == dtype
    if channels_last and y.numel() and y.shape[1] > 1 and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    ref_leaves = [t.double().requires_grad_() for t in cpu]
    ref = reference.masked_conv2d(ref_leaves[0], ref_leaves[1], mask, ref_leaves[2] if bias else None, s, p, d)
    assert y.shape == ref.shape
    rtol, atol = SPARSE_TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=rtol, atol=atol)
    _compare_grads(y, leaves, ref, ref_leaves, mask, dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", list(SPARSE_TOL))
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("case", CONV_CASES)
def test_masked_conv2d_cuda_matches_reference(case, sparsity, dtype):
    check_conv_cuda(case, sparsity, dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_cuda_index_dtypes_and_channels_last(index_dtype, channels_last):
    for case in CONV_CASES[:3]:
        check_conv_cuda(case, 0.6, torch.float64, index_dtype, channels_last)
    check_conv_cuda(CONV_CASES[2], 0.6, torch.float32, index_dtype, channels_last, bias=False)


@pytest.mark.cuda
@needs_gpu
def test_masked_conv2d_cuda_empty_and_fully_pruned():
    op = torch.ops.sparseops.masked_conv2d
    w = torch.randn(3, 2, 3, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device="cuda", dtype=torch.float64)
    geometry = ([1, 1], [1, 1], [1, 1])
    y = op(torch.randn(0, 2, 5, 5, device="cuda", dtype=torch.float64), w,
           *cuda_layout(torch.ones(w.shape, dtype=torch.bool)), b, *geometry)
    assert y.shape == (0, 3, 5, 5)
    x = torch.randn(2, 2, 5, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    y = op(x, w, *cuda_layout(torch.zeros(w.shape, dtype=torch.bool)), b, *geometry)
    torch.testing.assert_close(y, b.view(1, 3, 1, 1).expand(2, 3, 5, 5))
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert not dx.any() and not dw.any()
    dx, dw, db = torch.ops.sparseops.masked_conv2d_backward(torch.randn(2, 3, 5, 5, device="cuda",
                                                                        dtype=torch.float64), x.detach(),
                                                            w.detach(), *cuda_layout(random_mask(w.shape, 0.5)),
                                                            *geometry, [False, True, False])
    assert dx.shape == (0,) and db.shape == (0,) and dw.shape == w.shape


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("bias", [True, False])
def test_masked_conv2d_cuda_opcheck(bias):
    x = torch.randn(3, 2, 6, 5, device="cuda", requires_grad=True)
    w = torch.randn(4, 2, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(4, device="cuda", requires_grad=True) if bias else None
    lay = cuda_layout(random_mask(w.shape, 0.5))
    opcheck(torch.ops.sparseops.masked_conv2d.default, (x, w, *lay, b, [1, 2], [1, 0], [1, 1]))
    g = torch.randn(3, 4, 6, 2, device="cuda")
    opcheck(torch.ops.sparseops.masked_conv2d_backward.default,
            (g, x.detach(), w.detach(), *lay, [1, 2], [1, 0], [1, 1], [True, True, bias]))


@pytest.mark.cuda
@needs_gpu
def test_masked_conv2d_cuda_bad_input():
    op = torch.ops.sparseops.masked_conv2d
    x, w = torch.randn(1, 2, 6, 6, device="cuda"), torch.randn(3, 2, 3, 3, device="cuda")
    lay = cuda_layout(random_mask(w.shape, 0.5))
    geometry = ([1, 1], [0, 0], [1, 1])
    cases = [
        ((x[0], w, *lay, None, *geometry), ValueError, "x must be 4-D"),
        ((x, w, *lay, None, [0, 1], [0, 0], [1, 1]), ValueError, "stride must be positive"),
        ((x, w, *lay, None, [1, 1], [-1, 0], [1, 1]), ValueError, "padding must be >= 0"),
        ((x, w, *lay, None, [1, 1], [0, 0], [4, 1]), ValueError, "smaller than the dilated kernel"),
        ((torch.randn(1, 3, 6, 6, device="cuda"), w, *lay, None, *geometry), ValueError,
         "x has 3 channels but w expects 2"),
        ((x.double(), w, *lay, None, *geometry), TypeError, "x must have the dtype of w"),
        ((x.int(), w.int(), *lay, None, *geometry), TypeError, "float32, float64, float16 or bfloat16"),
        ((x, w, *lay, torch.randn(2, device="cuda"), *geometry), ValueError, "bias must have shape"),
        ((x.cpu(), w, *lay, None, *geometry), ValueError, "x is on cpu"),
        ((x, w, *(t.cpu() for t in lay), None, *geometry), ValueError, "layout is on cpu"),
        ((x, w, lay[0][:-1], *lay[1:], None, *geometry), ValueError, "row_ptr"),
    ]
    for args, exc, words in cases:
        with pytest.raises(exc, match=words):
            op(*args)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.sparseops.masked_conv2d_backward(torch.randn(1, 3, 5, 5, device="cuda"), x, w, *lay, *geometry,
                                                   [True, True, False])


@pytest.mark.cuda
@needs_gpu
def test_corrupt_layout_is_bounded_on_cuda():
    """The CUDA ops do not validate the CSR on the host (that would synchronise every call); instead
    every kernel bounds every index it reads, so an out-of-range column is skipped, never read."""
    mask = random_mask((5, 6), 0.5)
    mask[0, :2] = True
    x, w = torch.randn(4, 6, device="cuda", dtype=torch.float64), torch.randn(5, 6, device="cuda", dtype=torch.float64)
    rp, ci, trp, tci = cuda_layout(mask)
    bad = ci.clone()
    bad[0] = 10**6  # entry 0 is (row 0, column 0)
    y = torch.ops.sparseops.masked_linear(x, w, rp, bad, trp, tci, None)
    dropped = mask.clone()
    dropped[0, 0] = False
    torch.testing.assert_close(y, reference.masked_linear(x, w, dropped.cuda()))
    _, dw, _ = torch.ops.sparseops.masked_linear_backward(torch.ones(4, 5, device="cuda", dtype=torch.float64), x, w,
                                                          rp, bad, trp, tci, [False, True, False])
    assert dw[0, 0] == 0
    wc = torch.randn(3, 2, 3, 3, device="cuda")
    mc = random_mask(wc.shape, 0.5)
    mc[0, 0, 0, 0] = True
    rp, ci, trp, tci = cuda_layout(mc)
    bad = ci.clone()
    bad[0] = -7
    xc = torch.randn(2, 2, 6, 6, device="cuda")
    y = torch.ops.sparseops.masked_conv2d(xc, wc, rp, bad, trp, tci, None, [1, 1], [1, 1], [1, 1])
    dropped = mc.clone()
    dropped[0, 0, 0, 0] = False
    torch.testing.assert_close(y, reference.masked_conv2d(xc, wc, dropped.cuda(), None, 1, 1, 1))
    torch.cuda.synchronize()  # an out-of-bounds access would surface here


@pytest.mark.cuda
@needs_gpu
def test_soft_mask_cuda_float64_keeps_beta_and_scale_exact():
    """beta and scale reach the kernels in double for float64 tensors (not rounded to float)."""
    beta, scale = 2.3, 1 / (1 / (1 + math.exp(-0.5)))
    w = torch.randn(1000, device="cuda", dtype=torch.float64)
    s = torch.randn(1000, device="cuda", dtype=torch.float64) * 10
    torch.testing.assert_close(sparseops.soft_mask(w, s, beta, scale), reference.soft_mask(w, s, beta, scale),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sparseops.soft_mask_l1(s, beta, scale), reference.soft_mask_l1(s, beta, scale),
                               rtol=1e-13, atol=1e-13)
