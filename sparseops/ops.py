"""Python side of the sparseops ops: fake (meta) implementations and autograd formulas for the
schemas declared in csrc/ops.cpp, the backend choice, and the public functions that use them.

Backend rules (../shared/DESIGN.md): `auto` runs the compiled kernel for the tensors' device and,
for the masked matmul, the dense fallback where the mask is denser than the measured break-even
(thresholds.json). `SPARSEOPS_BACKEND` or `sparseops.backend(...)` forces one of
cpu | cuda | triton | reference | dense.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from importlib import resources
from numbers import Real

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from . import reference
from .layout import CsrLayout, MaskStats, csr_layout, mask_stats

try:  # the CUDA kernels live in a second library, built only where nvcc and a CUDA torch are
    from . import _cuda  # noqa: F401

    CUDA_EXTENSION_ERROR = None
except ImportError as exc:  # a CPU-only build, or CUDA libraries that cannot be loaded here
    CUDA_EXTENSION_ERROR = str(exc)

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference", "dense")
ops = torch.ops.sparseops

# ---------------------------------------------------------------------------------------------
# Backend choice


def _load_thresholds() -> dict:
    with resources.files(__package__).joinpath("thresholds.json").open() as f:
        return json.load(f)


THRESHOLDS = _load_thresholds()
SMALL_WEIGHT = 1 << 18  # weights up to 512x512: the dense fallback is a plain mask multiply (below)


def _env_backend() -> str:
    name = os.environ.get("SPARSEOPS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"sparseops: SPARSEOPS_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def _env_max_density() -> float | None:
    v = os.environ.get("SPARSEOPS_MAX_DENSITY")
    return None if v in (None, "") else _check_density(float(v), "SPARSEOPS_MAX_DENSITY")


def _check_density(v, name):
    if not isinstance(v, Real) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"sparseops: {name} must be a number in [0, 1], got {v!r}")
    return float(v)


class _State(threading.local):
    def __init__(self):
        self.backend = _env_backend()
        self.max_density = _env_max_density()


_state = _State()


@contextlib.contextmanager
def backend(name: str | None = None, *, max_density: float | None = None):
    """Forces a backend (and/or the density above which masked ops run dense) inside a block.

    >>> with sparseops.backend("reference"):
    ...     y = sparseops.masked_linear(x, w, mask)
    """
    if name is not None:
        name = str(name).lower()
        if name not in BACKENDS:
            raise ValueError(f"sparseops.backend: name must be one of {BACKENDS}, got {name!r}")
    if max_density is not None:
        max_density = _check_density(max_density, "sparseops.backend: max_density")
    saved = (_state.backend, _state.max_density)
    _state.backend = name or saved[0]
    _state.max_density = saved[1] if max_density is None else max_density
    try:
        yield
    finally:
        _state.backend, _state.max_density = saved


def get_backend() -> str:
    return _state.backend


def max_density(op: str, device_type: str, shape: tuple[int, int] | None = None, *,
                plane: int | None = None) -> float:
    """The density above which `op` runs its dense fallback on `device_type`.

    For a weight of `shape` [N, K] it also follows the measured break-even by layer width
    h = N*K/(N+K) (thresholds.json, "<op>_by_width": [[h, density], ...], interpolated): the sparse
    kernels' fixed cost grows like M*(N+K) while the dense GEMM's grows like M*N*K, so narrow layers
    need sparser masks before the sparse path pays, and the narrowest never do. For a convolution,
    `plane` (output positions) selects "<op>_by_plane" the same way: its fixed cost (transposing the
    input, writing the output) weighs more against small planes.
    """
    if _state.max_density is not None:
        return _state.max_density
    table = THRESHOLDS.get(device_type, {})
    cap = float(table.get(op, 1.0))
    if plane is not None:
        points = table.get(f"{op}_by_plane")
        return min(cap, _interpolate(points, plane)) if points else cap
    points = table.get(f"{op}_by_width")
    if shape is None or not points:
        return cap
    n, k = shape
    h = n * k / (n + k) if n + k else 0.0
    return min(cap, _interpolate(points, h))


def _interpolate(points, h: float) -> float:
    if h <= points[0][0]:
        return float(points[0][1])
    for (h0, d0), (h1, d1) in zip(points, points[1:]):
        if h <= h1:
            return float(d0 + (d1 - d0) * (h - h0) / (h1 - h0))
    return float(points[-1][1])


# Which compiled kernels are registered, read once (a plain dict is cheap and torch.compile-friendly).
_KERNELS = {
    (op, dev): torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseops::{op}", key)
    for op in ("soft_mask", "soft_mask_l1", "masked_linear", "masked_linear_dense", "masked_conv2d")
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def has_kernel(op: str, device_type: str) -> bool:
    return _KERNELS.get((op, device_type), False)


def _resolve(op: str, device: torch.device, kernels: tuple[str, ...]) -> str:
    """Which implementation of `op` runs for tensors on `device`: a name from BACKENDS."""
    name = _state.backend
    if name == "auto":
        if device.type in kernels and has_kernel(op, device.type):
            return device.type
        return "reference"
    if name in ("reference", "dense"):
        return name
    if name == "triton":
        raise NotImplementedError(f"sparseops.{op}: there is no Triton kernel for this op yet")
    if name not in kernels or not has_kernel(op, name):
        why = f" ({CUDA_EXTENSION_ERROR})" if name == "cuda" and CUDA_EXTENSION_ERROR else ""
        raise NotImplementedError(f"sparseops.{op}: no compiled {name} kernel for this op{why}")
    if device.type != name:
        raise ValueError(f"sparseops.{op}: backend {name!r} needs {name} tensors, got tensors on {device}")
    return name


def _check_inputs(op: str, x, w, bias) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError(f"sparseops.{op}: x and w must be tensors")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"sparseops.{op}: bias must be a tensor or None, got {type(bias).__name__}")


def _as_layout(op: str, layout) -> CsrLayout | MaskStats:
    """For a mask tensor, its cached layout or (cheaper) its MaskStats; a given CsrLayout once it is
    known not to be stale. `_csr` turns the result into a CsrLayout when a sparse kernel runs."""
    if isinstance(layout, torch.Tensor):
        return mask_stats(layout)
    if not isinstance(layout, CsrLayout):
        raise TypeError(f"sparseops.{op}: layout must be a CsrLayout or a mask tensor, got {type(layout).__name__}")
    if not torch.compiler.is_compiling() and layout.stale:  # version counters are not traceable
        raise ValueError(f"sparseops.{op}: layout is stale (its mask was changed in place after it was built); "
                         "call sparseops.layout.csr_layout(mask) again, or pass the mask")
    return layout


def _csr(info: CsrLayout | MaskStats) -> CsrLayout:
    return info if isinstance(info, CsrLayout) else csr_layout(info.source)


def _check_tensors(op: str, **tensors) -> None:
    """Dense tensors on one device (the dispatcher would otherwise pick a device silently)."""
    for name, t in tensors.items():
        if t is not None and t.layout != torch.strided:
            raise ValueError(f"sparseops.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"sparseops.{op}: all tensors must be on one device, got {listing}")


# ---------------------------------------------------------------------------------------------
# Soft mask (Continuous Sparsification)


def _check_scalar(op: str, v, name: str) -> float:
    if isinstance(v, torch.Tensor) or not isinstance(v, Real) or isinstance(v, bool):
        raise TypeError(f"sparseops.{op}: {name} must be a Python number, got {type(v).__name__}")
    return float(v)


@torch.library.register_fake("sparseops::soft_mask")
def _(w, s, beta, scale):
    torch._check(w.shape == s.shape, lambda: f"sparseops.soft_mask: s must have the shape of w {tuple(w.shape)}")
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("sparseops::soft_mask_backward")
def _(grad, w, s, beta, scale):
    return (torch.empty_like(w, memory_format=torch.contiguous_format),
            torch.empty_like(s, memory_format=torch.contiguous_format))


@torch.library.register_fake("sparseops::soft_mask_l1")
def _(s, beta, scale):
    return s.new_empty(())


@torch.library.register_fake("sparseops::soft_mask_l1_backward")
def _(grad, s, beta, scale):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _soft_mask_setup(ctx, inputs, output):
    w, s, beta, scale = inputs
    ctx.save_for_backward(w, s)
    ctx.beta, ctx.scale = beta, scale


def _soft_mask_backward(ctx, grad):
    w, s = ctx.saved_tensors
    dw, ds = ops.soft_mask_backward(grad, w, s, ctx.beta, ctx.scale)
    return dw, ds, None, None


torch.library.register_autograd("sparseops::soft_mask", _soft_mask_backward, setup_context=_soft_mask_setup)


def _soft_mask_l1_setup(ctx, inputs, output):
    s, beta, scale = inputs
    ctx.save_for_backward(s)
    ctx.beta, ctx.scale = beta, scale


def _soft_mask_l1_backward(ctx, grad):
    (s,) = ctx.saved_tensors
    return ops.soft_mask_l1_backward(grad, s, ctx.beta, ctx.scale), None, None


torch.library.register_autograd("sparseops::soft_mask_l1", _soft_mask_l1_backward,
                                setup_context=_soft_mask_l1_setup)


def soft_mask(w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`w * scale * sigmoid(beta * s)`, Continuous Sparsification's masked weight, fused: one pass
    forward and one pass for both gradients. `scale` is 1/sigmoid(s0) in the official CS code."""
    beta = _check_scalar("soft_mask", beta, "beta")
    scale = _check_scalar("soft_mask", scale, "scale")
    if not isinstance(w, torch.Tensor) or not isinstance(s, torch.Tensor):
        raise TypeError("sparseops.soft_mask: w and s must be tensors")
    _check_tensors("soft_mask", w=w, s=s)
    if _resolve("soft_mask", w.device, ("cpu", "cuda")) == "reference":
        return reference.soft_mask(w, s, beta, scale)
    return ops.soft_mask(w, s, beta, scale)


