"""masked_conv2d: `conv2d(x, w * mask, ...)` where only kept weights cost time, over a CSR layout of
W viewed as [C_out, C_in*kh*kw] (C++, CUDA C++ and Triton kernels) or a tap-major block layout
(Triton's tile kernels)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend, checks, reference, tuning
from .._library import define, lib, tracing
from ..layout import BlockLayout, CsrLayout, as_csr
from ..layout_channels import channel_layout
from . import channel_masked_conv2d
from .where_mask import where_mask, where_mask_
from ._common import as_layout, autocast_args, conv_fake, conv_geometry, conv_out, format_of, grads_fake, plane, trial

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
    return F.conv2d(x, where_mask(w, mask), bias, stride, padding, dilation).contiguous(
        memory_format=format_of(x))


def dense_conv_grads(grad, x, w, mask, stride, padding, dilation, groups, output_mask):
    """dx (x's memory format), dw (masked), db of y = conv2d(x, w*mask, b) through torch's dense
    convolution gradients; empties where not asked for. `mask` has w's shape."""
    need_x, need_w, need_b = output_mask
    grad_fn = torch.nn.grad
    dx = (grad_fn.conv2d_input(x.shape, where_mask(w, mask), grad, stride, padding, dilation, groups)
          .contiguous(memory_format=format_of(x)) if need_x else w.new_empty(0))
    dw = (where_mask_(grad_fn.conv2d_weight(x, w.shape, grad, stride, padding, dilation, groups), mask) if need_w
          else w.new_empty(0))
    return dx, dw, grad.sum((0, 2, 3)) if need_b else w.new_empty(0)


@torch.library.register_kernel("sparseops::masked_conv2d_block_backward", ("cpu", "cuda"))
def _(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, stride, padding, dilation, output_mask):
    return dense_conv_grads(grad, x, w, mask, stride, padding, dilation, 1, output_mask)


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
    if isinstance(layout, torch.Tensor) and tracing(x, w, layout):  # see masked_linear
        checks.same_device(op, x=x, w=w, mask=layout, bias=bias)
        x, w, bias = autocast_args(w.device, x, w, bias)
        checks.like(op, "w", w, x=x, bias=bias)
        stride_, pad, dilation_, supported = conv_geometry(op, x, w, stride, padding, dilation, groups)
        impl = backend.choose(op, w.device, traced=True, dtype=w.dtype, supported=supported, symmetric=pad is not None and x.dim() == 4)
        if impl == "mask_multiply":
            if layout.dtype != torch.bool:  # (its values cannot be checked while tracing)
                raise TypeError(f"sparseops.{op}: under torch.compile / torch.export, an unbatched x or "
                                "asymmetric 'same' padding takes a bool mask")
            return F.conv2d(x, where_mask(w, layout), bias, stride, padding, dilation, groups)
        return lib.masked_conv2d_runtime(x, w, layout, bias, stride_, pad, dilation_, groups)
    info = as_layout(op, layout)
    reduction = math.prod(w.shape[1:])  # C_in/groups * kh * kw (w[0] would fail for C_out = 0)
    if info.shape != (w.shape[0], reduction):
        raise ValueError(f"sparseops.{op}: the layout has shape {info.shape} but w flattens to "
                         f"{(w.shape[0], reduction)}")
    checks.same_device(op, x=x, w=w, mask=info.mask, bias=bias)
    x, w, bias = autocast_args(w.device, x, w, bias)  # under torch.autocast: its dtype, as F.conv2d
    checks.like(op, "w", w, x=x, bias=bias)
    geometry = (stride, padding, dilation, groups, *conv_geometry(op, x, w, stride, padding, dilation, groups)[:3])
    call = trial(_run, x, w, info, bias, geometry,
                 prepare=lambda impl: impl in ("cpu", "cuda", "triton") and as_csr(info))
    impl = _choose(x, w, info, geometry, call, isinstance(layout, torch.Tensor))
    if impl == "triton_block" and info.taps != w.shape[2] * w.shape[3]:
        raise ValueError(f"sparseops.{op}: the block layout was built from a 2-D mask; build it from the "
                         "4-D conv mask (sparseops.block_layout(mask)) so that its tiles follow the taps")
    return call.call(impl)


def runs_dense(x, w, mask, stride=1, padding=0, dilation=1, groups=1) -> bool:
    """Whether masked_conv2d(x, w, mask, ...) would run a dense path now, by its cached choice or the
    prior (nothing is measured): a caller whose w is already 0 off the mask (soft_masked_conv2d) then
    runs F.conv2d itself, without a second pass applying the mask."""
    info = as_layout("masked_conv2d", mask)
    geometry = (stride, padding, dilation, groups, *conv_geometry("masked_conv2d", x, w, stride, padding, dilation,
                                                                  groups)[:3])
    return _choose(x, w, info, geometry, None) in tuning.DENSE_PATHS


def _choose(x, w, info, geometry, trial_fn, from_mask=True):
    stride, padding, dilation, groups, stride_, pad, dilation_ = geometry
    supported = groups == 1 and pad is not None and x.dim() == 4
    block = isinstance(info, BlockLayout)
    full = info.nnz == info.mask.numel()
    # Whole pruned filters or input channels (a channel mask, ln_structured): read once per mask version.
    # (An empty mask stays on the sparse kernels, which do no work for it.)
    channels = channel_layout(info.source) if from_mask and not full and supported and info.nnz else None
    problem = (tuning.rows_bucket(x.shape[0]) if x.dim() == 4 else 1, *x.shape[-3:], *w.shape[:1], *w.shape[2:],
               *stride_, *(pad or (-1, -1)), *dilation_)
    return backend.choose("masked_conv2d", w.device, density=info.density, shape=info.shape, full=full,
                          channels=None if channels is None else channels.work, supported=supported,
                          unit_stride=stride_ == (1, 1),
                          reduction=math.prod(w.shape[1:]), plane=plane(x, w, stride_, pad, dilation_) if supported
                          else None, block=block, tile_density=info.tile_density if block else 1.0, problem=problem,
                          dtype=w.dtype, trial=trial_fn)


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
        return F.conv2d(x, where_mask(w, info.mask.view(w.shape)), bias, stride, padding, dilation, groups)
    return reference.masked_conv2d(x, w, info.mask.view(w.shape), bias, stride, padding, dilation, groups)


# What a compiled or exported graph holds (see masked_linear_runtime): padding as the pair the layer's
# geometry resolves to, groups as given (grouped convolutions run the mask multiply when the graph runs).


def _runtime_args(x, w, mask, stride, padding, dilation, groups):
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    info = as_layout("masked_conv2d", mask)
    geometry = (stride, padding, dilation, groups, stride, padding, dilation)
    return info, geometry, _choose(x, w, info, geometry, None)


@torch.library.register_kernel("sparseops::masked_conv2d_runtime", ("cpu", "cuda"))
def _(x, w, mask, bias, stride, padding, dilation, groups):
    info, geometry, impl = _runtime_args(x, w, mask, stride, padding, dilation, groups)
    return _run(impl, x, w, info, bias, geometry).contiguous(memory_format=format_of(x))


@torch.library.register_kernel("sparseops::masked_conv2d_runtime_backward", ("cpu", "cuda"))
def _(grad, x, w, mask, stride, padding, dilation, groups, output_mask):
    info, geometry, impl = _runtime_args(x, w, mask, stride, padding, dilation, groups)
    if impl in ("cpu", "cuda", "triton"):
        kernel = lib.triton_masked_conv2d_backward if impl == "triton" else lib.masked_conv2d_backward
        return kernel(grad, x, w, *as_csr(info).tensors(), geometry[4], geometry[5], geometry[6], output_mask)
    return dense_conv_grads(grad, x, w, info.mask.view(w.shape), geometry[4], geometry[5], geometry[6], groups,
                            output_mask)


def _runtime_fake(x, w, mask, bias, stride, padding, dilation, groups):
    torch._check(x.dim() == 4 and w.dim() == 4, lambda: "sparseops.masked_conv2d: x and w must be 4-D")
    torch._check(x.shape[1] == w.shape[1] * groups, lambda: "sparseops.masked_conv2d: x and w disagree on C_in")
    ho = conv_out(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_out(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w.shape[0], ho, wo)).contiguous(memory_format=format_of(x))


define("masked_conv2d_runtime", _runtime_fake, grads=("x", "w", "bias"))
define("masked_conv2d_runtime_backward",
       lambda grad, x, w, mask, stride, padding, dilation, groups, output_mask: grads_fake(x, w, output_mask))
