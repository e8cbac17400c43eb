"""MaskedConv2d, masked_conv2d and the soft-masked (Continuous Sparsification) layers against the reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops import SoftMaskedConv2d, SoftMaskedLinear, reference
from sparseops.layout import csr_layout

CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, groups, padding_mode)
    (3, 8, 3, 1, 1, 1, 1, "zeros"),
    (4, 6, (3, 1), 2, (1, 0), 1, 1, "zeros"),
    (4, 8, 3, 1, 2, 2, 2, "zeros"),
    (3, 5, 3, 1, 1, 1, 1, "reflect"),
    (2, 4, 1, 1, 0, 1, 1, "circular"),
    (3, 4, 3, 1, "same", 1, 1, "zeros"),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_masked_conv2d_layer_matches_reference(case):
    cin, cout, k, stride, padding, dilation, groups, mode = case
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, padding_mode=mode).double()
    mask = torch.rand(conv.weight.shape) > 0.6
    layer = sparseops.patch(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, padding_mode=mode).double())
    layer.load_state_dict(conv.state_dict())
    layer.set_mask(mask)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_()
    expected = conv._conv_forward(x, w * mask, conv.bias)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, layer.weight), g)
    dx_ref, dw_ref = torch.autograd.grad(expected, (x, w), g)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)
    assert bool((dw[~mask] == 0).all())


def test_masked_conv2d_function_gradcheck_and_channels_last():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(w.shape) > 0.5
    f = lambda x, w, b: sparseops.masked_conv2d(x, w, mask, b, 1, 1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    xc = x.detach().to(memory_format=torch.channels_last)
    torch.testing.assert_close(f(xc, w, b), reference.masked_conv2d(x, w, mask, b, 1, 1))
    torch.testing.assert_close(sparseops.masked_conv2d(x, w, csr_layout(mask), b, 1, 1), f(x, w, b))


def test_masked_conv2d_with_nothing_pruned_is_exactly_conv2d():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    y = sparseops.masked_conv2d(x, w, torch.ones_like(w, dtype=torch.bool), None, 1, 1)
    assert torch.equal(y, F.conv2d(x, w, None, 1, 1))


def test_masked_conv2d_bad_input():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    mask = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(TypeError, match="x and w must be tensors"):
        sparseops.masked_conv2d(x.numpy(), w, mask)
    with pytest.raises(ValueError, match="w must be 4-D"):
        sparseops.masked_conv2d(x, w[0], mask[0])
    with pytest.raises(ValueError, match=r"the mask has shape \(3, 2, 3\)"):
        sparseops.masked_conv2d(x, w, mask[..., 0])
    with pytest.raises(TypeError, match="layout must be a mask tensor, a CsrLayout or a BlockLayout"):
        sparseops.masked_conv2d(x, w, [1, 0])
    with pytest.raises(TypeError, match="bias must be a tensor or None"):
        sparseops.masked_conv2d(x, w, mask, 1.0)
    layout = csr_layout(mask)
    mask[0, 0, 0, 0] = False
    with pytest.raises(ValueError, match="stale"):
        sparseops.masked_conv2d(x, w, layout)
    with pytest.raises(ValueError, match="only 0 and 1"):
        sparseops.masked_conv2d(x, w, torch.full(w.shape, 2.0))
    with pytest.raises(ValueError, match="one device"):
        sparseops.masked_conv2d(x.to("meta"), w, mask)
    with pytest.raises((NotImplementedError, ValueError), match="cuda"), sparseops.backend("cuda"):
        sparseops.masked_conv2d(x, w, mask)  # no CUDA kernel built, or CPU tensors
    with pytest.raises(NotImplementedError, match="groups=1"), sparseops.backend("cpu"):
        sparseops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3), torch.ones(2, 2, 3, 3), groups=2)


def _eager_soft(w, s, beta, s0):
    return w * torch.sigmoid(beta * s) / (1 / (1 + math.exp(-s0)))


@pytest.mark.parametrize("make", [lambda: SoftMaskedLinear(7, 5, s0=-0.2, dtype=torch.float64),
                                  lambda: SoftMaskedConv2d(3, 4, 3, padding=1, s0=0.1, dtype=torch.float64)])
def test_soft_masked_layers_match_the_official_eager_formula(make):
    layer = make()
    with torch.no_grad():
        layer.weight_score.normal_(0, 0.5)
    layer.beta = 3.7
    x = torch.randn((2, 7) if isinstance(layer, nn.Linear) else (2, 3, 5, 5), dtype=torch.float64)
    w = layer.weight.detach().clone().requires_grad_()
    s = layer.weight_score.detach().clone().requires_grad_()
    masked = _eager_soft(w, s, layer.beta, layer.s0)
    expected = F.linear(x, masked, layer.bias) if isinstance(layer, nn.Linear) else F.conv2d(
        x, masked, layer.bias, padding=1)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (layer.weight, layer.weight_score), g),
                               torch.autograd.grad(expected, (w, s), g))
    pen = layer.penalty()
    torch.testing.assert_close(pen, (torch.sigmoid(layer.beta * s) / (1 / (1 + math.exp(-layer.s0)))).sum())
    # Ticket: (s > 0) / sigmoid(s0) on the sparse kernels, weight gradient scaled as in the official code.
    layer.set_ticket(True)
    hard = w * (s > 0) / (1 / (1 + math.exp(-layer.s0)))
    expected = F.linear(x, hard, layer.bias) if isinstance(layer, nn.Linear) else F.conv2d(x, hard, layer.bias,
                                                                                           padding=1)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y, layer.weight, g)[0], torch.autograd.grad(expected, w, g)[0])
    assert layer.sparsity == pytest.approx(1 - (s > 0).double().mean().item())
    assert "ticket" in repr(layer)


def test_soft_layer_ticket_mask_follows_device_and_state_dict():
    layer = SoftMaskedLinear(4, 3)
    assert set(layer.state_dict()) == {"weight", "bias", "weight_score"}
    layer.set_ticket(True)
    assert set(layer.state_dict()) == {"weight", "bias", "weight_score"}  # the hard mask is derived, not saved
    layer.ticket = True
    layer._hard_mask = None
    layer(torch.randn(2, 4))  # `ticket` set by hand: the mask is derived on first use
    assert layer._hard_mask is not None


def test_masked_layers_constructors():
    conv = sparseops.MaskedConv2d(2, 3, 3, mask=torch.zeros(3, 2, 3, 3))
    assert conv.sparsity == 1.0 and conv.weight_mask.dtype == torch.bool
    assert torch.equal(conv(torch.randn(1, 2, 5, 5)), conv.bias.view(1, 3, 1, 1).expand(1, 3, 3, 3))
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        sparseops.MaskedConv2d(2, 3, 3, mask=torch.zeros(3, 2))


def _skips_zeros(layer) -> bool:
    """Whether the layer's op runs the masked kernels over the entries whose soft mask is not 0."""
    from sparseops.ops.soft_masked_linear import nonzero_stats

    op = "soft_masked_conv2d" if layer.weight.dim() == 4 else "soft_masked_linear"
    return sparseops.backend.choose(op, layer.weight.device, supported=True,
                                    nonzero=lambda: nonzero_stats(layer.weight_score, layer.beta)) == "skip_zeros"


@pytest.mark.parametrize("make", [lambda: SoftMaskedLinear(40, 30, dtype=torch.float32),
                                  lambda: SoftMaskedConv2d(6, 8, 3, padding=1, dtype=torch.float32)])
def test_soft_mask_skips_exact_zeros_exactly(make):
    """Late in CS's schedule most of sigmoid(beta*s) is exactly 0 in float32: the layer then runs the
    sparse kernels on the rest, with the same outputs and gradients as the dense soft path."""
    layer = make()
    with torch.no_grad():
        layer.weight_score.uniform_(-10.0, 0.02)  # s > -0.444 survives beta = 200: about 4.6%
    layer.beta = 200.0
    assert _skips_zeros(layer)
    x = torch.randn((5, 40) if isinstance(layer, nn.Linear) else (2, 6, 5, 5))
    y = layer(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (layer.weight, layer.weight_score, layer.bias), g)
    with sparseops.backend("reference"):  # the plain soft path
        assert not _skips_zeros(layer)
        y_ref = layer(x)
        ref = torch.autograd.grad(y_ref, (layer.weight, layer.weight_score, layer.bias), g)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)
    layer.beta = 1.0  # early in the schedule nothing underflows: the dense soft path
    assert not _skips_zeros(layer)
