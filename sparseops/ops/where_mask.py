"""where_mask: `where(mask, w, 0)`, the masked weight (and masked gradient) of every dense path on
the CPU, in one pass of csrc/cpu/where_mask.cpp: exact where a pruned weight is inf or NaN, without
torch.nn.utils.prune's multiply (wrong there) or the finiteness pass that made the multiply safe
(reference.masked_weight). Elsewhere (other devices, tracing, tensor subclasses) the reference's."""
from __future__ import annotations

import torch

from .. import reference
from .._library import _PLAIN, define, lib

# Its autograd formula (the gradient is the same select of the incoming one) is C++ (where_mask.cpp):
# torch.library's Python one cost more than the select on small layers.
define("where_mask", lambda w, mask: torch.empty_like(w, memory_format=torch.contiguous_format))
define("where_mask_", lambda w, mask: None)


def _here(t: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the one-pass kernel takes the call: a real CPU tensor of the mask's shape, run eagerly."""
    return (t.device.type == "cpu" and type(t) in _PLAIN and type(mask) in _PLAIN and t.dtype.is_floating_point
            and mask.dtype == torch.bool and t.shape == mask.shape and not torch.compiler.is_compiling())


def where_mask(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w at kept entries, exactly 0 at pruned ones; its gradient the same select of the incoming one."""
    mask = mask if mask.dtype == torch.bool else mask != 0
    return lib.where_mask(w, mask) if _here(w, mask) else reference.masked_weight(w, mask)


def where_mask_(dw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dw zeroed at pruned entries, in place."""
    mask = mask if mask.dtype == torch.bool else mask != 0
    if not _here(dw, mask):
        return reference.mask_grad_(dw, mask)
    lib.where_mask_(dw, mask)
    return dw
