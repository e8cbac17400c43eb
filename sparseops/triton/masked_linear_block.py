"""Block-sparse masked matmul: the mask cut into B x B tiles (B = 16, 32, 64); tiles with no kept
entry are skipped and kept tiles run on tensor cores (tl.dot), with the mask applied inside the
tile so a partly kept tile is exact. The fast path for block and structured tickets.

- forward: a program per (block of M, tile row of W), over that row's kept tiles (CSR of tiles).
- dx: a program per (block of M, tile column of W), over the kept tiles of W^T's row.
- dw: a program per kept tile (and, when there are few tiles, per slice of M): G^T X on the tile.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import checks
from ._common import acc_dtype, acc_type, autotune, bias_grad, define, dot_precision, entry_rows, split_count

_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
            for bm, w, st in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (32, 4, 2))]


@autotune(_CONFIGS, key=["M", "N", "K", "B"])
@triton.jit
def _fwd(x_ptr, w_ptr, mask_ptr, row_ptr, col_idx, bias_ptr, y_ptr, M, N, K, B: tl.constexpr,
         HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
         BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    nb = tl.program_id(1).to(tl.int64)
    offs_n = nb * B + tl.arange(0, B)
    acc = tl.zeros((BLOCK_M, B), dtype=ACC)
    for j in range(tl.load(row_ptr + nb), tl.load(row_ptr + nb + 1)):
        offs_k = tl.load(col_idx + j).to(tl.int64) * B + tl.arange(0, B)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        in_w = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=in_w, other=0)
        keep = tl.load(mask_ptr + offs_n[:, None] * K + offs_k[None, :], mask=in_w, other=0)
        w = tl.where(keep != 0, w, 0)
        acc += tl.dot(x, tl.trans(w), input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(ACC)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotune(_CONFIGS, key=["M", "N", "K", "B"])
@triton.jit
def _dx(g_ptr, w_ptr, mask_ptr, t_row_ptr, t_col_idx, dx_ptr, M, N, K, B: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1).to(tl.int64)
    offs_k = kb * B + tl.arange(0, B)
    acc = tl.zeros((BLOCK_M, B), dtype=ACC)
    for j in range(tl.load(t_row_ptr + kb), tl.load(t_row_ptr + kb + 1)):
        offs_n = tl.load(t_col_idx + j).to(tl.int64) * B + tl.arange(0, B)
        g = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :],
                    mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0)
        in_w = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=in_w, other=0)
        keep = tl.load(mask_ptr + offs_n[:, None] * K + offs_k[None, :], mask=in_w, other=0)
        w = tl.where(keep != 0, w, 0)
        acc += tl.dot(g, w, input_precision=PREC, out_dtype=ACC)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@autotune(_CONFIGS, key=["M", "N", "K", "B"])
@triton.jit
def _dw(g_ptr, x_ptr, mask_ptr, tile_rows, col_idx, dw_ptr, part_ptr, M, N, K, m_per_split, B: tl.constexpr,
        SPLIT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_n = tl.load(tile_rows + t).to(tl.int64) * B + tl.arange(0, B)
    offs_k = tl.load(col_idx + t).to(tl.int64) * B + tl.arange(0, B)
    m_lo = split.to(tl.int64) * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((B, B), dtype=ACC)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < m_hi
        g = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :], mask=in_m[:, None] & (offs_n[None, :] < N),
                    other=0)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=in_m[:, None] & (offs_k[None, :] < K),
                    other=0)
        acc += tl.dot(tl.trans(g), x, input_precision=PREC, out_dtype=ACC)
    in_w = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    keep = tl.load(mask_ptr + offs_n[:, None] * K + offs_k[None, :], mask=in_w, other=0)
    acc = tl.where(keep != 0, acc, 0)
    if SPLIT == 1:
        tl.store(dw_ptr + offs_n[:, None] * K + offs_k[None, :], acc.to(dw_ptr.dtype.element_ty), mask=in_w)
    else:
        tile = (split * tl.num_programs(0) + t) * B * B
        tl.store(part_ptr + tile + tl.arange(0, B)[:, None] * B + tl.arange(0, B)[None, :], acc)


def _check(op, x, w, mask, layout, block, bias=None, grad=None):
    checks.like(op, "w", w, x=x, bias=bias, grad=grad)
    checks.linear(op, x, w, bias)
    checks.dot_dtype(op, w)
    if mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(f"sparseops.{op}: mask must be bool with the shape of w {tuple(w.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if block not in (16, 32, 64):
        raise ValueError(f"sparseops.{op}: block must be 16, 32 or 64, got {block}")
    row_ptr, col_idx, t_row_ptr, t_col_idx = layout
    nb, kb = triton.cdiv(w.shape[0], block), triton.cdiv(w.shape[1], block)
    checks.indices(op, w.device, row_ptr=(row_ptr, nb + 1), t_row_ptr=(t_row_ptr, kb + 1), col_idx=(col_idx, -1),
                   t_col_idx=(t_col_idx, col_idx.numel()))


def masked_linear_block(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias):
    _check("masked_linear_block", x, w, mask, (row_ptr, col_idx, t_row_ptr, t_col_idx), block, bias)
    n, k = w.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)  # fresh (an op returns no views)
    if m and n:
        wrap_triton(_fwd)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, block))](
            x2, w.contiguous(), mask.contiguous().view(torch.uint8), row_ptr, col_idx,
            bias if bias is not None else w, y, m, n, k, B=block, HAS_BIAS=bias is not None,
            ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype))
    return y


def masked_linear_block_backward(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, output_mask):
    op = "masked_linear_block_backward"
    _check(op, x, w, mask, (row_ptr, col_idx, t_row_ptr, t_col_idx), block, grad=grad)
    n, k = w.shape
    checks.grad_shape(op, grad, (*x.shape[:-1], n))
    need_x, need_w, need_b = output_mask
    g2, x2 = grad.reshape(-1, n).contiguous(), x.reshape(-1, k).contiguous()
    m = g2.shape[0]
    w, mask8 = w.contiguous(), mask.contiguous().view(torch.uint8)
    acc, prec = acc_type(w.dtype), dot_precision(w.dtype)
    dx, dw, db = (w.new_empty(0) for _ in range(3))  # distinct empties for outputs not asked for
    if need_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if m and k:
            wrap_triton(_dx)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, block))](
                g2, w, mask8, t_row_ptr, t_col_idx, dx, m, n, k, B=block, ACC=acc, PREC=prec)
    if need_w:
        dw = torch.zeros_like(w)
        tiles = col_idx.numel()
        if tiles and m:
            tile_rows = entry_rows(row_ptr, tiles)
            split = split_count(tiles, m, w.device, 128)
            per = triton.cdiv(m, split)
            part = torch.empty((split, tiles, block, block), dtype=acc_dtype(w.dtype), device=w.device) \
                if split > 1 else dw
            wrap_triton(_dw)[(tiles, split)](g2, x2, mask8, tile_rows, col_idx, dw, part, m, n, k, per, B=block,
                                             SPLIT=split, ACC=acc, PREC=prec)
            if split > 1:  # fixed-order sum of the partial tiles, then one scatter into the padded grid
                nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
                padded = torch.zeros((nb, kb, block, block), dtype=w.dtype, device=w.device)
                padded[tile_rows, col_idx.long()] = part.sum(0).to(w.dtype)
                dw = padded.permute(0, 2, 1, 3).reshape(nb * block, kb * block)[:n, :k].contiguous()
    if need_b:
        db = bias_grad(g2, 0, w.dtype)
    return dx, dw, db


define("masked_linear_block_backward", masked_linear_block_backward)
define("masked_linear_block", masked_linear_block)
