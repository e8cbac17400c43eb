"""soft_masked_linear: a linear layer under CS's soft mask, `x @ (w * scale * sigmoid(beta*s))^T + bias`,
with the mask fused into the GEMM on GPUs (Triton)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend, checks, reference
from .._library import define, lib, tracing
from ..layout import mask_stats
from ._common import autocast_args, grads_fake, linear_fake, linear_out
from .masked_linear import masked_linear, runs_dense
from .soft_mask import soft_mask


# Outside Triton: the soft mask op, then a dense GEMM (the masked weight is materialised).
@torch.library.register_kernel("sparseops::soft_masked_linear", ("cpu", "cuda"))
def _(x, w, s, beta, scale, bias):
    return linear_out(x, lib.soft_mask(w, s, beta, scale), bias)


@torch.library.register_kernel("sparseops::soft_masked_linear_backward", ("cpu", "cuda"))
def _(grad, x, w, s, beta, scale, output_mask):
    need_x, need_w, need_s, need_b = output_mask
    n, k = w.shape
    g2 = grad.reshape(-1, n)
    dx = linear_out(grad, lib.soft_mask(w, s, beta, scale).t()) if need_x else w.new_empty(0)
    dw = ds = None
    if need_w or need_s:
        dw, ds = lib.soft_mask_backward(g2.t() @ x.reshape(-1, k), w, s, beta, scale)
    return (dx, dw if need_w else w.new_empty(0), ds if need_s else w.new_empty(0),
            g2.sum(0) if need_b else w.new_empty(0))


define("soft_masked_linear", lambda x, w, s, beta, scale, bias: linear_fake("soft_masked_linear", x, w),
       grads=("x", "w", "s", "bias"))
define("soft_masked_linear_backward",
       lambda grad, x, w, s, beta, scale, output_mask: grads_fake(x, w, output_mask, extra=(s,)))


def check_soft(op: str, x, w, s, beta, scale, bias, groups=1):
    """The soft-masked ops' arguments, for every path: tensors on one device, of the op's shapes and
    one floating dtype (once autocast has cast them, while it is on), beta and scale as Python
    numbers (returned as floats)."""
    beta, scale = checks.number(op, beta, "beta"), checks.number(op, scale, "scale")
    checks.tensors(op, bias=bias, x=x, w=w)
    checks.tensors(op, s=s)
    checks.same_device(op, x=x, w=w, s=s, bias=bias)
    if op == "soft_masked_conv2d":
        checks.conv(op, x, w, bias, groups)
    else:
        checks.linear(op, x, w, bias)
    if tuple(s.shape) != tuple(w.shape):
        raise ValueError(f"sparseops.{op}: s must have the shape of w {tuple(w.shape)}, got {tuple(s.shape)}")
    # dtypes as F.linear / F.conv2d would see them (under autocast, a bfloat16 x meets float32 w)
    cx, cw, cs, cb = autocast_args(w.device, x, w, s, bias)
    checks.like(op, "w", cw, x=cx, s=cs, bias=cb)
    return beta, scale


def nonzero_stats(s: torch.Tensor, beta: float):
    """The MaskStats of `sigmoid(beta*s) != 0` (its `source` is that mask), or None while no entry
    can be 0: the soft mask is exactly 0 only below z = reference.SIGMOID_OFF_BELOW (-43.7)."""
    if s.numel() == 0 or tracing(s):  # (while tracing the values are unknown: the soft mask, then the dense op)
        return None
    with torch.no_grad():
        if not beta * float(s.min()) < reference.SIGMOID_OFF_BELOW:
            return None
        # sigmoid is above 0 at and above the cut (1e-19), so the mask is the cut's complement: one
        # pass over s instead of cut_sigmoid's five (a NaN score stays in, as its NaN mask value would)
        return mask_stats(torch.lt(beta * s, reference.SIGMOID_OFF_BELOW).logical_not_())


def soft_masked_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (w * scale * sigmoid(beta*s))^T + bias`: a linear layer under CS's soft mask.

    On GPUs with Triton the mask is fused into the GEMM (applied to each weight tile as it is
    loaded; tiles whose mask is exactly 0 are skipped; ds comes from the dw GEMM's epilogue): used
    with backend "triton", and in `auto` once measured faster on this GPU (thresholds.json "fused").
    Elsewhere: sparseops.soft_mask, then F.linear; on the CPU late in CS, when most of the mask is
    exactly 0, the masked product over the other entries (exact: the skipped ones contribute 0).
    """
    beta, scale = check_soft("soft_masked_linear", x, w, s, beta, scale, bias)
    found = []
    impl = backend.choose("soft_masked_linear", w.device, dtype=w.dtype,
                          nonzero=lambda: found.append(nonzero_stats(s, beta)) or found[-1])
    if impl == "reference":
        return reference.soft_masked_linear(x, w, s, beta, scale, bias)
    if impl == "triton":  # (the other paths end in F.linear or masked_linear, which follow autocast)
        x, w, s, bias = autocast_args(w.device, x, w, s, bias)
        return lib.triton_soft_masked_linear(x, w, s, beta, scale, bias)
    masked = soft_mask(w, s, beta, scale)
    if impl == "skip_zeros" and not runs_dense(x, masked, found[-1].source):  # (see soft_masked_conv2d)
        return masked_linear(x, masked, found[-1].source, bias)
    return F.linear(x, masked, bias)
