"""imp against open_lth's rules, each written out here from what open_lth does (not its code):
rewinding trains from the rewind point to the end, the pruning budget counts excluded layers,
the default exclusions per model; and the presets."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops.tickets import Trainer, imp, presets
from sparseops.tickets.pruning import resolve_exclude
from sparseops.tickets.zoo import build_model


def sparse_global(weights: dict, masks: dict, fraction: float, ignore=()) -> dict:
    """open_lth's sparse_global: the count to prune is `fraction` of every remaining weight (ignored
    layers' included); the threshold is taken over the unignored layers' remaining weights and only
    those layers lose weights."""
    remaining = sum(int(m.sum()) for m in masks.values())
    count = math.ceil(fraction * remaining)
    kept = np.concatenate([np.abs(w[masks[k]]) for k, w in weights.items() if k not in ignore])
    threshold = np.sort(kept)[count]
    return {k: (masks[k] if k in ignore else masks[k] & (np.abs(w) > threshold)) for k, w in weights.items()}


# ------------------------------------------------------------------------------------------------
# Rewinding: T - k steps per level, the schedule at step k


def mlp():
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3))


def toy_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def open_lth_lottery(model, data, *, levels, epochs, batch, lr, momentum, milestones, gamma, seed, rewind_it,
                     fraction, ignore):
    """open_lth's lottery run: pretrain for k steps (one optimiser), then every level, 0 included,
    trains from the weights at step k with a fresh optimiser from step k to the end; the learning
    rate is a function of the global step (milestones in iterations); epoch e's data order comes
    from seed + e and a level starting mid-epoch skips that epoch's first batches."""
    x, y = data
    ipe = math.ceil(len(x) / batch)
    end = epochs * ipe
    mods = dict(model.named_modules())
    names = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    masks = {n: np.ones(tuple(mods[n].weight.shape), dtype=bool) for n in names}
    drops = [m * ipe for m in milestones]

    def forward(inp):
        h = inp
        for n, m in model.named_children():
            h = F.linear(h, m.weight * torch.from_numpy(masks[n]), m.bias) if n in masks else m(h)
        return h

    def train(start, stop):
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        steps = 0
        for ep in range(start // ipe, math.ceil(stop / ipe) + 1):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + ep))
            for it in range(ipe):
                step = ep * ipe + it
                if step < start:
                    continue
                if step >= stop:
                    return steps
                for group in opt.param_groups:
                    group["lr"] = lr * gamma ** sum(step >= d for d in drops)
                idx = order[it * batch:(it + 1) * batch]
                opt.zero_grad()
                F.cross_entropy(forward(x[idx]), y[idx]).backward()
                opt.step()
                steps += 1
        return steps

    train(0, rewind_it)  # pretraining to the rewind point
    rewind = copy.deepcopy(model.state_dict())
    out, steps = [], []
    for level in range(levels + 1):
        if level > 0:
            w = {n: mods[n].weight.detach().numpy() for n in names}
            masks = sparse_global(w, masks, fraction, ignore)
            model.load_state_dict(rewind)
        steps.append(train(rewind_it, end))
        out.append({n: m.copy() for n, m in masks.items()})
    return out, steps


@pytest.mark.parametrize("rewind,k", [(7, 7), ("6it", 6), ("1ep", 6), (0, 0)])
def test_rewinding_trains_from_the_rewind_point_as_open_lth(rewind, k):
    """48 examples in batches of 8: 6 steps per epoch, 3 epochs (T = 18), the lr drops at epoch 2;
    k = 7 starts mid-epoch, 6 and 1ep at an epoch boundary."""
    data = toy_data()
    torch.manual_seed(0)
    model = mlp().double()
    reference = copy.deepcopy(model)
    hp = dict(epochs=3, lr=0.1, momentum=0.9, milestones=(2,), gamma=0.1)
    trainer = Trainer(data, batch_size=8, schedule="step", data_order_seed=5, **hp)
    result = imp(model, trainer, levels=2, rate=0.3, rewind=rewind, exclude=["4"], progress=False)
    expected, steps = open_lth_lottery(reference, data, levels=2, batch=8, seed=5, rewind_it=k, fraction=0.3,
                                       ignore=("4",), **hp)
    assert steps == [18 - k] * 3  # every level trains from the rewind point to the end
    assert [r.metrics["steps"] for r in result.levels] == [18] + [18 - k] * 2  # level 0 counts the pretraining
    assert [r.metrics["start_iteration"] for r in result.levels] == [0, k, k]
    for r, masks in zip(result.levels, expected, strict=True):
        for name, m in masks.items():
            assert np.array_equal(r.masks[name].numpy(), m), (r.level, name)
    for name, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], v, msg=name)


