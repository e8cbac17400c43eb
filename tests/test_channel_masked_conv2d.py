"""channel_masked_conv2d: a conv mask that keeps whole filters and/or input channels runs one dense
convolution of the kept size, reached through masked_conv2d / MaskedConv2d with a full-shape mask or
a channel mask ([C_out, 1, 1, 1], [1, C_in, 1, 1]). Against the float64 reference for every mask
kind and geometry (NCHW and channels_last), gradcheck, opcheck, torch.compile, routing, bad input."""
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.library import opcheck

import sparseops
from sparseops import reference
from sparseops.layout_channels import channel_layout
from sparseops.ops import channel_masked_conv2d as channel_module

lib = torch.ops.sparseops
CO, CI, KH, KW = 8, 6, 3, 3


def keep_third(size):
    keep = torch.zeros(size, dtype=torch.bool)
    keep[torch.randperm(size)[: max(1, size // 3)]] = True
    return keep


def mask_of(kind, co=CO, ci=CI):
    rows, cols = keep_third(co), keep_third(ci)  # at most half the product: auto's prior takes the path
    r, c = rows.view(-1, 1, 1, 1), cols.view(1, -1, 1, 1)
    full = (co, ci, KH, KW)
    if kind == "out":
        return r.expand(full).clone()
    if kind == "in":
        return c.expand(full).clone()
    if kind == "both":
        return (r & c).expand(full).clone()
    inner = torch.rand(full) < 0.7
    inner[0, 0, 0, 0] = True
    if kind == "out+elementwise":
        return r & inner
    if kind == "both+elementwise":
        return r & c & inner
    if kind == "none_kept":
        return torch.zeros(full, dtype=torch.bool)
    raise ValueError(kind)


KINDS = ["out", "in", "both", "out+elementwise", "both+elementwise", "none_kept"]
GEOMETRIES = [dict(stride=1, padding=1, dilation=1), dict(stride=2, padding=0, dilation=1),
              dict(stride=1, padding=2, dilation=2)]


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = channel_module.run

    def run(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(channel_module, "run", run)
    return calls


def leaves(bias=True, channels_last=False, dtype=torch.float64, co=CO, ci=CI, size=(7, 6), batch=2):
    x = torch.randn(batch, ci, *size, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, ci, KH, KW, dtype=dtype, requires_grad=True)
    b = torch.randn(co, dtype=dtype, requires_grad=True) if bias else None
    return x.requires_grad_(), w, b


def check(out, inputs, mask, geometry):
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref = reference.masked_conv2d(*ref_inputs[:2], mask, *ref_inputs[2:], **geometry)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, ref_inputs, g)
    for a, r in zip((out, *got), (ref, *want), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert bool((got[1][~mask] == 0).all()), "dw must be exactly zero at pruned entries"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_on_the_channel_path(kind, geometry, channels_last, spy):
    mask = mask_of(kind)
    x, w, b = leaves(bias=kind != "in", channels_last=channels_last)
    out = sparseops.masked_conv2d(x, w, mask, b, **geometry)
    assert bool(spy) == (kind != "none_kept"), "auto takes the channel path (an empty mask: the sparse kernels)"
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    check(out, [t for t in (x, w, b) if t is not None], mask, geometry)


def test_channel_layout_of_a_conv_mask():
    for kind in KINDS:
        mask = mask_of(kind)
        ch = channel_layout(mask)
        assert torch.equal(ch.out_idx, mask.flatten(1).any(1).nonzero().flatten())
        elementwise = kind.endswith("elementwise")
        assert (ch.inner is not None) == elementwise, kind
        kept_in = mask.any(3).any(2).any(0).nonzero().flatten()
        assert torch.equal(ch.in_idx, torch.arange(CI) if elementwise else kept_in)
    taps = torch.ones(CO, CI, KH, KW, dtype=torch.bool)
    taps[..., 0, 0] = False  # every channel kept, a tap pruned: elementwise, not channels
    assert channel_layout(taps).work == 1.0 and channel_layout(taps).inner is not None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kind", ["out", "in", "both", "none_kept"])
def test_op_gradcheck_and_opcheck(kind, channels_last):
    ch = channel_layout(mask_of(kind, 4, 3))  # small: gradcheck perturbs every input entry
    x, w, b = leaves(channels_last=channels_last, co=4, ci=3, size=(4, 5), batch=1)
    geo = ([1, 2], [1, 0], [1, 1])
    assert torch.autograd.gradcheck(lambda x, w, b: lib.channel_masked_conv2d(x, w, ch.out_idx, ch.in_idx, b, *geo),
                                    (x, w, b))
    opcheck(lib.channel_masked_conv2d, (x, w, ch.out_idx, ch.in_idx, b, *geo))
    opcheck(lib.channel_masked_conv2d, (x.detach(), w.detach(), ch.out_idx, ch.in_idx, None, *geo))
    g = lib.channel_masked_conv2d(x, w, ch.out_idx, ch.in_idx, b, *geo).detach().clone().normal_()
    opcheck(lib.channel_masked_conv2d_backward, (g, x.detach(), w.detach(), ch.out_idx, ch.in_idx, *geo,
                                                 [True, True, True]))
    opcheck(lib.channel_masked_conv2d_backward, (g, x.detach(), w.detach(), ch.out_idx, ch.in_idx, *geo,
                                                 [True, False, False]))


def test_gradcheck_with_elementwise_inside():
    mask = mask_of("both+elementwise", 4, 3)
    x, w, b = leaves(co=4, ci=3, size=(4, 4), batch=1)
    assert torch.autograd.gradcheck(lambda x, w, b: sparseops.masked_conv2d(x, w, mask, b, padding=1), (x, w, b))


def test_compile():
    ch = channel_layout(mask_of("both"))
    x, w, b = leaves(dtype=torch.float32)

    def f(x, w, b):
        return lib.channel_masked_conv2d(x, w, ch.out_idx, ch.in_idx, b, [1, 1], [1, 1], [1, 1])

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
    torch.testing.assert_close(got, f(x, w, b))
    got.sum().backward()
    conv = sparseops.MaskedConv2d(CI, CO, 3, padding=1)
    conv.set_mask(mask_of("out")[:, :1, :1, :1])  # a [C_out, 1, 1, 1] channel mask
    y = torch.randn(2, CI, 5, 5)
    torch.testing.assert_close(torch.compile(conv, backend="eager")(y), conv(y))


def test_layer_channel_masks_and_ln_structured(spy):
    conv = sparseops.MaskedConv2d(CI, CO, 3, padding=1)
    keep_in = torch.ones(1, CI, 1, 1, dtype=torch.bool)
    keep_in[0, 2] = False
    conv.set_mask(keep_in)
    assert conv.weight_mask.shape == (CO, CI, 3, 3) and not conv.weight_mask[:, 2].any()
    x = torch.randn(2, CI, 5, 5)
    torch.testing.assert_close(conv(x), reference.masked_conv2d(x, conv.weight, conv.weight_mask, conv.bias,
                                                                padding=1))
    model = nn.Sequential(nn.Conv2d(CI, CO, 3, padding=1))
    torch_prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=0)
    sparseops.patch(model)
    torch.testing.assert_close(model(x), reference.masked_conv2d(x, model[0].weight, model[0].weight_mask,
                                                                 model[0].bias, padding=1))
    # (the channel path ran; its correctness guard runs once per layer shape and process, so may have run before)
    assert spy and channel_layout(model[0].weight_mask).out_idx.numel() == CO // 2


@pytest.mark.parametrize("name", ["reference", "dense", "cpu"])
def test_forced_backends_keep_their_meaning(name, spy):
    mask = mask_of("out")
    x, w, b = leaves()
    with sparseops.backend(name):
        out = sparseops.masked_conv2d(x, w, mask, b, padding=1)
    assert not spy
    check(out, [x, w, b], mask, dict(padding=1))


def test_grouped_and_asymmetric_same_stay_off_the_channel_path(spy):
    x = torch.randn(2, CI, 6, 6, dtype=torch.float64)
    w = torch.randn(CO, CI // 2, 3, 3, dtype=torch.float64)
    mask = torch.ones(w.shape, dtype=torch.bool)
    mask[1] = False
    torch.testing.assert_close(sparseops.masked_conv2d(x, w, mask, groups=2),
                               reference.masked_conv2d(x, w, mask, groups=2))
    w2 = torch.randn(CO, CI, 2, 2, dtype=torch.float64)
    mask2 = torch.ones(w2.shape, dtype=torch.bool)
    mask2[1] = False
    torch.testing.assert_close(sparseops.masked_conv2d(x, w2, mask2, padding="same"),
                               reference.masked_conv2d(x, w2, mask2, padding="same"))
    assert not spy


def test_all_channels_pruned_gives_the_bias():
    conv = sparseops.MaskedConv2d(CI, CO, 3, padding=1).double()
    conv.set_mask(torch.zeros(1, 1, 1, 1, dtype=torch.bool))
    x = torch.randn(2, CI, 4, 4, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    torch.testing.assert_close(y, conv.bias.detach().view(1, -1, 1, 1).expand(2, CO, 4, 4))
    y.sum().backward()
    assert not conv.weight.grad.any() and not x.grad.any()


def test_bad_input():
    conv = sparseops.MaskedConv2d(CI, CO, 3)
    for bad in (torch.ones(CO, 1, 1), torch.ones(CO, 2, 1, 1), torch.ones(CO, CI, 2, 3), torch.ones(2, 1, 1, 1)):
        with pytest.raises(ValueError, match="MaskedConv2d: mask must have the weight's shape"):
            conv.set_mask(bad.bool())
    x, w = torch.randn(1, CI, 5, 5), torch.randn(CO, CI, 3, 3)
    geo = ([1, 1], [0, 0], [1, 1])
    good = torch.arange(2)
    with pytest.raises(ValueError, match="sparseops.channel_masked_conv2d: in_idx must hold sorted, distinct"):
        lib.channel_masked_conv2d(x, w, good, torch.tensor([0, CI]), None, *geo)
    with pytest.raises(ValueError, match="sparseops.channel_masked_conv2d: out_idx must be 1-D int64"):
        lib.channel_masked_conv2d(x, w, good[None], good, None, *geo)
    with pytest.raises(ValueError, match="sparseops.channel_masked_conv2d: x must be"):
        lib.channel_masked_conv2d(x[:, :2], w, good, good, None, *geo)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kind", ["out", "in", "both"])
def test_backward_for_every_output_mask(kind, channels_last):
    """Each subset of (dx, dw, db) (db with the kept outputs' gradient in one pass over grad, or not)
    against the reference, and dx in x's memory format."""
    mask = mask_of(kind)
    ch = channel_layout(mask)
    x, w, b = leaves(channels_last=channels_last)
    ref = reference.masked_conv2d(x, w, mask, b, padding=1)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for need in ([True, False, False], [False, True, False], [False, False, True], [True, True, False],
                 [False, True, True], [True, True, True]):
        got = lib.channel_masked_conv2d_backward(g, x.detach(), w.detach(), ch.out_idx, ch.in_idx, [1, 1], [1, 1],
                                                 [1, 1], need)
        for a, r, wanted in zip(got, want, need, strict=True):
            if wanted:
                torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
            else:
                assert a.numel() == 0
        opcheck(lib.channel_masked_conv2d_backward, (g, x.detach(), w.detach(), ch.out_idx, ch.in_idx, [1, 1], [1, 1],
                                                       [1, 1], need))  # also: no two outputs alias
        if need[0]:
            assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("kept,measured", [(0.5, False), (0.25, False), (0.75, True)])
def test_auto_measures_only_a_mask_keeping_more_than_half(kept, measured, tmp_path, monkeypatch):
    """Half the filters or fewer kept: the channel path wins everywhere measured (bench_structured), so
    `auto` takes it without timing (a search otherwise pays a measurement per layer per bucket); the
    correctness guard still runs once per layer."""
    from sparseops import tuning

    monkeypatch.setenv("SPARSEOPS_CACHE_DIR", str(tmp_path))
    tuning.clear(memory_only=True)
    picks = []
    real = tuning.Sample
    monkeypatch.setattr(tuning, "Sample", lambda m, impl, *a: picks.append(impl) or real(m, impl, *a))
    layer = sparseops.MaskedConv2d(8, 8, 3, padding=1)
    rows = torch.zeros(8, dtype=torch.bool)
    rows[: int(8 * kept)] = True
    layer.set_mask(rows.view(-1, 1, 1, 1))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    try:
        with tuning.measuring(True):
            layer(x).sum().backward()
    finally:
        tuning.clear(memory_only=True)
    assert bool(picks) == measured
    torch.testing.assert_close(x.grad, torch.autograd.grad(reference.masked_conv2d(
        x, layer.weight, layer.weight_mask, layer.bias, 1, 1, 1).sum(), x)[0])


def test_the_guard_checks_a_layer_once_whatever_its_channel_bucket(tmp_path, monkeypatch):
    """A search removing channels walks work buckets: each is measured once, but the channel kernel,
    right for one bucket, is checked against the dense path only the first time (tuning_infer.layer)."""
    from sparseops import tuning

    monkeypatch.setenv("SPARSEOPS_CACHE_DIR", str(tmp_path))
    tuning.clear(memory_only=True)
    checks = []
    real = tuning._check
    monkeypatch.setattr(tuning, "_check", lambda op, k, dev, dt, impl, *a: checks.append((k, impl)) or real(
        op, k, dev, dt, impl, *a))
    layer = sparseops.MaskedConv2d(16, 13, 3, padding=1)  # a shape no other test guards
    x = torch.randn(2, 16, 6, 6)
    try:
        with tuning.measuring(True):
            for kept in (12, 9, 5):  # work 0.92 (not a channel candidate), 0.69, 0.38 (channel prior)
                rows = torch.zeros(13, dtype=torch.bool)
                rows[:kept] = True
                layer.set_mask(rows.view(-1, 1, 1, 1))
                layer(x).sum().backward()
    finally:
        tuning.clear(memory_only=True)
    assert [impl for _, impl in checks].count("channels") == 1, checks
