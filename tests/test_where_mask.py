"""where_mask, the one-pass `where(mask, w, 0)` of the dense paths on the CPU (masked weight forward,
masked gradient backward): against torch.where bit for bit, every floating dtype, non-finite values
at pruned entries, layouts it copies, autograd, opcheck, bad input; and the dense paths use it."""
import pytest
import torch

import sparseops
from sparseops.ops import where_mask as wm

from conftest import random_mask

lib = torch.ops.sparseops
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _weight(shape, dtype):
    w = torch.randn(shape).to(dtype)
    flat = w.view(-1)
    flat[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-30, -5.0]).to(dtype)
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (5, 33), (64, 3, 3, 3), (300, 257)])  # (300x257: both threads)
def test_equals_torch_where_bit_for_bit(dtype, shape):
    w = _weight(shape, dtype)
    mask = random_mask(shape, 0.5)
    mask.view(-1)[:3] = False  # inf, -inf and NaN pruned: exactly +0.0 there
    mask.view(-1)[3:6] = True  # -0.0 kept as -0.0
    want = torch.where(mask, w, 0)
    got = lib.where_mask(w, mask)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    assert torch.equal(got.view(bits), want.view(bits))
    inplace = w.clone()
    lib.where_mask_(inplace, mask)
    assert torch.equal(inplace.view(bits), want.view(bits))


def test_non_contiguous_inputs_and_in_place_on_a_view():
    w = torch.randn(8, 12)
    mask = random_mask((12, 8), 0.4)
    assert torch.equal(lib.where_mask(w.t(), mask), torch.where(mask, w.t(), 0))
    expanded = random_mask((8, 1), 0.5).expand(8, 12)  # a channel mask as the ops pass it
    assert torch.equal(lib.where_mask(w, expanded), torch.where(expanded, w, 0))
    base = torch.randn(12, 8)
    want = torch.where(mask, base, 0)
    lib.where_mask_(base.t(), mask.t())  # written back through the view
    assert torch.equal(base, want)


def test_gradients_and_opcheck():
    w = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    mask = random_mask((6, 9), 0.5)
    assert torch.autograd.gradcheck(lambda t: wm.where_mask(t, mask), (w,))
    assert torch.autograd.gradgradcheck(lambda t: wm.where_mask(t, mask), (w,))
    g = torch.full((6, 9), float("inf"), dtype=torch.float64)
    (dw,) = torch.autograd.grad(wm.where_mask(w, mask), w, g)
    assert (dw[~mask] == 0).all() and torch.isinf(dw[mask]).all()  # a where, not a multiply: no NaN
    torch.library.opcheck(lib.where_mask, (w, mask))
    torch.library.opcheck(lib.where_mask_, (w.detach().clone(), mask))


def test_backward_keeps_only_the_mask():
    """The C++ formula saves the mask, not w: w may change (an optimiser step) before backward."""
    w = torch.randn(6, 9, requires_grad=True)
    mask = random_mask((6, 9), 0.5)
    y = wm.where_mask(w, mask)
    with torch.no_grad():
        w.add_(1.0)
    g = torch.randn(6, 9)
    (dw,) = torch.autograd.grad(y, w, g)
    assert torch.equal(dw, torch.where(mask, g, 0))


@pytest.mark.parametrize("fn", [lib.where_mask, lib.where_mask_])
def test_bad_input_names_the_argument(fn):
    w, mask = torch.randn(4, 5), random_mask((4, 5), 0.5)
    with pytest.raises(TypeError, match=r"sparseops.where_mask_?: mask must be bool"):
        fn(w, mask.float())
    with pytest.raises(ValueError, match=r"sparseops.where_mask_?: mask must have the shape of w"):
        fn(w, mask[:2])
    with pytest.raises(TypeError, match=r"sparseops.where_mask_?: w must be float"):
        fn(w.int(), mask)


def test_elsewhere_the_reference_runs(monkeypatch):
    """A traced or subclassed tensor, or a float mask: the reference's where (the kernel is eager-only)."""
    calls = []
    monkeypatch.setattr(wm.reference, "masked_weight", lambda w, m: calls.append(m.dtype) or torch.where(m, w, 0))
    w, mask = torch.randn(4, 5), random_mask((4, 5), 0.5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(wm.where_mask(w, mask.float()), torch.where(mask, w, 0))
    assert calls == [torch.bool]


def test_the_dense_paths_run_it(monkeypatch):
    """mask_multiply and the dense op select through it forward and backward (a multiply and a
    finiteness pass each before); their results stay the reference's."""
    seen = []
    real = lib.where_mask
    monkeypatch.setattr(wm, "lib", type("L", (), {"where_mask": lambda self, *a: seen.append(1) or real(*a),
                                                   "where_mask_": lambda self, *a: seen.append(2) or lib.where_mask_(*a)})())
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    mask = random_mask((12, 16), 0.5)
    for impl in ("reference", "dense"):
        seen.clear()
        x.grad = w.grad = None
        with sparseops.backend(impl):
            sparseops.masked_linear(x, w, mask).sum().backward()
        want = torch.autograd.grad(torch.nn.functional.linear(x, torch.where(mask, w, 0)).sum(), (x, w))
        torch.testing.assert_close((x.grad, w.grad), want)
        assert bool(seen) == (impl == "dense"), (impl, seen)
