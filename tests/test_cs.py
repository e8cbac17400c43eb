"""Continuous Sparsification: step for step against a plain reimplementation of the official code,
bad input, and a ticket search on scikit-learn's digits."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseops import SoftMaskedLinear
from sparseops.tickets import continuous_sparsification, get_masks, sparsity_report
from sparseops.tickets.cs import default_milestones
from sparseops.tickets.train import batches
from sparseops.tickets.zoo import build_model, load_digits


class OfficialSoftLinear(nn.Module):
    """The official SoftMaskedConv2d (models/layers.py), written for a linear layer with a bias."""

    def __init__(self, linear, s0):
        super().__init__()
        self.s0 = s0
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.mask_weight = nn.Parameter(torch.full_like(self.weight, s0))

    def compute_mask(self, temp, ticket):
        scaling = 1.0 / (1.0 / (1.0 + math.exp(-self.s0)))
        mask = (self.mask_weight > 0).to(self.weight.dtype) if ticket else torch.sigmoid(temp * self.mask_weight)
        return scaling * mask

    def prune(self, temp):
        self.mask_weight.data = torch.clamp(temp * self.mask_weight.data, max=self.s0)

    def forward(self, x, temp, ticket):
        self.mask = self.compute_mask(temp, ticket)
        return F.linear(x, self.weight * self.mask, self.bias)


def official_cs(model, data, *, rounds, epochs, lr, decay, lmbda, final_temp, rewind_epoch, s0, batch_size,
                schedule=(56, 71), drops=(0.1, 0.1)):
    """main.py of the official code (as it runs under Python 2), on an nn.Sequential of Linear/ReLU
    layers; returns the masks per round and each epoch's mean loss as main.py computes it."""
    layers = nn.ModuleList(OfficialSoftLinear(m, s0) if isinstance(m, nn.Linear) else m for m in model)
    masked = [m for m in layers if isinstance(m, OfficialSoftLinear)]
    state = {"temp": 1.0, "ckpt": None}
    losses = []

    def forward(x, ticket):
        for m in layers:
            x = m(x, state["temp"], ticket) if isinstance(m, OfficialSoftLinear) else m(x)
        return x

    def train(outer_round, optimizers, ticket):
        for epoch in range(epochs):
            if epoch > 0:
                state["temp"] *= temp_increase
            if outer_round == 0 and epoch == rewind_epoch and not ticket:
                state["ckpt"] = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in masked]
            lr_now = lr
            for drop, step in zip(drops, schedule):
                if epoch >= step:
                    lr_now *= drop
                else:
                    break
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = lr_now
            total, count = 0.0, 0
            for x, y in batches(data, batch_size, shuffle=True):
                for opt in optimizers:
                    opt.zero_grad()
                out = forward(x, ticket)
                loss = F.cross_entropy(out, y) + lmbda * sum(m.mask.sum() for m in masked)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                total, count = total + float(loss.detach()) * len(y), count + len(y)
            losses.append(total / count)
        return [(m.mask_weight > 0).clone() for m in masked]

    temp_increase = final_temp ** (1.0 / (epochs - 1))
    weight_params = [p for m in masked for p in (m.weight, m.bias)]
    mask_params = [m.mask_weight for m in masked]
    optimizers = [torch.optim.SGD(weight_params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay),
                  torch.optim.SGD(mask_params, lr=lr, momentum=0.9, nesterov=True)]
    per_round = []
    for r in range(rounds):
        per_round.append(train(r, optimizers, False))
        state["temp"] = 1.0
        if r != rounds - 1:
            for m in masked:
                m.prune(state["temp"])
    with torch.no_grad():
        for m, (w, b) in zip(masked, state["ckpt"], strict=True):
            m.weight.copy_(w)
            m.bias.copy_(b)
    optimizers = [torch.optim.SGD(weight_params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)]
    per_round.append(train(rounds - 1, optimizers, True))
    return per_round, masked, losses


