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
import math
import os
import threading
from importlib import resources
from numbers import Real

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from . import reference
from .layout import BlockLayout, CsrLayout, MaskStats, csr_layout, mask_stats

try:  # the CUDA kernels live in a second library, built only where nvcc and a CUDA torch are
    from . import _cuda  # noqa: F401

    CUDA_EXTENSION_ERROR = None
except ImportError as exc:  # a CPU-only build, or CUDA libraries that cannot be loaded here
    CUDA_EXTENSION_ERROR = str(exc)

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference", "dense")
_TRITON: dict = {}


def triton_unavailable(device: torch.device) -> str | None:
    """None if sparseops' Triton kernels can run on `device`, else why not. Imports (and so
    registers) them on first use: importing triton costs about a second."""
    if "error" not in _TRITON:
        try:
            from . import triton as kernels

            _TRITON["error"], _TRITON["module"] = None, kernels
        except ImportError as exc:
            _TRITON["error"] = f"Triton is not installed (pip install 'sparseops[triton]'): {exc}"
    if _TRITON["error"] is not None:
        return _TRITON["error"]
    return _TRITON["module"].usable_on(device)
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
    cap = float(table.get(op, 0.0))  # not measured on this device: the dense fallback (never slower)
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


def gpu_kernel(op: str, device: torch.device, shape: tuple[int, int], density: float) -> str | None:
    """"cuda" (C++) or "triton" for `op` on a GPU: the winner of the nearest measured point in
    thresholds.json ("cuda": {"kernels": {op: [[h, density, winner], ...]}}, h = N*K/(N+K), written
    by benchmarks/bench_gpu.py), among the kernels that exist here; Triton where nothing is
    measured; None if neither exists."""
    have = [k for k in ("triton", "cuda") if (k == "cuda" and has_kernel(op, "cuda"))
            or (k == "triton" and triton_unavailable(device) is None)]
    points = [p for p in THRESHOLDS.get("cuda", {}).get("kernels", {}).get(op, []) if p[2] in have]
    if not points:
        return have[0] if have else None
    n, k = shape
    h = max(n * k / (n + k), 1.0) if n + k else 1.0
    nearest = min(points, key=lambda p: abs(math.log(max(p[0], 1.0) / h)) + 4 * abs(p[1] - density))
    return nearest[2]


def measured_faster(op: str, device_type: str) -> bool:
    """Whether a fused GPU op was measured faster than its unfused torch equivalent ("fused" in
    thresholds.json, written by benchmarks/bench_gpu.py); `auto` uses it only then."""
    return bool(THRESHOLDS.get(device_type, {}).get("fused", {}).get(op, False))


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
        if device.type == "cuda" and "triton" in kernels and triton_unavailable(device) is None:
            return "triton"
        return "reference"
    if name in ("reference", "dense"):
        return name
    if name == "triton":
        why = triton_unavailable(device)
        if why is not None:
            raise NotImplementedError(f"sparseops.{op}: the triton backend cannot run here: {why}")
        return "triton"
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


def _as_layout(op: str, layout) -> CsrLayout | BlockLayout | MaskStats:
    """For a mask tensor, its cached layout or (cheaper) its MaskStats; a given layout once it is
    known not to be stale. `_csr` turns the result into a CsrLayout when a sparse kernel runs."""
    if isinstance(layout, torch.Tensor):
        return mask_stats(layout)
    if not isinstance(layout, (CsrLayout, BlockLayout)):
        raise TypeError(f"sparseops.{op}: layout must be a mask tensor, a CsrLayout or a BlockLayout, "
                        f"got {type(layout).__name__}")
    if not torch.compiler.is_compiling() and layout.stale:  # version counters are not traceable
        raise ValueError(f"sparseops.{op}: layout is stale (its mask was changed in place after it was built); "
                         "call sparseops.layout.csr_layout(mask) again, or pass the mask")
    return layout


def _csr(info: CsrLayout | BlockLayout | MaskStats) -> CsrLayout:
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
# Registration: each op's fake and autograd formula, kept so that its Triton twin gets the same


