"""The structured units of a model, found by tracing it with torch.fx: each Conv2d/Linear's output
channels (gated after the BatchNorm that reads the layer's output, if one does, since a gate before a
batch norm is normalised away), the layers that read those channels only through zero-preserving,
channel-wise ops (ReLU, pooling, dropout, flatten: a channel gated to exactly 0 reaches them as
exact zeros, so their columns for it can be masked too), and each unit's and block's cost in
multiply-accumulates per sample. `sync_masks` turns the channels whose gate is exactly 0 into
whole zero rows (the layer) and columns (its readers) of the layers' `weight_mask`, so that they cost
nothing on kernels that skip them and the result stays that of multiplying by the gates.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import gates

_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.Dropout, nn.Dropout2d,
                 nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_ZERO_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.tanh, F.dropout, F.max_pool2d,
                   F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten}
_ZERO_METHODS = {"relu", "tanh", "flatten"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Unit:
    """One layer's output channels. `gate_at` names the module whose output the gate multiplies (the
    layer, or the batch norm reading it); `readers` maps each reading layer to, per input column, the
    unit's channel feeding it; `macs` per channel: its row of the layer and its columns in the readers."""

    name: str
    layer: nn.Module
    gate_at: str
    channels: int
    readers: dict[str, torch.Tensor] = field(default_factory=dict)
    macs: torch.Tensor | None = None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (nn.Conv2d, nn.Linear, *_NORMS)) or super().is_leaf_module(m, qualname)


@contextlib.contextmanager
def _plain_blocks(model):
    """Gated blocks traced as their plain class (a gate's `if g == 0` cannot be traced)."""
    blocks = gates.gated_blocks(model)
    for _, b in blocks:
        b.__class__ = b._gate_base
    try:
        yield
    finally:
        for _, b in blocks:
            b.__class__ = gates._gated_class(b.__class__)


def trace(model: nn.Module, example: torch.Tensor):
    """(graph module, {module name: node}) with each node's output shape (node.meta['tensor_meta'])
    from `example` (run in eval mode without gradients: batch-norm statistics are not touched)."""
    with _plain_blocks(model):
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:
            raise ValueError(f"sparseops.tickets.structured_cs: the model cannot be traced by torch.fx ({exc}); "
                             "structured units are found from its graph") from None
        gm = fx.GraphModule(model, graph)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example)
        finally:
            model.train(was)
    return gm, {n.target: n for n in graph.nodes if n.op == "call_module"}


def _shape(node):
    meta = node.meta.get("tensor_meta")
    return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)


def _passes_zero(node, modules) -> tuple[bool, bool]:
    """(zero-preserving and channel-wise on its first argument, flattens from dim 1)."""
    if node.op == "call_module":
        m = modules[node.target]
        flat = isinstance(m, nn.Flatten)
        ok = isinstance(m, _ZERO_MODULES) and (not flat or (m.start_dim == 1 and m.end_dim == -1))
        return ok, flat
    if node.op == "call_function" and node.target in _ZERO_FUNCTIONS:
        if node.target is torch.flatten:
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return start == 1 and end == -1, True
        return True, False
    if node.op == "call_method" and node.target in _ZERO_METHODS:
        if node.target == "flatten":
            return node.args[1:] == (1,) and not node.kwargs, True
        return True, False
    return False, False


def _layer_macs(layer: nn.Module, out_shape) -> int:
    """Multiply-accumulates of one sample through `layer` (a Conv2d's weight once per output position)."""
    positions = 1
    for s in out_shape[2:]:
        positions *= s
    return layer.weight.numel() * positions


def _readers(start, channels, modules, shapes):
    """{reader layer name: channel of each input column} over chains of zero-preserving ops from `start`."""
    out = {}
    todo = [(start, torch.arange(channels))]
    while todo:
        node, channel_of = todo.pop()
        for user in node.users:
            if not user.args or user.args[0] is not node or any(a is node for a in user.args[1:]):
                continue
            if user.op == "call_module" and isinstance(modules[user.target], (nn.Conv2d, nn.Linear)):
                m = modules[user.target]
                cols = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                if (not isinstance(m, nn.Conv2d) or m.groups == 1) and cols == len(channel_of):
                    out[user.target] = channel_of
                continue
            ok, flat = _passes_zero(user, modules)
            if not ok:
                continue
            if flat:
                shape = shapes.get(node)
                if shape is None or len(shape) < 2:
                    continue
                per = 1
                for s in shape[2:]:
                    per *= s
                todo.append((user, channel_of.repeat_interleave(per)))
            else:
                todo.append((user, channel_of))
    return out


