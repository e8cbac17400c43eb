"""A model prepared for structured search: its layers patched (hard masks), its residual blocks gated,
a ChannelGate on every unit (sparseops.tickets.units), and the masks kept at the gates that are
exactly 0. Gates as plain {name: bool tensor} dicts: read, apply (with checks), and the random
channel baseline that keeps as many channels per unit at random positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import gates as sgates
from ..patch import check_model, patch, patched_layers
from .pruning import resolve_exclude
from .units import MaskSync, Unit, block_macs, find_units


@dataclass
class Structure:
    """The gated units of a prepared model; `sync()` puts the exactly-0 gates into the weight masks."""

    model: nn.Module
    units: list[Unit]
    blocks: list[tuple[str, nn.Module]]
    sync: MaskSync
    block_macs: dict[str, float]

    def channel_gates(self) -> list[sgates.ChannelGate]:
        return self.sync.gates

    def score_parameters(self) -> list[nn.Parameter]:
        return [g.score for g in self.sync.gates] + [b.gate_score for _, b in self.blocks]

    def penalty_weights(self, flops: bool) -> tuple[list[torch.Tensor], list[float]]:
        """Per unit's channels and per block: 1, or its multiply-accumulates over the mean of all of them."""
        if not flops:
            return [torch.ones(u.channels) for u in self.units], [1.0] * len(self.blocks)
        every = torch.cat([u.macs for u in self.units] + [torch.tensor([self.block_macs[n] for n, _ in self.blocks],
                                                                       dtype=torch.float64)])
        mean = float(every.mean()) if every.numel() else 1.0
        return ([(u.macs / mean).float() for u in self.units], [self.block_macs[n] / mean for n, _ in self.blocks])

    def macs(self) -> tuple[float, float]:
        """(multiply-accumulates per sample the hard gates keep, those of all units and blocks)."""
        kept = total = 0.0
        for u, g in zip(self.units, self.sync.gates, strict=True):
            keep = (g.score > 0) if g.soft else (g.hard != 0)
            kept += float(u.macs[keep.cpu()].sum())
            total += float(u.macs.sum())
        for n, b in self.blocks:
            on = float(b.gate_score.detach()) > 0 if b.gate_soft else float(b.gate) != 0
            kept += self.block_macs[n] * on
            total += self.block_macs[n]
        return kept, total


def _default_units(model: nn.Module, filter_fn, exclude) -> list[str]:
    excluded = set(resolve_exclude(model, tuple(resolve_exclude(model, exclude)) + ("output",)))
    names = []
    for name, m in patched_layers(model):
        if name in excluded or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if filter_fn is None or filter_fn(m, name):
            names.append(name)
    return names


def prepare(model: nn.Module, example: torch.Tensor, *, layer_gates=None, filter_fn=None, exclude=None,
            s0: float = 0.0, soft: bool = True) -> Structure:
    """Patches `model` (every Conv2d/Linear, hard masks), gates its residual blocks (`layer_gates`: None
    gates the blocks sparseops knows if it has any, True requires them, False none, or a filter),
    and puts a ChannelGate (scores at s0) on each unit: every patched Conv2d/Linear but the output
    layer and `exclude`, that `filter_fn(module, name)` accepts. `example`: a batch of inputs to trace."""
    check_model(model, "tickets.structured_cs")
    patch(model)
    if layer_gates is None:
        known = [m for m in model.modules() if sgates._known(m) is not None and not sgates.is_gated(m)]
        layer_gates = bool(known)
    if layer_gates is not False:
        sgates.add_gates(model, None if layer_gates is True else layer_gates)
    names = _default_units(model, filter_fn, exclude)
    if not names:
        raise ValueError("sparseops.tickets.structured_cs: no layer is a channel unit (all excluded or filtered)")
    units = find_units(model, example, names)
    modules = dict(model.named_modules())
    for u in units:
        gate = sgates.gate_channels(modules[u.gate_at], u.channels, s0)
        gate.soft = soft
    blocks = sgates.gated_blocks(model)
    for _, b in blocks:
        if soft:
            sgates.attach_gate_score(b, s0)
    return Structure(model, units, blocks, MaskSync(model, units), block_macs(model, example) if blocks else {})


def get_gates(structure: Structure) -> dict:
    """{"channels": {unit layer: bool [C]}, "blocks": {block: bool}}: the hard gates (s > 0 while soft)."""
    channels = {}
    for u, g in zip(structure.units, structure.sync.gates, strict=True):
        channels[u.name] = ((g.score > 0) if g.soft else (g.hard != 0)).detach().cpu().clone()
    blocks = {n: bool(b.gate_score > 0) if b.gate_soft else bool(b.gate != 0) for n, b in structure.blocks}
    return {"channels": channels, "blocks": blocks}


@torch.no_grad()
def apply_gates(structure: Structure, chosen: dict) -> None:
    """Hard gates from `chosen` (as `get_gates` gives; every unit and block must be named), then the masks."""
    if not isinstance(chosen, dict) or set(chosen) != {"channels", "blocks"}:
        raise TypeError("sparseops.tickets.apply_gates: gates must be {'channels': {...}, 'blocks': {...}}")
    channels, blocks = dict(chosen["channels"]), dict(chosen["blocks"])
    want = {u.name: u for u in structure.units}
    if set(channels) != set(want):
        raise ValueError(f"sparseops.tickets.apply_gates: gates['channels'] must name the units {sorted(want)}, "
                         f"got {sorted(channels)}")
    if set(blocks) != {n for n, _ in structure.blocks}:
        raise ValueError(f"sparseops.tickets.apply_gates: gates['blocks'] must name the gated blocks "
                         f"{sorted(n for n, _ in structure.blocks)}, got {sorted(blocks)}")
    for name, keep in channels.items():
        keep = torch.as_tensor(keep)
        if keep.dtype != torch.bool or tuple(keep.shape) != (want[name].channels,):
            raise ValueError(f"sparseops.tickets.apply_gates: gates['channels'][{name!r}] must be a bool tensor of "
                             f"shape ({want[name].channels},), got {keep.dtype} {tuple(keep.shape)}")
        if not bool(keep.any()):
            raise ValueError(f"sparseops.tickets.apply_gates: unit {name} keeps no channel (every channel pruned "
                             "disconnects the network); keep at least one")
        channels[name] = keep
    for u, g in zip(structure.units, structure.sync.gates, strict=True):
        g.set_ticket(channels[u.name])
    for n, b in structure.blocks:  # kept at 1 / sigmoid(s0), as CS's ticket masks
        b.gate.fill_((1.0 + math.exp(-b.gate_s0)) if blocks[n] else 0.0)
        b.gate_soft = False
    structure.sync()


def random_gates(chosen: dict, *, generator: torch.Generator | None = None) -> dict:
    """The random channel baseline: in every unit as many channels as `chosen` keeps, at uniformly random
    positions; the block gates as they are."""
    out = {}
    for name, keep in chosen["channels"].items():
        keep = torch.as_tensor(keep)
        order = torch.randperm(keep.numel(), generator=generator)
        new = torch.zeros(keep.numel(), dtype=torch.bool)
        new[order[:int(keep.sum())]] = True
        out[name] = new
    return {"channels": out, "blocks": dict(chosen["blocks"])}


def kept_fraction(chosen: dict) -> float:
    """The fraction of all units' channels that `chosen` keeps."""
    kept = sum(int(torch.as_tensor(k).sum()) for k in chosen["channels"].values())
    total = sum(torch.as_tensor(k).numel() for k in chosen["channels"].values())
    return kept / total if total else 1.0