_SPECS: dict[str, tuple] = {}


def _register(op: str, fake, setup=None, backward=None) -> None:
    """Registers the fake of `sparseops::<op>` and, with `setup`, its autograd formula;
    `backward(bwd)` builds the formula around the op that computes the gradients."""
    _SPECS[op] = (fake, setup, backward)
    register_twin(op, op)


def register_twin(op: str, name: str) -> None:
    """Gives `sparseops::<name>` the fake and autograd formula of `<op>` (whose backward then runs
    `<name>_backward`, the twin of `<op>_backward`)."""
    fake, setup, backward = _SPECS[op]
    torch.library.register_fake(f"sparseops::{name}", fake)
    if setup is not None:
        def bwd(*args):  # looked up when called: the twin's backward may be registered after it
            return getattr(ops, f"{name}_backward")(*args)
        torch.library.register_autograd(f"sparseops::{name}", backward(bwd), setup_context=setup)


# ---------------------------------------------------------------------------------------------
# Soft mask (Continuous Sparsification)


def _check_scalar(op: str, v, name: str) -> float:
    if isinstance(v, torch.Tensor) or not isinstance(v, Real) or isinstance(v, bool):
        raise TypeError(f"sparseops.{op}: {name} must be a Python number, got {type(v).__name__}")
    return float(v)


def _soft_mask_fake(w, s, beta, scale):
    torch._check(w.shape == s.shape, lambda: f"sparseops.soft_mask: s must have the shape of w {tuple(w.shape)}")
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _soft_mask_backward_fake(grad, w, s, beta, scale):
    return (torch.empty_like(w, memory_format=torch.contiguous_format),
            torch.empty_like(s, memory_format=torch.contiguous_format))


def _soft_mask_l1_fake(s, beta, scale):
    return s.new_empty(())


def _soft_mask_l1_backward_fake(grad, s, beta, scale):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _soft_mask_setup(ctx, inputs, output):
    w, s, beta, scale = inputs
    ctx.save_for_backward(w, s)
    ctx.beta, ctx.scale = beta, scale


def _soft_mask_backward(bwd):
    def backward(ctx, grad):
        w, s = ctx.saved_tensors
        dw, ds = bwd(grad, w, s, ctx.beta, ctx.scale)
        return dw, ds, None, None
    return backward


def _soft_mask_l1_setup(ctx, inputs, output):
    s, beta, scale = inputs
    ctx.save_for_backward(s)
    ctx.beta, ctx.scale = beta, scale


def _soft_mask_l1_backward(bwd):
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return bwd(grad, s, ctx.beta, ctx.scale), None, None
    return backward


_register("soft_mask", _soft_mask_fake, _soft_mask_setup, _soft_mask_backward)
_register("soft_mask_backward", _soft_mask_backward_fake)
_register("soft_mask_l1", _soft_mask_l1_fake, _soft_mask_l1_setup, _soft_mask_l1_backward)
_register("soft_mask_l1_backward", _soft_mask_l1_backward_fake)


