"""`shrink(model, example_inputs)`: a model with channel (and layer) masks as a physically smaller
dense model with identical outputs.

The dependency graph (which layers, BatchNorms, residual additions, concatenations and flattens
share a channel) comes from torch-pruning (`pip install 'sparseops[structured]'`): each group of
coupled channels is one `DependencyGraph` group, removed together with `group.prune()`.

A channel is removed when it is *dead*: every layer that writes it (all producers of a residual
sum, say) has all its weights there pruned (masked or zero) and no bias there, every BatchNorm it
passes has bias 0 and weight 0 or running mean 0 there, every op on its way keeps zeros zeros
(ReLU, pooling, additions, views), and some layer reads it (a model output is never cut). A dead
channel carries exact zeros in train and eval mode, so removing it, and the matching input
channels of the layers that read it, changes nothing. A channel whose filters are all pruned but
which still carries a constant (a BatchNorm bias, a layer bias) is kept, with a warning: removing
it would change the outputs.

Gated-off blocks: a module with an attribute `gate` (a number, buffer or parameter) that is all 0
is replaced by what it computes then: `module.gated_off()` (a module) where it has that method,
else nn.Identity (the contract without it: out = x where the gate is off).

Kept layers whose remaining mask prunes nothing become plain nn.Conv2d / nn.Linear; the others stay
sparseops layers with the mask cut to their new shape.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from . import nn as snn
from .patch import check_model, patch, patched_layers, unpatch

# Autograd nodes (torch-pruning's op nodes) that map zero inputs to zero outputs channel by channel.
_ZERO_PRESERVING = ("Relu", "LeakyRelu", "Hardtanh", "Gelu", "Silu", "Elu", "Hardswish", "Tanh", "AddBackward0",
                    "SubBackward0", "MulBackward", "DivBackward1", "Mean", "Sum", "MaxPool", "AvgPool", "AdaptiveAvgPool",
                    "AdaptiveMaxPool", "NativeDropout", "Clone", "TBackward", "Transpose", "Permute", "View",
                    "Reshape", "UnsafeView", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Cat", "Split", "Slice")


def require_torch_pruning():
    try:
        import torch_pruning
    except ImportError as exc:
        raise ImportError("sparseops.shrink needs torch-pruning: pip install 'sparseops[structured]'") from exc
    return torch_pruning


def shrink(model: nn.Module, example_inputs, *, inplace: bool = False) -> nn.Module:
    """A copy of `model` (or `model` itself, with `inplace`) with its dead channels and gated-off
    blocks removed (see the module docstring). `example_inputs` is a batch the model accepts (a
    tensor, or a tuple of its arguments), used once, in eval mode, to trace the dependency graph."""
    return shrink_mapped(model, example_inputs, inplace=inplace)[0]


def shrink_mapped(model: nn.Module, example_inputs, *, inplace: bool = False) -> tuple[nn.Module, Cuts]:
    """`shrink`, and where each kept entry of the smaller model came from (for `write_back`)."""
    check_model(model, "shrink")
    tp = require_torch_pruning()
    out = model if inplace else copy.deepcopy(model)
    training = [(m, m.training) for m in out.modules()]
    masks = _fold_masks(out)
    _remove_gated_blocks(out)
    out.eval()  # tracing runs a forward: in train mode it would move BatchNorm statistics
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    graph = tp.DependencyGraph().build_dependency(out, example_inputs=tuple(inputs))
    plans, constant = [], 0
    for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        root = group.items[0].dep
        dead, pruned, consumed = _dead_channels(tp, group)
        constant += int((pruned & ~dead).sum()) if consumed else 0
        idxs = dead.nonzero().flatten().tolist() if consumed else []
        if len(idxs) == dead.numel():  # a layer keeps at least one channel (a dead one: still exact)
            idxs = idxs[1:]
        if idxs:
            plans.append((root.target.module, root.handler, idxs))
    cuts = Cuts()
    for module, handler, idxs in plans:
        group = graph.get_pruning_group(module, handler, idxs)
        for item in group.items:
            _cut_mask(masks, item.dep, item.idxs, tp)
            cuts.add(tp, item.dep, item.idxs)
        group.prune()
    cuts.name(out)
    if constant:
        warnings.warn(f"sparseops.shrink: kept {constant} channel(s) whose filters are all pruned but which are not "
                      "dead: a BatchNorm or layer bias there, or another layer writing the same channel (a residual "
                      "sum), makes them carry values, and removing them would change the outputs. Zero the "
                      "BatchNorm's weight and bias there, and prune the channel in every layer writing it.",
                      stacklevel=2)
    _repatch(out, masks)
    for m, mode in training:
        m.train(mode)
    return out, cuts


def _fold_masks(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """Zeroes pruned weights, turns the sparseops layers back into plain ones (torch-pruning knows
    those) and returns their hard masks, to be cut and put back after pruning."""
    masks = {}
    with torch.no_grad():
        for _, m in patched_layers(model):
            if isinstance(m, snn._MaskedMixin):
                masks[m] = m.weight_mask.clone()
                m.weight.masked_fill_(~m.weight_mask, 0)  # where(mask, w, 0): a non-finite pruned weight too
    unpatch(model)  # soft layers fold their soft mask into the weight (the same outputs)
    return masks


def _remove_gated_blocks(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        gate = getattr(m, "gate", None)
        if name and gate is not None and not bool(torch.as_tensor(gate).ne(0).any()):
            parent, _, child = name.rpartition(".")
            off = m.gated_off() if hasattr(m, "gated_off") else nn.Identity()
            setattr(model.get_submodule(parent) if parent else model, child, off)


def _dead_channels(tp, group) -> tuple[torch.Tensor, bool]:
    """Which of the group's channels (root indices) are dead, which have all filters pruned in some
    layer writing them, and whether some layer reads them."""
    root_count = len(group.items[0].idxs)
    dead = torch.ones(root_count, dtype=torch.bool)
    pruned = torch.zeros(root_count, dtype=torch.bool)
    consumed = False
    for item in group.items:
        dep, m = item.dep, item.dep.target.module
        idx, root_idx = torch.tensor(item.idxs, dtype=torch.long), torch.tensor(item.root_idxs, dtype=torch.long)
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)] if isinstance(m, nn.Module) else []
        device_idx = idx.to(tensors[0].device) if tensors else idx  # (the model may live on a GPU)
        here = _dead_here(tp, m, dep.handler, device_idx)
        consumed |= dep.handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
        if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
            with torch.no_grad():
                pruned[root_idx[~(m.weight.index_select(0, device_idx).flatten(1) != 0).any(1).cpu()]] = True
        if here is not None:
            dead[root_idx[~here.cpu()]] = False
    return dead, pruned, consumed


def _dead_here(tp, m, handler, idx) -> torch.Tensor | None:
    """Per index: whether this item lets the channel be dead (None: every index does)."""
    with torch.no_grad():
        if handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
            dead = ~(m.weight.index_select(0, idx).flatten(1) != 0).any(1)
            return dead if m.bias is None else dead & (m.bias[idx] == 0)
        if handler == tp.prune_batchnorm_out_channels:
            none = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
            gamma_zero = m.weight[idx] == 0 if m.affine else none
            dead = m.bias[idx] == 0 if m.affine else ~none
            if m.running_mean is not None:
                dead &= gamma_zero | (m.running_mean[idx] == 0)
            return dead
        if handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
            return None  # a reader: removing a zero input channel is exact
        grad_fn = str(getattr(m, "_grad_fn", ""))
        if type(m).__module__.startswith("torch_pruning") and (
                grad_fn in ("", "None") or any(k in grad_fn for k in _ZERO_PRESERVING)):
            return None  # a reshape, concat, split, or an op that keeps zeros zeros
    return torch.zeros(idx.numel(), dtype=torch.bool)  # anything else (a LayerNorm, a sigmoid): keep


def _cut_mask(masks, dep, idxs, tp) -> None:
    m = dep.target.module
    if m not in masks:
        return
    dim = 0 if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels) else \
        1 if dep.handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels) else None
    if dim is None:
        return
    keep = torch.ones(masks[m].shape[dim], dtype=torch.bool)
    keep[torch.tensor(list(idxs), dtype=torch.long)] = False
    masks[m] = masks[m].index_select(dim, keep.nonzero().flatten().to(masks[m].device))


def _repatch(model: nn.Module, masks) -> None:
    """Layers whose cut mask still prunes something become sparseops layers again, with that mask."""
    sparse = {m: mask for m, mask in masks.items() if not bool(mask.all())}
    if not sparse:
        return
    patch(model, filter_fn=lambda m, name: m in sparse)
    for m, mask in sparse.items():
        m.set_mask(mask)


class Cuts:
    """Which channels `shrink` removed, per module (by its name in the model) and side: "out" (dim 0
    of its per-channel tensors: a layer's filters and bias, a BatchNorm's) and "in" (dim 1 of a layer's
    weight). Modules cut by other torch-pruning handlers (a LayerNorm, an embedding) are `unknown`."""

    def __init__(self):
        self.removed: dict = {}
        self.unknown: set = set()

    def add(self, tp, dep, idxs) -> None:
        m = dep.target.module
        if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels,
                           tp.prune_batchnorm_out_channels, tp.prune_batchnorm_in_channels):
            side = "out"
        elif dep.handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
            side = "in"
            if getattr(m, "groups", 1) != 1:
                self.unknown.add(m)  # (a grouped convolution's weight holds in/groups channels)
        else:
            if isinstance(m, nn.Module) and (next(m.parameters(False), None) is not None or
                                             next(m.buffers(False), None) is not None):
                self.unknown.add(m)  # (a module without tensors of its own has nothing to map back)
            return
        self.removed.setdefault(m, {}).setdefault(side, set()).update(int(i) for i in idxs)

    def name(self, model: nn.Module) -> None:
        """Keys the modules by their names in `model` (before _repatch swaps any for sparseops layers)."""
        names = {m: n for n, m in model.named_modules()}
        self.removed = {names[m]: sides for m, sides in self.removed.items()}
        self.unknown = {names.get(m, type(m).__name__) for m in self.unknown}


@torch.no_grad()
def write_back(model: nn.Module, small: nn.Module, cuts: Cuts) -> None:
    """Copies the parameters and buffers of `small` (from `shrink_mapped(model, ...)`, trained since)
    into the entries of `model`'s that they were cut from; removed entries keep their values. Masks
    are not copied (training does not change them)."""
    full = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in [*small.named_parameters(), *small.named_buffers()]:
        if name.endswith("_mask"):
            continue
        module = name.rpartition(".")[0]
        if module in cuts.unknown:
            raise NotImplementedError(f"sparseops.shrink: cannot write {name!r} back: torch-pruning cut module "
                                      f"{module!r} in a way sparseops does not map (only Conv2d, Linear, BatchNorm)")
        if name not in full:
            raise ValueError(f"sparseops.shrink: the shrunk model has {name!r}, which the full model does not")
        target, sides = full[name], cuts.removed.get(module, {})
        index = [None] * target.dim()
        for dim, side in ((0, "out"), (1, "in")):
            if side in sides and target.dim() > dim:
                gone = sides[side]
                index[dim] = torch.tensor([i for i in range(target.shape[dim]) if i not in gone], dtype=torch.long,
                                          device=target.device)
        want = tuple(len(i) if i is not None else n for i, n in zip(index, target.shape))
        if want != tuple(t.shape):
            raise RuntimeError(f"sparseops.shrink: cannot write {name!r} back: its shape {tuple(t.shape)} is not "
                               f"the kept part {want} of the full model's {tuple(target.shape)}")
        cut = [d for d, i in enumerate(index) if i is not None]
        new = t if not cut else target.clone()
        if len(cut) == 2:
            new[index[0].unsqueeze(1), index[1]] = t
        elif cut:
            new.index_copy_(cut[0], index[cut[0]], t)
        # A masked weight keeps its value (shrink zeroed it in the copy; training leaves it alone).
        mask = full.get(name + "_mask")
        target.copy_(new if mask is None else torch.where(mask, new, target))
