"""Linear layer with Continuous Sparsification's soft mask fused into the GEMM.

The weight tile is multiplied by scale*sigmoid(beta*s) as it is loaded, so the masked weight is
never written to memory; the backward computes dW~ = G^T X once and, in that GEMM's epilogue,
dw = dW~ * scale*m and ds = dW~ * w * scale*beta*m*(1-m). A tile whose mask is exactly 0 (below the
cut of reference.SIGMOID_OFF_BELOW, as most entries are late in CS) contributes nothing to y or dx and has zero
dw and ds, so its loads and its tl.dot are skipped: exact, and the late rounds get cheaper.

Tiles follow the grouped ordering of Triton's matmul tutorial for L2 reuse.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import checks
from ._common import (
    SPLIT_BLOCK,
    acc_dtype,
    acc_type,
    autotune,
    bias_grad,
    define,
    dot_precision,
    sigmoid_pair,
    soft_epilogue,
    split_count,
)

_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4),
                                      (64, 128, 32, 4, 4), (128, 128, 64, 8, 3))]


@triton.jit
def _tile(pid, rows, cols, BR: tl.constexpr, BC: tl.constexpr, GROUP: tl.constexpr):
    """Grouped tile order: GROUP tile-rows share the column tiles they read while in L2."""
    n_r = tl.cdiv(rows, BR)
    n_c = tl.cdiv(cols, BC)
    per_group = GROUP * n_c
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _mask_tile(s_ptr, offs_n, offs_k, N, K, beta, scale, ACC: tl.constexpr):
    """m = scale*sigmoid(beta*s) on a [BN, BK] tile (0 outside the matrix), dm = its sigmoid'."""
    inside = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    s = tl.load(s_ptr + offs_n[:, None] * K + offs_k[None, :], mask=inside, other=0).to(ACC)
    m, dm = sigmoid_pair(beta * s)
    return tl.where(inside, m * scale, 0.0), tl.where(inside, dm, 0.0), inside


@autotune(_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _fwd(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, beta, scale, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
         PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        m, _, inside = _mask_tile(s_ptr, offs_n, offs_k, N, K, beta, scale, ACC)
        if tl.max(tl.max(m, axis=1), axis=0) > 0:  # else the whole weight tile is masked to exactly 0
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=inside, other=0)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
            wm = (w.to(ACC) * m).to(x_ptr.dtype.element_ty)
            acc += tl.dot(x, tl.trans(wm), input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(ACC)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotune(_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _dx(g_ptr, w_ptr, s_ptr, dx_ptr, M, N, K, beta, scale, ACC: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """dx [M, K] = G [M, N] @ (w*m) [N, K]; here BK tiles the output's K and BN the reduction."""
    pid_m, pid_k = _tile(tl.program_id(0), M, K, BM, BK, GROUP)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_k = pid_k.to(tl.int64) * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=ACC)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        m, _, inside = _mask_tile(s_ptr, offs_n, offs_k, N, K, beta, scale, ACC)
        if tl.max(tl.max(m, axis=1), axis=0) > 0:
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=inside, other=0)
            g = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :],
                        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0)
            wm = (w.to(ACC) * m).to(g_ptr.dtype.element_ty)
            acc += tl.dot(g, wm, input_precision=PREC, out_dtype=ACC)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@autotune(_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _dws(g_ptr, x_ptr, w_ptr, s_ptr, dw_ptr, ds_ptr, part_ptr, M, N, K, m_per_split, beta, scale, SPLIT: tl.constexpr,
         ACC: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
         GROUP: tl.constexpr):
    """dW~ [N, K] = G^T X over M, then the epilogue gives dw and ds; BM tiles the reduction. With
    SPLIT > 1 (few tiles for many rows) each program sums one slice of M into part[split] and the
    launcher applies the epilogue to the fixed-order sum."""
    pid_n, pid_k = _tile(tl.program_id(0), N, K, BN, BK, GROUP)
    split = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    offs_k = pid_k.to(tl.int64) * BK + tl.arange(0, BK)
    m, dm, inside = _mask_tile(s_ptr, offs_n, offs_k, N, K, beta, scale, ACC)
    m_lo = split.to(tl.int64) * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BN, BK), dtype=ACC)
    if tl.max(tl.max(m, axis=1), axis=0) > 0:  # else dw = ds = 0 on this tile: skip the GEMM
        for m0 in range(m_lo, m_hi, BM):
            offs_m = m0 + tl.arange(0, BM)
            g = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :],
                        mask=(offs_m[:, None] < m_hi) & (offs_n[None, :] < N), other=0)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m[:, None] < m_hi) & (offs_k[None, :] < K), other=0)
            acc += tl.dot(tl.trans(g), x, input_precision=PREC, out_dtype=ACC)
    out = offs_n[:, None] * K + offs_k[None, :]
    if SPLIT == 1:
        w = tl.load(w_ptr + out, mask=inside, other=0).to(ACC)
        tl.store(dw_ptr + out, (acc * m).to(dw_ptr.dtype.element_ty), mask=inside)
        tl.store(ds_ptr + out, tl.where(dm == 0, 0.0, acc * w * (scale * beta) * dm).to(ds_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(part_ptr + split * N * K + out, acc, mask=inside)




def _check(op, x, w, s, beta, scale, bias=None, grad=None):
    checks.like(op, "w", w, x=x, s=s, bias=bias, grad=grad)
    checks.linear(op, x, w, bias)
    checks.dot_dtype(op, w)
    if s.shape != w.shape:
        raise ValueError(f"sparseops.{op}: s must have the shape of w {tuple(w.shape)}, got {tuple(s.shape)}")
    checks.finite(op, beta=beta, scale=scale)


def _grid(rows, cols, br, bc):
    return lambda meta: (triton.cdiv(rows, meta[br]) * triton.cdiv(cols, meta[bc]),)


def soft_masked_linear(x, w, s, beta, scale, bias):
    _check("soft_masked_linear", x, w, s, beta, scale, bias)
    n, k = w.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)  # fresh (an op returns no views)
    if m and n:
        wrap_triton(_fwd)[_grid(m, n, "BM", "BN")](
            x2, w.contiguous(), s.contiguous(), bias if bias is not None else w, y, m, n, k, beta, scale,
            HAS_BIAS=bias is not None, ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype))
    return y