def soft_mask_l1(s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`scale * sum(sigmoid(beta * s))`, CS's penalty on the mask, with a fused gradient."""
    beta = _check_scalar("soft_mask_l1", beta, "beta")
    scale = _check_scalar("soft_mask_l1", scale, "scale")
    if not isinstance(s, torch.Tensor):
        raise TypeError("sparseops.soft_mask_l1: s must be a tensor")
    _check_tensors("soft_mask_l1", s=s)
    if _resolve("soft_mask_l1", s.device, ("cpu", "cuda")) == "reference":
        return reference.soft_mask_l1(s, beta, scale)
    return ops.soft_mask_l1(s, beta, scale)


# ---------------------------------------------------------------------------------------------
# Masked linear


@torch.library.register_fake("sparseops::masked_linear")
def _(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias):
    torch._check(w.dim() == 2, lambda: "sparseops.masked_linear: w must be 2-D")
    torch._check(x.shape[-1] == w.shape[1], lambda: "sparseops.masked_linear: x and w disagree on in_features")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.register_fake("sparseops::masked_linear_backward")
def _(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, output_mask):
    shapes = (x.shape, w.shape, (w.shape[0],))  # outputs not asked for are distinct empty tensors
    return tuple(w.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask, strict=True))


@torch.library.register_fake("sparseops::masked_linear_dense")
def _(x, w, mask, bias):
    torch._check(x.shape[-1] == w.shape[1], lambda: "sparseops.masked_linear_dense: x and w disagree")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _masked_linear_setup(ctx, inputs, output):
    x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias = inputs
    ctx.save_for_backward(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx)
    ctx.has_bias = bias is not None


