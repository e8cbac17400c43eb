"""Removing a pruned filter's whole channel (channel IMP, Li et al.): besides the filter's row, the
columns of the layers that read the channel are masked and the layer's bias and the channel's
batch-norm scale and shift are zeroed, so the channel is exactly 0 where it leaves its layer (train
and eval mode), the readers' columns for it are skipped, not computed on, and sparseops.shrink can
cut it.

Where that is exact, from the model's torch.fx graph (no example input: a flatten's features per
channel come from the reader's width): the channel reaches nothing but Conv2d/Linear readers, through
zero-preserving, channel-wise ops only (sparseops.tickets.units: ReLU, pools, dropout, flatten), none
of them excluded from pruning (an excluded layer is never masked), and at most the one batch norm that
alone reads the layer (affine). Then the readers' columns and the
zeroed scale, shift and bias get exactly zero gradients: the channel stays 0 while training (SGD,
Adam: weight decay of 0 is 0), and a masked reader column reads only zeros, so masking it changes no
output. Elsewhere (a residual sum, a concatenation, the model's output, a model torch.fx cannot
trace) only the filter's row is masked, as before: its batch norm still emits its shift.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .units import _NORMS, _Tracer, _passes_zero, _plain_blocks


@dataclass
class Removable:
    """A layer whose pruned channels can be removed: its batch norm (or None) and {reader: the
    layer's channel feeding each of the reader's input columns}."""

    norm: str | None
    readers: dict[str, torch.Tensor]


def _consumers(start, channels: int, modules, exclude) -> dict[str, torch.Tensor] | None:
    """{reader: channel of each input column} if every path from `start` ends in a Conv2d/Linear
    reader (patched, not excluded) through zero-preserving, channel-wise ops, else None."""
    out = {}
    todo = [(start, torch.arange(channels), False)]
    while todo:
        node, channel_of, flat = todo.pop()
        for user in node.users:
            if not user.args or user.args[0] is not node or any(a is node for a in user.args[1:]) or \
                    any(v is node for v in user.kwargs.values()):
                return None
            if user.op == "call_module" and isinstance(modules[user.target], (nn.Conv2d, nn.Linear)):
                m = modules[user.target]
                cols = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                if not hasattr(m, "set_mask") or user.target in exclude or (isinstance(m, nn.Conv2d) and (
                        flat or m.groups != 1)):
                    return None
                per = cols // len(channel_of) if flat and cols % len(channel_of) == 0 else 1
                if cols != len(channel_of) * per:  # (NCHW flattened from dim 1: per channel, its H*W features)
                    return None
                out[user.target] = channel_of.repeat_interleave(per)
                continue
            ok, flattens = _passes_zero(user, modules)
            if not ok or (flattens and flat):
                return None
            todo.append((user, channel_of, flat or flattens))
    return out or None


def removable_layers(model: nn.Module, names, exclude=()) -> dict[str, Removable]:
    """{layer name: Removable} for the layers `names` whose pruned channels can be removed exactly (a
    reader in `exclude` is never masked: its channels are not); a model torch.fx cannot trace has none
    (a warning says so)."""
    try:
        with _plain_blocks(model):
            graph = _Tracer().trace(model)
    except Exception as exc:
        warnings.warn(f"sparseops.tickets.imp: the model cannot be traced by torch.fx ({exc}); channel pruning "
                      "masks only the pruned filters' rows (a batch norm after them still emits its shift)",
                      RuntimeWarning, stacklevel=3)
        return {}
    modules = dict(model.named_modules())
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    out = {}
    for name in names:
        layer, node = modules[name], nodes.get(name)
        if node is None or not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        channels = layer.weight.shape[0]
        users, start, norm = list(node.users), node, None
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _NORMS):
            bn = modules[users[0].target]
            if bn.num_features != channels or not bn.affine:
                continue
            start, norm = users[0], users[0].target
        readers = _consumers(start, channels, modules, set(exclude))
        if readers is not None:
            out[name] = Removable(norm, readers)
    return out


def removed_channels(masks: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """bool [C]: the channels of layer `name` whose whole filter `masks` prunes."""
    return ~masks[name].flatten(1).any(1)


def with_readers(masks: dict[str, torch.Tensor], removable: dict[str, Removable]) -> dict[str, torch.Tensor]:
    """`masks` with the readers' columns for every removed channel pruned too."""
    out = dict(masks)
    for name, r in removable.items():
        gone = removed_channels(masks, name)
        for reader, channel_of in r.readers.items():
            cols = ~gone.to(out[reader].device)[channel_of.to(out[reader].device)]
            out[reader] = out[reader] & cols.view(1, -1, *([1] * (out[reader].dim() - 2)))
    return out


@torch.no_grad()
def zero_removed(model: nn.Module, masks: dict[str, torch.Tensor], removable: dict[str, Removable]) -> None:
    """Zeroes the layer's bias and the batch norm's scale and shift of every removed channel (after a
    rewind they hold the rewound values again): the channel is then dead as sparseops.shrink needs it."""
    modules = dict(model.named_modules())
    for name, r in removable.items():
        gone = removed_channels(masks, name)
        targets = [modules[name].bias] + ([modules[r.norm].weight, modules[r.norm].bias] if r.norm else [])
        for t in targets:
            if t is not None:
                t[gone.to(t.device)] = 0
