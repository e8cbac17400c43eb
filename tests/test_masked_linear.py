"""masked_linear (sparse CSR kernels and the dense fallback) against reference.py."""
import importlib

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import backend, reference
from sparseops.layout import csr_layout

from conftest import random_mask

# (leading dims of x, in_features K, out_features N, sparsity)
CASES = [
    ((1,), 1, 1, 0.0),
    ((1,), 1, 1, 1.0),
    ((5,), 7, 3, 0.5),
    ((1,), 64, 33, 0.5),  # one row
    ((63,), 65, 17, 0.5),  # odd sizes around the 64-wide M block
    ((64,), 31, 129, 0.99),
    ((65,), 31, 129, 0.0),
    ((2, 3), 17, 33, 0.5),  # leading batch dims
    ((2, 1, 5), 40, 9, 0.9),
    ((130,), 50, 70, 1.0),
    ((33,), 100, 200, 0.99),
]


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


def test_backend_errors(monkeypatch):
    x, w, b, mask = inputs((4,), 6, 5, 0.5)
    if backend.triton_unavailable(x.device) is None:  # the interpreter: turn it off for this test
        monkeypatch.setattr(importlib.import_module("sparseops.triton._common"), "INTERPRET", False)
    with pytest.raises(ValueError, match="one of"):
        with sparseops.backend("gpu"):
            pass
    with pytest.raises(ValueError, match="max_density"):
        with sparseops.backend(max_density=1.5):
            pass
    with sparseops.backend("triton"):
        with pytest.raises(NotImplementedError, match="Triton"):  # not installed, or CPU tensors
            sparseops.masked_linear(x, w, mask, b)
    with sparseops.backend("cuda"):
        with pytest.raises((NotImplementedError, ValueError), match="masked_linear"):
            sparseops.masked_linear(x, w, mask, b)


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


def test_threshold_follows_layer_width(monkeypatch):
    monkeypatch.setitem(backend.thresholds(), "cpu", {"masked_linear": 0.5,
                                                      "masked_linear_by_width": [[50, 0.0], [150, 0.2], [500, 0.6]]})
    assert backend.max_density("masked_linear", "cpu") == 0.5
    assert backend.max_density("masked_linear", "cpu", (10, 10)) == 0.0  # h = 5: below the table
    assert backend.max_density("masked_linear", "cpu", (200, 200)) == pytest.approx(0.1)  # h = 100
    assert backend.max_density("masked_linear", "cpu", (300, 300)) == pytest.approx(0.2)  # h = 150
    assert backend.max_density("masked_linear", "cpu", (4000, 4000)) == 0.5  # capped
    with sparseops.backend(max_density=0.9):
        assert backend.max_density("masked_linear", "cpu", (10, 10)) == 0.9

    calls = []

    class Recorder:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(torch.ops.sparseops, name)

    monkeypatch.setattr(importlib.import_module("sparseops.ops.masked_linear"), "lib", Recorder())
    for shape, density, expected in [((200, 200), 0.05, "masked_linear"),  # sparser than 0.1: sparse
                                     ((200, 200), 0.3, None),  # a small layer's fallback: plain autograd
                                     ((1024, 1024), 0.7, "masked_linear_dense")]:  # a big one's: the op
        w, x = torch.randn(shape, dtype=torch.float64), torch.randn(3, shape[1], dtype=torch.float64)
        mask = torch.rand(shape) < density
        calls.clear()
        torch.testing.assert_close(sparseops.masked_linear(x, w, mask), x @ (w * mask).t())
        assert calls[:1] == ([expected] if expected else []), (shape, density, calls)
