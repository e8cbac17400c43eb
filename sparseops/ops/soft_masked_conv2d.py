"""soft_masked_conv2d: a convolution under CS's soft mask, `conv2d(x, w * scale * sigmoid(beta*s), ...)`,
with the mask fused into the implicit GEMM on GPUs (Triton)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend, reference
from .._library import define, lib
from ._common import autocast_args, conv_fake, conv_geometry, format_of, grads_fake
from .masked_conv2d import masked_conv2d, runs_dense
from .soft_mask import soft_mask
from .soft_masked_linear import check_soft, nonzero_stats


@torch.library.register_kernel("sparseops::soft_masked_conv2d", ("cpu", "cuda"))
def _(x, w, s, beta, scale, bias, stride, padding, dilation):
    return F.conv2d(x, lib.soft_mask(w, s, beta, scale), bias, stride, padding, dilation).contiguous(
        memory_format=format_of(x))


@torch.library.register_kernel("sparseops::soft_masked_conv2d_backward", ("cpu", "cuda"))
def _(grad, x, w, s, beta, scale, stride, padding, dilation, output_mask):
    need_x, need_w, need_s, need_b = output_mask
    grad_fn = torch.nn.grad
    dx = (grad_fn.conv2d_input(x.shape, lib.soft_mask(w, s, beta, scale), grad, stride, padding, dilation)
          .contiguous(memory_format=format_of(x)) if need_x else w.new_empty(0))
    dw = ds = None
    if need_w or need_s:
        dw, ds = lib.soft_mask_backward(grad_fn.conv2d_weight(x, w.shape, grad, stride, padding, dilation), w, s,
                                        beta, scale)
    return (dx, dw if need_w else w.new_empty(0), ds if need_s else w.new_empty(0),
            grad.sum((0, 2, 3)) if need_b else w.new_empty(0))


define("soft_masked_conv2d",
       lambda x, w, s, beta, scale, bias, stride, padding, dilation:
       conv_fake("soft_masked_conv2d", x, w, stride, padding, dilation),
       grads=("x", "w", "s", "bias"))
define("soft_masked_conv2d_backward",
       lambda grad, x, w, s, beta, scale, stride, padding, dilation, output_mask:
       grads_fake(x, w, output_mask, extra=(s,)))


def soft_masked_conv2d(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0,
                       bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1):
    """`conv2d(x, w * scale * sigmoid(beta*s), bias, ...)`: a convolution under CS's soft mask.

    With Triton (forced, or in `auto` once measured faster on this GPU: thresholds.json "fused") the
    mask is applied to each weight tile inside the implicit GEMM, tiles whose mask is exactly 0 are
    skipped, and dw and ds come from one GEMM; groups=1 and symmetric padding. Elsewhere, and for
    other convolutions in `auto`: sparseops.soft_mask, then F.conv2d (on the CPU late in CS, the
    masked convolution over the entries whose mask is not exactly 0).
    """
    op = "soft_masked_conv2d"
    beta, scale = check_soft(op, x, w, s, beta, scale, bias, groups)
    stride_, pad, dilation_, supported = conv_geometry(op, x, w, stride, padding, dilation, groups)
    found = []
    impl = backend.choose(op, w.device, supported=supported, dtype=w.dtype,
                          nonzero=lambda: found.append(nonzero_stats(s, beta)) or found[-1])
    if impl == "reference":
        return reference.soft_masked_conv2d(x, w, s, beta, scale, bias, stride, padding, dilation, groups)
    if impl == "triton":  # (the other paths end in F.conv2d or masked_conv2d, which follow autocast)
        x, w, s, bias = autocast_args(w.device, x, w, s, bias)
        return lib.triton_soft_masked_conv2d(x, w, s, beta, scale, bias, stride_, pad, dilation_)
    masked = soft_mask(w, s, beta, scale)
    # (where the masked op runs a dense path here, F.conv2d on `masked`, already 0 off the mask, is that
    # product without its pass applying the mask: the soft mask's backward zeroes dw there too)
    if impl == "skip_zeros" and not runs_dense(x, masked, found[-1].source, stride, padding, dilation, groups):
        return masked_conv2d(x, masked, found[-1].source, bias, stride, padding, dilation, groups)
    return F.conv2d(x, masked, bias, stride, padding, dilation, groups)
