"""Channel-level IMP (Li et al.'s filter pruning by L1/L2 norm), the random channel baseline, and
resuming a channel search from its checkpoints."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparseops
from sparseops.tickets import Ticket, Trainer, channel_masks, imp, random_channel_masks
from sparseops.tickets.zoo import build_model, load_digits


def _layer_with_norms():
    """Rows whose L1 and L2 orders differ: row 0 many small entries (L1 4, L2 1), row 1 one large (L1 3, L2 3)."""
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
    sparseops.patch(model)
    with torch.no_grad():
        w = torch.zeros(4, 16)
        w[0, :16] = 0.25  # L1 4, L2 1
        w[1, 0] = 3.0  # L1 3, L2 3
        w[2, :4] = 2.0  # L1 8, L2 4
        w[3, :2] = 5.0  # L1 10, L2 7.07
        model[0].weight.copy_(w)
    return model


@pytest.mark.parametrize("norm, pruned", [("l1", 1), ("l2", 0)])
def test_channel_masks_prune_whole_filters_by_norm(norm, pruned):
    model = _layer_with_norms()
    masks = channel_masks(model, 0.25, norm=norm, exclude=["2"])
    rows = masks["0"].any(1)
    assert rows.tolist() == [i != pruned for i in range(4)]
    assert torch.equal(masks["0"], rows[:, None].expand(4, 16))  # whole rows
    assert masks["2"].all()


def test_channel_masks_measure_only_the_kept_weights_and_keep_a_filter():
    model = _layer_with_norms()
    model[0].weight_mask[3, :] = False  # already pruned: its norm is not counted again
    model[0].weight_mask[2, 1:] = False  # row 2 keeps one weight: L1 2
    masks = channel_masks(model, 0.3, exclude=["2"])  # ceil(0.3 * 3 kept filters) = 1: the smallest L1 (row 2)
    assert masks["0"].any(1).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match=r"sparseops.tickets.channel_masks: this step would prune every filter of"):
        tiny = nn.Sequential(nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 2))
        sparseops.patch(tiny)
        channel_masks(tiny, 0.5, exclude=["2"])
    with pytest.raises(ValueError, match="norm must be one of"):
        channel_masks(model, 0.2, norm="l3", exclude=["2"])


def test_global_scope_compares_filters_across_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    sparseops.patch(model)
    with torch.no_grad():
        model[0].weight.fill_(10.0)
        model[2].weight.copy_(torch.arange(1.0, 5.0).view(4, 1).expand(4, 4))
    masks = channel_masks(model, 0.25, scope="global", exclude=["4"])  # 2 of 8 filters, both in layer 2
    assert masks["0"].all() and masks["2"].any(1).tolist() == [False, False, True, True]


def test_random_channel_masks_remove_the_same_count_at_random_filters():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    sparseops.patch(model)
    a = random_channel_masks(model, 0.25, exclude=["2"], generator=torch.Generator().manual_seed(0))
    b = random_channel_masks(model, 0.25, exclude=["2"], generator=torch.Generator().manual_seed(1))
    for m in (a, b):
        rows = m["0"].any(1)
        assert int(rows.sum()) == 32 - math.ceil(0.25 * 32)
        assert torch.equal(m["0"], rows[:, None].expand(32, 8))
    assert not torch.equal(a["0"], b["0"])


@pytest.mark.parametrize("remove", [False, True])
def test_channel_imp_prunes_filters_each_level_and_resumes(tmp_path, remove):
    train, test = load_digits()
    train = (train[0][:512], train[1][:512])
    trainer = Trainer(train, test, epochs=1, batch_size=128, lr=0.05, data_order_seed=0)

    def search(directory, fail_at=None):
        torch.manual_seed(0)

        def train_fn(m, level):
            if level.index == fail_at:
                raise KeyboardInterrupt
            return trainer(m, level)

        return imp(build_model("mlp"), train_fn, levels=3, granularity="channel", norm="l2",
                   checkpoint_dir=directory, progress=False, remove_channels=remove)

    full = search(None)
    kept = {"0": 256, "2": 128}
    for level in full.levels[1:]:
        for name in kept:
            kept[name] -= math.ceil(0.2 * kept[name])
            rows = level.masks[name].any(1)
            assert int(rows.sum()) == kept[name]
            # removed channels: layer 0's pruned filters are layer 2's masked columns too (not the output
            # layer's: it is excluded, so layer 2's channels keep only their rows masked)
            cols = level.masks["0"].any(1) if remove and name == "2" else torch.ones(level.masks[name].shape[1], dtype=bool)
            assert torch.equal(level.masks[name], rows[:, None] & cols[None, :])
        assert level.masks["4"].all()  # the output layer (open_lth's default exclusion)
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path, fail_at=2)  # interrupted after level 1 ...
    resumed = search(tmp_path)  # ... and resumed
    for a, b in zip(full.levels, resumed.levels, strict=True):
        assert a.metrics["accuracy"] == b.metrics["accuracy"]
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    with pytest.raises(ValueError, match="other settings"):
        imp(build_model("mlp"), trainer, levels=3, checkpoint_dir=tmp_path, progress=False)  # weight granularity


def test_channel_imp_bad_input():
    model = build_model("mlp")
    with pytest.raises(ValueError, match="granularity must be one of"):
        imp(model, lambda m, level: None, levels=1, granularity="block", progress=False)
    with pytest.raises(ValueError, match="budget='all' counts weights"):
        imp(model, lambda m, level: None, levels=1, granularity="channel", budget="all", progress=False)
    with pytest.raises(ValueError, match="norm must be 'l1' or 'l2'"):
        imp(model, lambda m, level: None, levels=1, granularity="channel", norm="max", progress=False)


def test_random_channel_imp_is_the_baseline():
    train, _ = load_digits()
    trainer = Trainer((train[0][:256], train[1][:256]), epochs=1, batch_size=128)
    torch.manual_seed(0)
    result = imp(build_model("mlp"), trainer, levels=1, granularity="channel", pruning="random",
                 generator=torch.Generator().manual_seed(0), progress=False)
    rows = result.levels[1].masks["0"].any(1)
    assert int(rows.sum()) == 256 - math.ceil(0.2 * 256)
    assert result.method == "random"


def test_cli_runs_channel_imp(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for extra in ([], ["--shrink"]) if _has_torch_pruning() else ([],):  # --shrink: the same search, shrunk levels
        subprocess.run([sys.executable, "-m", "sparseops", "ticket", "--method", "imp", "--granularity", "channel",
                        "--norm", "l2", "--model", "mlp", "--levels", "2", "--epochs", "1", "--no-progress",
                        "--save-ticket", str(tmp_path / "t.pt"), *extra], capture_output=True, text=True, check=True,
                       cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
        found.append(Ticket.load(tmp_path / "t.pt").masks)
    masks = found[0]
    kept0, kept2 = 256 - math.ceil(0.2 * 256), 128 - math.ceil(0.2 * 128)  # layerwise: 20% of each layer's filters
    assert int(masks["0"].any(1).sum()) == kept0 - math.ceil(0.2 * kept0)
    assert int(masks["2"].any(1).sum()) == kept2 - math.ceil(0.2 * kept2) and masks["4"].all()
    assert all(torch.equal(m[k], masks[k]) for m in found[1:] for k in masks)


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def _cnn():
    """conv-BN-ReLU-conv-BN-ReLU-pool-flatten-linear-ReLU-linear (VGG's pattern, with a flatten of 4 features a
    channel), float64."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 12),
                         nn.ReLU(), nn.Linear(12, 3)).double()


