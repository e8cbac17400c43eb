"""Modules built on the sparseops ops."""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .layout import as_bool_mask


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed boolean mask, computed by the sparse kernels.

    Parameters stay `weight` and `bias` and the mask is the buffer `weight_mask` (the name
    torch.nn.utils.prune uses), so optimisers and state_dict keys work as with nn.Linear. The
    weight keeps its values at pruned entries; they get zero gradient and do not affect outputs.
    Editing `weight_mask` in place (e.g. `layer.weight_mask[...] = False`) takes effect at the
    next call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 mask: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if mask is None:
            mask = torch.ones(out_features, in_features, dtype=torch.bool, device=self.weight.device)
        self.register_buffer("weight_mask", self._as_mask(mask))

    def _as_mask(self, mask: torch.Tensor) -> torch.Tensor:
        m = as_bool_mask(mask, name="mask")
        if m.shape != self.weight.shape:
            raise ValueError(f"MaskedLinear: mask must have the weight's shape {tuple(self.weight.shape)}, "
                             f"got {tuple(m.shape)}")
        return m.to(self.weight.device).clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "MaskedLinear":
        """A MaskedLinear sharing `linear`'s parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MaskedLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        if mask is None:
            mask = torch.ones_like(linear.weight, dtype=torch.bool)
        new.register_buffer("weight_mask", new._as_mask(mask))
        return new

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        self.weight_mask.copy_(self._as_mask(mask))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.weight_mask.float().mean().item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(x, self.weight, self.weight_mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity:.3f}"
