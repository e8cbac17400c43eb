"""soft_mask and soft_mask_l1 (Continuous Sparsification) against reference.py."""
import math

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import reference

SHAPES = [(1,), (7,), (15,), (16,), (17,), (3, 5), (64, 33), (2, 3, 129), (70001,)]


def sample(shape, dtype=torch.float64, spread=4.0, requires_grad=False):
    w = torch.randn(shape, dtype=dtype, requires_grad=requires_grad)
    s = (torch.randn(shape, dtype=dtype) * spread).requires_grad_(requires_grad)
    return w, s


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta,scale", [(1.0, 1.0), (3.5, 2.0), (200.0, 1 / (1 / (1 + math.exp(-0.0))))])
def test_forward_and_grads_match_reference_float64(isa, shape, beta, scale):
    w, s = sample(shape, requires_grad=True)
    out = sparseops.soft_mask(w, s, beta, scale)
    w2, s2 = w.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = reference.soft_mask(w2, s2, beta, scale)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_reference(isa, shape):
    w, s = sample(shape, dtype=torch.float32, spread=30.0, requires_grad=True)
    beta, scale = 2.5, 1.7
    out = sparseops.soft_mask(w, s, beta, scale)
    w64, s64 = w.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref = reference.soft_mask(w64, s64, beta, scale)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-5, atol=1e-6)
    l1 = sparseops.soft_mask_l1(s, beta, scale)
    torch.testing.assert_close(l1.double(), reference.soft_mask_l1(s64, beta, scale), rtol=1e-6, atol=1e-5)


def test_saturation_is_exact(isa):
    # Large |beta*s|: the mask is exactly 0 or 1 and the gradient exactly 0, never NaN.
    s = torch.tensor([-1e4, -200.0, -90.0, 90.0, 200.0, 1e4] * 3, dtype=torch.float32, requires_grad=True)
    w = torch.ones_like(s, requires_grad=True)
    out = sparseops.soft_mask(w, s, 1.0, 1.0)
    out.sum().backward()
    assert torch.equal(out.detach(), (s > 0).float())
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("shape", [(1,), (5, 7), (1000,), (3, 70001)])
def test_l1_matches_reference_float64(isa, shape):
    s = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    s2 = s.detach().clone().requires_grad_()
    out = sparseops.soft_mask_l1(s, 1.7, 2.0)
    ref = reference.soft_mask_l1(s2, 1.7, 2.0)
    assert out.shape == () and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (out * 3).backward()
    (ref * 3).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)


def test_l1_does_not_depend_on_thread_count():
    s = torch.randn(300001)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparseops.soft_mask_l1(s, 2.0)
        torch.set_num_threads(max(2, before))
        many = sparseops.soft_mask_l1(s, 2.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_gradcheck():
    w, s = sample((4, 5), requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, s: sparseops.soft_mask(w, s, 1.3, 0.7), (w, s))
    assert torch.autograd.gradcheck(lambda s: sparseops.soft_mask_l1(s, 1.3, 0.7), (s,))


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        w, s = sample((8, 9), dtype=dtype, requires_grad=True)
        opcheck(torch.ops.sparseops.soft_mask.default, (w, s, 2.0, 1.5))
        opcheck(torch.ops.sparseops.soft_mask_l1.default, (s, 2.0, 1.5))
        g = torch.randn(8, 9, dtype=dtype)
        opcheck(torch.ops.sparseops.soft_mask_backward.default, (g, w.detach(), s.detach(), 2.0, 1.5))
        opcheck(torch.ops.sparseops.soft_mask_l1_backward.default, (torch.tensor(1.5, dtype=dtype), s.detach(), 2.0, 1.5))


def test_empty():
    w, s = sample((0, 3))
    assert sparseops.soft_mask(w, s, 2.0).shape == (0, 3)
    assert sparseops.soft_mask_l1(s, 2.0).item() == 0.0


def test_non_contiguous_inputs():
    w, s = sample((6, 10))
    out = sparseops.soft_mask(w.t(), s.t(), 2.0, 1.5)
    torch.testing.assert_close(out, reference.soft_mask(w.t(), s.t(), 2.0, 1.5))


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda w, s: sparseops.soft_mask(w, s.float(), 1.0), TypeError, ["soft_mask", "s", "dtype"]),
        (lambda w, s: sparseops.soft_mask(w.int(), s.int(), 1.0), TypeError, ["soft_mask", "w", "float32"]),
        (lambda w, s: sparseops.soft_mask(w, s[:2], 1.0), ValueError, ["soft_mask", "shape"]),
        (lambda w, s: sparseops.soft_mask(w, s, float("nan")), ValueError, ["soft_mask", "beta", "finite"]),
        (lambda w, s: sparseops.soft_mask(w, s, float("inf")), ValueError, ["soft_mask", "beta", "finite"]),
        (lambda w, s: sparseops.soft_mask(w, s, 1.0, float("nan")), ValueError, ["soft_mask", "scale"]),
        (lambda w, s: sparseops.soft_mask(w, s, torch.tensor(1.0)), TypeError, ["soft_mask", "beta"]),
        (lambda w, s: sparseops.soft_mask(w, s, "2"), TypeError, ["soft_mask", "beta"]),
        (lambda w, s: sparseops.soft_mask(w, s.to("meta"), 1.0), ValueError, ["soft_mask", "device"]),
        (lambda w, s: sparseops.soft_mask(w, s.to_sparse(), 1.0), ValueError, ["soft_mask", "s", "dense"]),
        (lambda w, s: sparseops.soft_mask_l1(s, float("nan")), ValueError, ["soft_mask_l1", "beta"]),
        (lambda w, s: sparseops.soft_mask_l1(s.int(), 1.0), TypeError, ["soft_mask_l1", "s"]),
        (lambda w, s: sparseops.soft_mask_l1([1.0], 1.0), TypeError, ["soft_mask_l1", "s"]),
    ],
)
def test_bad_input(call, exc, words):
    w, s = sample((4, 6))
    with pytest.raises(exc) as info:
        call(w, s)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_scores_are_an_error(dtype):
    w, s = sample((50,), dtype=dtype)
    s[37] = float("nan")
    with pytest.raises(ValueError, match="soft_mask: s contains 1 NaN"):
        sparseops.soft_mask(w, s, 1.0)
    with pytest.raises(ValueError, match="soft_mask_l1: s contains 1 NaN"):
        sparseops.soft_mask_l1(s, 1.0)


def test_compile_fullgraph():
    w, s = sample((16, 24), dtype=torch.float32, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(w, s):
        return sparseops.soft_mask(w, s, 2.0, 1.5).square().sum() + 1e-3 * sparseops.soft_mask_l1(s, 2.0, 1.5)

    loss = step(w, s)
    loss.backward()
    w2, s2 = w.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = reference.soft_mask(w2, s2, 2.0, 1.5).square().sum() + 1e-3 * reference.soft_mask_l1(s2, 2.0, 1.5)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(s.grad, s2.grad)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), beta=st.floats(-50, 250), scale=st.floats(0.01, 10), seed=st.integers(0, 2**16))
def test_random_sizes_and_temperatures_match_reference(n, beta, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, dtype=torch.float64, generator=gen, requires_grad=True)
    s = (torch.randn(n, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    out = sparseops.soft_mask(w, s, beta, scale)
    w2, s2 = w.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = reference.soft_mask(w2, s2, beta, scale)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sparseops.soft_mask_l1(s, beta, scale), reference.soft_mask_l1(s2, beta, scale),
                               rtol=1e-12, atol=1e-12)