def test_cs_matches_the_official_algorithm_step_for_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    plain = copy.deepcopy(model)
    kw = dict(rounds=2, epochs=4, lr=0.15, lmbda=1e-3, final_temp=50.0, rewind_epoch=1, s0=-0.02, batch_size=16)
    torch.manual_seed(1)  # mask_lr left out: main.py's mask optimiser takes lr; per-drop factors as main.py
    result = continuous_sparsification(model, (x, y), weight_decay=1e-3, lr_milestones=[3, 2], lr_drops=[0.2, 0.5],
                                       progress=False, **kw)
    torch.manual_seed(1)
    expected, official, losses = official_cs(plain, (x, y), decay=1e-3, schedule=(2, 3), drops=(0.5, 0.2), **kw)
    assert [r.level for r in result.levels] == [0, 1, 2]
    for r, masks in zip(result.levels, expected, strict=True):
        assert [torch.equal(r.masks[k], m) for k, m in zip(("0", "2"), masks, strict=True)] == [True, True]
    ours = [model[0], model[2]]
    for a, b in zip(ours, official, strict=True):
        torch.testing.assert_close(a.weight_score, b.mask_weight)
        torch.testing.assert_close(a.weight, b.weight)
        torch.testing.assert_close(a.bias, b.bias)
        assert a.ticket
    kept = sum(int(m.sum()) for m in expected[-1])
    assert 0 < kept < 16 * 10 + 3 * 16  # the toy problem really prunes, and keeps something
    history = result.levels[0].metrics["history"]
    assert history[-1]["beta"] == pytest.approx(50.0) and history[0]["beta"] == 1.0
    assert [h["lr"] for h in history] == pytest.approx([0.15, 0.15, 0.075, 0.015])
    # the logged loss is main.py's, the ticket phase's constant lmbda * sum(mask) included
    logged = [h["loss"] for r in result.levels for h in r.metrics["history"]]
    assert logged == pytest.approx(losses, rel=1e-9)
    ticket_constant = 1e-3 * kept / torch.sigmoid(torch.tensor(-0.02, dtype=torch.float64)).item()
    assert ticket_constant > 1e-6 * losses[-1]  # leaving it out would fail the comparison


def test_cs_defaults_follow_main_py():
    """Milestones stay at epochs 56 and 71 whatever the epoch count; the mask lr follows lr."""
    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    result = continuous_sparsification(nn.Sequential(nn.Linear(4, 3)), data, rounds=1, epochs=3, rewind_epoch=0,
                                       lr=0.3, progress=False)
    assert [h["lr"] for h in result.levels[0].metrics["history"]] == [0.3, 0.3, 0.3]
    assert default_milestones(85) == [56, 71] and default_milestones(10) == [7, 8]


def test_clamp_with_final_beta_follows_the_paper():
    layer = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    continuous_sparsification(layer, (x, y), rounds=2, epochs=2, rewind_epoch=0, final_temp=10.0, lr=0.5,
                              mask_lr=0.5, clamp_with_final_beta=True, progress=False)
    assert isinstance(layer[0], SoftMaskedLinear) and layer[0].ticket


def test_cs_bad_input():
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="epochs must be an integer >= 2"):
        continuous_sparsification(nn.Linear(4, 3), data, epochs=1, progress=False)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        continuous_sparsification(nn.Linear(4, 3), data, rounds=0, progress=False)
    with pytest.raises(ValueError, match="rewind_epoch"):
        continuous_sparsification(nn.Linear(4, 3), data, epochs=3, rewind_epoch=3, progress=False)
    with pytest.raises(ValueError, match="final_temp must be positive"):
        continuous_sparsification(nn.Linear(4, 3), data, final_temp=0, progress=False)
    with pytest.raises(ValueError, match="lmbda must be >= 0"):
        continuous_sparsification(nn.Linear(4, 3), data, lmbda=-1, progress=False)
    with pytest.raises(ValueError, match="no layer sparseops can soft-mask"):
        continuous_sparsification(nn.Sequential(nn.ReLU()), data, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        continuous_sparsification("mlp", data, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        continuous_sparsification(nn.Linear(4, 3), 5, epochs=2, rewind_epoch=0, progress=False)


def test_cs_on_digits_finds_a_sparse_ticket():
    train, test = load_digits(0)
    torch.manual_seed(0)
    model = build_model("lenet300")
    result = continuous_sparsification(model, train, test, rounds=3, epochs=10, batch_size=64, lr=0.05,
                                       mask_lr=0.05, s0=-0.05, progress=False)
    ticket = result.levels[-1]
    assert ticket.sparsity >= 0.9 and ticket.metrics["accuracy"] >= 0.93
    assert sparsity_report(model).sparsity == pytest.approx(ticket.sparsity)
    assert all(torch.equal(get_masks(model)[k], ticket.masks[k]) for k in ticket.masks)
