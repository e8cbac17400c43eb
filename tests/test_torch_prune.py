"""torch.nn.utils.prune and patched layers (issue 14 item 8): a prune.* call on a patched layer is
refused before it changes anything (it would replace the mask by one over all the weights); inside
`sparseops.as_torch_prune(model)` prune.* composes as torch composes two prunings (PruningContainer:
the new method's mask over the remaining weights), and the layers come back patched with that mask."""
import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import sparseops
from sparseops import nn as snn

from conftest import random_mask


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(32, 64).double(), torch.randn(5, 32, dtype=torch.float64)
    if kind == "conv2d":
        return nn.Conv2d(4, 8, 3, padding=1).double(), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(64, 32).double(), torch.randn(5, 32, dtype=torch.float64)


KINDS = ["linear", "conv2d", "conv1d"]
METHODS = {
    "l1": lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
    "l1-count": lambda m: prune.l1_unstructured(m, "weight", amount=20),
    "random": lambda m: prune.random_unstructured(m, "weight", amount=0.3),
    "ln-structured": lambda m: prune.ln_structured(m, "weight", amount=0.25, n=2, dim=0),
    "custom": lambda m: prune.custom_from_mask(m, "weight", random_mask(m.weight.shape, 0.5,
                                                                         torch.Generator().manual_seed(3))),
    "scores": lambda m: prune.l1_unstructured(m, "weight", amount=0.5,
                                              importance_scores=torch.randn(m.weight.shape,
                                                                            generator=torch.Generator().manual_seed(4))),
}


def _patched(kind, sparsity=0.9):
    layer, x = _layer(kind)
    old = random_mask(layer.weight.shape, sparsity, torch.Generator().manual_seed(1))
    ref = copy.deepcopy(layer)
    prune.custom_from_mask(ref, "weight", old)  # torch's own state: the old mask as a first pruning
    sparseops.patch(layer)
    layer.set_mask(old)
    return layer, ref, old, x


def _forward_and_grads(layer, x):
    layer.zero_grad()
    y = layer(x)
    y.square().sum().backward()
    w = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
    return y.detach(), w.grad.clone()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", KINDS)
def test_prune_on_a_patched_layer_is_refused_and_changes_nothing(kind, method):
    layer, _, old, x = _patched(kind)
    weight, before = layer.weight, layer(x)
    with pytest.raises(NotImplementedError, match="as_torch_prune"):
        METHODS[method](layer)
    assert type(layer).__module__ == snn.__name__ and layer.weight is weight
    assert not layer._forward_pre_hooks and "weight_orig" not in dict(layer.named_parameters())
    assert layer.weight_mask.dtype == torch.bool and torch.equal(layer.weight_mask, old)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    sparseops.unpatch(layer)
    torch.testing.assert_close(layer(x), before)


def test_global_unstructured_on_patched_layers_is_refused():
    model = sparseops.patch(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    with pytest.raises(NotImplementedError, match="as_torch_prune"):
        prune.global_unstructured([(model[0], "weight"), (model[1], "weight")], prune.L1Unstructured, amount=0.5)
    assert all(type(m) is snn.MaskedLinear and not m._forward_pre_hooks for m in model)


def test_prune_on_a_soft_layer_is_refused():
    layer = sparseops.patch(nn.Linear(8, 8), mode="soft")
    with pytest.raises(NotImplementedError, match="soft"):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    assert type(layer) is snn.SoftMaskedLinear and "weight_orig" not in dict(layer.named_parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", KINDS)
def test_as_torch_prune_composes_like_torch(kind, method):
    layer, ref, _, x = _patched(kind)
    weight = layer.weight
    torch.manual_seed(5)
    METHODS[method](ref)  # torch: a PruningContainer of the old mask and the new method
    torch.manual_seed(5)
    with sparseops.as_torch_prune(layer):
        METHODS[method](layer)
    assert type(layer).__module__ == snn.__name__ and layer.weight is weight and not layer._forward_pre_hooks
    assert torch.equal(layer.weight_mask, ref.weight_mask.bool())
    y, g = _forward_and_grads(layer, x)
    y_ref, g_ref = _forward_and_grads(ref, x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)
    sparseops.unpatch(layer)  # a plain layer computing the same
    torch.testing.assert_close(layer(x).detach(), y)


def test_global_unstructured_inside_as_torch_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)).double()
    olds = [random_mask(m.weight.shape, 0.7, torch.Generator().manual_seed(i)) for i, m in enumerate(model)]
    ref = copy.deepcopy(model)
    for m, old in zip(ref, olds):
        prune.custom_from_mask(m, "weight", old)
    sparseops.patch(model)
    for m, old in zip(model, olds):
        m.set_mask(old)
    for net in (ref, model):
        with sparseops.as_torch_prune(model) if net is model else torch.no_grad():
            prune.global_unstructured([(net[0], "weight"), (net[1], "weight")], prune.L1Unstructured, amount=0.4)
    for a, b in zip(model, ref):
        assert type(a) is snn.MaskedLinear and torch.equal(a.weight_mask, b.weight_mask.bool())
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x))


def test_prune_remove_inside_as_torch_prune():
    layer, ref, _, x = _patched("linear")
    with sparseops.as_torch_prune(layer):
        prune.l1_unstructured(layer, "weight", amount=0.5)
        prune.remove(layer, "weight")  # permanent, as torch makes it: the weight holds the zeros
    prune.l1_unstructured(ref, "weight", amount=0.5)
    assert type(layer) is snn.MaskedLinear  # patched back (dense mask: the pruning is in the weight now)
    torch.testing.assert_close(layer(x), ref(x))


def test_model_pruned_by_torch_then_patched_then_pruned_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)).double()
    ref = copy.deepcopy(model)
    for m in (model, ref):
        prune.l1_unstructured(m[0], "weight", amount=0.6)
    sparseops.patch(model)
    with sparseops.as_torch_prune(model):
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.l1_unstructured(model[2], "weight", amount=0.5)
    for m in (ref[0], ref[2]):
        prune.l1_unstructured(m, "weight", amount=0.5)
    x = torch.randn(4, 12, dtype=torch.float64)
    assert type(model[0]) is snn.MaskedLinear and type(model[2]) is snn.MaskedLinear
    for a, b in ((model[0], ref[0]), (model[2], ref[2])):
        assert torch.equal(a.weight_mask, b.weight_mask.bool())
    torch.testing.assert_close(model(x), ref(x))


def test_as_torch_prune_refuses_soft_models():
    model = sparseops.patch(nn.Sequential(nn.Linear(8, 8)), mode="soft")
    with pytest.raises(TypeError, match="soft"):
        with sparseops.as_torch_prune(model):
            pass
    assert type(model[0]) is snn.SoftMaskedLinear
