"""soft_mask and soft_mask_l1: Continuous Sparsification's soft mask and its penalty, fused."""
from __future__ import annotations

import torch

from .. import backend, checks, reference
from .._library import define, lib
from ._common import trial


def _fake(w, s, beta, scale):
    torch._check(w.shape == s.shape, lambda: f"sparseops.soft_mask: s must have the shape of w {tuple(w.shape)}")
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _backward_fake(grad, w, s, beta, scale):
    return (torch.empty_like(w, memory_format=torch.contiguous_format),
            torch.empty_like(s, memory_format=torch.contiguous_format))


def _l1_fake(s, beta, scale):
    return s.new_empty(())


def _l1_backward_fake(grad, s, beta, scale):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


define("soft_mask", _fake, grads=("w", "s"))
define("soft_mask_backward", _backward_fake)
define("soft_mask_l1", _l1_fake, grads=("s",))
define("soft_mask_l1_backward", _l1_backward_fake)


def soft_mask(w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`w * scale * sigmoid(beta * s)`, Continuous Sparsification's masked weight, fused: one pass
    forward and one pass for both gradients. `scale` is 1/sigmoid(s0) in the official CS code."""
    beta = checks.number("soft_mask", beta, "beta")
    scale = checks.number("soft_mask", scale, "scale")
    checks.tensors("soft_mask", w=w, s=s)
    checks.same_device("soft_mask", w=w, s=s)
    checks.like("soft_mask", "w", w, s=s)  # floating, one dtype: every path takes the call or none does
    impl = backend.choose("soft_mask", w.device, numel=w.numel(), dtype=w.dtype,
                          trial=trial(_run_soft_mask, w, s, beta, scale, batched=False))
    return _run_soft_mask(impl, w, s, beta, scale)


def _run_soft_mask(impl, w, s, beta, scale):
    if impl == "reference":
        return reference.soft_mask(w, s, beta, scale)
    return (lib.triton_soft_mask if impl == "triton" else lib.soft_mask)(w, s, beta, scale)


def soft_mask_l1(s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`scale * sum(sigmoid(beta * s))`, CS's penalty on the mask, with a fused gradient."""
    beta = checks.number("soft_mask_l1", beta, "beta")
    scale = checks.number("soft_mask_l1", scale, "scale")
    checks.tensors("soft_mask_l1", s=s)
    checks.same_device("soft_mask_l1", s=s)
    checks.like("soft_mask_l1", "s", s)
    impl = backend.choose("soft_mask_l1", s.device, numel=s.numel(), dtype=s.dtype,
                          trial=trial(_run_soft_mask_l1, s, beta, scale, batched=False))
    return _run_soft_mask_l1(impl, s, beta, scale)


def _run_soft_mask_l1(impl, s, beta, scale):
    if impl == "reference":
        return reference.soft_mask_l1(s, beta, scale)
    return (lib.triton_soft_mask_l1 if impl == "triton" else lib.soft_mask_l1)(s, beta, scale)
