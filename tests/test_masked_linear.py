"""masked_linear (CSR and block layouts) and masked_linear_dense (the dense fallback) against
reference.py: every implementation through the `impl` fixture, then the CPU kernel's own tests (per
ISA, corrupt layouts), Triton's (split reductions, block tiles) and the CUDA kernels' (GPU only)."""

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import backend, reference
from sparseops.layout import CsrLayout, block_layout, csr_layout

from cases import CUDA_LINEAR_SHAPES, LINEAR_BLOCK_CASES, LINEAR_CASES, LINEAR_SPARSITIES, SMALL_LINEAR_SHAPES
from conftest import (INDEX_DTYPES, SPARSE_TOL, TRITON, block_mask, compare_cuda_grads, cuda_layout, cuda_leaves,
                      impl_params, needs_gpu, needs_triton, random_mask)

DEV = TRITON.device  # Triton's tests run on CUDA tensors where a GPU exists, else under the interpreter
DOT64 = TRITON.dot64  # the tl.dot kernels (block, fused soft mask) take float64 only under the interpreter
# numpy, under the interpreter, warns where the kernels compute exp(-z) = inf and then select 0
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CASES = LINEAR_CASES



# ---------------------------------------------------------------------------------------------
# Every implementation (cpu, reference, triton, cuda)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sparsity", LINEAR_SPARSITIES)
@pytest.mark.parametrize("shape", SMALL_LINEAR_SHAPES)
def test_every_impl_matches_reference(impl, shape, sparsity, dtype):
    m, n, k = shape
    x, w, b = impl.leaf(m, k, dtype=dtype), impl.leaf(n, k, dtype=dtype), impl.leaf(n, dtype=dtype)
    mask = random_mask((n, k), sparsity).to(impl.device)
    if n > 2:
        mask[1] = False  # an empty row
    with impl.force():
        out = sparseops.masked_linear(x, w, mask, b)
    impl.check(out, (x, w, b), lambda x, w, b: reference.masked_linear(x, w, mask, b), dtype)


def test_every_impl_gradcheck(impl):
    x, w, b = impl.leaf(3, 6), impl.leaf(4, 6), impl.leaf(4)
    mask = random_mask((4, 6), 0.5).to(impl.device)
    with impl.force():
        assert torch.autograd.gradcheck(lambda x, w, b: sparseops.masked_linear(x, w, mask, b), (x, w, b))


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("impl,case", impl_params(LINEAR_BLOCK_CASES, only=("cpu", "reference", "triton")), indirect=["impl"])
def test_block_layout_matches_reference(impl, case, keep, partial):
    (m, n, k), block = case
    dtype = impl.dot64
    x, w, b = impl.leaf(m, k, dtype=dtype), impl.leaf(n, k, dtype=dtype), impl.leaf(n, dtype=dtype)
    mask = block_mask(n, k, block, keep, partial, impl.device)
    lay = block_layout(mask, block)
    with impl.force():
        out = sparseops.masked_linear(x, w, lay, b)
    impl.check(out, (x, w, b), lambda x, w, b: reference.masked_linear(x, w, mask, b), dtype)


# ---------------------------------------------------------------------------------------------
# The CPU kernel (csrc/cpu/masked_linear.cpp), per ISA variant, and the dense fallback


