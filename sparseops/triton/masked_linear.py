"""Unstructured masked matmul: the forward and dx as CSR SpMMs, dw as an SDDMM over kept entries.

Sputnik's decomposition (Gale et al., SC'20) on the transposed problem: with X^T stored [K, M]
(one transpose per call), every kept weight W[n, k] scales one contiguous row X^T[k, :], so a
program owns one sparse row n and a block of M, and all its loads are coalesced vectors. Rows are
launched longest first (a per-layout permutation, cached) so the long rows do not form a tail.

- forward: Y^T[n, :] = sum_j W[n, col_j] * X^T[col_j, :]       (CSR of W)
- dx:      dX^T[k, :] = sum_j W[row_j, k] * G^T[row_j, :]      (CSR of W^T, same kernel)
- dw:      dW[n, k] = <G^T[n, :], X^T[k, :]> at kept (n, k)     (SDDMM; M split over programs when
           there are too few rows to fill the GPU, partial sums added in a fixed order)

Indices are int32 or int64 as the layout holds them; addresses are computed in int64.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import checks
from ._common import (
    acc_dtype,
    acc_type,
    autotune,
    bias_grad,
    define,
    nnz_bucket,
    row_order,
    scatter_partials,
    split_count,
)

_SPMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_J": bj}, num_warps=w)
                 for bm, bj, w in ((64, 16, 2), (128, 16, 4), (256, 8, 4), (512, 8, 8), (128, 32, 4))]
_SDDMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_J": bj}, num_warps=w)
                  for bm, bj, w in ((64, 16, 2), (128, 16, 4), (256, 8, 4), (128, 32, 4))]


@autotune(_SPMM_CONFIGS, key=["R", "M", "NNZ_BUCKET"])
@triton.jit
def _spmm(order_ptr, row_ptr, col_idx, val_ptr, val_sr, val_sc, b_ptr, out_ptr, bias_ptr, R, M, NNZ_BUCKET,
          HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[r, m] = sum over j in row r of val[r*val_sr + col_j*val_sc] * b[col_j, m] (+ bias[r])."""
    # one flat grid (rows may pass the 65535 limit of grid axis 1): consecutive programs take
    # consecutive rows of the longest-first order for one block of M
    pid = tl.program_id(0).to(tl.int64)
    r = tl.load(order_ptr + pid % R).to(tl.int64)
    offs_m = (pid // R) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    start = tl.load(row_ptr + r).to(tl.int64)
    end = tl.load(row_ptr + r + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(start, end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        in_j = js < end
        cols = tl.load(col_idx + js, mask=in_j, other=0).to(tl.int64)
        v = tl.load(val_ptr + r * val_sr + cols * val_sc, mask=in_j, other=0).to(ACC)
        b = tl.load(b_ptr + cols[:, None] * M + offs_m[None, :], mask=in_j[:, None] & in_m[None, :], other=0)
        acc += tl.sum(v[:, None] * b.to(ACC), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r).to(ACC)
    tl.store(out_ptr + r * M + offs_m, acc.to(out_ptr.dtype.element_ty), mask=in_m)


@autotune(_SDDMM_CONFIGS, key=["R", "M", "NNZ_BUCKET"])
@triton.jit
def _sddmm(order_ptr, row_ptr, col_idx, a_ptr, b_ptr, out_ptr, part_ptr, R, C, M, NNZ, NNZ_BUCKET, m_per_split,
           SPLIT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr):
    """For kept (r, col_j): <a[r, m-range], b[col_j, m-range]>, into out[r*C + col_j] (one split) or
    part[split, j] (several)."""
    r = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    split = tl.program_id(1)
    m_lo = split.to(tl.int64) * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    start = tl.load(row_ptr + r).to(tl.int64)
    end = tl.load(row_ptr + r + 1).to(tl.int64)
    for j0 in range(start, end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        in_j = js < end
        cols = tl.load(col_idx + js, mask=in_j, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_J,), dtype=ACC)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_m = offs_m < m_hi
            a = tl.load(a_ptr + r * M + offs_m, mask=in_m, other=0).to(ACC)
            b = tl.load(b_ptr + cols[:, None] * M + offs_m[None, :], mask=in_j[:, None] & in_m[None, :], other=0)
            acc += tl.sum(b.to(ACC) * a[None, :], axis=1)
        if SPLIT == 1:
            tl.store(out_ptr + r * C + cols, acc.to(out_ptr.dtype.element_ty), mask=in_j)
        else:
            tl.store(part_ptr + split * NNZ + js, acc, mask=in_j)


# Row permutations (longest row first) and entry rows, per layout index tensor: layouts are cached
# per mask (sparseops.layout), so these are computed once per mask, not per call.
def spmm_t(row_ptr, col_idx, vals, val_strides, b, rows: int, bias=None) -> torch.Tensor:
    """out [rows, M] = S @ b for S in CSR (values read from `vals` at row*sr + col*sc), b [C, M]."""
    m = b.shape[1]
    out = torch.empty((rows, m), dtype=b.dtype, device=b.device)
    if rows == 0 or m == 0:
        return out
    wrap_triton(_spmm)[lambda meta: (rows * triton.cdiv(m, meta["BLOCK_M"]),)](
        row_order(row_ptr), row_ptr, col_idx, vals, val_strides[0], val_strides[1], b, out,
        bias if bias is not None else out, rows, m, nnz_bucket(col_idx.numel()),
        HAS_BIAS=bias is not None, ACC=acc_type(b.dtype))
    return out


def sddmm(row_ptr, col_idx, a, b, shape, out_dtype) -> torch.Tensor:
    """Dense [R, C] with out[r, c] = <a[r], b[c]> at the kept entries of the CSR, 0 elsewhere."""
    rows, cols = shape
    m, nnz = a.shape[1], col_idx.numel()
    out = torch.zeros(shape, dtype=out_dtype, device=a.device)
    if nnz == 0:
        return out
    split = split_count(rows, m, a.device, 128)
    per = triton.cdiv(m, split) if m else 0
    part = torch.empty((split, nnz), dtype=acc_dtype(a.dtype), device=a.device) if split > 1 else out
    wrap_triton(_sddmm)[(rows, split)](row_order(row_ptr), row_ptr, col_idx, a, b, out, part, rows, cols, m, nnz,
                                       nnz_bucket(nnz), per, SPLIT=split, ACC=acc_type(a.dtype))
    if split > 1:
        scatter_partials(out, row_ptr, col_idx, part)
    return out


def _check(op, x, w, bias, layout, grad=None):
    row_ptr, col_idx, t_row_ptr, t_col_idx = layout
    checks.like(op, "w", w, x=x, bias=bias, grad=grad)
    checks.linear(op, x, w, bias)
    n, k = w.shape
    checks.indices(op, w.device, row_ptr=(row_ptr, n + 1), t_row_ptr=(t_row_ptr, k + 1), col_idx=(col_idx, -1),
                   t_col_idx=(t_col_idx, col_idx.numel()))


def masked_linear(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias):
    _check("masked_linear", x, w, bias, (row_ptr, col_idx, t_row_ptr, t_col_idx))
    n, k = w.shape
    xt = x.reshape(-1, k).t().contiguous()  # [K, M]: every kept weight reads one contiguous row
    w = w.contiguous()
    yt = spmm_t(row_ptr, col_idx, w, (k, 1), xt, n, bias)
    y = x.new_empty((*x.shape[:-1], n))  # fresh, in the output's shape: an op returns no views
    y.view(-1, n).copy_(yt.t())  # one coalesced transpose pass
    return y


def masked_linear_backward(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, output_mask):
    _check("masked_linear_backward", x, w, None, (row_ptr, col_idx, t_row_ptr, t_col_idx), grad)
    n, k = w.shape
    checks.grad_shape("masked_linear_backward", grad, (*x.shape[:-1], n))
    need_x, need_w, need_b = output_mask
    g2 = grad.reshape(-1, n)
    gt = g2.t().contiguous()  # [N, M], shared by dx and dw
    w = w.contiguous()
    dx, dw, db = (w.new_empty(0) for _ in range(3))  # distinct empties for outputs not asked for
    if need_x:  # dX^T [K, M] through W^T's CSR; W[row, k] sits at row*K + k
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dx.view(-1, k).copy_(spmm_t(t_row_ptr, t_col_idx, w, (1, k), gt, k).t())
    if need_w:
        dw = sddmm(row_ptr, col_idx, gt, x.reshape(-1, k).t().contiguous(), (n, k), w.dtype)
    if need_b:
        db = bias_grad(g2, 0, w.dtype)
    return dx, dw, db


define("masked_linear_backward", masked_linear_backward)
define("masked_linear", masked_linear)