def find_units(model: nn.Module, example: torch.Tensor, names) -> list[Unit]:
    """The units of the layers `names` (Conv2d/Linear module names of `model`), traced on `example`."""
    gm, nodes = trace(model, example)
    modules = dict(model.named_modules())
    shapes = {n: _shape(n) for n in gm.graph.nodes}
    units = []
    for name in names:
        layer, node = modules[name], nodes.get(name)
        if node is None:
            raise ValueError(f"sparseops.tickets.structured_cs: layer {name} is not called in the model's forward")
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"sparseops.tickets.structured_cs: layer {name} is a grouped convolution; "
                             "exclude it (channel units need groups=1)")
        gate_at = node
        users = list(node.users)
        if (len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _NORMS)
                and modules[users[0].target].num_features == channels):
            gate_at = users[0]
        unit = Unit(name, layer, gate_at.target, channels, _readers(gate_at, channels, modules, shapes))
        out_shape = shapes[node]
        macs = torch.full((channels,), _layer_macs(layer, out_shape) / channels, dtype=torch.float64)
        for reader, channel_of in unit.readers.items():
            r = modules[reader]
            per_col = _layer_macs(r, shapes[nodes[reader]]) / len(channel_of)
            macs += torch.bincount(channel_of, minlength=channels).double() * per_col
        unit.macs = macs
        units.append(unit)
    return units


def block_macs(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """{gated block name: multiply-accumulates per sample of its residual branch F} (its layers outside
    the shortcut: the modules named downsample or shortcut)."""
    _, nodes = trace(model, example)
    shapes = {n.target: _shape(n) for n in nodes.values()}
    out = {}
    for bname, block in gates.gated_blocks(model):
        total = 0.0
        for sub, m in block.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or sub.split(".")[0] in ("downsample", "shortcut"):
                continue
            full = f"{bname}.{sub}" if bname else sub
            if shapes.get(full) is not None:
                total += _layer_macs(m, shapes[full])
        out[bname] = total
    return out


def _gate_of(model_modules, unit: Unit):
    return model_modules[unit.gate_at].channel_gate


class MaskSync:
    """Keeps the layers' `weight_mask` at the gates that are exactly 0: a channel's row in its unit's layer
    and its columns in the readers; every layer of a block's branch F where the block's gate is 0 (F
    does not run then: this only makes the masks say so). Rebuilt only when that set changes."""

    def __init__(self, model: nn.Module, units: list[Unit]):
        modules = dict(model.named_modules())
        self.units = units
        self.gates = [_gate_of(modules, u) for u in units]
        self.blocks = gates.gated_blocks(model)
        self.layers = {u.name: u.layer for u in units}
        for u in units:
            for r in u.readers:
                self.layers[r] = modules[r]
        self.inside = {}  # block name -> the layers of its branch F (not its shortcut)
        for bname, block in self.blocks:
            names = [f"{bname}.{sub}" if bname else sub for sub, m in block.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear)) and hasattr(m, "set_mask")
                     and sub.split(".")[0] not in ("downsample", "shortcut")]
            self.inside[bname] = names
            for n in names:
                self.layers[n] = modules[n]
        self._last = None
        self._written = {}  # layer -> its kept rows and columns as last written

    @torch.no_grad()
    def off(self) -> tuple[list[torch.Tensor], list[bool]]:
        """(per unit, bool [C]: gate exactly 0; per block: gate exactly 0)."""
        return [g.off() for g in self.gates], [bool(b.gate_value() == 0) for _, b in self.blocks]

    @torch.no_grad()
    def masks_for(self, channels_off, blocks_off) -> dict[str, torch.Tensor]:
        """{layer: weight mask} where the channels and blocks marked off are pruned."""
        rows, cols = self._rows_cols(channels_off, blocks_off)
        return {n: self._mask(n, rows[n], cols[n]) for n in self.layers}

    def _mask(self, name, rows, cols):
        w = self.layers[name].weight
        extra = [1] * (w.dim() - 2)
        return (rows.view(-1, 1, *extra) & cols.view(1, -1, *extra)).expand_as(w)

    def _rows_cols(self, channels_off, blocks_off):
        """Per layer (kept rows, kept columns) where the channels and blocks marked off are pruned."""
        rows = {n: torch.ones(m.weight.shape[0], dtype=torch.bool, device=m.weight.device)
                for n, m in self.layers.items()}
        cols = {n: torch.ones(m.weight.shape[1], dtype=torch.bool, device=m.weight.device)
                for n, m in self.layers.items()}
        for u, o in zip(self.units, channels_off, strict=True):
            o = o.to(rows[u.name].device)
            rows[u.name] &= ~o
            for r, channel_of in u.readers.items():
                cols[r] &= ~o[channel_of.to(o.device)]
        for (bname, _), o in zip(self.blocks, blocks_off, strict=True):
            for n in self.inside[bname] if o else ():
                rows[n].zero_()
        return rows, cols

    @torch.no_grad()
    def __call__(self, enabled: bool = True) -> None:
        channels, blocks = self.off()
        if not enabled:
            channels, blocks = [torch.zeros_like(c) for c in channels], [False] * len(blocks)
        key = (torch.cat([c.cpu() for c in channels]) if channels else torch.zeros(0, dtype=torch.bool), blocks)
        if self._last is not None and torch.equal(key[0], self._last[0]) and key[1] == self._last[1]:
            return
        self._last = key
        rows, cols = self._rows_cols(channels, blocks)
        for n, layer in self.layers.items():  # only the layers whose rows or columns changed: a mask write is a
            now = torch.cat([rows[n], cols[n]])  # pass over the weight's size (and a new layout next step)
            if n not in self._written or not torch.equal(self._written[n], now):
                layer.set_mask(self._mask(n, rows[n], cols[n]))
                self._written[n] = now
