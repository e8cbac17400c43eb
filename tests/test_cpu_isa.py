"""The CPU kernels of every instruction-set variant (SSE2, AVX2, AVX-512: vector widths of 16, 32
and 64 bytes, with their own register tiles, transposes and padding) on shapes that are not
multiples of any of their blocks, against float64 references."""
import pytest
import torch
import torch.nn.functional as F

import sparseops
from conftest import random_mask

# (rows M, in K, out N): below, between and across the 4-vector SpMM blocks and W x W transposes
# of each width (16/32/64 floats, 8/16/32 doubles).
LINEAR_SHAPES = [(1, 1, 1), (7, 13, 5), (9, 17, 33), (33, 8, 70), (65, 40, 9), (130, 24, 17)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_ragged_shapes(isa, shape, dtype):
    M, K, N = shape
    mask = random_mask((N, K), 0.6)
    x = torch.randn(M, K, dtype=torch.float64)
    w = torch.randn(N, K, dtype=torch.float64)
    b = torch.randn(N, dtype=torch.float64)
    g = torch.randn(M, N, dtype=torch.float64)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    F.linear(xr, wr * mask, br).backward(g)
    xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
    with sparseops.backend("cpu"):
        y = sparseops.masked_linear(xs, ws, mask, bs)
    y.backward(g.to(dtype))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.double(), F.linear(x, w * mask, b), **tol)
    torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(ws.grad.double(), wr.grad * mask, **tol)
    torch.testing.assert_close(bs.grad.double(), br.grad, **tol)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [1, 5, 19, 70])
def test_conv_ragged_batches(isa, batch, stride):
    cin, cout, h = 6, 5, 7
    mask = random_mask((cout, cin, 3, 3), 0.5)
    x = torch.randn(batch, cin, h, h, dtype=torch.float64)
    w = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.conv2d(xr, wr * mask, None, stride, 1)
    g = torch.randn_like(ref)
    ref.backward(g)
    xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
    with sparseops.backend("cpu"):
        y = sparseops.masked_conv2d(xs, ws, mask, None, stride, 1)
    y.backward(g.float())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(ws.grad.double(), wr.grad * mask, **tol)


def test_variants_agree():
    """Every variant computes the same masked linear (up to float rounding)."""
    isas = list(torch.ops.sparseops._cpu_isa_supported())
    gen = torch.Generator().manual_seed(3)
    M, K, N = 77, 50, 90
    mask = torch.rand(N, K, generator=gen) >= 0.7
    x = torch.randn(M, K, generator=gen)
    w = torch.randn(N, K, generator=gen)
    g = torch.randn(M, N, generator=gen)
    previous = torch.ops.sparseops._cpu_isa()
    out = {}
    try:
        for name in isas:
            torch.ops.sparseops._set_cpu_isa(name)
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            with sparseops.backend("cpu"):
                y = sparseops.masked_linear(xs, ws, mask)
            y.backward(g)
            out[name] = (y.detach(), xs.grad, ws.grad)
    finally:
        torch.ops.sparseops._set_cpu_isa(previous)
    for name in isas[1:]:
        for a, b in zip(out[isas[0]], out[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 15, 17, 33, 100_003])
def test_soft_mask_ragged_lengths(isa, n):
    s = torch.randn(n, dtype=torch.float64) * 4
    w = torch.randn(n, dtype=torch.float64)
    g = torch.randn(n, dtype=torch.float64)
    beta, scale = 3.0, 1.5
    m = torch.sigmoid(beta * s)
    sf, wf = s.float().requires_grad_(), w.float().requires_grad_()
    out = sparseops.soft_mask(wf, sf, beta, scale)
    l1 = sparseops.soft_mask_l1(sf, beta, scale)
    torch.autograd.backward([out, l1], [g.float(), torch.tensor(0.5)])
    torch.testing.assert_close(out.double(), w * scale * m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.double(), scale * m.sum(), rtol=1e-5, atol=1e-5)
    ds = g * w * scale * beta * m * (1 - m) + 0.5 * scale * beta * m * (1 - m)
    torch.testing.assert_close(sf.grad.double(), ds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wf.grad.double(), g * scale * m, rtol=1e-5, atol=1e-6)


def test_l1_sum_thread_count_independent_per_variant(isa):
    s = torch.randn(300_001) * 3
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparseops.soft_mask_l1(s, 2.0, 1.0)
        torch.set_num_threads(max(2, previous))
        many = sparseops.soft_mask_l1(s, 2.0, 1.0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)
