"""Structured Continuous Sparsification: the units found by tracing, gates exactly 0 turned into masks
without changing any value or gradient (float64), gradients through the channel gates, bad input,
the schedule, the random channel baseline, and a search on scikit-learn's digits."""
import argparse
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparseops import gates
from sparseops.tickets import apply_gates, get_gates, random_gates, structured_cs
from sparseops.tickets.command import add_arguments, resolve
from sparseops.tickets.gating import prepare
from sparseops.tickets.structured_cs import _Temperature
from sparseops.tickets.train import Trainer
from sparseops.tickets.zoo import build_model, load_digits, resnet20, vgg16

from conftest import one_thread


def test_units_of_vgg16_and_resnet20():
    s = prepare(vgg16(), torch.randn(2, 3, 32, 32))
    assert [u.name for u in s.units] == ["0", "3", "7", "10", "14", "17", "20", "24", "27", "30", "34", "37", "40"]
    assert [u.gate_at for u in s.units][:3] == ["1", "4", "8"]  # after each conv's batch norm
    assert [list(u.readers) for u in s.units][:3] == [["3"], ["7"], ["10"]]  # through ReLU and max-pooling
    assert torch.equal(s.units[-1].readers["45"], torch.arange(512))  # through avg-pool and flatten
    s = prepare(resnet20(), torch.randn(2, 3, 32, 32))
    assert len(s.units) == 21 and len(s.blocks) == 9
    by = {u.name: u for u in s.units}
    assert list(by["3.conv1"].readers) == ["3.conv2"]  # through the block's functional relu
    assert by["3.conv2"].readers == {}  # into the residual sum: no layer reads it alone
    assert list(by["0"].readers) == ["3.conv1"]


def test_flatten_maps_each_feature_to_its_channel():
    s = prepare(build_model("lenet5"), torch.randn(2, 64))
    assert torch.equal(s.units[1].readers["7"], torch.arange(32).repeat_interleave(16))


def _small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(12, 5))


def _force_off(structure, off):
    """Gates exactly 0 (sigmoid underflow) at the channels `off` marks, per unit."""
    with torch.no_grad():
        for g, o in zip(structure.channel_gates(), off):
            g.score.copy_(torch.where(o, -1.0, 0.3).to(g.score.dtype))
            g.beta.fill_(2000.0)


def test_gates_exactly_zero_become_masks_and_change_nothing():
    torch.manual_seed(0)
    net = _small_net().double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    s = prepare(net, x)
    off = [torch.tensor([1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool), torch.zeros(12, dtype=torch.bool)]
    off[1][[2, 5]] = True
    _force_off(s, off)
    twin = copy.deepcopy(net)
    s.sync()  # masks from the gates
    conv0, conv1 = net[0].weight_mask, net[4].weight_mask
    assert torch.equal(conv0.flatten(1).any(1), ~off[0]) and torch.equal(conv1.flatten(1).any(1), ~off[1])
    assert torch.equal(conv1.transpose(0, 1).flatten(1).any(1), ~off[0])  # its columns for the channels off
    assert torch.equal(net[9].weight_mask.any(0), ~off[1])
    assert twin[0].weight_mask.all()  # the copy multiplies by the gates only
    outs = []
    for model in (net, twin):
        loss = nn.functional.cross_entropy(model(x), y) + 0.1 * _gate_sum(model)
        grads = torch.autograd.grad(loss, [model[0].weight, model[4].weight, model[1].channel_gate.score,
                                           model[9].weight])
        outs.append((loss, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _gate_sum(model):
    return sum(m.channel_gate().sum() for m in model.modules() if hasattr(m, "channel_gate"))


def test_channel_gate_gradients_match_gradcheck_in_float64():
    torch.manual_seed(0)
    net = _small_net().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    prepare(net, x)
    with torch.no_grad():
        net[5].channel_gate.beta.fill_(1.7)
    gate = net[5].channel_gate
    call = lambda s_: torch.func.functional_call(gate, {"score": s_}, ())  # noqa: E731
    assert torch.autograd.gradcheck(call, (torch.randn(12, dtype=torch.float64, requires_grad=True),))
    # through the model: d output / d score against finite differences
    f = lambda s_: torch.func.functional_call(net, {"5.channel_gate.score": s_}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (torch.randn(12, dtype=torch.float64, requires_grad=True),))


def test_bad_input():
    s = prepare(_small_net(), torch.randn(2, 3, 8, 8))
    chosen = get_gates(s)
    chosen["channels"]["0"] = torch.ones(8, dtype=torch.bool)
    chosen["channels"]["4"] = torch.zeros(12, dtype=torch.bool)
    with pytest.raises(ValueError, match="unit 4 keeps no channel"):
        apply_gates(s, chosen)
    chosen["channels"]["4"] = torch.ones(11, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"gates\['channels'\]\['4'\] must be a bool tensor of shape \(12,\)"):
        apply_gates(s, chosen)
    with pytest.raises(ValueError, match="must name the units"):
        apply_gates(s, {"channels": {}, "blocks": {}})
    data = (torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))
    for kwargs, match in (({"temperature": "cold"}, "temperature must be one of"),
                          ({"rewind_epoch": 2, "epochs": 2}, r"rewind_epoch \(2\) must be < epochs"),
                          ({"lmbda": -1.0}, "lmbda must be >= 0"), ({"keep_min": -1}, "keep_min must be")):
        with pytest.raises(ValueError, match=match):
            structured_cs(_small_net(), data, **{"epochs": 3, **kwargs}, progress=False)
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    grouped(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="grouped convolution"):
        prepare(grouped, torch.randn(1, 4, 5, 5))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) if x.sum() > 0 else x)

    with pytest.raises(ValueError, match="cannot be traced by torch.fx"):
        prepare(Branchy(), torch.randn(2, 4))


