"""masked_conv2d (CSR and block layouts) against reference.py: every implementation through the
`impl` fixture (the CPU kernel per ISA), then the CPU kernel's own tests, Triton's (block tiles,
layout rules) and the CUDA kernels' (GPU only). The geometries are tests/cases.py's."""
import pytest
import torch
import torch.nn.functional as F

import sparseops
from sparseops import reference
from sparseops.layout import block_layout, csr_layout
from torch.library import opcheck

from cases import (ALL_CONV_CASES, CONV_BLOCK_CASES, CONV_SPARSITIES, CPU_CONV_CASES, CUDA_CONV_CASES,
                   SMALL_CONV_CASES, conv_id)
from conftest import (INDEX_DTYPES, SPARSE_TOL, TRITON, compare_cuda_grads, cuda_layout, cuda_leaves, impl_params,
                      needs_gpu, needs_triton, random_mask)

DEV = TRITON.device  # Triton's tests run on CUDA tensors where a GPU exists, else under the interpreter
DOT64 = TRITON.dot64
# numpy, under the interpreter, warns where the kernels compute exp(-z) = inf and then select 0
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CASES = CPU_CONV_CASES



# ---------------------------------------------------------------------------------------------
# Every implementation (cpu per ISA, reference, triton, cuda)


@pytest.mark.parametrize("sparsity", CONV_SPARSITIES)
@pytest.mark.parametrize("impl,case", impl_params(ALL_CONV_CASES, small=SMALL_CONV_CASES, per_isa=True, ids=conv_id),
                         indirect=["impl"])
def test_matches_reference(impl, case, sparsity):
    nb, c, co, h, wd, k, stride, padding, dilation = case
    x, w, b = impl.leaf(nb, c, h, wd), impl.leaf(co, c, *k), impl.leaf(co)
    mask = random_mask(w.shape, sparsity).to(impl.device)
    with impl.force():
        out = sparseops.masked_conv2d(x, w, mask, b, stride, padding, dilation)
    impl.check(out, (x, w, b), lambda x, w, b: reference.masked_conv2d(x, w, mask, b, stride, padding, dilation),
               torch.float64)
    (dw,) = torch.autograd.grad(out, w, torch.randn_like(out))
    assert bool((dw[~mask] == 0).all())


@pytest.mark.parametrize("grad", [False, True])
def test_cpu_scratch_border_is_zero_after_another_geometry(grad):
    """The CPU kernel keeps its transposed input's zero border between calls of one geometry; a call
    of another geometry in between (here without padding, its rows covering that border with large
    values) must not leave them behind."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=grad)
    mask = torch.rand(w.shape, generator=g) < 0.6
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=grad)
    big = torch.full((2, 3, 7, 7), 1e6, dtype=torch.float64, requires_grad=grad)
    with sparseops.backend("cpu"):
        outs = []
        for xi, pad in ((x, 1), (big, 0), (x, 1)):
            y = sparseops.masked_conv2d(xi, w, mask, None, 1, pad)
            outs.append((y, *(torch.autograd.grad(y.sum(), (xi, w)) if grad else ())))
    want = reference.masked_conv2d(x, w, mask, None, 1, 1)
    want = (want, *(torch.autograd.grad(want.sum(), (x, w)) if grad else ()))
    for got, ref in zip(outs[2], want):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin,cout", [(512, 6), (6, 512)])
def test_cpu_many_channels_run_in_blocks(isa, dtype, stride, cin, cout):
    """With 512 input channels @8x8 the input window of a forward tile outgrows half of any L2 here,
    so the CPU kernel sums each output channel over blocks of input channels (csrc/cpu/dispatch.cpp,
    spmm_conv_in_blocks); with 512 output channels dx does the same over blocks of them (its grouped
    rows reordered by block). 70 images: two passes of the batch. Channels with no kept entry, or
    entries only in the first or the last block, included."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    mask = torch.rand(w.shape, generator=g) < 0.05
    many = mask if cin > cout else mask.transpose(0, 1)  # [the few channels, the many, 3, 3]
    many[0] = False
    many[1, 8:] = False
    many[2, :-8] = False
    x = torch.randn(70, cin, 8, 8, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(cout, generator=g, dtype=dtype, requires_grad=True)
    with sparseops.backend("cpu"):
        y = sparseops.masked_conv2d(x, w, mask, b, stride, 1)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    got = (y, *torch.autograd.grad(y, (x, w, b), gy))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference.masked_conv2d(x64, w64, mask, b64, stride, 1)
    want = (ref, *torch.autograd.grad(ref, (x64, w64, b64), gy.double()))
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, **tol)


