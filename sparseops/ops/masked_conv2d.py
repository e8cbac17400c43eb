"""masked_conv2d: `conv2d(x, w * mask, ...)` where only kept weights cost time, over a CSR layout of
W viewed as [C_out, C_in*kh*kw] (C++, CUDA C++ and Triton kernels) or a tap-major block layout
(Triton's tile kernels)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend, checks, reference, tuning
from .._library import define, lib
from ..layout import BlockLayout, CsrLayout, as_csr, channel_layout
from ..reference import mask_grad_, masked_weight
from . import channel_masked_conv2d
from ._common import as_layout, autocast_args, conv_fake, conv_geometry, format_of, grads_fake, plane, trial

define("masked_conv2d",
       lambda x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation:
       conv_fake("masked_conv2d", x, w, stride, padding, dilation),
       grads=("x", "w", "bias"))
define("masked_conv2d_backward",
       lambda grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, stride, padding, dilation, output_mask:
       grads_fake(x, w, output_mask))


# The block layout's op: Triton runs it (sparseops/triton/masked_conv2d_block.py); on other devices
# the tiles buy nothing, so CPU and CUDA tensors get the dense masked convolution (same math, same fake).
@torch.library.register_kernel("sparseops::masked_conv2d_block", ("cpu", "cuda"))
def _(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias, stride, padding, dilation):
    return F.conv2d(x, masked_weight(w, mask), bias, stride, padding, dilation).contiguous(
        memory_format=format_of(x))


@torch.library.register_kernel("sparseops::masked_conv2d_block_backward", ("cpu", "cuda"))
def _(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, stride, padding, dilation, output_mask):
    need_x, need_w, need_b = output_mask
    grad_fn = torch.nn.grad
    dx = (grad_fn.conv2d_input(x.shape, masked_weight(w, mask), grad, stride, padding, dilation)
          .contiguous(memory_format=format_of(x)) if need_x else w.new_empty(0))
    dw = (mask_grad_(grad_fn.conv2d_weight(x, w.shape, grad, stride, padding, dilation), mask) if need_w
          else w.new_empty(0))
    return dx, dw, grad.sum((0, 2, 3)) if need_b else w.new_empty(0)


define("masked_conv2d_block",
       lambda x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias, stride, padding, dilation:
       conv_fake("masked_conv2d", x, w, stride, padding, dilation),
       grads=("x", "w", "bias"))
define("masked_conv2d_block_backward",
       lambda grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, stride, padding, dilation,
       output_mask: grads_fake(x, w, output_mask))


def masked_conv2d(x: torch.Tensor, w: torch.Tensor, layout: CsrLayout | BlockLayout | torch.Tensor,
                  bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """`conv2d(x, w * mask, bias, stride, padding, dilation, groups)` where only kept weights cost time.

    `layout` is the mask (bool or 0/1, shape of w), its CsrLayout (over [C_out, C_in*kh*kw]) or
    its BlockLayout (sparseops.block_layout(mask, 32): tap-major tiles on tensor cores, Triton on
    GPUs; elsewhere the element path). The CPU kernel covers groups=1 with any stride, padding and
    dilation, NCHW and channels_last inputs (the output follows the input's memory format). Grouped
    convolutions, asymmetric "same" padding and devices without a kernel run the reference (one mask
    multiply); so does a mask denser than the break-even (thresholds.json), and an unpruned mask runs
    exactly F.conv2d.
    """
    op = "masked_conv2d"
    checks.tensors(op, bias=bias, x=x, w=w)
    checks.conv(op, x, w, bias, groups)  # one set of checks for every path (see masked_linear)
    if isinstance(layout, torch.Tensor) and tuple(layout.shape) != tuple(w.shape):
        raise ValueError(f"sparseops.{op}: the mask has shape {tuple(layout.shape)} but w has {tuple(w.shape)}")
    info = as_layout(op, layout)
    reduction = math.prod(w.shape[1:])  # C_in/groups * kh * kw (w[0] would fail for C_out = 0)
    if info.shape != (w.shape[0], reduction):
        raise ValueError(f"sparseops.{op}: the layout has shape {info.shape} but w flattens to "
                         f"{(w.shape[0], reduction)}")
    checks.same_device(op, x=x, w=w, mask=info.mask, bias=bias)
    x, w, bias = autocast_args(w.device, x, w, bias)  # under torch.autocast: its dtype, as F.conv2d
    checks.like(op, "w", w, x=x, bias=bias)
    stride_, pad, dilation_, supported = conv_geometry(op, x, w, stride, padding, dilation, groups)
    block = isinstance(info, BlockLayout)
    geometry = (stride, padding, dilation, groups, stride_, pad, dilation_)
    full = info.nnz == info.mask.numel()
    # Whole pruned filters or input channels (a channel mask, ln_structured): read once per mask version.
    # (An empty mask stays on the sparse kernels, which do no work for it.)
    structured = isinstance(layout, torch.Tensor) and not full and supported and info.nnz
    channels = channel_layout(info.source) if structured else None
    problem = (tuning.rows_bucket(x.shape[0]) if x.dim() == 4 else 1, *x.shape[-3:], *w.shape[:1], *w.shape[2:],
               *stride_, *(pad or (-1, -1)), *dilation_)
    impl = backend.choose(op, w.device, density=info.density, shape=info.shape, full=full,
                          channels=None if channels is None else channels.work,
                          supported=supported, unit_stride=stride_ == (1, 1), reduction=reduction,
                          plane=plane(x, w, stride_, pad, dilation_) if supported else None, block=block,
                          tile_density=info.tile_density if block else 1.0, problem=problem, dtype=w.dtype,
                          trial=trial(_run, x, w, info, bias, geometry))
    if impl == "triton_block" and info.taps != w.shape[2] * w.shape[3]:
        raise ValueError(f"sparseops.{op}: the block layout was built from a 2-D mask; build it from the "
                         "4-D conv mask (sparseops.block_layout(mask)) so that its tiles follow the taps")
    return _run(impl, x, w, info, bias, geometry)


def _run(impl: str, x, w, info, bias, geometry):
    stride, padding, dilation, groups, stride_, pad, dilation_ = geometry
    if impl == "channels":  # (cached per mask version on the alias the stats hold)
        return channel_masked_conv2d.run(masked_conv2d, x, w, channel_layout(info.source), bias, stride_, pad,
                                         dilation_)
    if impl == "triton_block":
        return lib.triton_masked_conv2d_block(x, w, info.mask.view(w.shape), *info.tensors(), info.block, bias,
                                              stride_, pad, dilation_)
    if impl in ("cpu", "cuda", "triton"):  # the ops return x's memory format (NCHW or channels_last)
        kernel = lib.triton_masked_conv2d if impl == "triton" else lib.masked_conv2d
        return kernel(x, w, *as_csr(info).tensors(), bias, stride_, pad, dilation_)
    if impl == "unmasked":
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    if impl == "mask_multiply":
        return F.conv2d(x, masked_weight(w, info.mask.view(w.shape)), bias, stride, padding, dilation, groups)
    return reference.masked_conv2d(x, w, info.mask.view(w.shape), bias, stride, padding, dilation, groups)