def test_per_unit_temperature_rises_only_where_the_hard_gate_held():
    s = prepare(_small_net(), torch.randn(2, 3, 8, 8))
    t = _Temperature(s, 2.0, "per_unit")
    g = s.channel_gates()[0]
    with torch.no_grad():
        g.score.copy_(torch.tensor([1.0, -1.0] * 4))
    t.last = t.signs()
    with torch.no_grad():
        g.score[0] = -1.0  # channel 0 flips
    t.step()
    assert g.beta.tolist() == [1.0] + [2.0] * 7
    t_global = _Temperature(s, 3.0, "global")
    t_global.step()
    assert bool((g.beta == 3.0).all())


def test_flops_weights_are_each_units_macs_over_the_mean():
    s = prepare(vgg16(), torch.randn(1, 3, 32, 32))
    unit_w, _ = s.penalty_weights(flops=True)
    macs = torch.cat([u.macs for u in s.units])
    torch.testing.assert_close(torch.cat(unit_w).double(), macs / macs.mean(), rtol=1e-6, atol=0)
    # the first conv's channel: 3*3*3 MACs at each of 32*32 positions, and its 64*3*3 in conv "3"
    assert float(s.units[0].macs[0]) == 27 * 1024 + 64 * 9 * 1024


def test_random_gates_keep_as_many_channels_per_unit_elsewhere():
    s = prepare(_small_net(), torch.randn(2, 3, 8, 8))
    chosen = {"channels": {"0": torch.arange(8) < 3, "4": torch.arange(12) < 5}, "blocks": {}}
    rnd = random_gates(chosen, generator=torch.Generator().manual_seed(1))
    assert [int(v.sum()) for v in rnd["channels"].values()] == [3, 5]
    assert any(not torch.equal(rnd["channels"][k], chosen["channels"][k]) for k in chosen["channels"])
    apply_gates(s, rnd)
    assert torch.equal(s.model[4].weight_mask.flatten(1).any(1), rnd["channels"]["4"])
    data = (torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))
    Trainer(data, data, epochs=1, batch_size=8)(s.model)  # the baseline trains as any masked model