def soft_mask(w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`w * scale * sigmoid(beta * s)`, Continuous Sparsification's masked weight, fused: one pass
    forward and one pass for both gradients. `scale` is 1/sigmoid(s0) in the official CS code."""
    beta = _check_scalar("soft_mask", beta, "beta")
    scale = _check_scalar("soft_mask", scale, "scale")
    if not isinstance(w, torch.Tensor) or not isinstance(s, torch.Tensor):
        raise TypeError("sparseops.soft_mask: w and s must be tensors")
    _check_tensors("soft_mask", w=w, s=s)
    impl = _resolve("soft_mask", w.device, ("cpu", "cuda", "triton"))
    if impl == "reference":
        return reference.soft_mask(w, s, beta, scale)
    return (ops.triton_soft_mask if impl == "triton" else ops.soft_mask)(w, s, beta, scale)


def soft_mask_l1(s: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """`scale * sum(sigmoid(beta * s))`, CS's penalty on the mask, with a fused gradient."""
    beta = _check_scalar("soft_mask_l1", beta, "beta")
    scale = _check_scalar("soft_mask_l1", scale, "scale")
    if not isinstance(s, torch.Tensor):
        raise TypeError("sparseops.soft_mask_l1: s must be a tensor")
    _check_tensors("soft_mask_l1", s=s)
    impl = _resolve("soft_mask_l1", s.device, ("cpu", "cuda", "triton"))
    if impl == "reference":
        return reference.soft_mask_l1(s, beta, scale)
    return (ops.triton_soft_mask_l1 if impl == "triton" else ops.soft_mask_l1)(s, beta, scale)


# ---------------------------------------------------------------------------------------------
# Masked linear


def _masked_linear_fake(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias):
    torch._check(w.dim() == 2, lambda: "sparseops.masked_linear: w must be 2-D")
    torch._check(x.shape[-1] == w.shape[1], lambda: "sparseops.masked_linear: x and w disagree on in_features")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _grads_fake(x, w, output_mask, extra=()):
    """dx (in x's memory format, as the conv kernels return it), dw, the `extra` weight-shaped grads
    (ds), db; outputs not asked for are distinct empty tensors."""
    shapes = (x.shape, w.shape, *(w.shape for _ in extra), (w.shape[0],))
    out = [w.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask, strict=True)]
    if output_mask[0]:
        out[0] = out[0].contiguous(memory_format=_format_of(x))
    return tuple(out)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    """The conv ops' convention (csrc/checks.h format_of): outputs and dx take x's memory format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _masked_linear_backward_fake(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, output_mask):
    return _grads_fake(x, w, output_mask)


def _masked_linear_dense_fake(x, w, mask, bias):
    torch._check(x.shape[-1] == w.shape[1], lambda: "sparseops.masked_linear_dense: x and w disagree")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _masked_linear_setup(ctx, inputs, output):
    x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias = inputs
    ctx.save_for_backward(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx)
    ctx.has_bias = bias is not None


def _masked_linear_backward(bwd):
    def backward(ctx, grad):
        x, w, row_ptr, col_idx, t_row_ptr, t_col_idx = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[6]
        dx, dw, db = bwd(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, [need_x, need_w, need_b])
        return (dx if need_x else None, dw if need_w else None, None, None, None, None, db if need_b else None)
    return backward


def _masked_linear_dense_setup(ctx, inputs, output):
    x, w, mask, bias = inputs
    ctx.save_for_backward(x, w, mask)  # all alive anyway: no masked copy of w is kept
    ctx.has_bias = bias is not None


def _masked_linear_dense_backward(ctx, grad):
    x, w, mask = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3])
    dx, dw, db = _dense_masked_grads(grad, x, w, mask, need)
    return dx if need[0] else None, dw if need[1] else None, None, db if need[2] else None


def _dense_masked_grads(grad, x, w, mask, output_mask):
    """dx, dw (masked), db of y = x @ (w*mask)^T + b through dense GEMMs; empties where not asked for."""
    need_x, need_w, need_b = output_mask
    n, k = w.shape
    g2 = grad.reshape(-1, n)
    dx = grad @ (w * mask) if need_x else w.new_empty(0)
    dw = (g2.t() @ x.reshape(-1, k)).mul_(mask) if need_w else w.new_empty(0)
    db = g2.sum(0) if need_b else w.new_empty(0)
    return dx, dw, db


_register("masked_linear", _masked_linear_fake, _masked_linear_setup, _masked_linear_backward)
_register("masked_linear_backward", _masked_linear_backward_fake)
_register("masked_linear_dense", _masked_linear_dense_fake, _masked_linear_dense_setup,
          lambda bwd: _masked_linear_dense_backward)


def masked_linear(x: torch.Tensor, w: torch.Tensor, layout: CsrLayout | BlockLayout | torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (w * mask)^T + bias` where only the kept weights cost time.

    `layout` is the mask itself (bool or 0/1, shape of w), whose layout is then built once and
    cached until the mask changes, a CsrLayout (sparseops.layout.csr_layout(mask)) or a BlockLayout
    (sparseops.layout.block_layout(mask, 32): skips empty tiles, runs kept tiles on tensor cores;
    Triton on GPUs). `x` may have any leading dimensions. Gradients: dx through the transposed
    layout, dw at kept entries only (zero elsewhere), dbias as usual.
    """
    _check_inputs("masked_linear", x, w, bias)
    if isinstance(layout, torch.Tensor) and layout.dim() != 2:
        raise ValueError(f"sparseops.masked_linear: mask must be 2-D [out_features, in_features], "
                         f"got shape {tuple(layout.shape)}")
    layout = _as_layout("masked_linear", layout)
    if tuple(w.shape) != layout.shape:
        raise ValueError(f"sparseops.masked_linear: the mask has shape {layout.shape} but w has {tuple(w.shape)}")
    _check_tensors("masked_linear", x=x, w=w, mask=layout.mask, bias=bias)
    if isinstance(layout, BlockLayout):
        return _masked_linear_block(x, w, layout, bias)
    impl = _resolve("masked_linear", w.device, ("cpu", "cuda", "triton"))
    if impl == "reference":
        if _state.backend == "reference":
            return reference.masked_linear(x, w, layout.mask, bias)
        impl = "dense"  # no sparse kernel for this device: the fused dense path
    if _state.backend == "auto" and impl != "dense":
        if layout.density > max_density("masked_linear", w.device.type, layout.shape):
            impl = "dense"
        elif impl != "cpu":
            impl = gpu_kernel("masked_linear", w.device, layout.shape, layout.density)
    if impl == "dense":
        if layout.nnz == layout.mask.numel():  # nothing pruned (IMP's level 0): exactly nn.Linear
            return torch.nn.functional.linear(x, w, bias)
        if _state.backend == "auto" and w.numel() <= SMALL_WEIGHT:
            # Small layers: the op's Python autograd costs more than the masked copy of w that plain
            # autograd keeps (what torch.nn.utils.prune does); large ones keep the memory.
            return reference.masked_linear(x, w, layout.mask, bias)
        return ops.masked_linear_dense(x, w, layout.mask, bias)
    kernel = ops.triton_masked_linear if impl == "triton" else ops.masked_linear
    return kernel(x, w, *_csr(layout).tensors(), bias)


