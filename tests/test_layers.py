"""The nn layers: MaskedConv2d and the soft-masked (Continuous Sparsification) layers against the reference
(the op functions themselves are tested in tests/test_<op>.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops import SoftMaskedConv2d, SoftMaskedLinear

from cases import LAYER_CONV_CASES

CONV_CASES = LAYER_CONV_CASES


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