def soft_masked_linear_backward(grad, x, w, s, beta, scale, output_mask):
    op = "soft_masked_linear_backward"
    _check(op, x, w, s, beta, scale, grad=grad)
    n, k = w.shape
    checks.grad_shape(op, grad, (*x.shape[:-1], n))
    need_x, need_w, need_s, need_b = output_mask
    g2, x2 = grad.reshape(-1, n).contiguous(), x.reshape(-1, k).contiguous()
    m = g2.shape[0]
    w, s = w.contiguous(), s.contiguous()
    acc, prec = acc_type(w.dtype), dot_precision(w.dtype)
    dx, dw, ds, db = (w.new_empty(0) for _ in range(4))  # distinct empties for outputs not asked for
    if need_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if m and k:
            wrap_triton(_dx)[_grid(m, k, "BM", "BK")](g2, w, s, dx, m, n, k, beta, scale, ACC=acc, PREC=prec)
    if need_w or need_s:  # one GEMM serves both; its epilogue writes both
        full_dw, full_ds = torch.empty_like(w), torch.empty_like(s)
        if n and k:
            split = split_count(triton.cdiv(n, 64) * triton.cdiv(k, 64), m, w.device, SPLIT_BLOCK)
            part = torch.zeros((split, n, k), dtype=acc_dtype(w.dtype),
                               device=w.device) if split > 1 else full_dw
            grid = _grid(n, k, "BN", "BK")
            wrap_triton(_dws)[lambda meta: (grid(meta)[0], split)](
                g2, x2, w, s, full_dw, full_ds, part, m, n, k, triton.cdiv(m, split), beta, scale, SPLIT=split,
                ACC=acc, PREC=prec)
            if split > 1:
                full_dw, full_ds = soft_epilogue(part.sum(0), w, s, beta, scale)
        dw, ds = (full_dw if need_w else dw), (full_ds if need_s else ds)
    if need_b:
        db = bias_grad(g2, 0, w.dtype)
    return dx, dw, ds, db




define("soft_masked_linear_backward", soft_masked_linear_backward)
define("soft_masked_linear", soft_masked_linear)