def test_channel_imp_removes_the_channel_exactly():
    """A pruned filter's channel: its readers' columns masked, its batch norm's scale and shift 0 (and
    still 0 after training: they get no gradient); the same outputs and gradients, train and eval mode,
    as masking only the filters once those batch-norm entries are 0."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]

    def train_fn(m, level):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            level.step()

    torch.manual_seed(0)
    model = _cnn()
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.0)  # a filter-only mask would leave relu(shift) > 0 flowing on
        model[4].bias.uniform_(0.5, 1.0)
    masks = imp(model, train_fn, levels=2, rate=0.3, granularity="channel", exclude=["10"], progress=False).final_masks
    gone0, gone3 = ~masks["0"].flatten(1).any(1), ~masks["3"].flatten(1).any(1)
    assert int(gone0.sum()) == 5 and int(gone3.sum()) == 4  # 8 -> 5 -> 3 kept, 6 -> 4 -> 2
    assert not masks["3"][:, gone0].any() and masks["3"][~gone3][:, ~gone0].all()
    assert not masks["8"][:, gone3.repeat_interleave(4)].any()  # the flatten: 4 features per channel
    assert masks["10"].all()  # the output layer is excluded: never masked
    for conv, bn, gone in ((model[0], model[1], gone0), (model[3], model[4], gone3)):
        assert not bn.weight[gone].any() and not bn.bias[gone].any() and not conv.bias[gone].any()
    rows_only = {k: m.flatten(1).any(1).view(-1, *[1] * (m.dim() - 1)).expand_as(m) if k in ("0", "3", "8") else m
                 for k, m in masks.items()}
    other = _cnn()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("weight_mask")}, strict=False)
    sparseops.patch(other)
    sparseops.tickets.set_masks(other, rows_only)
    assert not torch.equal(rows_only["3"], masks["3"])
    x, y = data[0]
    for train in (True, False):
        outs = []
        for m in (model, other):
            m.train(train)
            m.zero_grad()
            out = m(x)
            nn.functional.cross_entropy(out, y).backward()
            outs.append((out, [p.grad for p in m.parameters()]))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(outs[0][1], outs[1][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _Branchy(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x):
        return self[2](self[1](self[0](x))) if x.sum() > 0 else self[2](x)  # data-dependent: torch.fx cannot trace


def test_channels_are_removed_only_where_exact():
    from sparseops.tickets.removal import removable_layers
    from sparseops.tickets.zoo import resnet20, vgg16

    for build, expect in ((vgg16, "every conv but the last (the excluded classifier reads it)"),
                          (resnet20, "each block's first conv (the second's channels join a residual sum)")):
        model = build()
        sparseops.patch(model)
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        found = removable_layers(model, names, sparseops.tickets.pruning.resolve_exclude(model, None))
        convs = [n for n in names if isinstance(dict(model.named_modules())[n], nn.Conv2d)]
        want = convs[:-1] if build is vgg16 else [n for n in convs if n.endswith("conv1")]
        assert sorted(found) == sorted(want), expect
        assert all(r.norm is not None for r in found.values())
    untraceable = _Branchy()
    sparseops.patch(untraceable)
    with pytest.warns(RuntimeWarning, match="cannot be traced by torch.fx"):
        assert removable_layers(untraceable, ["0"]) == {}


def test_a_channel_imp_ticket_shrinks():
    """The removed channels are dead (bias, scale and shift 0): sparseops.shrink cuts them, same outputs;
    a layer whose channels only lost their rows (an excluded layer reads them) keeps them."""
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = _cnn()

    def train_fn(m, level):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            m(torch.randn(4, 3, 6, 6, dtype=torch.float64)).sum().backward()
            opt.step()
            level.step()

    imp(model, train_fn, levels=1, rate=0.5, granularity="channel", exclude=["10"], progress=False)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="kept 6 channel"):  # layer 8's: the excluded output layer reads them
        small = sparseops.shrink(model, x)
    assert (small[0].out_channels, small[3].out_channels, small[8].out_features) == (4, 3, 12)
    model.eval(), small.eval()
    torch.testing.assert_close(small(x), model(x), rtol=1e-12, atol=1e-12)
