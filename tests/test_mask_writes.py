"""Every way of writing a mask is seen at the next call (issue 14 item 5): writes that move the
version counter, and those that do not (through `.data`, a numpy view) on CPU tensors, on every
path that caches what it derived from the mask (CSR layouts, the mask's stats, its 0/1 copy); and a
soft layer in ticket mode computes with the mask its scores give now, which `sparsity` and
`tickets.get_masks` report."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops import tickets

from conftest import random_mask


def _new_mask(shape):
    return random_mask(shape, 0.6, torch.Generator().manual_seed(7))


def _write(kind, layer, new):
    m = layer.weight_mask
    if kind == "index":
        m[...] = new
    elif kind == "data":
        m.data[...] = new
    elif kind == "data_copy":
        m.data.copy_(new)
    elif kind == "numpy":
        m.numpy()[...] = new.numpy()
    elif kind == "from_numpy":
        torch.from_numpy(m.numpy()).copy_(new)
    elif kind == "copy_no_grad":
        with torch.no_grad():
            m.copy_(new)
    elif kind == "set_mask":
        layer.set_mask(new)
    elif kind == "reassign":
        layer.weight_mask = new.clone()
    elif kind == "data_assign":
        m.data = new.clone()
    else:
        raise AssertionError(kind)


WRITES = ["index", "data", "data_copy", "numpy", "from_numpy", "copy_no_grad", "set_mask", "reassign", "data_assign"]


def _layer(kind):
    if kind == "linear":
        return nn.Linear(48, 40).double(), torch.randn(3, 48, dtype=torch.float64), F.linear
    if kind == "conv2d":
        conv = nn.Conv2d(8, 16, 3, padding=1).double()
        return conv, torch.randn(2, 8, 5, 5, dtype=torch.float64), lambda x, w, b: F.conv2d(x, w, b, padding=1)
    transformers = pytest.importorskip("transformers")
    return (transformers.pytorch_utils.Conv1D(40, 48).double(), torch.randn(3, 48, dtype=torch.float64),
            lambda x, w, b: x @ w + b)


def _check(layer, x, ref_fn):
    mask = layer.weight_mask
    layer.zero_grad()
    y = layer(x)
    y.square().sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    y_ref = ref_fn(x, w * mask, layer.bias.detach())
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(layer.weight.grad, w.grad)


@pytest.mark.parametrize("start", ["full", "pruned"])
@pytest.mark.parametrize("backend", ["auto", "cpu", "dense", "reference"])
@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_mask_writes_are_seen(kind, write, backend, start):
    torch.manual_seed(0)
    layer, x, ref_fn = _layer(kind)
    sparseops.patch(layer)
    if start == "pruned":
        layer.set_mask(random_mask(layer.weight.shape, 0.3, torch.Generator().manual_seed(1)))
    with sparseops.backend(backend):
        _check(layer, x, ref_fn)  # warm: layouts, stats and the 0/1 copy cached
        _write(write, layer, _new_mask(layer.weight.shape))
        assert torch.equal(layer.weight_mask, _new_mask(layer.weight.shape))
        _check(layer, x, ref_fn)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("write", ["data", "numpy", "from_numpy", "index"])
def test_writes_to_a_large_mask_are_seen(write, backend):
    """From 64K entries refresh keeps a one-bit copy of a bool mask (layout._snapshot)."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 300).double()
    x = torch.randn(3, 256, dtype=torch.float64)
    sparseops.patch(layer)
    layer.set_mask(random_mask(layer.weight.shape, 0.3, torch.Generator().manual_seed(1)))
    with sparseops.backend(backend):
        _check(layer, x, F.linear)
        _write(write, layer, _new_mask(layer.weight.shape))
        _check(layer, x, F.linear)


# ---- soft layers in ticket mode ----------------------------------------------------------------


def _score_write(kind, s, new):
    if kind == "no_grad":
        with torch.no_grad():
            s.copy_(new)
    elif kind == "data":
        s.data.copy_(new)
    elif kind == "numpy":
        s.detach().numpy()[...] = new.numpy()
    elif kind == "optimizer":
        s.grad = s.detach() - new  # one SGD step of lr 1 lands on `new`
        torch.optim.SGD([s], lr=1.0).step()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
@pytest.mark.parametrize("write", ["no_grad", "data", "numpy", "optimizer"])
def test_ticket_mode_computes_with_the_mask_it_reports(write, backend):
    """Writes that move the scores' version (no_grad, optimizer) are seen at the next call; those
    through .data or numpy at set_ticket. Either way the forward, `sparsity` and `get_masks` agree."""
    torch.manual_seed(0)
    model = sparseops.patch(nn.Sequential(nn.Linear(48, 40)).double(), mode="soft", s0=0.5)
    layer = model[0]
    x = torch.randn(3, 48, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_score.normal_()
    layer.set_ticket(True)

    def agree(hard):
        assert torch.equal(tickets.get_masks(model)["0"], hard)
        assert layer.sparsity == pytest.approx(1 - hard.double().mean().item())
        expected = F.linear(x, layer.weight.detach() * hard * layer.scale, layer.bias.detach())
        torch.testing.assert_close(layer(x), expected)

    with sparseops.backend(backend):
        layer(x)
        new = torch.randn(layer.weight_score.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        _score_write(write, layer.weight_score, new)
        if write in ("no_grad", "optimizer"):
            agree(new > 0)
        else:
            agree(tickets.get_masks(model)["0"])
            layer.set_ticket(True)
            agree(new > 0)


def test_with_checks_off_version_moving_writes_are_still_seen(monkeypatch):
    monkeypatch.setattr(sparseops.layout, "CHECK_WRITES", False)
    layer, x, ref_fn = _layer("linear")
    sparseops.patch(layer)
    _check(layer, x, ref_fn)
    _write("index", layer, _new_mask(layer.weight.shape))
    _check(layer, x, ref_fn)