def inputs(lead, K, N, sparsity, dtype=torch.float64, bias=True):
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype, requires_grad=True)
    b = torch.randn(N, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b, random_mask((N, K), sparsity)


def check_against_reference(x, w, b, mask, rtol, atol, backend="cpu"):
    with sparseops.backend(backend):
        y = sparseops.masked_linear(x, w, mask, b)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref = reference.masked_linear(leaves[0].double(), leaves[1].double(), mask,
                                  leaves[2].double() if b is not None else None)
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    ours = [x.grad, w.grad] + ([b.grad] if b is not None else [])
    for mine, theirs in zip(ours, leaves, strict=True):
        torch.testing.assert_close(mine.double(), theirs.grad.double(), rtol=rtol, atol=atol)
    assert torch.all(w.grad[~mask] == 0), "dw must be zero at pruned entries"


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float64(isa, case):
    x, w, b, mask = inputs(*case)
    check_against_reference(x, w, b, mask, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES[2:8])
def test_matches_reference_float32(isa, case):
    x, w, b, mask = inputs(*case, dtype=torch.float32)
    check_against_reference(x, w, b, mask, rtol=1e-4, atol=1e-4)


def test_rows_and_columns_without_kept_entries(isa):
    x, w, b, _ = inputs((37,), 50, 40, 0.0)
    mask = torch.rand(40, 50) < 0.3
    mask[::3] = False  # empty rows of W: those outputs are just the bias
    mask[:, 1::4] = False  # empty columns: those inputs get zero gradient
    check_against_reference(x, w, b, mask, rtol=1e-12, atol=1e-12)


def test_without_bias_and_without_grads(isa):
    x, w, _, mask = inputs((9,), 20, 30, 0.7, bias=False)
    check_against_reference(x, w, None, mask, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        y = sparseops.masked_linear(x, w, mask)
    assert not y.requires_grad
    # Only x needs a gradient.
    x.grad = None
    w2 = w.detach()
    y = sparseops.masked_linear(x, w2, mask)
    y.sum().backward()
    torch.testing.assert_close(x.grad, reference.masked_linear(torch.ones(9, 30, dtype=torch.float64), w2.t(), mask.t()))


def test_dense_fallback_matches_sparse_kernel():
    x, w, b, mask = inputs((12,), 30, 20, 0.4)
    check_against_reference(x, w, b, mask, rtol=1e-12, atol=1e-12, backend="dense")
    x.grad = w.grad = b.grad = None
    # auto with max_density 0 always chooses the dense path; 1 always the sparse one
    with sparseops.backend(max_density=0.0):
        check_against_reference(x, w, b, mask, rtol=1e-12, atol=1e-12, backend="auto")


def test_reference_backend():
    x, w, b, mask = inputs((4,), 6, 5, 0.5)
    check_against_reference(x, w, b, mask, rtol=1e-12, atol=1e-12, backend="reference")


def test_int64_indices(isa):
    x, w, b, mask = inputs((21,), 19, 23, 0.6)
    lay = csr_layout(mask)
    rp, ci, trp, tci = (t.long() for t in lay.tensors())
    y = torch.ops.sparseops.masked_linear(x, w, rp, ci, trp, tci, b)
    torch.testing.assert_close(y, reference.masked_linear(x, w, mask, b), rtol=1e-12, atol=1e-12)
    dx, dw, db = torch.ops.sparseops.masked_linear_backward(torch.ones_like(y), x, w, rp, ci, trp, tci,
                                                            [True, True, True])
    y.backward(torch.ones_like(y))
    torch.testing.assert_close((dx, dw, db), (x.grad, w.grad, b.grad))


def test_non_contiguous_inputs():
    x = torch.randn(20, 11, dtype=torch.float64).t()  # [11, 20], strided
    w = torch.randn(20, 9, dtype=torch.float64).t()  # [9, 20]
    mask = random_mask((9, 20), 0.5)
    with sparseops.backend("cpu"):
        y = sparseops.masked_linear(x, w, mask)
    torch.testing.assert_close(y, reference.masked_linear(x, w, mask))


def test_in_place_mask_edit_is_seen(isa):
    x, w, b, _ = inputs((8,), 16, 12, 0.0)
    mask = torch.ones(12, 16, dtype=torch.bool)
    with sparseops.backend("cpu"):
        first = sparseops.masked_linear(x, w, mask, b)
        mask[3:7, ::2] = False
        second = sparseops.masked_linear(x, w, mask, b)
        mask.fill_(False)
        third = sparseops.masked_linear(x, w, mask, b)
    torch.testing.assert_close(first, reference.masked_linear(x, w, torch.ones_like(mask), b))
    expect = torch.ones_like(mask)
    expect[3:7, ::2] = False
    torch.testing.assert_close(second, reference.masked_linear(x, w, expect, b))
    torch.testing.assert_close(third, b.expand(8, 12))


def test_stale_layout_object_is_refused():
    x, w, b, mask = inputs((3,), 4, 5, 0.5)
    lay = csr_layout(mask)
    mask[0, 0] = ~mask[0, 0]
    with pytest.raises(ValueError, match="stale"):
        sparseops.masked_linear(x, w, lay, b)
    assert csr_layout(mask) is not lay


def test_gradcheck():
    x, w, b, mask = inputs((3,), 7, 5, 0.5)
    with sparseops.backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w, b: sparseops.masked_linear(x, w, mask, b), (x, w, b))
    with sparseops.backend("dense"):
        assert torch.autograd.gradcheck(lambda x, w, b: sparseops.masked_linear(x, w, mask, b), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x, w, b, mask = inputs((2, 5), 13, 11, 0.6, dtype=dtype)
    lay = csr_layout(mask)
    opcheck(torch.ops.sparseops.masked_linear.default, (x, w, *lay.tensors(), b))
    opcheck(torch.ops.sparseops.masked_linear.default, (x, w, *lay.tensors(), None))
    g = torch.randn(2, 5, 11, dtype=dtype)
    for need in ([True, True, True], [True, False, False], [False, True, False]):
        opcheck(torch.ops.sparseops.masked_linear_backward.default,
                (g, x.detach(), w.detach(), *lay.tensors(), need))
    opcheck(torch.ops.sparseops.masked_linear_dense.default, (x, w, mask, b))


def test_compile_fullgraph():
    x, w, b, mask = inputs((6,), 24, 16, 0.75, dtype=torch.float32)
    lay = csr_layout(mask)

    @torch.compile(fullgraph=True)
    def step(x, w, b):
        return torch.relu(sparseops.masked_linear(x, w, lay, b)).sum()

    with sparseops.backend("cpu"):
        loss = step(x, w, b)
    loss.backward()
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = torch.relu(reference.masked_linear(leaves[0], leaves[1], mask, leaves[2])).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip((x, w, b), leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_empty_batch_and_zero_features():
    for lead, K, N in [((0,), 5, 4), ((2, 0), 5, 4), ((3,), 0, 4), ((3,), 5, 0)]:
        x = torch.randn(*lead, K, requires_grad=True)
        w = torch.randn(N, K, requires_grad=True)
        mask = torch.ones(N, K, dtype=torch.bool)
        with sparseops.backend("cpu"):
            y = sparseops.masked_linear(x, w, mask)
        assert y.shape == (*lead, N)
        torch.testing.assert_close(y, reference.masked_linear(x, w, mask))
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape
        assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


def _bad_cases():
    x = torch.randn(4, 6)
    w = torch.randn(5, 6)
    mask = torch.rand(5, 6) > 0.5
    return [
        (lambda: sparseops.masked_linear(x.double(), w, mask), TypeError, ["masked_linear", "x", "dtype"]),
        (lambda: sparseops.masked_linear(x.int(), w.int(), mask), TypeError, ["masked_linear", "float32"]),
        (lambda: sparseops.masked_linear(torch.randn(4, 7), w, mask), ValueError, ["masked_linear", "features"]),
        (lambda: sparseops.masked_linear(x, w, mask[:4]), ValueError, ["masked_linear", "mask", "shape"]),
        (lambda: sparseops.masked_linear(x, w, mask.float() * 0.5), ValueError, ["mask", "0 and 1"]),
        (lambda: sparseops.masked_linear(x, w, torch.full((5, 6), float("nan"))), ValueError, ["mask", "0 and 1"]),
        (lambda: sparseops.masked_linear(x, w, mask, torch.randn(4)), ValueError, ["masked_linear", "bias"]),
        (lambda: sparseops.masked_linear(x, w, mask, [0.0] * 5), TypeError, ["masked_linear", "bias"]),
        (lambda: sparseops.masked_linear(x, w, "mask"), TypeError, ["masked_linear", "layout"]),
        (lambda: sparseops.masked_linear(x.to("meta"), w, mask), ValueError, ["masked_linear", "device"]),
        (lambda: sparseops.masked_linear(x, w.to_sparse(), mask), ValueError, ["masked_linear", "w", "dense"]),
        (lambda: sparseops.masked_linear(x, torch.randn(5, 6, 1), torch.ones(5, 6, 1)), ValueError,
         ["mask", "2-D"]),
        (lambda: sparseops.masked_linear(torch.randn(()), w, mask), ValueError, ["masked_linear", "x"]),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    call, exc, words = _bad_cases()[case]
    with sparseops.backend("cpu"):
        with pytest.raises(exc) as info:
            call()
    for word in words:
        assert word in str(info.value), str(info.value)


def test_corrupt_layout_is_an_error_not_a_crash():
    x, w, b, mask = inputs((4,), 6, 5, 0.5)
    rp, ci, trp, tci = (t.clone() for t in csr_layout(mask).tensors())
    bad_col = ci.clone()
    bad_col[0] = 10**6
    bad_rp = rp.clone()
    bad_rp[2] = -5
    op = torch.ops.sparseops.masked_linear
    for args, words in [
        ((x, w, rp, bad_col, trp, tci, b), "invalid"),
        ((x, w, bad_rp, ci, trp, tci, b), "invalid"),
        ((x, w, rp[:-1], ci, trp, tci, b), "row_ptr"),
        ((x, w, rp, ci, trp, tci[:-1], b), "t_col_idx"),
        ((x, w, rp.float(), ci, trp, tci, b), "int32 or int64"),
        ((x, w, rp.long(), ci, trp, tci, b), "one dtype"),
    ]:
        with pytest.raises((ValueError, TypeError), match=words):
            op(*args)
    g = torch.randn(4, 5, dtype=torch.float64)
    bad_tcol = tci.clone()
    bad_tcol[-1] = -1
    with pytest.raises(ValueError, match="transposed CSR is invalid"):
        torch.ops.sparseops.masked_linear_backward(g, x.detach(), w.detach(), rp, ci, trp, bad_tcol, [True, False, False])



from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), k=st.integers(1, 40), n=st.integers(1, 40),
       density=st.floats(0.0, 1.0), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_and_masks_match_reference(rows, k, n, density, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    mask = torch.rand(n, k, generator=gen) < density
    check_against_reference(x, w, b, mask, rtol=1e-12, atol=1e-12)



# ---------------------------------------------------------------------------------------------
# Triton (sparseops/triton/masked_linear.py, masked_linear_block.py); on CUDA tensors with a GPU


@needs_triton
def test_triton_leading_dims_int64_indices_and_split():
    kernels = pytest.importorskip("sparseops.triton")
    x, w = TRITON.leaf(2, 150, 9), TRITON.leaf(4, 9)
    mask = random_mask((4, 9), 0.5).to(DEV)
    lay = csr_layout(mask)
    wide = CsrLayout(lay.mask, *(t.long() for t in lay.tensors()), lay.nnz, lay.source, lay.built_version)
    assert kernels.split_count(4, 300, x.device, 128) > 1  # dw's reduction over M=300 is split
    with sparseops.backend("triton"):
        out = sparseops.masked_linear(x, w, wide)
    TRITON.check(out, (x, w), lambda x, w: reference.masked_linear(x, w, mask), torch.float64)


@needs_triton
def test_triton_bad_input():
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


def test_block_layout_elsewhere_runs_the_element_path():
    """On the CPU the block layout is served exactly (element CSR or dense), not refused."""
    x, w = torch.randn(7, 50, dtype=torch.float64), torch.randn(40, 50, dtype=torch.float64)
    mask = block_mask(40, 50, 16, 0.5, partial=True).cpu()
    out = sparseops.masked_linear(x, w, block_layout(mask, 16))
    torch.testing.assert_close(out, reference.masked_linear(x, w, mask))



def test_block_composite_op_opcheck():
    """The block op's CPU implementation (the Triton kernel's stand-in elsewhere)."""
    x, w = torch.randn(5, 40, dtype=torch.float64), torch.randn(33, 40, dtype=torch.float64, requires_grad=True)
    mask = block_mask(33, 40, 16, 0.5, partial=True).cpu()
    lay = block_layout(mask, 16)
    opcheck(torch.ops.sparseops.masked_linear_block.default, (x, w, mask, *lay.tensors(), 16, None))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_half_precision_and_large(dtype):
    x, w, b = TRITON.leaf(512, 768, dtype=dtype), TRITON.leaf(3072, 768, dtype=dtype), TRITON.leaf(3072, dtype=dtype)
    mask = random_mask((3072, 768), 0.95).cuda()
    for lay in (mask, block_layout(block_mask(3072, 768, 32, 0.1, False), 32)):
        with sparseops.backend("triton"):
            out = sparseops.masked_linear(x, w, lay, b)
        m = lay if isinstance(lay, torch.Tensor) else lay.mask
        TRITON.check(out, (x, w, b), lambda x, w, b: reference.masked_linear(x, w, m, b), dtype)
    s = TRITON.leaf(3072, 768, dtype=dtype, scale=3)
    with sparseops.backend("triton"):
        out = sparseops.soft_masked_linear(x, w, s, 4.0, 1.0, b)
    TRITON.check(out, (x, w, s, b), lambda x, w, s, b: reference.soft_masked_linear(x, w, s, 4.0, 1.0, b), dtype)


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



# ---------------------------------------------------------------------------------------------
# The CUDA kernels (csrc/cuda/masked_linear.cu), GPU only: the op called through torch.ops.sparseops.*
# with the layout's index tensors on the GPU (conftest.py: cuda_layout, SPARSE_TOL)


def check_linear_cuda(lead, K, N, sparsity, dtype, index_dtype=torch.int32, bias=True, mask=None):
    mask = random_mask((N, K), sparsity) if mask is None else mask
    shapes = [(*lead, K), (N, K)] + ([(N,)] if bias else [])
    cpu, leaves = cuda_leaves(dtype, *shapes)
    y = torch.ops.sparseops.masked_linear(leaves[0], leaves[1], *cuda_layout(mask, index_dtype),
                                          leaves[2] if bias else None)
    assert y.is_cuda and y.dtype == dtype and y.shape == (*lead, N) and y.is_contiguous()
    ref_leaves = [t.double().requires_grad_() for t in cpu]
    ref = reference.masked_linear(ref_leaves[0], ref_leaves[1], mask, ref_leaves[2] if bias else None)
    rtol, atol = SPARSE_TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=rtol, atol=atol)
    compare_cuda_grads(y, leaves, ref, ref_leaves, mask, dtype)


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


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", list(SPARSE_TOL))
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("shape", CUDA_LINEAR_SHAPES)
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



# ---- torch.sparse (MKL) implementation: a candidate of auto's measured choice (sparseops/torch_sparse/)


def _torch_sparse(x, w, mask, b):
    return torch.ops.sparseops.torch_sparse_masked_linear(x, w, *csr_layout(mask).tensors(), b)


@pytest.mark.parametrize("lead,sparsity", [((9,), 0.0), ((2, 5), 0.6), ((4,), 0.95), ((3,), 1.0)])
def test_torch_sparse_matches_reference(lead, sparsity):
    x, w, b, mask = inputs(lead, 13, 11, sparsity)
    y = _torch_sparse(x, w, mask, b)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = reference.masked_linear(*leaves[:2], mask, leaves[2])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for mine, theirs in zip((x, w, b), leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(w.grad[~mask] == 0)


def test_torch_sparse_gradcheck_opcheck_and_bad_input():
    x, w, b, mask = inputs((3,), 7, 5, 0.5)
    assert torch.autograd.gradcheck(lambda x, w, b: _torch_sparse(x, w, mask, b), (x, w, b))
    lay = csr_layout(mask)
    opcheck(torch.ops.sparseops.torch_sparse_masked_linear.default, (x, w, *lay.tensors(), b))
    opcheck(torch.ops.sparseops.torch_sparse_masked_linear_backward.default,
            (torch.randn(3, 5, dtype=torch.float64), x.detach(), w.detach(), *lay.tensors(), [True, True, True]))
    with pytest.raises(ValueError, match="masked_linear"):  # the C++ op's checks, named
        _torch_sparse(torch.randn(3, 6, dtype=torch.float64), w, mask, b)
