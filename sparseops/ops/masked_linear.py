"""masked_linear: `x @ (w * mask)^T + bias` where only kept weights cost time, over a CSR layout
(the C++, CUDA C++ and Triton kernels) or a block layout (Triton's tile kernels); and its dense
fallback masked_linear_dense."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend, checks, reference, torch_sparse, tuning  # noqa: F401  (torch_sparse: registers its variant)
from .._library import define, lib, tracing
from ..layout import BlockLayout, CsrLayout, as_csr
from ..layout_channels import channel_layout
from . import channel_masked_linear
from .where_mask import where_mask, where_mask_
from ._common import as_layout, autocast_args, fresh, grads_fake, linear_fake, linear_out, trial


def dense_masked_grads(grad, x, w, mask, output_mask):
    """dx, dw (masked), db of y = x @ (w*mask)^T + b through dense GEMMs; empties where not asked for."""
    need_x, need_w, need_b = output_mask
    n, k = w.shape
    g2 = grad.reshape(-1, n)
    # A pruned weight contributes nothing (reference.masked_weight); dw is exactly 0 there.
    dx = linear_out(grad, where_mask(w, mask).t()) if need_x else w.new_empty(0)
    dw = where_mask_(g2.t() @ x.reshape(-1, k), mask) if need_w else w.new_empty(0)
    db = g2.sum(0) if need_b else w.new_empty(0)
    return dx, dw, db


define("masked_linear", lambda x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias: linear_fake("masked_linear", x, w),
       grads=("x", "w", "bias"))
define("masked_linear_backward",
       lambda grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, output_mask: grads_fake(x, w, output_mask))
# The dense fallback saves only its inputs (all alive anyway: no masked copy of w is kept).
define("masked_linear_dense", lambda x, w, mask, bias: linear_fake("masked_linear_dense", x, w),
       grads=("x", "w", "bias"), backward=dense_masked_grads)


# The block layout's op: Triton runs it (sparseops/triton/masked_linear_block.py); on other devices
# the tiles buy nothing, so CPU and CUDA tensors get the dense masked product (same math, same fake).
@torch.library.register_kernel("sparseops::masked_linear_block", ("cpu", "cuda"))
def _(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias):
    return linear_out(x, where_mask(w, mask), bias)


@torch.library.register_kernel("sparseops::masked_linear_block_backward", ("cpu", "cuda"))
def _(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, output_mask):
    return dense_masked_grads(grad, x, w, mask, output_mask)


define("masked_linear_block",
       lambda x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias: linear_fake("masked_linear", x, w),
       grads=("x", "w", "bias"))
define("masked_linear_block_backward",
       lambda grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, output_mask:
       grads_fake(x, w, output_mask))


def masked_linear(x: torch.Tensor, w: torch.Tensor, layout: CsrLayout | BlockLayout | torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (w * mask)^T + bias` where only the kept weights cost time.

    `layout` is the mask itself (bool or 0/1, shape of w), whose layout is then built once and
    cached until the mask changes, a CsrLayout (sparseops.layout.csr_layout(mask)) or a BlockLayout
    (sparseops.layout.block_layout(mask, 32): skips empty tiles, runs kept tiles on tensor cores;
    Triton on GPUs). `x` may have any leading dimensions. Gradients: dx through the transposed
    layout, dw at kept entries only (zero elsewhere), dbias as usual. Under torch.compile and
    torch.export a mask tensor stays a graph input, read when the graph runs (masked_linear_runtime).
    """
    # One set of checks for every path (the dense ones would broadcast a [1] bias, take int64, or
    # raise torch's own errors): shapes here, dtypes once autocast has had its say.
    checks.tensors("masked_linear", bias=bias, x=x, w=w)
    checks.linear("masked_linear", x, w, bias)
    if isinstance(layout, torch.Tensor) and layout.dim() != 2:
        raise ValueError(f"sparseops.masked_linear: mask must be 2-D [out_features, in_features], "
                         f"got shape {tuple(layout.shape)}")
    if isinstance(layout, torch.Tensor) and tracing(x, w, layout):
        # The mask's values are not known while tracing: checked (as_bool_mask) when the graph runs.
        if tuple(w.shape) != tuple(layout.shape):
            raise ValueError(f"sparseops.masked_linear: the mask has shape {tuple(layout.shape)} but w has "
                             f"{tuple(w.shape)}")
        checks.same_device("masked_linear", x=x, w=w, mask=layout, bias=bias)
        x, w, bias = autocast_args(w.device, x, w, bias)
        checks.like("masked_linear", "w", w, x=x, bias=bias)
        backend.choose("masked_linear", w.device, traced=True, dtype=w.dtype)  # "runtime", or raises
        return lib.masked_linear_runtime(x, w, layout, bias)
    info = as_layout("masked_linear", layout)
    if tuple(w.shape) != info.shape:
        raise ValueError(f"sparseops.masked_linear: the mask has shape {info.shape} but w has {tuple(w.shape)}")
    checks.same_device("masked_linear", x=x, w=w, mask=info.mask, bias=bias)
    x, w, bias = autocast_args(w.device, x, w, bias)  # under torch.autocast: its dtype, as F.linear
    checks.like("masked_linear", "w", w, x=x, bias=bias)
    if isinstance(info, BlockLayout):
        impl = backend.choose("masked_linear_block", w.device, tile_density=info.tile_density, dtype=w.dtype)
        if impl == "reference":
            return reference.masked_linear(x, w, info.mask, bias)
        if impl == "triton":
            return lib.triton_masked_linear_block(x, w, info.mask, *info.tensors(), info.block, bias)
        return masked_linear(x, w, info.mask, bias)  # the element path
    call = trial(_run, x, w, info, bias, prepare=lambda impl: impl in _KERNELS and as_csr(info))
    return call.call(_choose(x, w, info, call, isinstance(layout, torch.Tensor)))


