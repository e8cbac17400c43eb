"""sparseops under torch.distributed (DDP, FSDP2): masks must be the same on every rank, and FSDP2
(`fully_shard`) turns parameters into DTensors (each rank holds a shard) while buffers, the masks
among them, stay whole plain tensors on every rank, never synchronised by FSDP2.

`sync_masks` checks (or makes) the hard masks agree across ranks; the rest are the DTensor helpers
that patch, unpatch and pruning use. Nothing here runs a collective unless torch.distributed is
initialised with more than one rank.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from . import nn as snn


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def like(t: torch.Tensor, dtensor) -> torch.Tensor:
    """The whole tensor `t`, present on every rank, as a DTensor placed as `dtensor` (each rank keeps
    its own part of its own copy: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, dtensor.device_mesh, dtensor.placements, src_data_rank=None)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (fully_shard) wraps `module` or any parameter of its own is a DTensor."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule) or any(is_dtensor(p) for p in module.parameters(recurse=False))


def world_size() -> int:
    """The default process group's size; 1 without one."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _digest(mask: torch.Tensor) -> str:
    m = mask.detach().cpu().contiguous()
    return hashlib.sha256(f"{tuple(m.shape)}".encode() + m.numpy().tobytes()).hexdigest()


def check_masks(masks: dict[str, torch.Tensor], who: str) -> None:
    """RuntimeError, on every rank, naming the layers (and ranks) whose masks differ from rank 0's.
    A collective (every rank must call it) when more than one rank runs; else nothing."""
    if world_size() == 1:
        return
    digests = [None] * world_size()
    torch.distributed.all_gather_object(digests, {k: _digest(m) for k, m in masks.items()})
    names = sorted(set().union(*digests), key=str)
    bad = {k: [r for r, d in enumerate(digests) if d.get(k) != digests[0].get(k)] for k in names}
    bad = {k: ranks for k, ranks in bad.items() if ranks}
    if bad:
        raise RuntimeError(
            f"sparseops.{who}: masks differ between ranks (layer: ranks whose mask is not rank 0's): {bad}. "
            "Every rank must prune alike (random pruning: a generator seeded the same on every rank); "
            "sparseops.sync_masks(model, src=0) copies rank 0's masks to every rank")


def _hard_layers(model: nn.Module):
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, snn._MaskedMixin) and id(m.weight_mask) not in seen:
            seen.add(id(m.weight_mask))
            yield name, m


@torch.no_grad()
def sync_masks(model: nn.Module, *, src: int | None = None) -> nn.Module:
    """Masks on every rank of the default process group, and returns `model`.

    `src=None` checks that every hard-masked layer's mask is the same on every rank, and raises
    RuntimeError (on every rank) naming the layers and ranks that differ. `src=r` copies rank r's
    masks to every rank instead (a broadcast per layer, in place). Every rank must call it; without
    an initialised process group (or with one rank) it does nothing. Call it on the module inside
    DistributedDataParallel (`ddp.module`); FSDP2 models are passed as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparseops.sync_masks: model must be a torch.nn.Module, got {type(model).__name__}")
    if src is not None and (isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < world_size()):
        raise ValueError(f"sparseops.sync_masks: src must be a rank in [0, {world_size()}), got {src!r}")
    layers = list(_hard_layers(model))
    if world_size() == 1:
        return model
    if src is None:
        check_masks({name: m.weight_mask for name, m in layers}, "sync_masks")
        return model
    for _, m in layers:
        buf = m.weight_mask.to(torch.uint8)  # gloo and NCCL broadcast uint8, not every backend bool
        torch.distributed.broadcast(buf, src)
        m.weight_mask.copy_(buf.bool())
    return model
