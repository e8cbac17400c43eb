"""Continuous Sparsification's soft mask, elementwise: one pass forward, one pass for both
gradients, one pass for the L1 penalty (per-program partial sums, then a deterministic sum).

Storage in the input dtype, math in float32 (float64 for float64 inputs). sigmoid(z) is
1/(1+e) with e = exp(-z), and its derivative m*(e*m): no cancellation, and exactly 0 where exp
overflows, as torch.sigmoid saturates, so the zero-skipping paths see the same zeros.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import checks
from ._common import acc_dtype, acc_type, autotune, define, sigmoid_pair

_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))]


@autotune(_CONFIGS, key=["n"])
@triton.jit
def _fwd(w_ptr, s_ptr, out_ptr, n, beta, scale, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    w = tl.load(w_ptr + offs, mask=keep, other=0).to(ACC)
    s = tl.load(s_ptr + offs, mask=keep, other=0).to(ACC)
    m, _ = sigmoid_pair(beta * s)
    tl.store(out_ptr + offs, (w * scale * m).to(out_ptr.dtype.element_ty), mask=keep)


@autotune(_CONFIGS, key=["n"])
@triton.jit
def _bwd(g_ptr, w_ptr, s_ptr, dw_ptr, ds_ptr, n, beta, scale, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    g = tl.load(g_ptr + offs, mask=keep, other=0).to(ACC)
    w = tl.load(w_ptr + offs, mask=keep, other=0).to(ACC)
    s = tl.load(s_ptr + offs, mask=keep, other=0).to(ACC)
    m, dm = sigmoid_pair(beta * s)
    tl.store(dw_ptr + offs, (g * scale * m).to(dw_ptr.dtype.element_ty), mask=keep)
    ds = tl.where(dm == 0, 0.0, g * w * scale * beta * dm)  # 0 where flat, also for beta*scale = inf
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _l1_partial(s_ptr, part_ptr, n, beta, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    s = tl.load(s_ptr + offs, mask=keep, other=0).to(ACC)
    m, _ = sigmoid_pair(beta * s)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.where(keep, m, 0.0), axis=0))


@autotune(_CONFIGS, key=["n"])
@triton.jit
def _l1_bwd(g_ptr, s_ptr, ds_ptr, n, beta, scale, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    s = tl.load(s_ptr + offs, mask=keep, other=0).to(ACC)
    _, dm = sigmoid_pair(beta * s)
    coef = tl.load(g_ptr).to(ACC) * scale * beta
    tl.store(ds_ptr + offs, tl.where(dm == 0, 0.0, coef * dm).to(ds_ptr.dtype.element_ty), mask=keep)


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def _check(op, beta, scale, **tensors):
    ref_name, ref = next(iter(tensors.items()))
    checks.like(op, ref_name, ref, **tensors)
    for name, t in tensors.items():
        if t.shape != ref.shape:
            raise ValueError(f"sparseops.{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                             f"got {tuple(t.shape)}")
    checks.finite(op, beta=beta, scale=scale)


def soft_mask(w: torch.Tensor, s: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    _check("soft_mask", beta, scale, w=w, s=s)
    w, s = w.contiguous(), s.contiguous()
    out = torch.empty_like(w)
    if w.numel():
        wrap_triton(_fwd)[_grid(w.numel())](w, s, out, w.numel(), beta, scale, ACC=acc_type(w.dtype))
    return out


def soft_mask_backward(grad, w, s, beta: float, scale: float):
    _check("soft_mask_backward", beta, scale, w=w, s=s, grad=grad)
    grad, w, s = grad.contiguous(), w.contiguous(), s.contiguous()
    dw, ds = torch.empty_like(w), torch.empty_like(s)
    if w.numel():
        wrap_triton(_bwd)[_grid(w.numel())](grad, w, s, dw, ds, w.numel(), beta, scale, ACC=acc_type(w.dtype))
    return dw, ds


_L1_BLOCK = 4096


def soft_mask_l1(s: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    _check("soft_mask_l1", beta, scale, s=s)
    s = s.contiguous()
    n = s.numel()
    part = torch.zeros(triton.cdiv(n, _L1_BLOCK), dtype=acc_dtype(s.dtype), device=s.device)
    if n:
        wrap_triton(_l1_partial)[(part.numel(),)](s, part, n, beta, ACC=acc_type(s.dtype), BLOCK=_L1_BLOCK,
                                                  num_warps=8)
    return (part.sum() * scale).to(s.dtype)


def soft_mask_l1_backward(grad: torch.Tensor, s: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    _check("soft_mask_l1_backward", beta, scale, s=s)
    if grad.numel() != 1:
        raise ValueError("sparseops.soft_mask_l1_backward: grad must be a scalar")
    s = s.contiguous()
    g = grad.reshape(1).to(acc_dtype(s.dtype))  # no half overflow
    ds = torch.empty_like(s)
    if s.numel():
        wrap_triton(_l1_bwd)[_grid(s.numel())](g, s, ds, s.numel(), beta, scale, ACC=acc_type(s.dtype))
    return ds


for _op in (soft_mask, soft_mask_backward, soft_mask_l1, soft_mask_l1_backward):
    define(_op.__name__, _op)
