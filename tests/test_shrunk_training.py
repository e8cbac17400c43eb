"""Training on the shrunk model and writing it back: sparseops.shrink.shrink_mapped / write_back, and
channel IMP's `shrink=True` (each pruned level trains the physically smaller model)."""
import pytest
import torch
from torch import nn

import sparseops
from sparseops.shrink import shrink_mapped, write_back
from sparseops.tickets import imp
from sparseops.tickets.zoo import vgg16

pytest.importorskip("torch_pruning")  # the `structured` extra (make installs it)


def _cnn():
    """conv-BN-ReLU-conv-BN-ReLU-pool-flatten-linear-ReLU-linear, float64 (VGG's pattern)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 12),
                         nn.ReLU(), nn.Linear(12, 3)).double()


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]


def _search(shrink, sizes=None):
    data = _data()

    def train_fn(m, level):
        if sizes is not None:
            sizes.append(sum(p.numel() for p in m.parameters()))
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            level.step()
            losses.append(loss.item())
        return {"losses": losses}

    torch.manual_seed(0)
    model = _cnn()
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.0)  # (removal zeroes them: the channels must really be dead)
    result = imp(model, train_fn, levels=2, rate=0.3, granularity="channel", exclude=["10"], progress=False,
                 shrink=shrink, example_inputs=data[0][0][:2] if shrink else None)
    return model, result


def test_shrunk_levels_train_a_smaller_model_with_the_same_result():
    sizes = []
    masked, a = _search(False)
    shrunk, b = _search(True, sizes)
    full = sum(p.numel() for p in masked.parameters())
    assert sizes[0] == full and sizes[1] < sizes[0] and sizes[2] < sizes[1]  # levels 1, 2: the shrunk copies
    for x, y in zip(a.levels, b.levels, strict=True):
        assert all(torch.equal(x.masks[k], y.masks[k]) for k in x.masks)
        torch.testing.assert_close(x.metrics["losses"], y.metrics["losses"], rtol=1e-10, atol=1e-12)
    sa, sb = masked.state_dict(), shrunk.state_dict()
    for k, v in sa.items():
        if k.endswith(("running_mean", "running_var")):  # removed channels' statistics: not updated when shrunk
            live = dict(masked.named_modules())[k.rpartition(".")[0]].weight != 0
            torch.testing.assert_close(sb[k][live], v[live], rtol=1e-10, atol=1e-12)
        else:  # parameters (masked entries included: left as they were on both sides), masks, counters
            torch.testing.assert_close(sb[k], v, rtol=1e-10, atol=1e-12)
    x = _data()[0][0]
    masked.eval(), shrunk.eval()
    torch.testing.assert_close(shrunk(x), masked(x), rtol=1e-10, atol=1e-12)


def test_write_back_puts_every_trained_entry_where_it_came_from():
    torch.manual_seed(0)
    model = vgg16().double()
    sparseops.patch(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, m in enumerate(model):
            if isinstance(m, nn.Conv2d) and i < 40:
                gone = torch.randperm(m.out_channels, generator=g)[: m.out_channels // 3]
                m.set_mask(m.weight_mask & torch.rand(m.weight.shape, generator=g).gt(0.2))  # elementwise too
                m.weight_mask[gone] = False
                m.bias[gone] = 0
                model[i + 1].weight[gone], model[i + 1].bias[gone] = 0, 0
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, cuts = shrink_mapped(model, x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # "training": every kept entry of the copy changes
        for t in [*small.parameters(), *small.buffers()]:
            if t.is_floating_point():
                t.add_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
    write_back(model, small, cuts)
    small.eval(), model.eval()
    torch.testing.assert_close(model(x), small(x), rtol=1e-12, atol=1e-12)
    for name, m in model.named_modules():
        if isinstance(m, sparseops.MaskedConv2d):
            assert torch.equal(m.weight[~m.weight_mask], before[name + ".weight"][~m.weight_mask])  # masked: kept
            assert not torch.equal(m.weight[m.weight_mask], before[name + ".weight"][m.weight_mask])
            assert torch.equal(m.weight_mask, before[name + ".weight_mask"])


def test_bad_input():
    model, train_fn = _cnn(), (lambda m, level: None)
    for kwargs, match in (({"granularity": "weight"}, "shrink=True needs granularity='channel'"),
                          ({"granularity": "channel", "remove_channels": False}, "and remove_channels=True"),
                          ({"granularity": "channel"}, "shrink=True needs example_inputs")):
        with pytest.raises(ValueError, match=match):
            imp(model, train_fn, levels=1, progress=False, shrink=True, **kwargs)

    torch.manual_seed(0)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # over the full model's parameters: not the copy's

    def closure_train(m, level):
        opt.zero_grad()
        model(torch.randn(4, 3, 6, 6, dtype=torch.float64)).sum().backward()
        opt.step()

    with pytest.raises(RuntimeError, match="train_fn must train the model it is given"):
        imp(model, closure_train, levels=1, rate=0.3, granularity="channel", exclude=["10"], progress=False,
            shrink=True, example_inputs=torch.randn(2, 3, 6, 6, dtype=torch.float64))
    small, cuts = shrink_mapped(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="the shrunk model has 'extra.weight'"):
        small.extra = nn.Linear(2, 2).double()
        write_back(model, small, cuts)
    del small.extra
    with torch.no_grad():
        small[0].weight = nn.Parameter(small[0].weight[:1].clone())
    with pytest.raises(RuntimeError, match="cannot write '0.weight' back"):
        write_back(model, small, cuts)


def test_shrunk_levels_of_a_resnet():
    """ResNet-20: only each block's first convolution is removable (the second's channels join the residual
    sum); the shrunk levels train fewer parameters and end where the masked ones do."""
    from sparseops.tickets.zoo import resnet20

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g))
            for _ in range(2)]

    def train_fn(m, level):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            level.step()
        return {"params": sum(p.numel() for p in m.parameters())}

    models, results = [], []
    for shrink in (False, True):
        torch.manual_seed(0)
        models.append(resnet20().double())
        results.append(imp(models[-1], train_fn, levels=2, rate=0.4, granularity="channel", progress=False,
                           shrink=shrink, example_inputs=data[0][0][:2]))
    assert [r.metrics["params"] for r in results[0].levels] == [272474] * 3
    assert results[1].levels[2].metrics["params"] < results[1].levels[1].metrics["params"] < 272474
    for x, y in zip(results[0].levels, results[1].levels, strict=True):
        assert all(torch.equal(x.masks[k], y.masks[k]) for k in x.masks)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
