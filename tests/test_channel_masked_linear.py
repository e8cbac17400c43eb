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