def _masked_linear_backward(ctx, grad):
    x, w, row_ptr, col_idx, t_row_ptr, t_col_idx = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[6]
    dx, dw, db = ops.masked_linear_backward(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx,
                                            [need_x, need_w, need_b])
    return (dx if need_x else None, dw if need_w else None, None, None, None, None, db if need_b else None)


torch.library.register_autograd("sparseops::masked_linear", _masked_linear_backward,
                                setup_context=_masked_linear_setup)


def _masked_linear_dense_setup(ctx, inputs, output):
    x, w, mask, bias = inputs
    ctx.save_for_backward(x, w, mask)  # all alive anyway: no masked copy of w is kept
    ctx.has_bias = bias is not None


def _masked_linear_dense_backward(ctx, grad):
    x, w, mask = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    g2 = grad.reshape(-1, w.shape[0])
    dx = (grad @ (w * mask)) if need_x else None
    dw = (g2.t() @ x.reshape(-1, w.shape[1])).mul_(mask) if need_w else None
    db = g2.sum(0) if need_b else None
    return dx, dw, None, db


torch.library.register_autograd("sparseops::masked_linear_dense", _masked_linear_dense_backward,
                                setup_context=_masked_linear_dense_setup)


def masked_linear(x: torch.Tensor, w: torch.Tensor, layout: CsrLayout | torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (w * mask)^T + bias` where only the kept weights cost time.

    `layout` is a CsrLayout (sparseops.layout.csr_layout(mask)) or the mask itself (bool or 0/1,
    shape of w), whose layout is then built once and cached until the mask changes. `x` may have
    any leading dimensions. Gradients: dx through the transposed layout, dw at kept entries only
    (zero elsewhere), dbias as usual.
    """
    _check_inputs("masked_linear", x, w, bias)
    if isinstance(layout, torch.Tensor) and layout.dim() != 2:
        raise ValueError(f"sparseops.masked_linear: mask must be 2-D [out_features, in_features], "
                         f"got shape {tuple(layout.shape)}")
    layout = _as_layout("masked_linear", layout)
    if tuple(w.shape) != layout.shape:
        raise ValueError(f"sparseops.masked_linear: the mask has shape {layout.shape} but w has {tuple(w.shape)}")
    _check_tensors("masked_linear", x=x, w=w, mask=layout.mask, bias=bias)
    impl = _resolve("masked_linear", w.device, ("cpu",))
    if impl == "reference":
        if _state.backend == "reference":
            return reference.masked_linear(x, w, layout.mask, bias)
        impl = "dense"  # no sparse kernel for this device yet: the fused dense path
    if impl == "cpu" and _state.backend == "auto" and layout.density > max_density("masked_linear", "cpu",
                                                                                   layout.shape):
        impl = "dense"
    if impl == "dense":
        if layout.nnz == layout.mask.numel():  # nothing pruned (IMP's level 0): exactly nn.Linear
            return torch.nn.functional.linear(x, w, bias)
        if _state.backend == "auto" and w.numel() <= SMALL_WEIGHT:
            # Small layers: the op's Python autograd costs more than the masked copy of w that plain
            # autograd keeps (what torch.nn.utils.prune does); large ones keep the memory.
            return reference.masked_linear(x, w, layout.mask, bias)
        return ops.masked_linear_dense(x, w, layout.mask, bias)
    return ops.masked_linear(x, w, *_csr(layout).tensors(), bias)


# ---------------------------------------------------------------------------------------------
# Masked conv2d


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("sparseops::masked_conv2d")
def _(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation):
    torch._check(x.dim() == 4 and w.dim() == 4, lambda: "sparseops.masked_conv2d: x and w must be 4-D")
    torch._check(x.shape[1] == w.shape[1], lambda: "sparseops.masked_conv2d: x and w disagree on C_in")
    ho = _conv_out(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    wo = _conv_out(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w.shape[0], ho, wo))


@torch.library.register_fake("sparseops::masked_conv2d_backward")
def _(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, stride, padding, dilation, output_mask):
    shapes = (x.shape, w.shape, (w.shape[0],))
    return tuple(w.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask, strict=True))


def _masked_conv2d_setup(ctx, inputs, output):
    x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx)
    ctx.has_bias = bias is not None
    ctx.geometry = (stride, padding, dilation)


def _masked_conv2d_backward(ctx, grad):
    x, w, row_ptr, col_idx, t_row_ptr, t_col_idx = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[6]
    dx, dw, db = ops.masked_conv2d_backward(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, *ctx.geometry,
                                            [need_x, need_w, need_b])
    return (dx if need_x else None, dw if need_w else None, None, None, None, None, db if need_b else None,
            None, None, None)


torch.library.register_autograd("sparseops::masked_conv2d", _masked_conv2d_backward,
                                setup_context=_masked_conv2d_setup)


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise TypeError(f"sparseops.masked_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    return t


def _plane(x, w, stride, padding, dilation) -> int:
    return (_conv_out(x.shape[-2], w.shape[2], stride[0], padding[0], dilation[0])
            * _conv_out(x.shape[-1], w.shape[3], stride[1], padding[1], dilation[1]))


def _numeric_padding(padding, w, dilation):
    """Padding as two ints; 'same' only where it is symmetric (odd dilated kernels), else None."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:], strict=True)]
        return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None
    if isinstance(padding, str):
        raise ValueError(f"sparseops.masked_conv2d: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    return _pair(padding, "padding")


def masked_conv2d(x: torch.Tensor, w: torch.Tensor, layout: CsrLayout | torch.Tensor,
                  bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """`conv2d(x, w * mask, bias, stride, padding, dilation, groups)` where only kept weights cost time.

    `layout` is the mask (bool or 0/1, shape of w) or its CsrLayout (over [C_out, C_in*kh*kw]).
    The CPU kernel covers groups=1 with any stride, padding and dilation, NCHW and channels_last
    inputs (the output follows the input's memory format). Grouped convolutions, asymmetric "same"
    padding and devices without a kernel run the reference (one mask multiply); so does a mask
    denser than the break-even (thresholds.json), and an unpruned mask runs exactly F.conv2d.
    """
    _check_inputs("masked_conv2d", x, w, bias)
    if w.dim() != 4:
        raise ValueError(f"sparseops.masked_conv2d: w must be 4-D [C_out, C_in/groups, kh, kw], got {tuple(w.shape)}")
    if isinstance(layout, torch.Tensor) and tuple(layout.shape) != tuple(w.shape):
        raise ValueError(f"sparseops.masked_conv2d: the mask has shape {tuple(layout.shape)} but w has "
                         f"{tuple(w.shape)}")
    layout = _as_layout("masked_conv2d", layout)
    if layout.shape != (w.shape[0], w[0].numel()):
        raise ValueError(f"sparseops.masked_conv2d: the layout has shape {layout.shape} but w flattens to "
                         f"{(w.shape[0], w[0].numel())}")
    _check_tensors("masked_conv2d", x=x, w=w, mask=layout.mask, bias=bias)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    pad = _numeric_padding(padding, w, dilation)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"sparseops.masked_conv2d: groups must be a positive int, got {groups!r}")
    name = _state.backend
    supported = groups == 1 and pad is not None and x.dim() == 4
    if name in ("cpu", "cuda", "triton"):
        impl = _resolve("masked_conv2d", w.device, ("cpu",))
        if not supported:
            raise NotImplementedError("sparseops.masked_conv2d: the cpu kernel covers groups=1 and symmetric "
                                      "padding; use the auto or reference backend for this convolution")
    elif name == "auto" and supported and w.device.type == "cpu" and has_kernel("masked_conv2d", "cpu") \
            and stride == (1, 1) and w.shape[1] * w.shape[2] * w.shape[3] >= 64 \
            and layout.density <= max_density("masked_conv2d", "cpu", plane=_plane(x, w, stride, pad, dilation)):
        # Measured (bench_conv.py): strided convolutions lose at 90-95% sparsity (dx works on the
        # stride-dilated grad) and so do layers with tiny C_in*kh*kw (a 3-channel input layer);
        # both stay on the fallback in `auto`.
        impl = "cpu"
    else:
        impl = "reference" if name == "reference" else "dense"
    if impl == "cpu":  # the op returns x's memory format (NCHW or channels_last)
        return ops.masked_conv2d(x, w, *_csr(layout).tensors(), bias, stride, pad, dilation)
    if impl == "dense" and layout.nnz == layout.mask.numel():
        return torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups)
    return reference.masked_conv2d(x, w, layout.mask.view(w.shape), bias, stride, padding, dilation, groups)