def test_structured_cs_on_digits_keeps_half_the_channels_within_two_points():
    train, test = load_digits()
    with one_thread():
        torch.manual_seed(0)
        dense = Trainer(train, test, epochs=6, batch_size=64, lr=0.05, momentum=0.9, nesterov=True,
                        weight_decay=1e-4)(build_model("mlp"))["accuracy"]
        torch.manual_seed(0)
        model = build_model("mlp")
        result = structured_cs(model, train, test, rounds=1, epochs=6, batch_size=64, lr=0.05, lmbda=3e-4,
                               rewind_epoch=1, progress=False)
    ticket = result.levels[-1]
    assert ticket.metrics["kept_channels"] <= 0.5, ticket.metrics["kept_channels"]
    assert ticket.metrics["accuracy"] >= dense - 0.02, (ticket.metrics["accuracy"], dense)
    kept = {k: torch.tensor(v) for k, v in ticket.metrics["gates"]["channels"].items()}
    assert set(kept) == {"0", "2"}  # the hidden layers; never the output layer
    # The model is the ticket: pruned rows, and the reader's columns, masked; hard gates.
    assert torch.equal(model[0].weight_mask.any(1), kept["0"])
    assert torch.equal(model[2].weight_mask.any(0), kept["0"]) and torch.equal(model[4].weight_mask.any(0), kept["2"])
    assert not model[0].channel_gate.soft
    assert torch.equal(ticket.masks["2"], model[2].weight_mask)


def test_skipping_zero_units_gives_the_search_of_mask_multiplication():
    train, test = load_digits()
    train, test = (train[0][:256].double(), train[1][:256]), (test[0].double(), test[1])
    runs = []
    with one_thread():
        for skip in (True, False):
            torch.manual_seed(0)
            model = build_model("mlp").double()
            runs.append(structured_cs(model, train, test, rounds=2, epochs=4, batch_size=64, lr=0.05, lmbda=3e-3,
                                      final_temp=1e4, rewind_epoch=1, skip_zero_units=skip, progress=False))
    a, b = runs
    assert any(h["channels_off"] > 0 for r in a.levels for h in r.metrics["history"])  # zeros were skipped
    for ra, rb in zip(a.levels, b.levels):
        assert ra.metrics["gates"] == rb.metrics["gates"]
        assert ra.metrics["accuracy"] == rb.metrics["accuracy"]
        for ha, hb in zip(ra.metrics["history"], rb.metrics["history"]):
            assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-9)


def test_a_structured_search_gates_resnet_blocks():
    data = (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    model = resnet20()
    with one_thread():
        result = structured_cs(model, data, data, rounds=1, epochs=2, batch_size=8, lr=0.01, lmbda=1e-3,
                               rewind_epoch=0, flops_weighted=True, temperature="per_unit", progress=False)
    ticket = result.levels[-1].metrics
    assert len(ticket["gates"]["blocks"]) == 9 and len(ticket["gates"]["channels"]) == 21
    assert 0 < ticket["macs_kept"] <= 1
    blocks = gates.gated_blocks(model)
    assert all(not b.gate_soft for _, b in blocks)
    blocks[0][1].gate.zero_()  # a block switched off in the ticket is skipped
    calls = []
    blocks[0][1].conv1.register_forward_hook(lambda *a: calls.append(1))
    model(data[0][:2])
    assert not calls


def test_cli_runs_a_structured_search(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "sparseops", "ticket", "--method", "structured-cs", "--model", "mlp",
                          "--epochs", "3", "--rounds", "1", "--rewind-epoch", "1", "--flops-weighted",
                          "--temperature", "per_unit", "--no-progress", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Structured Continuous Sparsification on digits with mlp" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["args"]["lmbda"] == 1e-3  # structured-cs's own default, not CS's 1e-8
    ticket = result["levels"][-1]
    assert set(ticket["gates"]["channels"]) == {"0", "2"} and 0 < ticket["kept_channels"] <= 1
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match="has no preset"):
        resolve(parser.parse_args(["--method", "structured-cs", "--preset", "cs_resnet_20"]))


def test_mask_sync_writes_only_the_layers_whose_channels_changed(monkeypatch):
    """A mask write is a pass over the weight (and a new layout): while gates die one step at a time,
    only the unit's layer and its readers are written, and with the same masks as a full rewrite."""
    net = _small_net()
    s = prepare(net, torch.randn(2, 3, 8, 8))
    s.sync()
    off = [torch.zeros(8, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)]
    off[1][3] = True  # the second conv's channel 3: its row and the linear layer's column 3
    _force_off(s, off)
    written = []
    for name in ("0", "4", "9"):
        real = net[int(name)].set_mask
        monkeypatch.setattr(net[int(name)], "set_mask", lambda m, real=real, name=name: written.append(name) or real(m))
    s.sync()
    assert sorted(written) == ["4", "9"]
    assert not net[4].weight_mask[3].any() and not net[9].weight_mask[:, 3].any()
    assert net[4].weight_mask.sum() == 11 * 8 * 9 and net[0].weight_mask.all()
