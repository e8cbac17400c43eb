"""channel_masked_linear: a linear mask that keeps whole channels (rows and/or columns of w) runs one
dense GEMM of the kept size, reached through masked_linear / MaskedLinear with a full-shape mask or a
channel mask ([N, 1], [1, K]). Against the float64 reference for every mask kind, gradcheck,
opcheck, torch.compile, the routing (auto takes it, forced backends keep their meaning) and bad input."""
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.library import opcheck

import sparseops
from sparseops import backend, reference
from sparseops.layout_channels import channel_layout
from sparseops.ops import _common as common
from sparseops.ops import channel_masked_linear as channel_module

lib = torch.ops.sparseops
N, K = 12, 10


def keep_third(size):
    keep = torch.zeros(size, dtype=torch.bool)
    keep[torch.randperm(size)[: max(1, size // 3)]] = True
    return keep


def mask_of(kind, n=N, k=K):
    """A mask of each kind the channel path handles."""
    rows, cols = keep_third(n), keep_third(k)  # at most half the product: auto's prior takes the path
    if kind == "out":
        return rows[:, None].expand(n, k).clone()
    if kind == "in":
        return cols[None, :].expand(n, k).clone()
    if kind == "both":
        return rows[:, None] & cols[None, :]
    if kind == "out+elementwise":  # pruned rows, an elementwise pattern inside the kept ones
        inner = torch.rand(n, k) < 0.7
        inner[:, 0] = True
        return rows[:, None] & inner
    if kind == "both+elementwise":
        inner = torch.rand(n, k) < 0.7
        inner[0, 0] = True
        return rows[:, None] & cols[None, :] & inner
    if kind == "none_kept":
        return torch.zeros(n, k, dtype=torch.bool)
    raise ValueError(kind)


KINDS = ["out", "in", "both", "out+elementwise", "both+elementwise", "none_kept"]


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that took the channel path."""
    calls = []
    real = channel_module.run

    def run(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(channel_module, "run", run)
    return calls


def leaves(lead, bias=True, dtype=torch.float64):
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype, requires_grad=True)
    return x, w, torch.randn(N, dtype=dtype, requires_grad=True) if bias else None


def check(out, inputs, mask):
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref = reference.masked_linear(*ref_inputs[:2], mask, *ref_inputs[2:])
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, ref_inputs, g)
    for a, r in zip((out, *got), (ref, *want), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    dw = got[1]
    assert bool((dw[~mask] == 0).all()), "dw must be exactly zero at pruned entries"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 3)])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_on_the_channel_path(kind, lead, bias, spy):
    mask = mask_of(kind)
    x, w, b = leaves(lead, bias)
    out = sparseops.masked_linear(x, w, mask, b)
    assert bool(spy) == (kind != "none_kept"), "auto takes the channel path (an empty mask: the sparse kernels)"
    check(out, [t for t in (x, w, b) if t is not None], mask)


def test_channel_layout_kinds():
    for kind in KINDS:
        mask = mask_of(kind)
        ch = channel_layout(mask)
        assert torch.equal(ch.out_idx, mask.any(1).nonzero().flatten())
        elementwise = kind.endswith("elementwise")
        assert (ch.inner is not None) == elementwise, kind
        # elementwise inside: only the pruned rows count (the inner op's kernels skip empty columns)
        assert torch.equal(ch.in_idx, torch.arange(K) if elementwise else mask.any(0).nonzero().flatten())
    unstructured = torch.rand(N, K) < 0.5
    unstructured[:, 0] = unstructured[0] = True
    assert channel_layout(unstructured).work == 1.0
    mask = mask_of("out")
    before = channel_layout(mask)
    mask[before.out_idx[0]] = False  # edited in place: read again
    assert channel_layout(mask).out_idx.numel() == before.out_idx.numel() - 1


@pytest.mark.parametrize("kind", ["out", "in", "both", "none_kept"])
def test_op_gradcheck_and_opcheck(kind):
    ch = channel_layout(mask_of(kind))
    x, w, b = leaves((5,))
    assert torch.autograd.gradcheck(lambda x, w, b: lib.channel_masked_linear(x, w, ch.out_idx, ch.in_idx, b),
                                    (x, w, b))
    opcheck(lib.channel_masked_linear, (x, w, ch.out_idx, ch.in_idx, b))
    opcheck(lib.channel_masked_linear, (x.detach()[None], w.detach(), ch.out_idx, ch.in_idx, None))
    g = torch.randn(5, N, dtype=torch.float64)
    opcheck(lib.channel_masked_linear_backward, (g, x.detach(), w.detach(), ch.out_idx, ch.in_idx,
                                                 [True, True, True]))
    opcheck(lib.channel_masked_linear_backward, (g, x.detach(), w.detach(), ch.out_idx, ch.in_idx,
                                                 [False, True, False]))


def test_gradcheck_through_the_layer_with_elementwise_inside():
    mask = mask_of("both+elementwise")
    x, w, b = leaves((3,))
    assert torch.autograd.gradcheck(lambda x, w, b: sparseops.masked_linear(x, w, mask, b), (x, w, b))


def test_compile():
    ch = channel_layout(mask_of("both"))
    x, w, b = leaves((4,), dtype=torch.float32)

    def f(x, w, b):
        return lib.channel_masked_linear(x, w, ch.out_idx, ch.in_idx, b)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
    torch.testing.assert_close(got, f(x, w, b))
    got.sum().backward()
    layer = sparseops.MaskedLinear(K, N)
    layer.set_mask(mask_of("out")[:, :1])  # a [N, 1] channel mask
    y = torch.randn(4, K)
    torch.testing.assert_close(torch.compile(layer, backend="eager")(y), layer(y))


def test_layer_takes_channel_masks_and_keeps_the_full_shape(spy):
    layer = sparseops.MaskedLinear(K, N)
    rows = torch.rand(N, 1) < 0.5
    rows[0] = True
    layer.set_mask(rows)
    assert layer.weight_mask.shape == (N, K) and torch.equal(layer.weight_mask, rows.expand(N, K))
    cols = torch.ones(1, K, dtype=torch.bool)
    cols[0, ::2] = False  # half the input features
    layer.set_mask(cols)
    assert not layer.weight_mask[:, 2].any() and layer.weight_mask[:, 3].all()
    x = torch.randn(4, K)
    torch.testing.assert_close(layer(x), reference.masked_linear(x, layer.weight, layer.weight_mask, layer.bias))
    assert spy
    assert set(layer.state_dict()["weight_mask"].shape) == {N, K}


def test_an_ln_structured_pruned_layer_takes_the_channel_path(spy):
    model = nn.Sequential(nn.Linear(K, N))
    torch_prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    sparseops.patch(model)
    x = torch.randn(3, K)
    out = model(x)
    assert spy and channel_layout(model[0].weight_mask).out_idx.numel() == N // 2
    torch.testing.assert_close(out, reference.masked_linear(x, model[0].weight, model[0].weight_mask, model[0].bias))


@pytest.mark.parametrize("name", ["reference", "dense", "cpu"])
def test_forced_backends_keep_their_meaning(name, spy):
    mask = mask_of("out")
    x, w, b = leaves((3,))
    with sparseops.backend(name):
        out = sparseops.masked_linear(x, w, mask, b)
    assert not spy
    check(out, [x, w, b], mask)


def test_choose_prior():
    facts = dict(density=0.5, shape=(N, K), full=False, numel=N * K, rows=4, dtype=torch.float32)
    assert backend.choose("masked_linear", torch.device("cpu"), channels=0.5, **facts) == "channels"
    assert backend.choose("masked_linear", torch.device("cpu"), channels=1.0, **facts) != "channels"
    assert backend.choose("masked_linear", torch.device("cpu"), channels=None, **facts) != "channels"


def test_all_channels_pruned_gives_the_bias():
    layer = sparseops.MaskedLinear(K, N).double()
    layer.set_mask(torch.zeros(1, 1, dtype=torch.bool))
    x = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, layer.bias.detach().expand(3, N))
    y.sum().backward()
    assert not layer.weight.grad.any() and not x.grad.any()
    torch.testing.assert_close(layer.bias.grad, torch.full((N,), 3.0, dtype=torch.float64))


def test_bad_input():
    layer = sparseops.MaskedLinear(K, N)
    for bad in (torch.ones(N - 1, K), torch.ones(N, 2), torch.ones(N), torch.ones(1, 1, 1)):
        with pytest.raises(ValueError, match="MaskedLinear: mask must have the weight's shape"):
            layer.set_mask(bad.bool())
    x, w = torch.randn(3, K), torch.randn(N, K)
    good = torch.arange(3)
    for name, out_idx, in_idx, what in (
            ("out_idx", torch.tensor([2, 1]), good, "sorted, distinct"),
            ("out_idx", torch.tensor([1, 1]), good, "sorted, distinct"),
            ("out_idx", torch.tensor([0, N]), good, "sorted, distinct"),
            ("in_idx", good, torch.tensor([-1, 2]), "sorted, distinct"),
            ("in_idx", good, good.int(), "1-D int64"),
            ("out_idx", torch.arange(N + 1), good, "1-D int64")):
        with pytest.raises(ValueError, match=f"sparseops.channel_masked_linear: {name} must (be|hold) {what}"):
            lib.channel_masked_linear(x, w, out_idx, in_idx, None)
    with pytest.raises(TypeError, match="sparseops.channel_masked_linear: x must have the dtype of w"):
        lib.channel_masked_linear(x.double(), w, good, good, None)


HELPER_CASES = [((4, 5), 0), ((5, 4), 1), ((3, 4, 2, 2), 1), ((4, 3, 3, 3), 0), ((2, 4, 1), 1)]  # kept channels: 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fill", [True, False])
@pytest.mark.parametrize("shape,dim", HELPER_CASES)
def test_scatter_channels_helper(shape, dim, fill, dtype):
    """The CPU helper that writes the kept channels into the full-size output (a linear layer's
    columns or rows, a conv's channels or filters): every other channel gets its fill value (or 0),
    against index_copy_ into a filled tensor; and the GPUs' torch path against it."""
    size, idx = 9, torch.tensor([0, 3, 4, 8])
    src = torch.randn(shape, dtype=dtype)
    f = torch.randn(size, dtype=dtype) if fill else None
    full = list(shape)
    full[dim] = size
    view = [1] * len(shape)
    view[dim] = size
    want = torch.zeros(full, dtype=dtype) if f is None else f.view(view).expand(full)
    want = want.clone().index_copy_(dim, idx, src)
    got = lib._scatter_channels(src, idx, f, size, dim)
    assert got.is_contiguous() and torch.equal(got, want)
    assert torch.equal(common.scatter_channels_torch(src, idx, f, size, dim), want)
    if dtype == torch.float64:
        opcheck(lib._scatter_channels, (src, idx, f, size, dim))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((1, 11), 1), ((7, 11), 1), ((3000, 11), 1), ((2, 11, 3, 3), 1),
                                       ((3, 11, 5, 7), 1), ((400, 11, 2, 2), 1), ((11, 5), 0)])
def test_gather_channels_sum_helper(shape, dim, dtype):
    """(grad.index_select(dim, idx), grad summed over the other dims) in one pass: rows or planes,
    one task or several."""
    grad, idx = torch.randn(shape, dtype=dtype), torch.tensor([1, 2, 6, 10])
    gk, db = lib._gather_channels_sum(grad, idx, dim)
    assert torch.equal(gk, grad.index_select(dim, idx))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(db, grad.double().sum([d for d in range(grad.dim()) if d != dim]).to(dtype),
                               rtol=tol, atol=tol * 10)
    if dtype == torch.float64:
        opcheck(lib._gather_channels_sum, (grad, idx, dim))


def test_channel_helpers_bad_input():
    src, idx = torch.randn(3, 2), torch.tensor([0, 4])
    for bad, what in ((torch.tensor([4, 0]), "sorted, distinct"), (torch.tensor([0, 9]), "sorted, distinct"),
                      (torch.tensor([0, 1], dtype=torch.int32), "1-D int64")):
        with pytest.raises(ValueError, match=f"sparseops._scatter_channels: idx must (be|hold) .*{what}"):
            lib._scatter_channels(src, bad, None, 5, 1)
        with pytest.raises(ValueError, match=f"sparseops._gather_channels_sum: idx must (be|hold) .*{what}"):
            lib._gather_channels_sum(torch.randn(3, 5), bad, 1)
    with pytest.raises(ValueError, match="sparseops._scatter_channels: idx must have src.shape"):
        lib._scatter_channels(src, torch.tensor([0]), None, 5, 1)
    with pytest.raises(ValueError, match=r"sparseops._scatter_channels: fill must be a CPU tensor of shape \[5\]"):
        lib._scatter_channels(src, idx, torch.zeros(4), 5, 1)
    with pytest.raises(TypeError, match="sparseops._scatter_channels: fill must have the dtype of src"):
        lib._scatter_channels(src, idx, torch.zeros(5, dtype=torch.float64), 5, 1)
    with pytest.raises(ValueError, match=r"sparseops._scatter_channels: dim must be in \[0, src.dim\(\)\)"):
        lib._scatter_channels(src, idx, None, 5, 2)
    with pytest.raises(ValueError, match=r"sparseops._gather_channels_sum: dim must be in \[0, grad.dim\(\)\)"):
        lib._gather_channels_sum(torch.randn(3, 5), idx, -1)


@pytest.mark.parametrize("kind", ["out", "in", "both"])
def test_backward_for_every_output_mask(kind):
    """Each subset of (dx, dw, db) the backward can be asked for (db alone, or the kept outputs'
    gradient without db, take other paths) against the reference."""
    mask = mask_of(kind)
    ch = channel_layout(mask)
    x, w, b = leaves((2, 3))
    ref = reference.masked_linear(x, w, mask, b)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for need in ([True, False, False], [False, True, False], [False, False, True], [True, True, False],
                 [False, True, True], [True, True, True]):
        got = lib.channel_masked_linear_backward(g, x.detach(), w.detach(), ch.out_idx, ch.in_idx, need)
        for a, r, wanted in zip(got, want, need, strict=True):
            if wanted:
                torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
            else:
                assert a.numel() == 0
        # also: no two outputs alias
        opcheck(lib.channel_masked_linear_backward, (g, x.detach(), w.detach(), ch.out_idx, ch.in_idx, need))


def test_set_mask_from_a_view_of_its_own_buffer():
    """set_mask copies a channel mask from its expanded view (no full-size clone first); a view of the
    buffer itself is cloned before (an overlapping copy_ could read what it already wrote)."""
    layer = sparseops.MaskedLinear(K, N)
    layer.weight_mask[:, 0] = False
    layer.weight_mask[2, 0] = True
    layer.set_mask(layer.weight_mask[:, :1])  # [N, 1]: row i becomes all of its column-0 value
    want = torch.zeros(N, K, dtype=torch.bool)
    want[2] = True
    assert torch.equal(layer.weight_mask, want)
    layer.set_mask(torch.ones(1, K, dtype=torch.bool))
    assert layer.weight_mask.all() and layer.weight_mask.is_contiguous()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["out", "in", "both", "none_kept"])
def test_an_inplace_op_after_the_op_is_allowed(kind, bias):
    """The op returns a tensor of its own, not a view (autograd refuses an in-place op on a custom op's
    view: torchvision's VGG runs ReLU(inplace=True) after its linear layers); the gradients through the
    in-place ReLU are the reference's."""
    mask = mask_of(kind)
    x, w, b = leaves((2, 3), bias)
    ch = channel_layout(mask)
    out = lib.channel_masked_linear(x, w, ch.out_idx, ch.in_idx, b)
    assert not out._is_view()
    inputs = [t for t in (x, w, b) if t is not None]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref = torch.relu(reference.masked_linear(*ref_inputs[:2], mask, *ref_inputs[2:]))
    got, want = torch.autograd.grad(torch.relu_(out).sum(), inputs), torch.autograd.grad(ref.sum(), ref_inputs)
    for a, r in zip((out, *got), (ref, *want), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    layer = sparseops.MaskedLinear(K, N).double()
    layer.set_mask(mask)
    with backend.backend("auto"):
        nn.Sequential(layer, nn.ReLU(inplace=True))(x).sum().backward()  # the layer's path too