def test_level_reports_its_start_point_to_a_training_function():
    seen = []

    def train_fn(model, level):
        seen.append((level.index, level.start_iteration, level.start_epoch, level.start_batch, level.iteration))
        fired = []
        for epoch in range(level.start_epoch, 3):
            for b in range(4):
                if epoch == level.start_epoch and b < level.start_batch:
                    continue
                fired.append(level.step())
            fired.append(level.end_epoch())
        assert sum(fired) == (1 if level.index == 0 else 0)  # True once: where the rewind weights were saved

    imp(mlp(), train_fn, levels=1, rewind="6it", progress=False)
    assert seen == [(0, 0, 0, 0, 0), (1, 6, 1, 2, 6)]


# ------------------------------------------------------------------------------------------------
# The pruning budget: excluded layers count


def lenet_search(budget, levels=3):
    """LeNet-300-100 on MNIST's shape, output layer excluded; each 'training' moves the weights at
    random so every level prunes new ones. Returns the result and each level's trained weights."""
    torch.manual_seed(0)
    model = build_model("lenet300", inputs=784)
    trained = []

    def train_fn(m, level):
        with torch.no_grad():
            for layer in (m[0], m[2], m[4]):
                layer.weight.add_(0.05 * torch.randn_like(layer.weight))
        trained.append({n: m[int(n)].weight.detach().numpy().copy() for n in ("0", "2", "4")})

    result = imp(model, train_fn, levels=levels, budget=budget, progress=False)
    return result, trained


def test_budget_counts_excluded_layers_as_open_lth():
    result, trained = lenet_search("all")
    masks = {n: np.ones(w.shape, dtype=bool) for n, w in trained[0].items()}
    for level in range(1, 4):
        masks = sparse_global(trained[level - 1], masks, 0.2, ignore=("4",))
        for n, m in masks.items():
            assert np.array_equal(result.levels[level].masks[n].numpy(), m), (level, n)
    assert bool(result.levels[-1].masks["4"].all())  # the excluded output layer keeps everything
    assert [round(r.sparsity, 4) for r in result.levels] == [0.0, 0.2, 0.36, 0.488]
    old, _ = lenet_search("prunable")
    assert [round(r.sparsity, 4) for r in old.levels] == [0.0, 0.1993, 0.3587, 0.4862]


# ------------------------------------------------------------------------------------------------
# Default exclusions: open_lth's per model


@pytest.mark.parametrize("name,ignored", [("lenet300", ["4"]), ("mlp", ["4"]), ("vgg16", ["45"]),
                                          ("resnet20", [])])
def test_default_exclusions_are_open_lths(name, ignored):
    """open_lth ignores fc.weight for mnist_lenet_* and cifar_vgg_*, nothing for cifar_resnet_*."""
    model = sparseops.patch(build_model(name))
    assert list(resolve_exclude(model, None)) == ignored
    if ignored:
        assert isinstance(dict(model.named_modules())[ignored[0]], nn.Linear)
    assert resolve_exclude(model, ()) == ()


def test_imp_default_leaves_lenets_output_layer_unpruned():
    def no_training(model, level):
        return None

    lenet = imp(build_model("lenet300"), no_training, levels=2, progress=False)
    assert bool(lenet.final_masks["4"].all()) and not bool(lenet.final_masks["2"].all())
    resnet = imp(build_model("resnet20"), no_training, levels=1, progress=False)
    assert not bool(resnet.final_masks["14"].all())  # ResNet-20: open_lth prunes the output layer too
    pruned_all = imp(build_model("lenet300"), no_training, levels=1, exclude=(), progress=False)
    assert not bool(pruned_all.final_masks["4"].all())


