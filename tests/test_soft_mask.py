"""soft_mask and soft_mask_l1 (Continuous Sparsification) against reference.py: every
implementation through the `impl` fixture, then the CPU kernel's own tests (per ISA), Triton's and
the CUDA kernels' (GPU only)."""
import math

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import reference

from cases import CUDA_SOFT_MASK_SIZES, SOFT_MASK_L1_SHAPES, SOFT_MASK_SHAPES, SOFT_MASK_SIZES
from conftest import TRITON, impl_params, needs_gpu, needs_triton

SHAPES = SOFT_MASK_SHAPES


def sample(shape, dtype=torch.float64, spread=4.0, requires_grad=False):
    w = torch.randn(shape, dtype=dtype, requires_grad=requires_grad)
    s = (torch.randn(shape, dtype=dtype) * spread).requires_grad_(requires_grad)
    return w, s


# ---------------------------------------------------------------------------------------------
# Every implementation


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: exp(-z) = inf, then 0
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", SOFT_MASK_SIZES)
def test_matches_reference(impl, dtype, n):
    w, s = impl.leaf(n, dtype=dtype), impl.leaf(n, dtype=dtype, scale=5)
    with torch.no_grad():
        s[: n // 4] = -1e4  # saturated: exactly 0 mask, exactly 0 gradients
    with impl.force():
        out = sparseops.soft_mask(w, s, 3.0, 1.5)
        l1 = sparseops.soft_mask_l1(s, 3.0, 1.5)
    _, s64 = impl.check(out, (w, s), lambda w, s: reference.soft_mask(w, s, 3.0, 1.5), dtype)
    torch.testing.assert_close(l1.double(), reference.soft_mask_l1(s64, 3.0, 1.5), **impl.tol(dtype))
    (ds,) = torch.autograd.grad(l1, s)
    (ds_ref,) = torch.autograd.grad(reference.soft_mask_l1(s64, 3.0, 1.5), s64)
    torch.testing.assert_close(ds.double(), ds_ref, **impl.tol(dtype))
    assert (out[: n // 4] == 0).all() and (ds[: n // 4] == 0).all()


# ---------------------------------------------------------------------------------------------
# The CPU kernel (default backend on CPU tensors), per ISA variant


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


@pytest.mark.parametrize("shape", SOFT_MASK_L1_SHAPES)
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


# ---------------------------------------------------------------------------------------------
# Triton (sparseops/triton/soft_mask.py)


@needs_triton
def test_triton_bad_input():
    dev = TRITON.device
    w = torch.randn(3, 4, device=dev)
    with sparseops.backend("triton"):
        with pytest.raises(ValueError, match="shape of w"):
            torch.ops.sparseops.triton_soft_mask(w, torch.randn(4, 3, device=dev), 1.0, 1.0)
        with pytest.raises(TypeError, match="dtype of w"):
            torch.ops.sparseops.triton_soft_mask(w, torch.randn(3, 4, device=dev, dtype=torch.float64), 1.0, 1.0)
        with pytest.raises(ValueError, match="beta must be finite"):
            torch.ops.sparseops.triton_soft_mask(w, w, float("nan"), 1.0)
        with pytest.raises(TypeError, match="s must be float32"):
            torch.ops.sparseops.triton_soft_mask_l1(torch.ones(3, dtype=torch.int64, device=dev), 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels (csrc/cuda/soft_mask.cu), GPU only

CUDA_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 1e-3),
            torch.bfloat16: (2e-2, 1e-2)}


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", list(CUDA_TOL))
@pytest.mark.parametrize("n", CUDA_SOFT_MASK_SIZES)
def test_cuda_matches_reference(dtype, n):
    rtol, atol = CUDA_TOL[dtype]
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
def test_cuda_opcheck_and_bad_input():
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
def test_cuda_float64_keeps_beta_and_scale_exact():
    """beta and scale reach the kernels in double for float64 tensors (not rounded to float)."""
    beta, scale = 2.3, 1 / (1 / (1 + math.exp(-0.5)))
    w = torch.randn(1000, device="cuda", dtype=torch.float64)
    s = torch.randn(1000, device="cuda", dtype=torch.float64) * 10
    torch.testing.assert_close(sparseops.soft_mask(w, s, beta, scale), reference.soft_mask(w, s, beta, scale),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sparseops.soft_mask_l1(s, beta, scale), reference.soft_mask_l1(s, beta, scale),
                               rtol=1e-13, atol=1e-13)


# beta * s across the cut -63 ln 2 (sigmoid < 2^-63): above it the sigmoid, below it exactly 0, as are
# the gradients (fp32's sigmoid itself is subnormal from -87.3 to -103.3, and a mask far above that
# makes the masked weight subnormal: x86 arithmetic on either is up to 100x slower)
CUT_Z = [2.0, -1.0, -30.0, -43.6, -43.7, -50.0, -60.0, -90.0, -100.0, -120.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl", impl_params(per_isa=True), indirect=True)  # each ISA's vectorised sigmoid
def test_below_the_cut_the_mask_and_its_gradients_are_exactly_zero(impl, dtype):
    if dtype not in impl.dtypes:
        pytest.skip(f"{impl.name} does not take {dtype}")
    beta, scale = 4.0, 1.5
    z = torch.tensor(CUT_Z * 4, dtype=dtype)  # 40 entries: whole vectors and a tail
    off = (z < -63 * math.log(2)).to(impl.device)
    s = (z / beta).to(impl.device).requires_grad_()
    w = impl.leaf(len(z), dtype=dtype)
    with impl.force():
        out = sparseops.soft_mask(w, s, beta, scale)
        l1 = sparseops.soft_mask_l1(s, beta, scale)
    assert (out[off] == 0).all() and (out[~off] != 0).all()
    g = torch.randn_like(out)
    dw, ds = torch.autograd.grad(out, (w, s), g, retain_graph=True)
    (dl1,) = torch.autograd.grad(l1, s)
    for grad in (dw, ds, dl1):
        assert torch.isfinite(grad).all() and (grad[off] == 0).all()
    assert (dw[~off] != 0).all() and (dl1[~off] != 0).all()
    impl.check(out, (w, s), lambda w, s: reference.soft_mask(w, s, beta, scale), dtype)
    torch.testing.assert_close(l1.double(), reference.soft_mask_l1(s.detach().double(), beta, scale),
                               **impl.tol(dtype))


def test_the_reference_cuts_below_minus_63_ln_2_with_gradient_zero():
    z = torch.tensor(CUT_Z, dtype=torch.float64, requires_grad=True)
    m = reference.cut_sigmoid(z)
    off = z.detach() < -63 * math.log(2)
    assert (m[off] == 0).all() and torch.equal(m[~off], torch.sigmoid(z[~off]))
    (dz,) = torch.autograd.grad(m.sum(), z)
    assert (dz[off] == 0).all() and torch.isfinite(dz).all()
    assert torch.isnan(reference.cut_sigmoid(torch.tensor([float("nan")]))).all()  # NaN stays NaN
