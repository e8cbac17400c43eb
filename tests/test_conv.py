"""masked_conv2d's CPU kernel (implicit-im2col SpMM, dx, dw) against the reference in float64."""
import pytest
import torch
import torch.nn.functional as F

import sparseops
from sparseops import reference
from sparseops.layout import csr_layout

from conftest import random_mask

CASES = [  # (N, C_in, C_out, H, W, kernel, stride, padding, dilation)
    (2, 3, 4, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 4, 5, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 3, 4, 9, 8, (3, 2), (2, 1), (0, 2), (2, 1)),
    (1, 2, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),
    (70, 3, 6, 5, 4, (3, 3), (1, 1), (2, 2), (2, 2)),  # more than one SpMM batch block
    (2, 5, 33, 3, 11, (2, 3), (1, 3), (1, 0), (1, 1)),  # tiles that end inside a plane
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
]


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


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_matches_reference(case, sparsity, isa):
    check(case, sparsity)


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