def _masked_linear_block(x, w, layout: BlockLayout, bias):
    """The block path: Triton's tile-skipping kernels where they run (forced, or in `auto` once the
    tile density is below the break-even measured on this GPU); elsewhere the element path."""
    name = _state.backend
    if name == "reference":
        return reference.masked_linear(x, w, layout.mask, bias)
    if name == "triton" or (name == "auto" and w.device.type == "cuda" and triton_unavailable(w.device) is None
                            and layout.tile_density <= max_density("masked_linear_block", "cuda")):
        _resolve("masked_linear", w.device, ("triton",))  # raises, naming why, if Triton cannot run here
        return ops.triton_masked_linear_block(x, w, layout.mask, *layout.tensors(), layout.block, bias)
    return masked_linear(x, w, layout.mask, bias)


def _masked_linear_block_setup(ctx, inputs, output):
    x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias = inputs
    ctx.save_for_backward(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx)
    ctx.block, ctx.has_bias = block, bias is not None


def _masked_linear_block_backward(bwd):
    def backward(ctx, grad):
        x, w, mask, *layout = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[8]
        dx, dw, db = bwd(grad, x, w, mask, *layout, ctx.block, [need_x, need_w, need_b])
        return (dx if need_x else None, dw if need_w else None, None, None, None, None, None, None,
                db if need_b else None)
    return backward


def _masked_linear_block_fake(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias):
    return _masked_linear_dense_fake(x, w, mask, bias)


def _masked_linear_block_backward_fake(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block,
                                       output_mask):
    return _grads_fake(x, w, output_mask)


@torch.library.register_kernel("sparseops::masked_linear_block", ("cpu", "cuda"))
def _(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias):
    # Outside Triton the tiles buy nothing: the dense masked product (same math, same fake).
    return torch.nn.functional.linear(x, w * mask, bias)


