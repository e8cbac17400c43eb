"""Layer gates (sparseops.gates): finding the residual blocks, x + g * F(x) against a plain float64
reference (values and gradients), F not run in forward or backward where g is 0, bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops import gates
from sparseops.tickets.zoo import CSResNet, resnet20

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("build, blocks", [(resnet20, 9), (CSResNet, 9),
                                           (lambda: torchvision.models.resnet18(num_classes=10), 8),
                                           (lambda: torchvision.models.resnet50(num_classes=10), 16)])
def test_layer_gates_find_the_blocks_and_gate_one_changes_nothing(build, blocks):
    model = build().eval()
    plain = copy.deepcopy(model)
    sparseops.patch(model, layer_gates=True)
    assert len(gates.gated_blocks(model)) == blocks
    assert all(float(b.gate) == 1.0 for _, b in gates.gated_blocks(model))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-5)
    assert any(k.endswith(".gate") for k in model.state_dict())


def _counting(module):
    calls = {"forward": 0, "backward": 0}
    module.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    module.register_full_backward_hook(lambda *a: calls.__setitem__("backward", calls["backward"] + 1))
    return calls


@pytest.mark.parametrize("downsample", [False, True])
def test_a_gate_of_zero_skips_the_residual_branch_forward_and_backward(downsample):
    model = resnet20()
    sparseops.patch(model, layer_gates=True)
    block = model[3] if not downsample else model[6]  # stage 1 block 0; stage 2 block 0 (strided, 1x1 shortcut)
    x = torch.randn(2, block.conv1.in_channels, 8, 8, requires_grad=True)
    conv1, conv2 = _counting(block.conv1), _counting(block.conv2)
    block(x).sum().backward()
    assert conv1 == {"forward": 1, "backward": 1} and conv2 == {"forward": 1, "backward": 1}
    block.gate.zero_()
    x.grad = None
    y = block(x)
    y.sum().backward()
    assert conv1 == {"forward": 1, "backward": 1} and conv2 == {"forward": 1, "backward": 1}  # not run again
    torch.testing.assert_close(y, torch.relu(block.shortcut(x)))
    assert block.conv1.weight.grad is not None  # from the first call only
    assert x.grad is not None


def _reference_block(block, x, g):
    """relu(shortcut(x) + g * F(x)) of the zoo's ResNet-20 block, in plain torch."""
    out = F.conv2d(x, block.conv1.weight, None, block.conv1.stride, 1)
    out = torch.relu(F.batch_norm(out, None, None, block.bn1.weight, block.bn1.bias, training=True))
    out = F.batch_norm(F.conv2d(out, block.conv2.weight, None, 1, 1), None, None, block.bn2.weight, block.bn2.bias,
                       training=True)
    short = x if len(block.shortcut) == 0 else block.shortcut(x)
    return torch.relu(short + g * out)


def test_soft_gate_values_and_gradients_match_a_float64_reference():
    model = resnet20().double()
    sparseops.patch(model, layer_gates=True)
    block = model[6]
    gates.attach_gate_score(block, s0=0.5)
    block.gate_beta = 3.0
    with torch.no_grad():
        block.gate_score.fill_(-0.2)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    y = block(x)
    g = torch.sigmoid(3.0 * block.gate_score) / (1 / (1 + math.exp(-0.5)))
    ref = _reference_block(block, x, g)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(y)
    params = [x, block.gate_score, block.conv1.weight, block.bn2.bias]
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # gradcheck on the score (x's gradient is checked against the reference above)
    call = lambda s_: torch.func.functional_call(block, {"gate_score": s_}, (x.detach(),))  # noqa: E731
    assert torch.autograd.gradcheck(call, (block.gate_score.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("beta", [1e4, 50.0])  # underflowed; sigmoid(-50) = 2e-22: normal, but below the cut
def test_an_underflowed_soft_gate_is_exactly_zero_and_skips_the_branch(beta):
    model = resnet20()
    sparseops.patch(model, layer_gates=True)
    block = model[4]
    gates.attach_gate_score(block)
    block.gate_beta = beta
    with torch.no_grad():
        block.gate_score.fill_(-1.0)
    assert block.gate_value().item() == 0.0
    calls = _counting(block.conv1)
    x = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(block(x), torch.relu(x))
    assert calls["forward"] == 0


class _Residual(nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


def test_a_filter_gates_residual_branches_of_other_models():
    model = nn.Sequential(nn.Linear(8, 8), _Residual(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))))
    plain = copy.deepcopy(model)
    sparseops.patch(model, layer_gates=lambda m, name: name == "1.branch")
    assert [n for n, _ in gates.gated_blocks(model)] == ["1.branch"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), plain(x))
    calls = _counting(model[1].branch[0])
    model[1].branch.gate.zero_()
    torch.testing.assert_close(model(x), model[0](x))
    assert calls["forward"] == 0


