"""Ticket search: pruning rules, IMP with rewinding (against a plain reimplementation), resume, mask
tools, baselines, the CLI, and an end-to-end search on scikit-learn's digits."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops import tickets
from sparseops.tickets import Ticket, Trainer, get_masks, imp, set_masks
from sparseops.tickets.zoo import build_model, load_digits

ROOT = os.path.dirname(os.path.dirname(sparseops.__file__))


def mlp():
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3))


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


# ------------------------------------------------------------------------------------------------
# Pruning


def open_lth_global(weights: dict, masks: dict, fraction: float) -> dict:
    """open_lth's sparse_global strategy, in numpy, as its code reads."""
    remaining = int(np.sum([np.sum(v) for v in masks.values()]))
    n = np.ceil(fraction * remaining).astype(int)
    vector = np.concatenate([v[masks[k] == 1] for k, v in weights.items()])
    threshold = np.sort(np.abs(vector))[n]
    return {k: np.where(np.abs(v) > threshold, masks[k], np.zeros_like(v)) for k, v in weights.items()}


def test_magnitude_masks_follow_open_lth():
    model = sparseops.patch(mlp())
    g = torch.Generator().manual_seed(3)
    set_masks(model, {k: torch.rand(m.shape, generator=g) > 0.3 for k, m in get_masks(model).items()})
    weights = {k: m.weight.detach().numpy() for k, m in model.named_modules() if k in get_masks(model)}
    current = {k: v.numpy().astype(np.float32) for k, v in get_masks(model).items()}
    expected = open_lth_global(weights, current, 0.2)
    ours = tickets.magnitude_masks(model, 0.2)
    for k in expected:
        assert np.array_equal(ours[k].numpy(), expected[k].astype(bool)), k
    kept_before = sum(int(v.sum()) for v in current.values())
    kept_after = sum(int(v.sum()) for v in ours.values())
    assert kept_after == kept_before - math.ceil(0.2 * kept_before) - 1  # open_lth's rule drops one more


def test_layerwise_random_and_score_masks():
    model = sparseops.patch(mlp())
    lw = tickets.magnitude_masks(model, 0.5, scope="layerwise", exclude=["4"], budget="prunable")
    for k, m in lw.items():
        expected_kept = m.numel() if k == "4" else m.numel() - math.ceil(0.5 * m.numel()) - 1
        assert int(m.sum()) == expected_kept
        if k != "4":  # the kept weights are the largest of their layer
            w = dict(model.named_modules())[k].weight.detach().abs()
            assert w[m].min() > w[~m].max()
    # budget "all": layers 0 and 2 lose the share that removes half of all 564 weights, layer 4's included
    share = 0.5 * 564 / (240 + 288)
    lw_all = tickets.magnitude_masks(model, 0.5, scope="layerwise", exclude=["4"])
    for k, n in (("0", 240), ("2", 288)):
        assert int(lw_all[k].sum()) == n - math.ceil(share * n) - 1
    rnd = tickets.random_masks(model, 0.5, generator=torch.Generator().manual_seed(0), budget="prunable")
    assert all(int(rnd[k].sum()) == int(lw[k].sum()) for k in ("0", "2"))  # same per-layer fractions
    assert not torch.equal(rnd["0"], lw["0"])
    scores = {"2": torch.arange(24 * 12, dtype=torch.float32).view(12, 24)}
    sm = tickets.score_masks(model, scores, 0.25, budget="prunable")  # 25% of layer 2's 288
    assert torch.equal(sm["2"].flatten(), torch.arange(288) > 72) and bool(sm["0"].all())
    sm = tickets.score_masks(model, scores, 0.25)  # open_lth: 25% of all 564 kept weights, from layer 2
    assert torch.equal(sm["2"].flatten(), torch.arange(288) > math.ceil(0.25 * 564)) and bool(sm["0"].all())