@torch.library.register_kernel("sparseops::masked_linear_block_backward", ("cpu", "cuda"))
def _(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, output_mask):
    return _dense_masked_grads(grad, x, w, mask, output_mask)


_register("masked_linear_block", _masked_linear_block_fake, _masked_linear_block_setup,
          _masked_linear_block_backward)
_register("masked_linear_block_backward", _masked_linear_block_backward_fake)


# ---------------------------------------------------------------------------------------------
# Soft-masked linear (CS with the mask fused into the GEMM)


def _soft_masked_linear_fake(x, w, s, beta, scale, bias):
    torch._check(x.shape[-1] == w.shape[1], lambda: "sparseops.soft_masked_linear: x and w disagree")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _soft_masked_linear_backward_fake(grad, x, w, s, beta, scale, output_mask):
    return _grads_fake(x, w, output_mask, extra=(s,))


def _soft_masked_linear_setup(ctx, inputs, output):
    x, w, s, beta, scale, bias = inputs
    ctx.save_for_backward(x, w, s)
    ctx.beta, ctx.scale, ctx.has_bias = beta, scale, bias is not None


def _soft_masked_linear_backward(bwd):
    def backward(ctx, grad):
        x, w, s = ctx.saved_tensors
        need = [*ctx.needs_input_grad[:3], ctx.has_bias and ctx.needs_input_grad[5]]
        dx, dw, ds, db = bwd(grad, x, w, s, ctx.beta, ctx.scale, need)
        return (dx if need[0] else None, dw if need[1] else None, ds if need[2] else None, None, None,
                db if need[3] else None)
    return backward


@torch.library.register_kernel("sparseops::soft_masked_linear", ("cpu", "cuda"))
def _(x, w, s, beta, scale, bias):
    # Outside Triton: the soft mask op, then a dense GEMM (the masked weight is materialised).
    return torch.nn.functional.linear(x, ops.soft_mask(w, s, beta, scale), bias)


@torch.library.register_kernel("sparseops::soft_masked_linear_backward", ("cpu", "cuda"))
def _(grad, x, w, s, beta, scale, output_mask):
    need_x, need_w, need_s, need_b = output_mask
    n, k = w.shape
    g2 = grad.reshape(-1, n)
    dx = grad @ ops.soft_mask(w, s, beta, scale) if need_x else w.new_empty(0)
    dw = ds = None
    if need_w or need_s:
        dw, ds = ops.soft_mask_backward(g2.t() @ x.reshape(-1, k), w, s, beta, scale)
    return (dx, dw if need_w else w.new_empty(0), ds if need_s else w.new_empty(0),
            g2.sum(0) if need_b else w.new_empty(0))


_register("soft_masked_linear", _soft_masked_linear_fake, _soft_masked_linear_setup, _soft_masked_linear_backward)
_register("soft_masked_linear_backward", _soft_masked_linear_backward_fake)