def test_bad_gates_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"sparseops.patch: layer_gates: 0 \(Conv2d\) maps 3 to 8 channels"):
        sparseops.patch(model, layer_gates=lambda m, name: name == "0")
    assert not gates.gated_blocks(model)
    assert type(model[0]) is nn.Conv2d  # the layers were not patched either
    with pytest.raises(ValueError, match="found no residual block"):
        sparseops.patch(nn.Sequential(nn.Linear(4, 4)), layer_gates=True)
    with pytest.raises(ValueError, match="picked no module"):
        sparseops.patch(nn.Sequential(nn.Linear(4, 4)), layer_gates=lambda m, n: False)
    with pytest.raises(TypeError, match="layer_gates must be True or callable"):
        sparseops.patch(nn.Sequential(nn.Linear(4, 4)), layer_gates="yes")
    # A branch whose output shape differs from its input's is found when it runs.
    odd = nn.Sequential(nn.Sequential(nn.Linear(4, 6)))
    sparseops.patch(odd, layer_gates=lambda m, n: n == "0")
    with pytest.raises(ValueError, match="must keep its input's shape"):
        odd(torch.randn(2, 4))


def test_remove_gates_gives_the_plain_blocks_back():
    model = resnet20()
    sparseops.patch(model, layer_gates=True)
    model[3].gate.zero_()
    with pytest.raises(ValueError, match="gate other than 1"):
        gates.remove_gates(model)
    model[3].gate.fill_(1.0)
    gates.remove_gates(model)
    assert not gates.gated_blocks(model) and type(model[3]).__name__ == "_Block"
    assert not any(k.endswith(".gate") for k in model.state_dict())


def test_soft_gates_below_the_cut_are_exactly_zero_never_subnormal_with_zero_gradient():
    # beta * s from well inside fp32's normal range of sigmoid, across the cut (-43.7), into the range
    # where fp32's sigmoid is subnormal (-87.3 to -103.3) and beyond; scale 1 / sigmoid(0.5)
    z = torch.tensor([2.0, -1.0, -30.0, -43.6, -43.7, -60.0, -90.0, -100.0, -120.0])
    gate = gates.ChannelGate(len(z), s0=0.5)
    with torch.no_grad():
        gate.beta.fill_(4.0)
        gate.score.copy_(z / 4.0)
    g = gate()
    off = z < -63 * math.log(2)  # sigmoid(z) < 2^-63
    assert off.tolist() == [False] * 4 + [True] * 5
    assert (g[off] == 0).all() and gate.off().tolist() == off.tolist()
    assert (g[~off] >= torch.finfo(torch.float32).tiny).all()  # none subnormal
    w = torch.linspace(0.5, 2.0, len(z))
    (g * w).sum().backward()
    grad = gate.score.grad
    assert torch.isfinite(grad).all() and (grad[off] == 0).all()
    # the kept gates and their gradients are sigmoid's, against float64
    z64 = (4.0 * gate.score.detach().double()).requires_grad_()
    ref = torch.sigmoid(z64) * (1 + math.exp(-0.5))
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(g[~off].double(), ref[~off].detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[~off].double(), 4.0 * z64.grad[~off], rtol=1e-5, atol=0)
    # gradcheck in float64 on either side of the cut (the cut itself is a step)
    s = torch.tensor([0.3, -2.0, -10.0, -12.0, -30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s_: gates.soft_gate(4.0, s_, 0.5), (s,))
