"""channel_masked_linear: masked_linear for a mask that keeps whole channels (rows and/or columns of
w), as one dense GEMM of the kept size (oneDNN/MKL on the CPU, cuBLAS on GPUs): the kept rows and
columns of w gathered, the pruned outputs written as bias (or 0). masked_linear routes such masks
here (backend.choose), and a mask with pruned channels and an elementwise pattern inside the kept
ones to the masked op on the smaller problem (`run`)."""
from __future__ import annotations

import math

import torch

from .. import checks
from .._library import define, lib
from ..layout_channels import ChannelLayout
from ._common import check_channel_index, gather_channels_sum, grads_fake, linear_fake, scatter_channels, take_channels

OP = "channel_masked_linear"


def _check(x, w, out_idx, in_idx, bias):
    checks.linear(OP, x, w, bias)
    checks.like(OP, "w", w, x=x, bias=bias)
    check_channel_index(OP, "out_idx", out_idx, w.shape[0])
    check_channel_index(OP, "in_idx", in_idx, w.shape[1])


def _kept_weight(w, out_idx, in_idx):
    return take_channels(take_channels(w, out_idx, 0), in_idx, 1)


@torch.library.register_kernel(f"sparseops::{OP}", ("cpu", "cuda"))
def _(x, w, out_idx, in_idx, bias):
    _check(x, w, out_idx, in_idx, bias)
    n, k = w.shape
    m = math.prod(x.shape[:-1])
    shape = (*x.shape[:-1], n)
    if out_idx.numel() == 0 or in_idx.numel() == 0:  # nothing kept: every output is the bias (or 0)
        return x.new_zeros(shape) if bias is None else bias.expand(shape).clone()
    xk = take_channels(x.reshape(m, k), in_idx, 1)
    wk = _kept_weight(w, out_idx, in_idx)
    if out_idx.numel() == n:  # straight into the output
        out = x.new_empty(shape)
        y = out.view(m, n)
        if bias is None:
            torch.mm(xk, wk.t(), out=y)
        else:
            torch.addmm(bias, xk, wk.t(), out=y)
        return out  # not a view of it: autograd refuses in-place ops (ReLU(inplace=True)) on an op's view
    kept = torch.mm(xk, wk.t()) if bias is None else torch.addmm(bias.index_select(0, out_idx), xk, wk.t())
    # resize_, not view: the scattered [m, n] tensor is this op's own, and an op's output must not be a
    # view (autograd refuses in-place ops on it).
    return scatter_channels(kept, out_idx, bias, n, 1).resize_(shape)


@torch.library.register_kernel(f"sparseops::{OP}_backward", ("cpu", "cuda"))
def _(grad, x, w, out_idx, in_idx, output_mask):
    _check(x, w, out_idx, in_idx, None)
    n, k = w.shape
    checks.grad_shape(f"{OP}_backward", grad, (*x.shape[:-1], n))
    need_x, need_w, need_b = output_mask
    m = math.prod(x.shape[:-1])
    g2 = grad.reshape(m, n)
    empty = out_idx.numel() == 0 or in_idx.numel() == 0
    gk = db = None
    if not empty and (need_x or need_w):  # the kept outputs' gradient (and db, in the same pass)
        if out_idx.numel() == n:
            gk = g2
        elif need_b:
            gk, db = gather_channels_sum(g2, out_idx, 1)
        else:
            gk = g2.index_select(1, out_idx)
    dx, dw = w.new_empty(0), w.new_empty(0)  # distinct: outputs must not alias
    if need_x:  # zero at the pruned input channels
        if empty:
            dx = x.new_zeros(x.shape)
        elif in_idx.numel() == k:
            dx = x.new_empty(x.shape)
            torch.mm(gk, _kept_weight(w, out_idx, in_idx), out=dx.view(m, k))
        else:
            dx = scatter_channels(gk @ _kept_weight(w, out_idx, in_idx), in_idx, None, k, 1).view(x.shape)
    if need_w:  # dw only at the kept rows x columns, zero elsewhere
        if empty:
            dw = w.new_zeros(w.shape)
        else:
            dw = gk.t() @ take_channels(x.reshape(m, k), in_idx, 1)
            if in_idx.numel() < k:
                dw = scatter_channels(dw, in_idx, None, k, 1)
            if out_idx.numel() < n:
                dw = scatter_channels(dw, out_idx, None, n, 0)
    if need_b and db is None:
        db = g2.sum(0)
    return dx, dw, w.new_empty(0) if db is None else db


define(OP, lambda x, w, out_idx, in_idx, bias: linear_fake(OP, x, w), grads=("x", "w", "bias"))
define(f"{OP}_backward", lambda grad, x, w, out_idx, in_idx, output_mask: grads_fake(x, w, output_mask))


def run(masked_linear, x, w, ch: ChannelLayout, bias):
    """masked_linear(x, w, mask, bias) for a mask with pruned channels (`ch` its channel layout):
    the channel op, or, with an elementwise pattern inside the kept channels, `masked_linear` (which
    chooses again) on the kept rows and columns, its outputs written into the full ones."""
    if ch.inner is None:
        return lib.channel_masked_linear(x, w, ch.out_idx, ch.in_idx, bias)
    n = w.shape[0]
    kept = masked_linear(take_channels(x, ch.in_idx, x.dim() - 1), _kept_weight(w, ch.out_idx, ch.in_idx), ch.inner,
                         None if bias is None else take_channels(bias, ch.out_idx, 0))
    if ch.out_idx.numel() == n:
        return kept
    base = x.new_zeros((*x.shape[:-1], n)) if bias is None else bias.expand(*x.shape[:-1], n)
    return base.index_copy(x.dim() - 1, ch.out_idx, kept)
