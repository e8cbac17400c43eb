"""channel_masked_conv2d: masked_conv2d (groups = 1) for a mask that keeps whole output and/or input
channels, as one dense convolution of the kept size (oneDNN on the CPU, cuDNN on GPUs): the kept
filters and input channels gathered, the pruned output channels written as bias (or 0); backward
through aten's convolution_backward on the kept problem. masked_conv2d routes such masks here, and
a mask with pruned channels and an elementwise pattern inside the kept ones to the masked op on the
smaller problem (`run`)."""
from __future__ import annotations

import torch

from .. import checks
from .._library import define, lib
from ..layout_channels import ChannelLayout
from ._common import (check_channel_index, conv_fake, format_of, gather_channels_sum, grads_fake, scatter_channels,
                      take_channels)

OP = "channel_masked_conv2d"


def _check(x, w, out_idx, in_idx, bias):
    checks.conv(OP, x, w, bias, 1)
    checks.like(OP, "w", w, x=x, bias=bias)
    check_channel_index(OP, "out_idx", out_idx, w.shape[0])
    check_channel_index(OP, "in_idx", in_idx, w.shape[1])


def _kept(x, w, out_idx, in_idx):
    """The kept input channels (in x's memory format) and filters."""
    xk = take_channels(x, in_idx, 1)
    return xk.contiguous(memory_format=format_of(x)), take_channels(take_channels(w, out_idx, 0), in_idx, 1)


def _full(x, shape, bias, fmt):
    """The output when no channel is kept: bias (or 0) everywhere."""
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    return y.zero_() if bias is None else y.copy_(bias.view(1, -1, 1, 1).expand(shape))


def _scatter(kept, idx, fill, size, fmt):
    """`kept` (channels idx of dim 1) written into `size` channels, fill (or 0) elsewhere, in memory
    format `fmt`: channels_last is a [N*H*W, C] matrix whose columns are the channels."""
    if fmt == torch.channels_last:
        return scatter_channels(kept.permute(0, 2, 3, 1), idx, fill, size, 3).permute(0, 3, 1, 2)
    return scatter_channels(kept, idx, fill, size, 1)


def _gather(grad, idx):
    """(grad at the output channels idx, in grad's memory format; grad summed over (0, 2, 3))."""
    if format_of(grad) == torch.channels_last:
        gk, db = gather_channels_sum(grad.permute(0, 2, 3, 1), idx, 3)
        return gk.permute(0, 3, 1, 2), db
    return gather_channels_sum(grad, idx, 1)


@torch.library.register_kernel(f"sparseops::{OP}", ("cpu", "cuda"))
def _(x, w, out_idx, in_idx, bias, stride, padding, dilation):
    _check(x, w, out_idx, in_idx, bias)
    fmt = format_of(x)
    if out_idx.numel() == 0 or in_idx.numel() == 0:  # nothing kept: every output is the bias (or 0)
        return _full(x, conv_fake(OP, x, w, stride, padding, dilation).shape, bias, fmt)
    xk, wk = _kept(x, w, out_idx, in_idx)
    if out_idx.numel() == w.shape[0]:
        return torch.nn.functional.conv2d(xk, wk, bias, stride, padding, dilation).contiguous(memory_format=fmt)
    kept = torch.nn.functional.conv2d(xk, wk, None if bias is None else bias.index_select(0, out_idx), stride,
                                      padding, dilation)
    return _scatter(kept, out_idx, bias, w.shape[0], fmt)


@torch.library.register_kernel(f"sparseops::{OP}_backward", ("cpu", "cuda"))
def _(grad, x, w, out_idx, in_idx, stride, padding, dilation, output_mask):
    _check(x, w, out_idx, in_idx, None)
    checks.grad_shape(f"{OP}_backward", grad, conv_fake(OP, x, w, stride, padding, dilation).shape)
    need_x, need_w, need_b = output_mask
    fmt = format_of(x)
    n, k = w.shape[:2]
    dx = dw = db = None
    if out_idx.numel() == 0 or in_idx.numel() == 0:
        dx = x.new_zeros(x.shape).contiguous(memory_format=fmt) if need_x else None
        dw = w.new_zeros(w.shape) if need_w else None
    elif need_x or need_w:
        xk, wk = _kept(x, w, out_idx, in_idx)
        if out_idx.numel() == n:
            gk = grad.contiguous(memory_format=format_of(grad))
        elif need_b:  # the kept outputs' gradient and db in one pass over grad
            gk, db = _gather(grad, out_idx)
        else:
            gk = take_channels(grad, out_idx, 1).contiguous(memory_format=format_of(grad))
        dxk, dwk, _ = torch.ops.aten.convolution_backward(gk, xk, wk, None, stride, padding, dilation, False, [0, 0],
                                                          1, [need_x, need_w, False])
        if need_x:  # zero at the pruned input channels
            dx = dxk.contiguous(memory_format=fmt) if in_idx.numel() == k else _scatter(dxk, in_idx, None, k, fmt)
        if need_w:  # dw only at the kept filters x input channels, zero elsewhere
            dw = dwk.contiguous() if in_idx.numel() == k else scatter_channels(dwk, in_idx, None, k, 1)
            dw = dw if out_idx.numel() == n else scatter_channels(dw, out_idx, None, n, 0)
    if need_b and db is None:
        db = grad.sum((0, 2, 3))
    return tuple(w.new_empty(0) if t is None else t for t in (dx, dw, db))  # distinct empties: no aliasing


define(OP, lambda x, w, out_idx, in_idx, bias, stride, padding, dilation:
       conv_fake(OP, x, w, stride, padding, dilation), grads=("x", "w", "bias"))
define(f"{OP}_backward", lambda grad, x, w, out_idx, in_idx, stride, padding, dilation, output_mask:
       grads_fake(x, w, output_mask))


def run(masked_conv2d, x, w, ch: ChannelLayout, bias, stride, padding, dilation):
    """masked_conv2d for a mask with pruned channels (`ch` its channel layout), groups = 1, padding
    a pair: the channel op, or, with an elementwise pattern inside the kept channels, `masked_conv2d`
    (which chooses again) on the kept filters and input channels, written into the full output."""
    if ch.inner is None:
        return lib.channel_masked_conv2d(x, w, ch.out_idx, ch.in_idx, bias, stride, padding, dilation)
    xk = take_channels(x, ch.in_idx, 1).contiguous(memory_format=format_of(x))
    wk = take_channels(take_channels(w, ch.out_idx, 0), ch.in_idx, 1)
    kept = masked_conv2d(xk, wk, ch.inner, None if bias is None else take_channels(bias, ch.out_idx, 0), stride,
                         padding, dilation)
    if ch.out_idx.numel() == w.shape[0]:
        return kept
    shape = (kept.shape[0], w.shape[0], *kept.shape[2:])
    base = (kept.new_zeros(shape) if bias is None else bias.view(1, -1, 1, 1).expand(shape))
    return base.index_copy(1, ch.out_idx, kept).contiguous(memory_format=format_of(x))