def test_pruning_bad_input():
    model = sparseops.patch(mlp())
    for rate in (0, 1, -0.1, 1.5, True, "0.2", float("nan")):
        with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\)"):
            tickets.magnitude_masks(model, rate)
    with pytest.raises(ValueError, match="scope must be one of"):
        tickets.magnitude_masks(model, 0.2, scope="row")
    with pytest.raises(ValueError, match=r"exclude names \['fc'\]"):
        tickets.magnitude_masks(model, 0.2, exclude=["fc"])
    with pytest.raises(ValueError, match="has no masked layers"):
        tickets.magnitude_masks(mlp(), 0.2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tickets.magnitude_masks({"0": 1}, 0.2)
    with pytest.raises(ValueError, match=r"scores\['0'\] must be a tensor of shape \(24, 10\)"):
        tickets.score_masks(model, {"0": torch.ones(3)}, 0.2)
    with pytest.raises(ValueError, match="NaN"):
        tickets.score_masks(model, {"0": torch.full((24, 10), float("nan"))}, 0.2)
    with pytest.raises(ValueError, match="not prunable layers"):
        tickets.score_masks(model, {"9": torch.ones(2)}, 0.2)


# ------------------------------------------------------------------------------------------------
# IMP


def plain_imp(model, data, levels, rate, epochs, rewind_iters):
    """IMP with rewinding written out with plain torch: mask multiplication, open_lth's pruning rule,
    every level trained from the rewind point to the end with a fresh optimiser."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    mods = dict(model.named_modules())
    masks = {n: torch.ones_like(mods[n].weight, dtype=torch.bool) for n in names}
    rewind, out = None, []
    for level in range(levels + 1):
        if level > 0:
            w = {n: mods[n].weight.detach().numpy() for n in names}
            new = open_lth_global(w, {n: masks[n].numpy().astype(np.float32) for n in names}, rate)
            masks = {n: torch.from_numpy(new[n].astype(bool)) for n in names}
            model.load_state_dict(rewind)
        if rewind_iters == 0 and level == 0:
            rewind = copy.deepcopy(model.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        it = 0
        for _ in range(epochs):
            for x, y in tickets.train.batches(data, 16, shuffle=True):
                if level > 0 and it < rewind_iters:  # open_lth: later levels start at the rewind point
                    it += 1
                    continue
                opt.zero_grad()
                h = x
                for n, m in model.named_children():
                    h = F.linear(h, m.weight * masks[n], m.bias) if n in masks else m(h)
                F.cross_entropy(h, y).backward()
                opt.step()
                it += 1
                if level == 0 and it == rewind_iters and rewind_iters > 0:
                    rewind = copy.deepcopy(model.state_dict())
                    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # open_lth's level 0 starts here
        out.append({n: m.clone() for n, m in masks.items()})
    return out, model


@pytest.mark.parametrize("rewind", [0, 3])
def test_imp_masks_equal_a_plain_reimplementation(rewind):
    data = toy_data()
    torch.manual_seed(0)
    model = mlp().double()
    base = copy.deepcopy(model)
    trainer = Trainer(data, epochs=2, batch_size=16, lr=0.1, momentum=0.9)
    data64 = (data[0].double(), data[1])
    trainer.train_data = data64
    torch.manual_seed(1)
    result = imp(model, trainer, levels=3, rate=0.3, rewind=rewind, progress=False)
    torch.manual_seed(1)
    expected, plain = plain_imp(base, data64, 3, 0.3, 2, rewind)
    assert [r.level for r in result.levels] == [0, 1, 2, 3]
    for r, masks in zip(result.levels, expected, strict=True):
        for k in masks:
            assert torch.equal(r.masks[k], masks[k]), (r.level, k)
        assert r.sparsity == pytest.approx(1 - sum(int(m.sum()) for m in masks.values()) / sum(
            m.numel() for m in masks.values()))
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_rewind_point_by_iteration_and_epoch():
    seen = {}

    def train_fn(model, level):
        for epoch in range(3):
            for it in range(4):
                with torch.no_grad():
                    model[0].weight.add_(1.0)
                seen[(level.index, epoch, it)] = model[0].weight.detach().clone()
                level.step()
            level.end_epoch()
        return {"accuracy": 0.5}

    for rewind, key in (("6it", (0, 1, 1)), ("2ep", (0, 1, 3)), (5, (0, 1, 0))):
        model = mlp()
        result = imp(model, train_fn, levels=1, rewind=rewind, progress=False)
        level1_first = seen[(1, 0, 0)]  # one +1 step after the rewind
        torch.testing.assert_close(level1_first - 1.0, seen[key])
        assert result.levels[1].metrics == {"accuracy": 0.5}


def test_imp_errors():
    def no_steps(model, level):
        return None

    with pytest.raises(RuntimeError, match="before the rewind point '2ep'"):
        imp(mlp(), no_steps, levels=1, rewind="2ep", progress=False)
    with pytest.raises(ValueError, match="levels must be an integer >= 1"):
        imp(mlp(), no_steps, levels=0, progress=False)
    with pytest.raises(ValueError, match="rate must be a number"):
        imp(mlp(), no_steps, levels=2, rate=1.0, progress=False)
    with pytest.raises(ValueError, match="rewind must be"):
        imp(mlp(), no_steps, levels=2, rewind="3 steps", progress=False)
    with pytest.raises(TypeError, match="train_fn must be callable"):
        imp(mlp(), None, levels=2, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        imp(object(), no_steps, levels=2, progress=False)
    with pytest.raises(ValueError, match="exclude names"):
        imp(mlp(), no_steps, levels=2, exclude=["nope"], progress=False)
    with pytest.raises(ValueError, match="scope must be one of"):
        imp(mlp(), no_steps, levels=2, scope="row", progress=False)
    with pytest.raises(TypeError, match="must return a dict"):
        imp(mlp(), lambda m, lv: 0.5, levels=1, progress=False)


def test_interrupted_search_resumes_with_the_same_result(tmp_path):
    data = toy_data()

    def run(checkpoint_dir, fail_at=None):
        torch.manual_seed(0)
        model = mlp()
        trainer = Trainer(data, data, epochs=2, batch_size=16, lr=0.1)

        def train_fn(m, level):
            if level.index == fail_at:
                raise KeyboardInterrupt
            return trainer(m, level)

        return imp(model, train_fn, levels=4, rewind="2it", checkpoint_dir=checkpoint_dir, progress=False), model

    full, full_model = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, fail_at=2)
    assert sorted(os.listdir(tmp_path)) == ["level_000.pt", "level_001.pt"]
    resumed, resumed_model = run(tmp_path)
    assert [r.level for r in resumed.levels] == [0, 1, 2, 3, 4]
    for a, b in zip(full.levels, resumed.levels, strict=True):
        assert a.sparsity == b.sparsity and a.metrics["accuracy"] == b.metrics["accuracy"]
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    for k, v in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="other settings"):
        imp(mlp(), Trainer(data, epochs=1), levels=4, rate=0.5, rewind="2it", checkpoint_dir=tmp_path,
            progress=False)


def test_imp_on_digits_reaches_90_percent_sparsity_near_dense_accuracy():
    """LeNet-300-100 on digits: 11 levels at 0.2 = 91.4% sparsity within 2 points of level 0."""
    train, test = load_digits(0)
    torch.manual_seed(0)
    result = imp(build_model("lenet300"), Trainer(train, test, epochs=10, batch_size=64, lr=0.05,
                                                  weight_decay=1e-4), levels=11, progress=False)
    dense, last = result.levels[0], result.levels[-1]
    assert last.sparsity >= 0.9
    assert last.metrics["accuracy"] >= dense.metrics["accuracy"] - 0.02
    assert dense.metrics["accuracy"] > 0.93
    random = imp(build_model("lenet300"), Trainer(train, test, epochs=10, batch_size=64, lr=0.05,
                                                  weight_decay=1e-4), levels=11, pruning="random",
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert random.levels[-1].sparsity == pytest.approx(last.sparsity, abs=0.01)
    assert "level | sparsity | accuracy" in result.table()


# ------------------------------------------------------------------------------------------------
# Mask tools and baselines


def test_mask_algebra():
    a = {"x": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), "y": torch.tensor([True, False])}
    b = {"x": torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), "y": torch.tensor([False, False])}
    assert tickets.union(a, b)["x"].tolist() == [[True, True, True, False]]
    assert tickets.intersection(a, b)["x"].tolist() == [[True, False, False, False]]
    assert tickets.difference(a, b)["x"].tolist() == [[False, True, False, False]]
    ov = tickets.overlap(a, b)
    assert ov["layers"] == {"x": pytest.approx(1 / 3), "y": 0.0} and ov["total"] == pytest.approx(1 / 4)
    assert tickets.overlap(b, b)["total"] == 1.0
    assert tickets.overlap({"z": torch.zeros(3, dtype=torch.bool)}, {"z": torch.zeros(3)})["total"] == 1.0
    with pytest.raises(ValueError, match="different layers"):
        tickets.union(a, {"x": a["x"]})
    with pytest.raises(ValueError, match="layer x has shape"):
        tickets.union(a, {"x": torch.ones(4, dtype=torch.bool), "y": a["y"]})
    with pytest.raises(TypeError, match="mapping of layer name"):
        tickets.union(a, [1, 2])


def test_sparsity_report():
    model = sparseops.patch(mlp())
    model[0].weight_mask[:12] = False
    rep = tickets.sparsity_report(model)
    assert rep.layers["0"] == {"shape": [24, 10], "kept": 120, "total": 240, "sparsity": 0.5}
    assert rep.total == 240 + 288 + 36 and rep.kept == rep.total - 120
    assert rep.to_dict()["sparsity"] == pytest.approx(120 / rep.total)
    text = str(rep)
    assert "layer" in text.splitlines()[0] and "50.00%" in text and text.splitlines()[-1].startswith("total")


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9, 3), (3, 2, 3, 3), (0, 4)])
def test_bit_packing_round_trips(shape):
    m = torch.rand(shape) > 0.5
    packed = tickets.masks.pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
    assert torch.equal(tickets.masks.unpack_bits(packed, shape), m)
    if m.numel():
        assert torch.equal(packed, torch.from_numpy(np.packbits(m.flatten().numpy())))


def test_ticket_export_load_and_apply(tmp_path):
    model = sparseops.patch(mlp())
    set_masks(model, tickets.random_masks(model, 0.7, generator=torch.Generator().manual_seed(0)))
    ticket = Ticket.from_model(model, method="test", accuracy=0.5, levels=[1, 2])
    path = tmp_path / "t.pt"
    ticket.save(path)
    raw = torch.load(path, weights_only=True)  # plain tensors and values: safe to load
    assert raw["format"] == "sparseops.ticket" and raw["masks"]["0"]["bits"].dtype == torch.uint8
    assert os.path.getsize(path) < 4000
    loaded = Ticket.load(path)
    assert loaded.metadata == {"method": "test", "accuracy": 0.5, "levels": [1, 2]}
    assert all(torch.equal(loaded.masks[k], ticket.masks[k]) for k in ticket.masks)
    assert loaded.sparsity == pytest.approx(ticket.sparsity)
    fresh = loaded.apply(mlp())  # a fresh model of the same architecture: patched as needed
    assert isinstance(fresh[0], sparseops.MaskedLinear)
    assert all(torch.equal(get_masks(fresh)[k], ticket.masks[k]) for k in ticket.masks)
    with pytest.raises(ValueError, match=r"no layer named \['9'\]"):
        set_masks(mlp(), {"9": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"the mask for 0 has shape \(2, 2\)"):
        set_masks(mlp(), {"0": torch.ones(2, 2)}, strict=False)
    with pytest.raises(ValueError, match="no mask given for layers"):
        set_masks(sparseops.patch(mlp()), {"0": torch.ones(24, 10)})
    with pytest.raises(ValueError, match="cannot be masked"):
        set_masks(nn.Sequential(nn.Embedding(3, 4)), {"0": torch.ones(3, 4)})
    with pytest.raises(TypeError, match="plain values"):
        Ticket(ticket.masks, {"fn": print}).save(tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sparseops ticket"):
        Ticket.load(tmp_path / "other.pt")


def test_baselines():
    model = sparseops.patch(mlp())
    set_masks(model, tickets.magnitude_masks(model, 0.6, scope="layerwise"))
    ticket = get_masks(model)
    rnd = tickets.random_ticket(ticket, generator=torch.Generator().manual_seed(0))
    assert all(int(rnd[k].sum()) == int(ticket[k].sum()) for k in ticket)
    assert tickets.overlap(rnd, ticket)["total"] < 0.9
    before = model[0].weight.detach().clone()
    tickets.reinitialize(model, rnd, seed=1)
    assert not torch.equal(model[0].weight, before)
    assert all(torch.equal(get_masks(model)[k], rnd[k]) for k in rnd)
    again = tickets.reinitialize(copy.deepcopy(model), seed=1)
    assert torch.equal(again[0].weight, model[0].weight)  # the seed fixes the init


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_ticket_runs_and_saves_a_ticket(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sparseops", "ticket", "--method", "random", "--model", "lenet5",
                          "--levels", "2", "--epochs", "1", "--no-progress", "--save-ticket", str(tmp_path / "t.pt"),
                          "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "random pruning on digits with lenet5" in out.stdout
    # random pruning: each prunable layer loses the share that removes 20% of all kept weights, the output
    # layer's (10x84, excluded by default) included; open_lth's rule drops one more weight per threshold
    kept, out_layer = [16 * 9, 32 * 16 * 9, 32 * 16 * 120, 120 * 84], 84 * 10
    for _ in range(2):
        share = 0.2 * (sum(kept) + out_layer) / sum(kept)
        kept = [k - math.ceil(share * k) - 1 for k in kept]
    expected = 1 - (sum(kept) + out_layer) / (16 * 9 + 32 * 16 * 9 + 32 * 16 * 120 + 120 * 84 + out_layer)
    assert "level | sparsity | accuracy | epoch time" in out.stdout and f"{expected:.2%}" in out.stdout
    ticket = Ticket.load(tmp_path / "t.pt")
    assert ticket.metadata["method"] == "random" and ticket.sparsity == pytest.approx(expected)
    assert ticket.masks["11"].all()  # lenet5's output layer: excluded by default, as open_lth's LeNets
    bad = subprocess.run([sys.executable, "-m", "sparseops", "ticket", "--method", "snip"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "invalid choice: 'snip'" in bad.stderr


def test_cli_ticket_runs_a_preset_scaled_down(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sparseops", "ticket", "--preset", "mnist_lenet_300_100", "--epochs",
                          "2", "--levels", "1", "--no-progress", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    first = out.stdout.splitlines()[0]
    assert first.startswith("preset mnist_lenet_300_100 (open_lth mnist_lenet_300_100 on MNIST)")
    assert "SGD lr 0.1 momentum 0" in first and "scaled down to 2 of 40 epochs; model lenet300 on digits" in first
    levels = json.loads((tmp_path / "r.json").read_text())["levels"]
    assert [lv["steps"] for lv in levels] == [2 * 12, 2 * 12]  # 1437 digits in batches of 128, 2 epochs
    assert levels[1]["sparsity"] == pytest.approx(0.2, abs=1e-4)  # 20% of all weights, the output layer kept
    bad = subprocess.run([sys.executable, "-m", "sparseops", "ticket", "--preset", "cs_resnet_20", "--method", "imp"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "is a Continuous Sparsification run" in bad.stderr
