"""soft_mask and soft_mask_l1: Continuous Sparsification's soft mask and its penalty, fused."""
from __future__ import annotations

import math
import weakref
from numbers import Real

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
define("soft_mask_with_l1", lambda w, s, beta, scale: (_fake(w, s, beta, scale), _l1_fake(s, beta, scale)))
define("soft_mask_with_l1_backward", lambda grad, grad_l1, w, s, beta, scale: _backward_fake(grad, w, s, beta, scale))


def _with_l1_setup(ctx, inputs, output):
    w, s, ctx.beta, ctx.scale = inputs
    if _plain(w) and _plain(s):
        # Kept, not saved: the pair's two outputs may be differentiated in separate backward calls
        # (the loss, then the penalty), and the first must not free what the second needs. The
        # versions stand for autograd's check that the inputs were not modified in place since.
        ctx.inputs, ctx.versions = (w, s), (w._version, s._version)
    else:
        ctx.inputs = None
        ctx.save_for_backward(w, s)


def _with_l1_backward(ctx, grad, grad_l1):
    # Two outputs: the backward takes both incoming gradients (zeros for an unused one) in one pass.
    if ctx.inputs is None:
        w, s = ctx.saved_tensors
    else:
        w, s = ctx.inputs
        if (w._version, s._version) != ctx.versions:
            raise RuntimeError("sparseops.soft_mask: one of the variables needed for gradient computation (w or s) "
                               "has been modified by an inplace operation since the forward")
    dw, ds = lib.soft_mask_with_l1_backward(grad, grad_l1, w, s, ctx.beta, ctx.scale)
    return dw, ds, None, None


torch.library.register_autograd("sparseops::soft_mask_with_l1", _with_l1_backward, setup_context=_with_l1_setup)


def _check_pair(op, w, s, beta, scale):
    """Every path's checks (the C++ op, which both public functions run, names its own)."""
    beta, scale = checks.number(op, beta, "beta"), checks.number(op, scale, "scale")
    checks.tensors(op, w=w, s=s)
    checks.same_device(op, w=w, s=s)
    checks.like(op, "w", w, s=s)  # floating, one dtype: every path takes the call or none does
    if w.shape != s.shape:
        raise ValueError(f"sparseops.{op}: s must have the shape of w {list(w.shape)}, got {list(s.shape)}")
    for name, v in (("beta", beta), ("scale", scale)):  # (while tracing, the kernels check: a traced float has no value)
        if not torch.compiler.is_compiling() and not math.isfinite(v):
            raise ValueError(f"sparseops.{op}: {name} must be finite, got {v}")
    return beta, scale


def soft_mask(w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`w * scale * sigmoid(beta * s)`, Continuous Sparsification's masked weight, fused: one pass
    forward and one pass for both gradients. `scale` is 1/sigmoid(s0) in the official CS code."""
    beta, scale = _check_pair("soft_mask", w, s, beta, scale)
    call = trial(_run_soft_mask, w, s, beta, scale, batched=False)
    return call.call(backend.choose("soft_mask", w.device, numel=w.numel(), dtype=w.dtype, trial=call))


def _run_soft_mask(impl, w, s, beta, scale):
    if impl == "reference":
        return reference.soft_mask(w, s, beta, scale)
    if impl != "cpu":
        return (lib.triton_soft_mask if impl == "triton" else lib.soft_mask)(w, s, beta, scale)
    # The CPU kernel sums the mask in the same pass: kept for soft_mask_l1 of these scores.
    out, l1 = lib.soft_mask_with_l1(w, s, beta, scale)
    _keep_penalty(w, s, beta, scale, l1)
    return out


# CS's step runs soft_mask in the forward, then the penalty of the same scores: a soft layer's
# penalty() takes the one kept from its forward (penalty_after_forward), so one backward pass of the
# kernel gives dw and both parts of ds. Never for traced or subclassed tensors.
_penalties = torch.utils.weak.WeakIdKeyDictionary()


def _plain(s: torch.Tensor) -> bool:
    return type(s) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()


def _keep_penalty(w, s, beta, scale, l1):
    if _plain(s):  # (w weakly: the pair's backward reads it, so it must not have changed either)
        _penalties[s] = (weakref.ref(w), w._version, s._version, beta, scale, torch.is_grad_enabled(), l1)


def penalty_after_forward(s: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """`soft_mask_l1(s, beta, scale)`, taken from the last soft_mask of these scores where nothing
    has changed since (w and s not edited in place, same beta, scale and grad mode): a layer's
    penalty after its forward. (Writes through `.data` move no version counter: they are not seen.)"""
    kept = _kept_penalty(s, float(beta), float(scale)) if isinstance(beta, Real) and isinstance(scale, Real) else None
    return kept if kept is not None else soft_mask_l1(s, beta, scale)


def _kept_penalty(s, beta, scale):
    entry = _penalties.get(s) if _plain(s) else None
    if entry is None:
        return None
    w_ref, w_version, *facts, l1 = entry
    w = w_ref()
    if w is None or w._version != w_version or facts != [s._version, beta, scale, torch.is_grad_enabled()]:
        return None
    return l1.clone()  # a fresh tensor per call, as from the op


def soft_mask_with_l1(w: torch.Tensor, s: torch.Tensor, beta: float = 1.0,
                      scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(soft_mask(w, s, beta, scale), soft_mask_l1(s, beta, scale))`, the masked weight and CS's
    penalty of the same scores, in one pass forward and one for all the gradients (the penalty's
    included): about half the memory traffic of calling the two."""
    beta, scale = _check_pair("soft_mask_with_l1", w, s, beta, scale)
    call = trial(_run_with_l1, w, s, beta, scale, batched=False)
    return call.call(backend.choose("soft_mask_with_l1", w.device, numel=w.numel(), dtype=w.dtype, trial=call))


def _run_with_l1(impl, w, s, beta, scale):
    if impl == "reference":
        return reference.soft_mask(w, s, beta, scale), reference.soft_mask_l1(s, beta, scale)
    if impl == "triton":  # (not fused on Triton yet: its two kernels)
        return lib.triton_soft_mask(w, s, beta, scale), lib.triton_soft_mask_l1(s, beta, scale)
    return lib.soft_mask_with_l1(w, s, beta, scale)


def soft_mask_l1(s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`scale * sum(sigmoid(beta * s))`, CS's penalty on the mask, with a fused gradient."""
    beta = checks.number("soft_mask_l1", beta, "beta")
    scale = checks.number("soft_mask_l1", scale, "scale")
    checks.tensors("soft_mask_l1", s=s)
    checks.same_device("soft_mask_l1", s=s)
    checks.like("soft_mask_l1", "s", s)
    call = trial(_run_soft_mask_l1, s, beta, scale, batched=False)
    return call.call(backend.choose("soft_mask_l1", s.device, numel=s.numel(), dtype=s.dtype, trial=call))


def _run_soft_mask_l1(impl, s, beta, scale):
    if impl == "reference":
        return reference.soft_mask_l1(s, beta, scale)
    return (lib.triton_soft_mask_l1 if impl == "triton" else lib.soft_mask_l1)(s, beta, scale)
