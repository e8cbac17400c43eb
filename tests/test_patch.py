"""sparseops.patch / unpatch: drop-in, state_dict-compatible, same computation as torch.nn.utils.prune."""
import copy
import io
import os
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import sparseops
from sparseops import nn as snn
from sparseops.patch import is_patched, patched_layers
from sparseops.tickets import get_masks, set_masks


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False, padding_mode="reflect")
        self.conv3 = nn.Conv2d(8, 16, 3, dilation=2, padding=2, groups=2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.fc(self.drop(x.flatten(1)))


def random_masks_for(model, sparsity=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) >= sparsity
            for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def pruned_copy(model, masks):
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for name, mask in masks.items():
        prune.custom_from_mask(mods[name], "weight", mask)
    return ref


def weight_grads(model):
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("make, shape", [(mlp, (6, 12)), (SmallCNN, (4, 3, 8, 8))])
@pytest.mark.parametrize("train", [True, False])
def test_patched_model_matches_torch_prune(make, shape, train):
    model = make().double()
    masks = random_masks_for(model)
    ref = pruned_copy(model, masks)
    ours = set_masks(sparseops.patch(copy.deepcopy(model)), masks)
    ref.train(train)
    ours.train(train)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.manual_seed(1)
    y_ref = ref(x)
    torch.manual_seed(1)  # the same dropout draws
    y = ours(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    g, g_ref = weight_grads(ours), weight_grads(ref)
    for name in g:
        ref_name = name.replace(".weight", ".weight_orig") if name.replace(".weight", ".weight_orig") in g_ref else name
        torch.testing.assert_close(g[name], g_ref[ref_name], msg=name)
        layer = name[: -len(".weight")]
        if layer in masks:  # pruned entries get exactly zero gradient
            assert bool((g[name][~masks[layer]] == 0).all())


def test_patch_keeps_names_parameters_dtypes_and_state_dict_keys():
    model = SmallCNN()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before patching: must keep working
    ids_before = {id(m) for m in model.modules()}
    out = sparseops.patch(model)
    assert out is model and {id(m) for m in model.modules()} == ids_before  # in place
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.conv1, snn.MaskedConv2d)
    assert isinstance(model.fc, nn.Linear) and isinstance(model.fc, snn.MaskedLinear)
    params_after = dict(model.named_parameters())
    assert list(params_after) == list(params_before)
    assert all(params_after[k] is params_before[k] for k in params_before)
    extra = [k for k in model.state_dict() if k not in keys_before]
    assert sorted(extra) == sorted(f"{n}.weight_mask" for n in ("conv1", "conv2", "conv3", "fc"))
    assert [k for k in model.state_dict() if k in keys_before] == keys_before
    assert model.fc.weight_mask.dtype == torch.bool and model.fc.weight_mask.device == model.fc.weight.device
    model.fc.weight_mask[:, :10] = False
    before = model.fc.weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert torch.equal(model.fc.weight[:, :10], before[:, :10])  # pruned weights got no gradient
    assert not torch.equal(model.fc.weight[:, 10:], before[:, 10:])


def test_patch_twice_is_harmless_and_modes_do_not_mix():
    model = sparseops.patch(mlp())
    model[0].weight_mask[0] = False
    masks = get_masks(model)
    report = sparseops.patch_report(model)
    assert report.patched == [] and report.already_patched == ["0", "2", "4"]
    sparseops.patch(model)
    assert all(torch.equal(a, b) for a, b in zip(get_masks(model).values(), masks.values(), strict=True))
    with pytest.raises(ValueError, match="already patched in mode 'mask'"):
        sparseops.patch(model, mode="soft")


@pytest.mark.parametrize("as_prune", [False, True])
def test_unpatch_gives_plain_layers_computing_the_same(as_prune):
    model = SmallCNN().eval()
    masks = random_masks_for(model)
    ours = set_masks(sparseops.patch(copy.deepcopy(model)), masks)
    x = torch.randn(2, 3, 8, 8)
    y = ours(x)
    plain = sparseops.unpatch(ours, as_prune=as_prune)
    assert not any(is_patched(m) for m in plain.modules())
    assert type(plain.conv1) is nn.Conv2d and type(plain.fc) is nn.Linear
    torch.testing.assert_close(plain(x), y)
    if as_prune:
        assert "fc.weight_orig" in plain.state_dict() and "fc.weight_mask" in plain.state_dict()
        assert prune.is_pruned(plain)
    else:
        assert set(plain.state_dict()) == set(model.state_dict())
        assert bool((plain.fc.weight[~masks["fc"]] == 0).all())


def test_soft_patch_and_unpatch_fold_the_soft_mask():
    model = mlp().double()
    sparseops.patch(model, mode="soft", s0=0.3)
    assert isinstance(model[0], snn.SoftMaskedLinear) and model[0].weight_score.shape == model[0].weight.shape
    assert "0.weight_score" in model.state_dict() and "0.weight_mask" not in model.state_dict()
    with torch.no_grad():
        for _, m in patched_layers(model):
            m.weight_score.normal_()
            m.beta = 2.5
    x = torch.randn(3, 12, dtype=torch.float64)
    y = model(x)
    torch.testing.assert_close(sparseops.unpatch(copy.deepcopy(model))(x), y)
    for _, m in patched_layers(model):
        m.set_ticket(True)
    y = model(x)
    torch.testing.assert_close(sparseops.unpatch(copy.deepcopy(model), as_prune=True)(x), y)


def test_takes_over_layers_pruned_by_torch_prune():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "weight", amount=0.3)  # a PruningContainer of two methods
    prune.l1_unstructured(model[2], "weight", amount=0.8)
    x = torch.randn(4, 12)
    y = model(x)
    orig = model[0].weight_orig
    expected = model[0].weight_mask.bool().clone()
    sparseops.patch(model)
    assert not prune.is_pruned(model) and not model[0]._forward_pre_hooks
    assert model[0].weight is orig and "weight_orig" not in dict(model[0].named_parameters())
    assert list(dict(model[0].named_parameters())) == ["weight", "bias"]
    assert torch.equal(model[0].weight_mask, expected)
    torch.testing.assert_close(model(x), y)


