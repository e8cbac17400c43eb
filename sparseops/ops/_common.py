"""What several op modules share: output fakes, the conv geometry, the layout argument."""
from __future__ import annotations

import contextlib
import math
import weakref

import torch

from .. import checks
from .._library import lib, saved_tensors_hooked
from ..layout import BlockLayout, CsrLayout, MaskStats, mask_stats, refresh




def fresh(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy where it is a view (F.linear of a batched x returns one): an op's outputs must
    be fresh tensors, or autograd refuses in-place edits of them (a following ReLU(inplace=True))."""
    return t if t._base is None else t.clone()


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


def trial(run, x, *args, batched: bool = True, prepare=None):
    """`trial(impl, exact=False, rows=None)` for sparseops.tuning's correctness check: runs `run(impl, x, *args)` on
    detached copies of the tensors (in float32 at least with `exact`, the reference a result is checked
    against), forward and, where the call would train, backward with a fixed random output gradient
    (a private generator: the global RNG is untouched). Returns the output(s) and the gradients.
    `rows`: only the leading entries of a `batched` x that make about that many rows of the product
    (one image of a convolution), for the correctness check, which needs every kept weight, not
    every row. `trial.call(impl)` runs the call itself (timed, where tuning measures it);
    `trial.prepare(impl)` builds what `impl` needs of this mask (its layout) before a timed call."""
    tensors = [x, *args]
    train = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    grad_out = {}

    def copy(t, exact, items=None):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        t = t if items is None else t[:items]
        wide = exact and t.dtype in (torch.float16, torch.bfloat16)  # (float32 and float64 stay as they are)
        return (t.detach().float() if wide else t.detach()).requires_grad_(t.requires_grad)

    def run_one(impl, exact=False, rows=None):
        items = None
        if rows and batched and x.dim() > 1:
            per_item = math.prod(x.shape[1:-1]) if x.dim() > 2 else 1  # rows of a linear: every dim but the last
            items = -(-rows // per_item)
        copies = [copy(x, exact, items), *(copy(t, exact) for t in args)]
        # Under a checkpoint's saved-tensor hooks, these runs on copies must not count as the call's.
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if saved_tensors_hooked() \
            else contextlib.nullcontext()
        with hooks, torch.enable_grad() if train else torch.no_grad():
            ys = run(impl, *copies)
            ys = list(ys) if isinstance(ys, (tuple, list)) else [ys]
            if not train:
                return ys
            for y in ys:
                if y.shape not in grad_out:
                    gen = torch.Generator(device=y.device).manual_seed(0)
                    grad_out[y.shape] = torch.randn(y.shape, generator=gen, device=y.device, dtype=x.dtype)
            wrt = [c for c in copies if isinstance(c, torch.Tensor) and c.requires_grad]
            # The gradient of sum(y * g) is exactly g at y. (Passing g as grad_outputs makes torch
            # import torch.fx's symbolic shapes, and sympy with it, the first time: ~0.4 s of a check.)
            loss = sum((y * grad_out[y.shape].to(y.dtype)).sum() for y in ys)
            return [*ys, *torch.autograd.grad(loss, wrt)]

    def call(impl):
        """The call itself with `impl`: timed where tuning.pick chose it to measure this call."""
        this = me()  # (weakly: run_one holds `call`, and a cycle would keep the call's tensors until gc)
        sample, this.sample = this.sample, None
        if sample is None or sample.impl != impl:
            return run(impl, x, *args)
        return sample.run(lambda *ts: run(impl, *ts), tensors)

    run_one.train, run_one.sample, run_one.call, run_one.tensors = train, None, call, tensors
    run_one.prepare = prepare or (lambda impl: None)
    me = weakref.ref(run_one)
    return run_one


def check_channel_index(op: str, name: str, idx: torch.Tensor, size: int) -> None:
    """The channel ops' index contract, checked before any read: 1-D int64, sorted and distinct, in
    [0, size) (what layout_channels.channel_layout builds; all `size` of them means no gather)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1 or idx.numel() > size:
        what = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"sparseops.{op}: {name} must be 1-D int64 with at most {size} entries, got {what}")
    if idx.numel() == 0:
        return
    ok = (idx[0] >= 0) & (idx[-1] < size) & (idx[1:] > idx[:-1]).all()
    message = f"sparseops.{op}: {name} must hold sorted, distinct channel indices in [0, {size})"
    if idx.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:  # no host sync on a GPU (nor under CUDA graph capture): the device asserts it
        torch._assert_async(ok, message)


def take_channels(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` at the channels `idx` along `dim`; `t` itself where idx keeps them all (sorted, distinct)."""
    return t if idx.numel() == t.shape[dim] else t.index_select(dim, idx)


def put_channels(full: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Writes `kept` (the tensor at rows out_idx x columns in_idx of dims 0 and 1) into `full`, in place."""
    rows, cols = out_idx.numel() < full.shape[0], in_idx.numel() < full.shape[1]
    if rows and cols:
        return full.index_put_((out_idx[:, None], in_idx[None, :]), kept)
    if rows:
        return full.index_copy_(0, out_idx, kept)
    if cols:
        return full.index_copy_(1, in_idx, kept)
    return full.copy_(kept)


def _channel_shape(t: torch.Tensor, dim: int, size: int) -> tuple[int, ...]:
    return (*t.shape[:dim], size, *t.shape[dim + 1:])


def scatter_channels(src, idx, fill, size: int, dim: int) -> torch.Tensor:
    """`src` of the kept channels `idx` (sorted, distinct) written into `size` channels along `dim`,
    fill[c] (or 0) along every other channel c; contiguous. One pass on the CPU (csrc/cpu/channels.cpp:
    torch's fill + index_copy_ cost two, the scatter at ~2 ns an element), torch's ops elsewhere."""
    if src.device.type == "cpu":
        return lib._scatter_channels(src, idx, fill, size, dim)
    return scatter_channels_torch(src, idx, fill, size, dim)


def scatter_channels_torch(src, idx, fill, size: int, dim: int) -> torch.Tensor:
    shape = _channel_shape(src, dim, size)
    if fill is None:
        return src.new_zeros(shape).index_copy_(dim, idx, src)
    view = [1] * src.dim()
    view[dim] = size
    return fill.view(view).expand(shape).contiguous().index_copy_(dim, idx, src)


def gather_channels_sum(grad, idx, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad.index_select(dim, idx), grad summed over every dim but `dim`): one pass over grad on the CPU."""
    if grad.device.type == "cpu":
        return lib._gather_channels_sum(grad, idx, dim)
    return grad.index_select(dim, idx), grad.sum([d for d in range(grad.dim()) if d != dim])


torch.library.register_fake("sparseops::_scatter_channels")(
    lambda src, idx, fill, size, dim: src.new_empty(_channel_shape(src, dim, size)))
torch.library.register_fake("sparseops::_gather_channels_sum")(
    lambda grad, idx, dim: (grad.new_empty(_channel_shape(grad, dim, idx.shape[0])),
                            grad.new_empty((grad.shape[dim],))))