def runs_dense(x, w, mask) -> bool:
    """Whether masked_linear(x, w, mask) would run a dense path now (see masked_conv2d.runs_dense)."""
    return _choose(x, w, as_layout("masked_linear", mask), None) in tuning.DENSE_PATHS


def _choose(x, w, info, trial_fn, from_mask=True):
    full = info.nnz == info.mask.numel()
    # Whole pruned rows or columns (a channel mask, ln_structured): read once per mask version. (An
    # empty mask stays on the sparse kernels, which do no work for it.)
    channels = channel_layout(info.source) if from_mask and not full and info.nnz else None
    return backend.choose("masked_linear", w.device, density=info.density, shape=info.shape, full=full,
                          numel=w.numel(), rows=x.numel() // max(x.shape[-1], 1) if x.dim() else 1, dtype=w.dtype,
                          channels=None if channels is None else channels.work, trial=trial_fn)


_KERNELS = {"triton": "triton_masked_linear", "torch_sparse": "torch_sparse_masked_linear", "cpu": "masked_linear",
            "cuda": "masked_linear"}


def _run(impl: str, x, w, info, bias):
    if impl == "channels":  # (cached per mask version on the alias the stats hold)
        return channel_masked_linear.run(masked_linear, x, w, channel_layout(info.source), bias)
    if impl == "reference":
        return reference.masked_linear(x, w, info.mask, bias)
    if impl == "mask_multiply":  # plain autograd over the masked weight, as torch.nn.utils.prune
        return F.linear(x, where_mask(w, info.mask), bias)
    if impl == "unmasked":
        return F.linear(x, w, bias)
    if impl == "dense":
        return lib.masked_linear_dense(x, w, info.mask, bias)
    return getattr(lib, _KERNELS[impl])(x, w, *as_csr(info).tensors(), bias)


# What a compiled or exported graph holds: the mask as a tensor, read when the graph runs. Its kernels
# find the mask's cached layout (or build it) and run what backend.choose names for that mask, by the
# prior (nothing is measured inside a graph). autograd calls them below itself: no graph is recorded.


@torch.library.register_kernel("sparseops::masked_linear_runtime", ("cpu", "cuda"))
def _(x, w, mask, bias):
    info = as_layout("masked_linear", mask)
    return fresh(_run(_choose(x, w, info, None), x, w, info, bias))


@torch.library.register_kernel("sparseops::masked_linear_runtime_backward", ("cpu", "cuda"))
def _(grad, x, w, mask, output_mask):
    info = as_layout("masked_linear", mask)
    impl = _choose(x, w, info, None)
    if impl in _KERNELS:
        return getattr(lib, _KERNELS[impl] + "_backward")(grad, x, w, *as_csr(info).tensors(), output_mask)
    return dense_masked_grads(grad, x, w, info.mask, output_mask)  # the same gradients as every dense path


define("masked_linear_runtime", lambda x, w, mask, bias: linear_fake("masked_linear", x, w), grads=("x", "w", "bias"))
define("masked_linear_runtime_backward", lambda grad, x, w, mask, output_mask: grads_fake(x, w, output_mask))