def test_a_prune_mask_that_is_not_0_1_is_refused_and_the_layer_left_as_it_was():
    layer = nn.Linear(4, 3)
    prune.custom_from_mask(layer, "weight", torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="weight_mask must hold only 0 and 1"):
        sparseops.patch(layer)
    assert prune.is_pruned(layer) and "weight_orig" in dict(layer.named_parameters())
    assert type(layer) is nn.Linear and "weight_mask" in dict(layer.named_buffers())


def test_loads_dense_and_prune_checkpoints():
    model = mlp()
    dense_state = copy.deepcopy(model.state_dict())
    pruned = pruned_copy(model, random_masks_for(model))
    ours = sparseops.patch(mlp())
    ours[0].weight_mask[:3] = False
    ours.load_state_dict(dense_state)  # no masks in it: the current ones stay
    assert not bool(ours[0].weight_mask[:3].any()) and torch.equal(ours[0].weight, dense_state["0.weight"])
    ours.load_state_dict(pruned.state_dict())  # weight_orig + float weight_mask
    x = torch.randn(2, 12)
    torch.testing.assert_close(ours(x), pruned(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        ours.load_state_dict({**ours.state_dict(), "0.weight_mask": torch.ones(3, 3, dtype=torch.bool)})


def test_unsupported_layers_are_reported_not_half_patched():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.conv1d = nn.Conv1d(8, 8, 3)
            self.attn = nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight  # tied to a layer sparseops cannot mask
            self.sub = type("MyLinear", (nn.Linear,), {})(8, 8)
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    net = Net()
    with pytest.warns(UserWarning, match="left unpatched") as rec:
        sparseops.patch(net)
    text = str(rec[0].message)
    for name in ("emb", "conv1d", "attn", "attn.out_proj", "head", "sub"):
        assert f"unsupported: {name}:" in text
    assert "norm" not in text
    assert isinstance(net.fc, snn.MaskedLinear)
    assert type(net.head) is nn.Linear and type(net.attn.out_proj) is not snn.MaskedLinear
    with pytest.raises(NotImplementedError, match="cannot patch every layer"):
        sparseops.patch(Net(), on_unsupported="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparseops.patch(Net(), on_unsupported="ignore")


def test_tied_weights_share_one_mask():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    sparseops.patch(model)
    assert model[0].weight is model[2].weight and model[0].weight_mask is model[2].weight_mask
    shared = nn.Linear(4, 4)
    model = sparseops.patch(nn.Sequential(shared, nn.ReLU(), shared))  # one module used twice
    assert model[0] is model[2] and isinstance(model[0], snn.MaskedLinear)


def test_filter_fn_chooses_layers():
    model = mlp()
    report = sparseops.patch_report(model, filter_fn=lambda m, fqn: fqn != "4")
    assert report.patched == ["0", "2"] and report.filtered_out == ["4"]
    sparseops.patch(model, filter_fn=lambda m, fqn: m.out_features > 16)
    assert isinstance(model[0], snn.MaskedLinear) and type(model[2]) is nn.Linear and type(model[4]) is nn.Linear


def test_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sparseops.patch("not a module")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sparseops.unpatch(3)
    with pytest.raises(ValueError, match="mode must be one of"):
        sparseops.patch(mlp(), mode="hard")
    with pytest.raises(ValueError, match="on_unsupported"):
        sparseops.patch(mlp(), on_unsupported="maybe")
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        sparseops.patch(mlp(), filter_fn="0")
    with pytest.raises(TypeError, match="before wrapping"):
        sparseops.patch(nn.DataParallel(mlp()))
    with pytest.raises(ValueError, match="s0 must be finite"):
        sparseops.patch(mlp(), mode="soft", s0=float("nan"))
    layer = sparseops.patch(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"mask must have the weight's shape \(4, 3\)"):
        layer.set_mask(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        layer.set_mask(torch.full((4, 3), 0.5))


def test_deepcopy_and_torch_save_round_trip():
    model = set_masks(sparseops.patch(SmallCNN().eval()), random_masks_for(SmallCNN()))
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    clone = copy.deepcopy(model)
    assert clone.fc.weight_mask is not model.fc.weight_mask
    torch.testing.assert_close(clone(x), y)
    clone.fc.weight_mask.zero_()  # the copy's mask is its own: the original is unchanged
    torch.testing.assert_close(model(x), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.fc, snn.MaskedLinear)
    torch.testing.assert_close(loaded(x), y)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = sparseops.patch(SmallCNN().eval())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), y)


def test_patched_model_compiles():
    model = set_masks(sparseops.patch(mlp()), random_masks_for(mlp()))
    x = torch.randn(4, 12)
    torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=False)(x), model(x))


