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


def test_channel_imp_prunes_filters_each_level_and_resumes(tmp_path):
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
                   checkpoint_dir=directory, progress=False)

    full = search(None)
    kept = {"0": 256, "2": 128}
    for level in full.levels[1:]:
        for name in kept:
            kept[name] -= math.ceil(0.2 * kept[name])
            rows = level.masks[name].any(1)
            assert int(rows.sum()) == kept[name]
            assert torch.equal(level.masks[name], rows[:, None].expand_as(level.masks[name]))
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
    subprocess.run([sys.executable, "-m", "sparseops", "ticket", "--method", "imp", "--granularity", "channel",
                    "--norm", "l2", "--model", "mlp", "--levels", "1", "--epochs", "1", "--no-progress",
                    "--save-ticket", str(tmp_path / "t.pt")], capture_output=True, text=True, check=True, cwd=root,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    masks = Ticket.load(tmp_path / "t.pt").masks
    assert int(masks["0"].any(1).sum()) == 256 - math.ceil(0.2 * 256)  # layerwise: 20% of each layer's filters
    assert int(masks["2"].any(1).sum()) == 128 - math.ceil(0.2 * 128) and masks["4"].all()