def soft_masked_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (w * scale * sigmoid(beta*s))^T + bias`: a linear layer under CS's soft mask.

    On GPUs with Triton the mask is fused into the GEMM (applied to each weight tile as it is
    loaded; tiles whose mask is exactly 0 are skipped; ds comes from the dw GEMM's epilogue): used
    with backend "triton", and in `auto` once measured faster on this GPU (thresholds.json "fused").
    Elsewhere: sparseops.soft_mask, then F.linear.
    """
    beta, scale = _check_soft("soft_masked_linear", x, w, s, beta, scale, bias)
    if _state.backend == "reference":
        return reference.soft_masked_linear(x, w, s, beta, scale, bias)
    if fused_soft("soft_masked_linear", w.device):
        return ops.triton_soft_masked_linear(x, w, s, beta, scale, bias)
    return torch.nn.functional.linear(x, soft_mask(w, s, beta, scale), bias)


def _check_soft(op: str, x, w, s, beta, scale, bias) -> tuple[float, float]:
    """The soft-masked ops' arguments: tensors on one device, beta and scale as Python numbers."""
    beta, scale = _check_scalar(op, beta, "beta"), _check_scalar(op, scale, "scale")
    _check_inputs(op, x, w, bias)
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"sparseops.{op}: s must be a tensor")
    _check_tensors(op, x=x, w=w, s=s, bias=bias)
    return beta, scale


def fused_soft(op: str, device: torch.device) -> bool:
    """Whether `op` (soft_masked_linear or soft_masked_conv2d) runs the fused Triton kernels on
    `device`: when forced (raising, with the reason, where Triton cannot run), or in `auto` on a GPU
    where it was measured faster than soft_mask + the dense op."""
    name = _state.backend
    if name == "triton":
        _resolve(op, device, ("triton",))
        return True
    return (name == "auto" and device.type == "cuda" and measured_faster(op, "cuda")
            and triton_unavailable(device) is None)


# ---------------------------------------------------------------------------------------------
# Masked conv2d


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _masked_conv2d_fake(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation):
    torch._check(x.dim() == 4 and w.dim() == 4, lambda: "sparseops.masked_conv2d: x and w must be 4-D")
    torch._check(x.shape[1] == w.shape[1], lambda: "sparseops.masked_conv2d: x and w disagree on C_in")
    ho = _conv_out(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    wo = _conv_out(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w.shape[0], ho, wo)).contiguous(memory_format=_format_of(x))


def _masked_conv2d_backward_fake(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, stride, padding, dilation,
                                 output_mask):
    return _grads_fake(x, w, output_mask)


def _masked_conv2d_setup(ctx, inputs, output):
    x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx)
    ctx.has_bias = bias is not None
    ctx.geometry = (stride, padding, dilation)


def _masked_conv2d_backward(bwd):
    def backward(ctx, grad):
        x, w, row_ptr, col_idx, t_row_ptr, t_col_idx = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[6]
        dx, dw, db = bwd(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, *ctx.geometry,
                         [need_x, need_w, need_b])
        return (dx if need_x else None, dw if need_w else None, None, None, None, None, db if need_b else None,
                None, None, None)
    return backward


_register("masked_conv2d", _masked_conv2d_fake, _masked_conv2d_setup, _masked_conv2d_backward)
_register("masked_conv2d_backward", _masked_conv2d_backward_fake)


def _masked_conv2d_block_fake(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias, stride, padding,
                              dilation):
    return _masked_conv2d_fake(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation)


def _masked_conv2d_block_backward_fake(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, stride,
                                       padding, dilation, output_mask):
    return _grads_fake(x, w, output_mask)


def _masked_conv2d_block_setup(ctx, inputs, output):
    x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx)
    ctx.block, ctx.has_bias, ctx.geometry = block, bias is not None, (stride, padding, dilation)


def _masked_conv2d_block_backward(bwd):
    def backward(ctx, grad):
        x, w, mask, *layout = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[8]
        dx, dw, db = bwd(grad, x, w, mask, *layout, ctx.block, *ctx.geometry, [need_x, need_w, need_b])
        return (dx if need_x else None, dw if need_w else None, *([None] * 6), db if need_b else None,
                None, None, None)
    return backward


@torch.library.register_kernel("sparseops::masked_conv2d_block", ("cpu", "cuda"))
def _(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias, stride, padding, dilation):
    # Outside Triton the tiles buy nothing: the dense masked convolution (same math, same fake).
    return torch.nn.functional.conv2d(x, w * mask, bias, stride, padding, dilation).contiguous(
        memory_format=_format_of(x))


@torch.library.register_kernel("sparseops::masked_conv2d_block_backward", ("cpu", "cuda"))
def _(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, stride, padding, dilation, output_mask):
    need_x, need_w, need_b = output_mask
    grad_fn = torch.nn.grad
    dx = (grad_fn.conv2d_input(x.shape, w * mask, grad, stride, padding, dilation).contiguous(
        memory_format=_format_of(x)) if need_x else w.new_empty(0))
    dw = grad_fn.conv2d_weight(x, w.shape, grad, stride, padding, dilation) * mask if need_w else w.new_empty(0)
    return dx, dw, grad.sum((0, 2, 3)) if need_b else w.new_empty(0)


_register("masked_conv2d_block", _masked_conv2d_block_fake, _masked_conv2d_block_setup,
          _masked_conv2d_block_backward)
_register("masked_conv2d_block_backward", _masked_conv2d_block_backward_fake)


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


def masked_conv2d(x: torch.Tensor, w: torch.Tensor, layout: CsrLayout | BlockLayout | torch.Tensor,
                  bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """`conv2d(x, w * mask, bias, stride, padding, dilation, groups)` where only kept weights cost time.

    `layout` is the mask (bool or 0/1, shape of w), its CsrLayout (over [C_out, C_in*kh*kw]) or
    its BlockLayout (sparseops.block_layout(mask, 32): tap-major tiles on tensor cores, Triton on
    GPUs; elsewhere the element path). The CPU kernel covers groups=1 with any stride, padding and dilation, NCHW and channels_last
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
    if isinstance(layout, BlockLayout) and supported and (name == "triton" or (
            name == "auto" and w.device.type == "cuda" and triton_unavailable(w.device) is None
            and layout.tile_density <= max_density("masked_conv2d_block", "cuda"))):
        if layout.taps != w.shape[2] * w.shape[3]:
            raise ValueError("sparseops.masked_conv2d: the block layout was built from a 2-D mask; build it from the "
                             "4-D conv mask (sparseops.block_layout(mask)) so that its tiles follow the taps")
        _resolve("masked_conv2d", w.device, ("triton",))  # raises, naming why, if Triton cannot run here
        return ops.triton_masked_conv2d_block(x, w, layout.mask.view(w.shape), *layout.tensors(), layout.block, bias,
                                              stride, pad, dilation)
    if name in ("cpu", "cuda", "triton"):
        impl = _resolve("masked_conv2d", w.device, ("cpu", "cuda", "triton"))
        if not supported:
            raise NotImplementedError(f"sparseops.masked_conv2d: the {name} kernel covers groups=1 and symmetric "
                                      "padding; use the auto or reference backend for this convolution")
    elif name == "auto" and supported and w.device.type == "cpu" and has_kernel("masked_conv2d", "cpu") \
            and stride == (1, 1) and w.shape[1] * w.shape[2] * w.shape[3] >= 64 \
            and layout.density <= max_density("masked_conv2d", "cpu", plane=_plane(x, w, stride, pad, dilation)):
        # Measured (bench_conv.py): strided convolutions lose at 90-95% sparsity (dx works on the
        # stride-dilated grad) and so do layers with tiny C_in*kh*kw (a 3-channel input layer);
        # both stay on the fallback in `auto`.
        impl = "cpu"
    elif name == "auto" and supported and w.device.type == "cuda" \
            and layout.density <= max_density("masked_conv2d", "cuda", plane=_plane(x, w, stride, pad, dilation)) \
            and (chosen := gpu_kernel("masked_conv2d", w.device, layout.shape, layout.density)) is not None:
        impl = chosen  # once measured on a GPU
    else:
        impl = "reference" if name == "reference" else "dense"
    if impl in ("cpu", "cuda", "triton"):  # the ops return x's memory format (NCHW or channels_last)
        kernel = ops.triton_masked_conv2d if impl == "triton" else ops.masked_conv2d
        return kernel(x, w, *_csr(layout).tensors(), bias, stride, pad, dilation)
    if impl == "dense" and layout.nnz == layout.mask.numel():
        return torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups)
    return reference.masked_conv2d(x, w, layout.mask.view(w.shape), bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------
# Soft-masked conv2d (CS with the mask fused into the implicit GEMM)


def _soft_masked_conv2d_fake(x, w, s, beta, scale, bias, stride, padding, dilation):
    return _masked_conv2d_fake(x, w, None, None, None, None, bias, stride, padding, dilation)


def _soft_masked_conv2d_backward_fake(grad, x, w, s, beta, scale, stride, padding, dilation, output_mask):
    return _grads_fake(x, w, output_mask, extra=(s,))


def _soft_masked_conv2d_setup(ctx, inputs, output):
    x, w, s, beta, scale, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w, s)
    ctx.beta, ctx.scale, ctx.has_bias, ctx.geometry = beta, scale, bias is not None, (stride, padding, dilation)


def _soft_masked_conv2d_backward(bwd):
    def backward(ctx, grad):
        x, w, s = ctx.saved_tensors
        need = [*ctx.needs_input_grad[:3], ctx.has_bias and ctx.needs_input_grad[5]]
        dx, dw, ds, db = bwd(grad, x, w, s, ctx.beta, ctx.scale, *ctx.geometry, need)
        return (dx if need[0] else None, dw if need[1] else None, ds if need[2] else None, None, None,
                db if need[3] else None, None, None, None)
    return backward


@torch.library.register_kernel("sparseops::soft_masked_conv2d", ("cpu", "cuda"))
def _(x, w, s, beta, scale, bias, stride, padding, dilation):
    return torch.nn.functional.conv2d(x, ops.soft_mask(w, s, beta, scale), bias, stride, padding, dilation).contiguous(
        memory_format=_format_of(x))


@torch.library.register_kernel("sparseops::soft_masked_conv2d_backward", ("cpu", "cuda"))
def _(grad, x, w, s, beta, scale, stride, padding, dilation, output_mask):
    need_x, need_w, need_s, need_b = output_mask
    grad_fn = torch.nn.grad
    dx = (grad_fn.conv2d_input(x.shape, ops.soft_mask(w, s, beta, scale), grad, stride, padding, dilation)
          .contiguous(memory_format=_format_of(x)) if need_x else w.new_empty(0))
    dw = ds = None
    if need_w or need_s:
        dw, ds = ops.soft_mask_backward(grad_fn.conv2d_weight(x, w.shape, grad, stride, padding, dilation), w, s,
                                        beta, scale)
    return (dx, dw if need_w else w.new_empty(0), ds if need_s else w.new_empty(0),
            grad.sum((0, 2, 3)) if need_b else w.new_empty(0))


_register("soft_masked_conv2d", _soft_masked_conv2d_fake, _soft_masked_conv2d_setup, _soft_masked_conv2d_backward)
_register("soft_masked_conv2d_backward", _soft_masked_conv2d_backward_fake)


def soft_masked_conv2d(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, beta: float = 1.0, scale: float = 1.0,
                       bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1):
    """`conv2d(x, w * scale * sigmoid(beta*s), bias, ...)`: a convolution under CS's soft mask.

    With Triton (forced, or in `auto` once measured faster on this GPU: thresholds.json "fused") the
    mask is applied to each weight tile inside the implicit GEMM, tiles whose mask is exactly 0 are
    skipped, and dw and ds come from one GEMM; groups=1 and symmetric padding. Elsewhere, and for
    other convolutions in `auto`: sparseops.soft_mask, then F.conv2d.
    """
    beta, scale = _check_soft("soft_masked_conv2d", x, w, s, beta, scale, bias)
    if w.dim() != 4:
        raise ValueError(f"sparseops.soft_masked_conv2d: w must be 4-D [C_out, C_in/groups, kh, kw], "
                         f"got {tuple(w.shape)}")
    if _state.backend == "reference":
        return reference.soft_masked_conv2d(x, w, s, beta, scale, bias, stride, padding, dilation, groups)
    stride_, dilation_ = _pair(stride, "stride"), _pair(dilation, "dilation")
    pad = _numeric_padding(padding, w, dilation_)
    supported = groups == 1 and pad is not None and x.dim() == 4
    if fused_soft("soft_masked_conv2d", w.device) and (supported or _state.backend == "triton"):
        if not supported:
            raise NotImplementedError("sparseops.soft_masked_conv2d: the triton kernel covers groups=1 and "
                                      "symmetric padding; use the auto or reference backend for this convolution")
        return ops.triton_soft_masked_conv2d(x, w, s, beta, scale, bias, stride_, pad, dilation_)
    return torch.nn.functional.conv2d(x, soft_mask(w, s, beta, scale), bias, stride, padding, dilation, groups)
