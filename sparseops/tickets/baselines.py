"""The baselines a ticket is compared with: a random mask with the ticket's per-layer sparsity, and
the ticket's own mask on freshly initialised weights."""
from __future__ import annotations

import torch
from torch import nn

from ..patch import check_model
from .masks import _as_masks, set_masks


def random_ticket(ticket, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Masks that keep, in every layer, as many weights as `ticket` does, at uniformly random positions."""
    out = {}
    for k, m in _as_masks(ticket, "random_ticket").items():
        keep = int(m.sum())
        order = torch.randperm(m.numel(), generator=generator)
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[order[:keep]] = True
        out[k] = flat.view(m.shape).to(m.device)
    return out


@torch.no_grad()
def reinitialize(model: nn.Module, ticket=None, *, seed: int | None = None) -> nn.Module:
    """Fresh weights for every layer with `reset_parameters` (torch's default init), then the ticket's
    masks if given: the "ticket with a random re-init" baseline. `seed` makes the init reproducible."""
    check_model(model, "tickets.reinitialize")
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
    if ticket is not None:
        set_masks(model, ticket, strict=False)
    return model
