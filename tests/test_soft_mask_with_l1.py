"""soft_mask_with_l1: the soft mask and CS's L1 penalty in one pass each way, against reference.py
(every implementation through the `impl` fixture, then the CPU kernel per ISA)."""
import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import reference
from sparseops.ops.soft_mask import penalty_after_forward

from cases import SOFT_MASK_SHAPES, SOFT_MASK_SIZES


def _ref(w, s, beta, scale):
    return reference.soft_mask(w, s, beta, scale), reference.soft_mask_l1(s, beta, scale)


def _grads(outs, inputs, g, c):
    y, l1 = outs
    return torch.autograd.grad([y, l1], inputs, [g.to(y.dtype), torch.tensor(c, dtype=l1.dtype, device=l1.device)],
                               retain_graph=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: exp(-z) = inf, then 0
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", SOFT_MASK_SIZES)
def test_matches_reference(impl, dtype, n):
    w, s = impl.leaf(n, dtype=dtype), impl.leaf(n, dtype=dtype, scale=5)
    with torch.no_grad():
        s[: n // 4] = -1e4  # saturated: exactly 0 mask, exactly 0 gradients
    with impl.force():
        y, l1 = sparseops.soft_mask_with_l1(w, s, 3.0, 1.5)
    w64, s64 = (t.detach().double().requires_grad_() for t in (w, s))
    y_ref, l1_ref = _ref(w64, s64, 3.0, 1.5)
    tol = impl.tol(dtype)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(l1.double(), l1_ref, **tol)
    g = torch.randn_like(y_ref)
    dw, ds = _grads((y, l1), (w, s), g, 0.7)
    dw_ref, ds_ref = _grads((y_ref, l1_ref), (w64, s64), g, 0.7)
    torch.testing.assert_close(dw.double(), dw_ref, **tol)
    torch.testing.assert_close(ds.double(), ds_ref, **tol)
    assert (y[: n // 4] == 0).all() and (ds[: n // 4] == 0).all()


@pytest.mark.parametrize("shape", SOFT_MASK_SHAPES)
@pytest.mark.parametrize("beta,scale", [(1.0, 1.0), (3.5, 2.0), (200.0, 2.0)])
def test_cpu_kernel_float64_equals_the_two_ops(isa, shape, beta, scale):
    w, s = ((torch.randn(shape, dtype=torch.float64) * f).requires_grad_() for f in (1, 4))
    y, l1 = sparseops.soft_mask_with_l1(w, s, beta, scale)
    w2, s2 = (t.detach().clone().requires_grad_() for t in (w, s))
    y_ref, l1_ref = _ref(w2, s2, beta, scale)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(l1, l1_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for c in (0.0, 2.5):  # with and without the penalty's gradient
        got, want = _grads((y, l1), (w, s), g, c), _grads((y_ref, l1_ref), (w2, s2), g, c)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_float32_sum_is_exact_enough_and_thread_independent():
    w, s = torch.randn(300001), torch.randn(300001) * 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparseops.soft_mask_with_l1(w, s, 2.0)[1]
        torch.set_num_threads(max(2, before))
        many = sparseops.soft_mask_with_l1(w, s, 2.0)[1]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
    torch.testing.assert_close(one.double(), reference.soft_mask_l1(s.double(), 2.0), rtol=1e-6, atol=0)


def test_one_output_used_alone():
    w, s = (torch.randn(7, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y, l1 = sparseops.soft_mask_with_l1(w, s, 1.5, 2.0)
    (ds,) = torch.autograd.grad(l1, s, retain_graph=True)
    torch.testing.assert_close(ds, torch.autograd.grad(reference.soft_mask_l1(s, 1.5, 2.0), s)[0])
    dw, ds = torch.autograd.grad(y.sum(), (w, s))
    want = torch.autograd.grad(reference.soft_mask(w, s, 1.5, 2.0).sum(), (w, s))
    torch.testing.assert_close(dw, want[0])
    torch.testing.assert_close(ds, want[1])


def test_gradcheck_and_opcheck():
    w, s = (torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda w, s: sparseops.soft_mask_with_l1(w, s, 1.3, 0.7), (w, s))
    for dtype in (torch.float32, torch.float64):
        w, s = (torch.randn(8, 9, dtype=dtype, requires_grad=True) for _ in range(2))
        opcheck(torch.ops.sparseops.soft_mask_with_l1.default, (w, s, 2.0, 1.5))
        opcheck(torch.ops.sparseops.soft_mask_with_l1_backward.default,
                (torch.randn(8, 9, dtype=dtype), torch.tensor(0.5, dtype=dtype), w.detach(), s.detach(), 2.0, 1.5))


def test_compile_fullgraph():
    w, s = (torch.randn(16, 24, requires_grad=True) for _ in range(2))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(w, s):
        y, l1 = sparseops.soft_mask_with_l1(w, s, 2.0, 1.5)
        return y.square().sum() + 1e-3 * l1

    loss = step(w, s)
    loss.backward()
    w2, s2 = (t.detach().clone().requires_grad_() for t in (w, s))
    y, l1 = _ref(w2, s2, 2.0, 1.5)
    ref = y.square().sum() + 1e-3 * l1
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda w, s: sparseops.soft_mask_with_l1(w, s.float(), 1.0), TypeError, ["soft_mask_with_l1", "s", "dtype"]),
        (lambda w, s: sparseops.soft_mask_with_l1(w, s[:2], 1.0), ValueError, ["soft_mask_with_l1", "shape"]),
        (lambda w, s: sparseops.soft_mask_with_l1(w, s, float("nan")), ValueError, ["soft_mask_with_l1", "beta"]),
        (lambda w, s: sparseops.soft_mask_with_l1(w, s, 1.0, "2"), TypeError, ["soft_mask_with_l1", "scale"]),
        (lambda w, s: sparseops.soft_mask_with_l1(w.int(), s.int(), 1.0), TypeError, ["soft_mask_with_l1", "w"]),
        (lambda w, s: torch.ops.sparseops.soft_mask_with_l1_backward(w, torch.ones(2, dtype=w.dtype), w, s, 1.0, 1.0),
         ValueError, ["soft_mask_with_l1_backward", "grad_l1", "scalar"]),
    ],
)
def test_bad_input(call, exc, words):
    w, s = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(exc) as info:
        call(w, s)
    for word in words:
        assert word in str(info.value)


def test_nan_scores_are_an_error():
    w, s = torch.randn(50), torch.randn(50)
    s[37] = float("nan")
    with pytest.raises(ValueError, match="soft_mask: s contains 1 NaN"):
        sparseops.soft_mask_with_l1(w, s, 1.0)


# ---------------------------------------------------------------------------------------------
# A soft layer's penalty after its forward: the sum from the forward's pass (penalty_after_forward)


def _leaves(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 10, dtype=dtype, generator=g, requires_grad=True)
    s = (torch.randn(12, 10, dtype=dtype, generator=g) * 2).requires_grad_()
    return w, s


def _node_names(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in seen:
            seen.add(node.name())
            todo += [n for n, _ in node.next_functions]
    return seen


def test_a_soft_layers_penalty_comes_from_its_forwards_pass(isa):
    layer = sparseops.SoftMaskedLinear(10, 12).double()
    with torch.no_grad():
        layer.weight_score.normal_(0, 2)
    layer.beta = 2.0
    x = torch.randn(5, 10, dtype=torch.float64)
    y = layer(x)
    pen = layer.penalty()
    assert not any("soft_mask_l1" in n for n in _node_names(pen)), _node_names(pen)  # one kernel, both grads
    (y.square().sum() + 0.3 * pen).backward()
    w, s = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.weight_score))
    ref = x @ reference.soft_mask(w, s, 2.0, layer.scale).t() + layer.bias.detach()
    (ref.square().sum() + 0.3 * reference.soft_mask_l1(s, 2.0, layer.scale)).backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.weight_score.grad, s.grad)


def test_the_kept_penalty_is_used_only_while_it_fits():
    w, s = _leaves()
    y = sparseops.soft_mask(w, s, 2.0, 1.5)
    early = penalty_after_forward(s, 2.0, 1.5)
    y.sum().backward()  # the loss, then the penalty in a backward call of its own
    late = penalty_after_forward(s, 2.0, 1.5)
    (early + late).backward()
    w2, s2 = (t.detach().clone().requires_grad_() for t in (w, s))
    y2, l2 = _ref(w2, s2, 2.0, 1.5)
    y2.sum().backward()
    (2 * l2).backward()
    torch.testing.assert_close(s.grad, s2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert early.data_ptr() != late.data_ptr()  # fresh tensors
    sparseops.soft_mask(w, s, 2.0, 1.5)
    with torch.no_grad():
        s.add_(0.5)  # an optimizer step
    torch.testing.assert_close(penalty_after_forward(s, 2.0, 1.5), reference.soft_mask_l1(s, 2.0, 1.5))
    sparseops.soft_mask(w, s, 2.0, 1.5)
    torch.testing.assert_close(penalty_after_forward(s, 3.0, 1.5), reference.soft_mask_l1(s, 3.0, 1.5))
    with torch.no_grad():
        sparseops.soft_mask(w, s, 2.0, 1.5)
    assert penalty_after_forward(s, 2.0, 1.5).requires_grad
    y = sparseops.soft_mask(w, s, 2.0, 1.5)
    with torch.no_grad():
        w.add_(1.0)  # the weights stepped, the scores did not: the penalty is recomputed, not refused
    penalty_after_forward(s, 2.0, 1.5).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()  # as autograd refuses any op whose inputs changed since its forward
    sparseops.soft_mask(w, s, 2.0, 1.5)
    torch.testing.assert_close(sparseops.soft_mask_l1(s, 2.5, 1.5), reference.soft_mask_l1(s, 2.5, 1.5))