# ------------------------------------------------------------------------------------------------
# Presets


def test_imp_presets_carry_open_lths_hyperparameters():
    p = presets.mnist_lenet_300_100
    assert (p.epochs, p.batch_size, p.lr, p.momentum, p.weight_decay, p.milestones, p.rate, p.exclude) == (
        40, 128, 0.1, 0.0, 0.0, (), 0.2, ("output",))
    for p in (presets.cifar_resnet_20, presets.cifar_vgg_16):
        assert (p.epochs, p.batch_size, p.lr, p.momentum, p.weight_decay, p.milestones, p.gamma, p.rate) == (
            160, 128, 0.1, 0.9, 1e-4, (80, 120), 0.1, 0.2)
    assert presets.cifar_resnet_20.exclude == () and presets.cifar_vgg_16.exclude == ("output",)
    small = presets.cifar_resnet_20.scaled(4)
    assert small.milestones == (2, 3) and small.epochs == 4 and presets.cifar_resnet_20.epochs == 160
    trainer = small.trainer(toy_data())
    assert (trainer.schedule, trainer.milestones, trainer.momentum, trainer.weight_decay) == ("step", (2, 3), 0.9, 1e-4)
    assert [trainer.lr_at(e) for e in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_imp_takes_a_preset():
    def no_training(model, level):
        return None

    preset = presets.mnist_lenet_300_100
    model = preset.model(inputs=64)
    bn_free = all(not isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert bn_free and model[0].weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)  # Kaiming normal
    result = imp(model, no_training, levels=1, preset=preset, progress=False)
    assert bool(result.final_masks["4"].all())
    loose = imp(preset.model(inputs=64), no_training, levels=1, preset=preset, exclude=(), rate=0.5, progress=False)
    assert not bool(loose.final_masks["4"].all()) and loose.levels[1].sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(TypeError, match="preset must be an IMPPreset"):
        imp(mlp(), no_training, levels=1, preset=presets.cs_resnet_20, progress=False)


def test_cs_preset_is_the_official_run():
    p = presets.cs_resnet_20
    assert (p.rounds, p.epochs, p.batch_size, p.lr, p.mask_lr, p.lr_milestones, p.lr_drops, p.s0, p.lmbda,
            p.final_temp, p.rewind_epoch, p.weight_decay) == (3, 85, 128, 0.1, None, (56, 71), (0.1, 0.1), 0.0, 1e-8,
                                                              200.0, 2, 1e-4)
    model = sparseops.patch(p.model(), **p.patch_kwargs())
    soft = [n for n, m in model.named_modules() if isinstance(m, sparseops.SoftMaskedConv2d)]
    plain_convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    assert len(soft) == 19 and soft[0] == "conv0"  # every 3x3 conv, the first included
    assert plain_convs == ["stage2.block1.downsample", "stage3.block1.downsample"]
    assert type(model.classifier) is nn.Linear
    masked_weights = sum(m.weight.numel() for n, m in model.named_modules() if n in soft)
    assert masked_weights == 3 * 16 * 9 + 6 * 16 * 16 * 9 + 32 * 16 * 9 + 5 * 32 * 32 * 9 + 64 * 32 * 9 + 5 * 64 * 64 * 9
    small = p.scaled(5, rounds=1)
    assert small.lr_milestones == (3, 4) and small.rewind_epoch == 0


def test_cs_takes_a_preset():
    data = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    torch.manual_seed(0)
    model = presets.cs_resnet_20.model()
    result = sparseops.tickets.continuous_sparsification(model, data, preset=presets.cs_resnet_20.scaled(2, rounds=1),
                                                         batch_size=4, progress=False)
    assert set(result.final_masks) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
                                       and m.kernel_size == (3, 3)}
    assert [h["lr"] for h in result.levels[0].metrics["history"]] == pytest.approx([0.1, 0.01])  # 56/85, 71/85 of 2
    with pytest.raises(TypeError, match="preset must be a CSPreset"):
        sparseops.tickets.continuous_sparsification(mlp(), data, preset=presets.cifar_resnet_20, progress=False)
