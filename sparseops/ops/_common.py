"""What several op modules share: output fakes, the conv geometry, the layout argument."""
from __future__ import annotations

import math

import torch

from .. import checks
from ..layout import BlockLayout, CsrLayout, MaskStats, mask_stats, refresh


def format_of(x: torch.Tensor) -> torch.memory_format:
    """The conv ops' convention (csrc/checks.h format_of): outputs and dx take x's memory format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def grads_fake(x, w, output_mask, extra=()):
    """dx (in x's memory format, as the conv kernels return it), dw, the `extra` weight-shaped grads
    (ds), db; outputs not asked for are distinct empty tensors."""
    shapes = (x.shape, w.shape, *(w.shape for _ in extra), (w.shape[0],))
    out = [w.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask, strict=True)]
    if output_mask[0]:
        out[0] = out[0].contiguous(memory_format=format_of(x))
    return tuple(out)


def autocast_args(device: torch.device, *tensors):
    """The tensors as torch.autocast would pass them to F.linear / F.conv2d on `device`: while
    autocast is on there, floating tensors other than float64 in its dtype (the ops have no
    autocast rule of their own, and their kernels would otherwise compute in float32)."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know
        return tensors
    if not on:
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def linear_out(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` into a fresh tensor of shape [*x.shape[:-1], N]. F.linear of a batched
    x returns a view of its 2-D result, and an op must return fresh tensors: autograd refuses
    in-place edits (a following ReLU(inplace=True)) of a custom op's view outputs."""
    n, k = w.shape
    m = math.prod(x.shape[:-1])
    out = x.new_empty((*x.shape[:-1], n))
    x2, y = x.reshape(m, k), out.view(m, n)
    if bias is None:
        torch.mm(x2, w.t(), out=y)
    else:
        torch.addmm(bias, x2, w.t(), out=y)
    return out


def linear_fake(op: str, x, w):
    torch._check(w.dim() == 2, lambda: f"sparseops.{op}: w must be 2-D")
    torch._check(x.shape[-1] == w.shape[1], lambda: f"sparseops.{op}: x and w disagree on in_features")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_fake(op: str, x, w, stride, padding, dilation):
    torch._check(x.dim() == 4 and w.dim() == 4, lambda: f"sparseops.{op}: x and w must be 4-D")
    torch._check(x.shape[1] == w.shape[1], lambda: f"sparseops.{op}: x and w disagree on C_in")
    ho = conv_out(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_out(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w.shape[0], ho, wo)).contiguous(memory_format=format_of(x))


def conv_geometry(op: str, x, w, stride, padding, dilation, groups):
    """stride and dilation as pairs, padding as a pair of ints (None for an asymmetric 'same'), and
    whether the sparse kernels cover this convolution (groups=1, symmetric padding, 4-D x)."""
    stride, dilation = checks.pair(op, stride, "stride"), checks.pair(op, dilation, "dilation")
    if padding == "valid":
        pad = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:], strict=True)]
        pad = tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None
    elif isinstance(padding, str):
        raise ValueError(f"sparseops.{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    else:
        pad = checks.pair(op, padding, "padding")
    return stride, pad, dilation, groups == 1 and pad is not None and x.dim() == 4


def plane(x, w, stride, padding, dilation) -> int:
    return (conv_out(x.shape[-2], w.shape[2], stride[0], padding[0], dilation[0])
            * conv_out(x.shape[-1], w.shape[3], stride[1], padding[1], dilation[1]))


def as_layout(op: str, layout) -> CsrLayout | BlockLayout | MaskStats:
    """For a mask tensor, its cached layout or (cheaper) its MaskStats; a given layout once it is
    known not to be stale. `layout.as_csr` turns the result into a CsrLayout when a kernel runs."""
    if isinstance(layout, torch.Tensor):
        refresh(layout)  # writes the version counter does not see (mask.data, numpy) drop the caches
        return mask_stats(layout)
    if not isinstance(layout, (CsrLayout, BlockLayout)):
        raise TypeError(f"sparseops.{op}: layout must be a mask tensor, a CsrLayout or a BlockLayout, "
                        f"got {type(layout).__name__}")
    if not torch.compiler.is_compiling() and layout.stale:  # version counters are not traceable
        raise ValueError(f"sparseops.{op}: layout is stale (its mask was changed in place after it was built); "
                         "call sparseops.layout.csr_layout(mask) again, or pass the mask")
    return layout


def trial(run, x, *args):
    """`trial(impl, exact=False)` for sparseops.tuning: runs `run(impl, x, *args)` on detached copies
    of the tensors (in float64 with `exact`, the reference a result is checked against), forward
    and, where the call would train, backward with a fixed random output gradient (a private
    generator: the global RNG is untouched). Returns the output and the gradients."""
    tensors = [x, *args]
    train = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    grad_out = []

    def copy(t, exact):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        return (t.detach().double() if exact else t.detach()).requires_grad_(t.requires_grad)

    def run_one(impl, exact=False):
        copies = [copy(t, exact) for t in tensors]
        with torch.enable_grad() if train else torch.no_grad():
            y = run(impl, *copies)
            if not train:
                return [y]
            if not grad_out:
                gen = torch.Generator(device=y.device).manual_seed(0)
                grad_out.append(torch.randn(y.shape, generator=gen, device=y.device, dtype=x.dtype))
            wrt = [c for c in copies if isinstance(c, torch.Tensor) and c.requires_grad]
            return [y, *torch.autograd.grad(y, wrt, grad_out[0].to(y.dtype))]

    run_one.train = train
    return run_one