def test_every_impl_float32_channels_last(impl):
    x = impl.leaf(2, 3, 6, 6, dtype=torch.float32).detach().to(memory_format=torch.channels_last).requires_grad_()
    w = impl.leaf(4, 3, 3, 3, dtype=torch.float32)
    mask = random_mask(w.shape, 0.5).to(impl.device)
    with impl.force():
        out = sparseops.masked_conv2d(x, w, mask, None, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    impl.check(out, (x, w), lambda x, w: reference.masked_conv2d(x, w, mask, None, 1, 1), torch.float32)


@pytest.mark.parametrize("keep", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("impl,case", impl_params(CONV_BLOCK_CASES, only=("cpu", "reference", "triton"),
                                                  ids=lambda c: "x".join(map(str, c[:5]))), indirect=["impl"])
def test_block_layout_matches_reference(impl, case, keep):
    nb, c, h, wd, co, k, stride, padding, dilation, block = case
    dtype = impl.dot64
    x, w, b = impl.leaf(nb, c, h, wd, dtype=dtype), impl.leaf(co, c, *k, dtype=dtype), impl.leaf(co, dtype=dtype)
    # channel-block structure per tap, partly pruned inside kept tiles
    tiles = torch.rand(-(-co // block), c // block, *k) < keep
    mask = tiles.repeat_interleave(block, 0)[:co].repeat_interleave(block, 1) & (torch.rand(w.shape) < 0.8)
    mask = mask.to(impl.device)
    lay = block_layout(mask, block)
    assert lay.taps == k[0] * k[1]
    with impl.force():
        out = sparseops.masked_conv2d(x, w, lay, b, stride, padding, dilation)
    impl.check(out, (x, w, b), lambda x, w, b: reference.masked_conv2d(x, w, mask, b, stride, padding, dilation), dtype)


# ---------------------------------------------------------------------------------------------
# The CPU kernel (csrc/cpu/masked_conv2d.cpp) and the public function


def check(case, sparsity, dtype=torch.float64, channels_last=False):
    n, cin, cout, h, w_, k, s, p, d = case
    x = torch.randn(n, cin, h, w_, dtype=dtype, requires_grad=True)
    w = torch.randn(cout, cin, *k, dtype=dtype, requires_grad=True)
    b = torch.randn(cout, dtype=dtype, requires_grad=True)
    mask = random_mask(w.shape, sparsity)
    xin = x.to(memory_format=torch.channels_last) if channels_last else x
    with sparseops.backend("cpu"):
        y = sparseops.masked_conv2d(xin, w, mask, b, s, p, d)
    ref = reference.masked_conv2d(x, w, mask, b, s, p, d)
    tol = {} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(y, ref, **tol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, **tol)
    assert bool((grads[1][~mask] == 0).all())
    return y




def test_float32_and_channels_last():
    y = check(CASES[1], 0.5, torch.float32)
    assert y.is_contiguous()
    y = check(CASES[0], 0.5, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck():
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    layout = csr_layout(random_mask(w.shape, 0.5))
    def f(x, w, b):
        return torch.ops.sparseops.masked_conv2d(x, w, *layout.tensors(), b, [2, 1], [1, 1], [1, 2])
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias, channels_last):
    x = torch.randn(3, 2, 6, 5)
    # channels_last: the fakes must promise the memory format the kernels return (x's), or compiled
    # graphs read y and dx with the wrong strides
    x = x.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format).requires_grad_()
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True) if bias else None
    layout = csr_layout(random_mask(w.shape, 0.5))
    torch.library.opcheck(torch.ops.sparseops.masked_conv2d, (x, w, *layout.tensors(), b, [1, 2], [1, 0], [1, 1]))
    g = torch.randn(3, 4, 6, 2)
    torch.library.opcheck(torch.ops.sparseops.masked_conv2d_backward,
                          (g, x.detach(), w.detach(), *layout.tensors(), [1, 2], [1, 0], [1, 1], [True, True, bias]))


def test_compile():
    conv = sparseops.MaskedConv2d(3, 4, 3, padding=1)
    conv.set_mask(random_mask(conv.weight.shape, 0.7))
    x = torch.randn(2, 3, 6, 6)
    layout = csr_layout(conv.weight_mask)

    def f(x, w, b):
        return sparseops.masked_conv2d(x, w, layout, b, 1, 1)

    with sparseops.backend("cpu"):
        expected = f(x, conv.weight, conv.bias)
        got = torch.compile(f, fullgraph=True, backend="eager")(x, conv.weight, conv.bias)
    torch.testing.assert_close(got, expected)


def test_empty_and_fully_pruned():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64)
    with sparseops.backend("cpu"):
        y = sparseops.masked_conv2d(torch.randn(0, 2, 5, 5, dtype=torch.float64), w, torch.ones(w.shape), b, 1, 1)
        assert y.shape == (0, 3, 5, 5)
        x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
        y = sparseops.masked_conv2d(x, w, torch.zeros(w.shape), b, 1, 1)
    torch.testing.assert_close(y, b.view(1, 3, 1, 1).expand(2, 3, 5, 5))
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert not dx.any() and not dw.any()


def test_auto_backend_routes_by_density_and_groups():
    x, w = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(4, 4, 3, 3, dtype=torch.float64)
    sparse_mask = random_mask(w.shape, 0.95)
    dense_mask = random_mask(w.shape, 0.2)
    for mask in (sparse_mask, dense_mask):
        torch.testing.assert_close(sparseops.masked_conv2d(x, w, mask, None, 1, "same"),
                                   F.conv2d(x, w * mask, None, 1, 1))
    wg = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    mg = random_mask(wg.shape, 0.9)
    torch.testing.assert_close(sparseops.masked_conv2d(x, wg, mg, None, 1, 1, 1, 2), F.conv2d(x, wg * mg, None, 1, 1,
                                                                                              1, 2))
    with pytest.raises(NotImplementedError, match="groups=1"), sparseops.backend("cpu"):
        sparseops.masked_conv2d(x, wg, mg, None, 1, 1, 1, 2)


def test_bad_input():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    layout = csr_layout(random_mask(w.shape, 0.5))
    op = torch.ops.sparseops.masked_conv2d
    with pytest.raises(ValueError, match="x must be 4-D"):
        op(x[0], w, *layout.tensors(), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="stride must be positive"):
        op(x, w, *layout.tensors(), None, [0, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="padding must be >= 0"):
        op(x, w, *layout.tensors(), None, [1, 1], [-1, 0], [1, 1])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        op(x, w, *layout.tensors(), None, [1, 1], [0, 0], [4, 1])
    with pytest.raises(ValueError, match="x has 3 channels but w expects 2"):
        op(torch.randn(1, 3, 6, 6), w, *layout.tensors(), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="x must have the dtype of w"):
        op(x.double(), w, *layout.tensors(), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="float32"):
        op(x.int(), w.int(), *layout.tensors(), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, w, *layout.tensors(), torch.randn(2), [1, 1], [0, 0], [1, 1])
    bad = layout.col_idx.clone()
    bad[0] = 99
    with pytest.raises(ValueError, match="CSR is invalid"):
        op(x, w, layout.row_ptr, bad, layout.t_row_ptr, layout.t_col_idx, None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        sparseops.masked_conv2d(x, w, layout, None, (1, 1, 1))
    with pytest.raises(ValueError, match="groups must be a positive int"):
        sparseops.masked_conv2d(x, w, layout, None, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        sparseops.masked_conv2d(x, w, layout, None, 1, "full")
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.sparseops.masked_conv2d_backward(torch.randn(1, 3, 5, 5), x, w, *layout.tensors(), [1, 1], [0, 0],
                                                   [1, 1], [True, True, False])


def test_function_gradcheck_and_channels_last():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(w.shape) > 0.5
    f = lambda x, w, b: sparseops.masked_conv2d(x, w, mask, b, 1, 1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    xc = x.detach().to(memory_format=torch.channels_last)
    torch.testing.assert_close(f(xc, w, b), reference.masked_conv2d(x, w, mask, b, 1, 1))
    torch.testing.assert_close(sparseops.masked_conv2d(x, w, csr_layout(mask), b, 1, 1), f(x, w, b))


def test_with_nothing_pruned_is_exactly_conv2d():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    y = sparseops.masked_conv2d(x, w, torch.ones_like(w, dtype=torch.bool), None, 1, 1)
    assert torch.equal(y, F.conv2d(x, w, None, 1, 1))


def test_function_bad_input():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    mask = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(TypeError, match="x and w must be tensors"):
        sparseops.masked_conv2d(x.numpy(), w, mask)
    with pytest.raises(ValueError, match="w must be 4-D"):
        sparseops.masked_conv2d(x, w[0], mask[0])
    with pytest.raises(ValueError, match=r"the mask has shape \(3, 2, 3\)"):
        sparseops.masked_conv2d(x, w, mask[..., 0])
    with pytest.raises(TypeError, match="layout must be a mask tensor, a CsrLayout or a BlockLayout"):
        sparseops.masked_conv2d(x, w, [1, 0])
    with pytest.raises(TypeError, match="bias must be a tensor or None"):
        sparseops.masked_conv2d(x, w, mask, 1.0)
    layout = csr_layout(mask)
    mask[0, 0, 0, 0] = False
    with pytest.raises(ValueError, match="stale"):
        sparseops.masked_conv2d(x, w, layout)
    with pytest.raises(ValueError, match="only 0 and 1"):
        sparseops.masked_conv2d(x, w, torch.full(w.shape, 2.0))
    with pytest.raises(ValueError, match="one device"):
        sparseops.masked_conv2d(x.to("meta"), w, mask)
    with pytest.raises((NotImplementedError, ValueError), match="cuda"), sparseops.backend("cuda"):
        sparseops.masked_conv2d(x, w, mask)  # no CUDA kernel built, or CPU tensors
    with pytest.raises(NotImplementedError, match="groups=1"), sparseops.backend("cpu"):
        sparseops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3), torch.ones(2, 2, 3, 3), groups=2)



# ---------------------------------------------------------------------------------------------
# Triton (sparseops/triton/masked_conv2d.py, masked_conv2d_block.py); on CUDA tensors with a GPU


@needs_triton
def test_triton_bad_input():
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


@needs_triton
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



@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_conv_half_precision_and_large(dtype):
    """A CIFAR VGG layer (64->64 at 16x16, batch 16): CSR at 95%, 32x32 channel blocks per tap, fused soft mask."""
    x, w, b = TRITON.leaf(16, 64, 16, 16, dtype=dtype), TRITON.leaf(64, 64, 3, 3, dtype=dtype), TRITON.leaf(64, dtype=dtype)
    mask = random_mask(w.shape, 0.95).cuda()
    tiles = torch.rand(2, 2, 3, 3) < 0.3
    bmask = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1).cuda()
    for m, lay in ((mask, mask), (bmask, block_layout(bmask, 32))):
        with sparseops.backend("triton"):
            out = sparseops.masked_conv2d(x, w, lay, b, 1, 1)
        TRITON.check(out, (x, w, b), lambda x, w, b: reference.masked_conv2d(x, w, m, b, 1, 1), dtype)
    s = TRITON.leaf(64, 64, 3, 3, dtype=dtype, scale=3)
    with sparseops.backend("triton"):
        out = sparseops.soft_masked_conv2d(x, w, s, 4.0, 1.0, b, 1, 1)
    TRITON.check(out, (x, w, s, b), lambda x, w, s, b: reference.soft_masked_conv2d(x, w, s, 4.0, 1.0, b, 1, 1), dtype)



# ---------------------------------------------------------------------------------------------
# The CUDA kernels (csrc/cuda/masked_conv2d.cu), GPU only (conftest.py: cuda_layout, SPARSE_TOL)


def check_conv_cuda(case, sparsity, dtype, index_dtype=torch.int32, channels_last=False, bias=True):
    n, cin, cout, h, w_, k, s, p, d = case
    mask = random_mask((cout, cin, *k), sparsity)
    shapes = [(n, cin, h, w_), (cout, cin, *k)] + ([(cout,)] if bias else [])
    cpu, leaves = cuda_leaves(dtype, *shapes)
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
    compare_cuda_grads(y, leaves, ref, ref_leaves, mask, dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", list(SPARSE_TOL))
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("case", CUDA_CONV_CASES)
def test_masked_conv2d_cuda_matches_reference(case, sparsity, dtype):
    check_conv_cuda(case, sparsity, dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_cuda_index_dtypes_and_channels_last(index_dtype, channels_last):
    for case in CUDA_CONV_CASES[:3]:
        check_conv_cuda(case, 0.6, torch.float64, index_dtype, channels_last)
    check_conv_cuda(CUDA_CONV_CASES[2], 0.6, torch.float32, index_dtype, channels_last, bias=False)


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