def test_transformers_gpt2_conv1d_matches_torch_prune():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()
    report = sparseops.patch_report(model)
    assert len(report.patched) == 8 and "lm_head" in report.unsupported  # tied to the token embedding
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(dict(model.named_modules())[n].weight.shape, generator=g) > 0.6 for n in report.patched}
    ref = pruned_copy(model, masks)
    with pytest.warns(UserWarning, match="lm_head"):
        ours = set_masks(sparseops.patch(copy.deepcopy(model)), masks)
    assert type(ours.transformer.h[0].attn.c_attn).__name__ == "MaskedConv1D"
    assert isinstance(ours.transformer.h[0].attn.c_attn, transformers.pytorch_utils.Conv1D)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    out, out_ref = ours(ids).logits, ref(ids).logits
    torch.testing.assert_close(out, out_ref)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    torch.testing.assert_close(ours.transformer.h[1].mlp.c_fc.weight.grad,
                               ref.transformer.h[1].mlp.c_fc.weight_orig.grad)
    plain = sparseops.unpatch(ours)
    torch.testing.assert_close(plain(ids).logits, out_ref)


def test_torchvision_resnet_matches_torch_prune():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    masks = random_masks_for(model, 0.8)
    ref = pruned_copy(model, masks)
    ours = set_masks(sparseops.patch(copy.deepcopy(model)), masks)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x))


def _ddp_worker(rank, world, init_file, state, masks, xs, ys, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = mlp()
    model.load_state_dict(state)
    set_masks(sparseops.patch(model), masks)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys, strict=True):
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[shard]), y[shard]).backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pt"))
    dist.barrier()  # neither rank leaves (and drops its gloo connections) while the other still works
    dist.destroy_process_group()
    # Plain torch (no sparseops) aborts here in about 1 run of 6 on this machine ("terminate called
    # without an active exception" in gloo's teardown at interpreter exit): leave without it.
    os._exit(0)


def test_distributed_data_parallel_on_gloo_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    model = mlp()
    masks = random_masks_for(model, 0.8)
    xs = [torch.randn(8, 12) for _ in range(3)]
    ys = [torch.randint(0, 5, (8,)) for _ in range(3)]
    state = copy.deepcopy(model.state_dict())
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), state, masks, xs, ys, str(tmp_path)), nprocs=2)
    single = set_masks(sparseops.patch(model), masks)
    opt = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        nn.functional.cross_entropy(single(x), y).backward()  # mean over the batch = DDP's average of halves
        opt.step()
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, msg=k)
