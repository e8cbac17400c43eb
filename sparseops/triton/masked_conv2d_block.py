"""Block-sparse masked conv2d: W tiled as [C_out, kh*kw*C_in] (tap-major, BlockLayout with taps > 1),
so a tile is one tap (r, s) and B input channels and every kept tile is a shifted GEMM:
forward: y[co-blk, q] += W[co-blk, ci-blk, r, s] @ x[ci-blk, shifted q]
dx:      dx[ci-blk, q'] += W[co-blk, ci-blk, r, s]^T @ grad[co-blk, q' shifted back] (where it divides)
dw:      dW[co-blk, ci-blk, r, s] = grad[co-blk, q] @ x[ci-blk, shifted q]^T over all positions q
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
    conv_check,
    conv_geometry,
    define,
    dot_precision,
    entry_rows,
    grad_at_tap,
    like_x,
    split_count,
    x_at_tap,
)

_CONFIGS = [triton.Config({"BLOCK_Q": bq}, num_warps=w, num_stages=st)
                 for bq, w, st in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (32, 4, 2))]


@autotune(_CONFIGS, key=["Q", "C", "C_OUT", "B"])
@triton.jit
def _fwd(x_ptr, w_ptr, mask_ptr, row_ptr, col_idx, bias_ptr, y_ptr, Q, C, H, W, C_OUT, OH, OW,
              KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
              PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_Q: tl.constexpr):
    cb = tl.program_id(1).to(tl.int64)  # positions on grid axis 0: no 65535 limit there
    co = cb * B + tl.arange(0, B)
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n, p = q // (OH * OW), q % (OH * OW)
    oh, ow = p // OW, p % OW
    kk = C * KH * KW
    acc = tl.zeros((B, BLOCK_Q), dtype=ACC)
    for j in range(tl.load(row_ptr + cb), tl.load(row_ptr + cb + 1)):
        kb = tl.load(col_idx + j).to(tl.int64)
        tap, ci = kb // (C // B), (kb % (C // B)) * B + tl.arange(0, B)
        r, s = tap // KW, tap % KW
        w_at = co[:, None] * kk + ci[None, :] * (KH * KW) + r * KW + s
        w = tl.load(w_ptr + w_at, mask=co[:, None] < C_OUT, other=0)
        keep = tl.load(mask_ptr + w_at, mask=co[:, None] < C_OUT, other=0)
        w = tl.where(keep != 0, w, 0)
        xs = x_at_tap(x_ptr, n, ci, oh, ow, r, s, q < Q, C, H, W, SH, SW, PH, PW, DH, DW)
        acc += tl.dot(w, xs, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co < C_OUT, other=0).to(ACC)[:, None]
    tl.store(y_ptr + (n[None, :] * C_OUT + co[:, None]) * (OH * OW) + p[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(co[:, None] < C_OUT) & (q[None, :] < Q))


@autotune(_CONFIGS, key=["Q", "C", "C_OUT", "B"])
@triton.jit
def _dx(g_ptr, w_ptr, mask_ptr, t_row_ptr, t_col_idx, dx_ptr, Q, C, H, W, C_OUT, OH, OW,
             KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
             PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, B: tl.constexpr, ACC: tl.constexpr,
             PREC: tl.constexpr, BLOCK_Q: tl.constexpr):
    cib = tl.program_id(1).to(tl.int64)
    ci = cib * B + tl.arange(0, B)
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # input positions
    n, p = q // (H * W), q % (H * W)
    ih, iw = p // W, p % W
    kk = C * KH * KW
    acc = tl.zeros((B, BLOCK_Q), dtype=ACC)
    for tap in range(KH * KW):
        r, s = tap // KW, tap % KW
        kb = tap * (C // B) + cib
        for j in range(tl.load(t_row_ptr + kb), tl.load(t_row_ptr + kb + 1)):
            co = tl.load(t_col_idx + j).to(tl.int64) * B + tl.arange(0, B)
            w_at = co[None, :] * kk + ci[:, None] * (KH * KW) + r * KW + s  # W^T tile [ci, co]
            w = tl.load(w_ptr + w_at, mask=co[None, :] < C_OUT, other=0)
            keep = tl.load(mask_ptr + w_at, mask=co[None, :] < C_OUT, other=0)
            w = tl.where(keep != 0, w, 0)
            gs = grad_at_tap(g_ptr, n, co, ih, iw, r, s, q < Q, C_OUT, OH, OW, SH, SW, PH, PW, DH, DW)
            acc += tl.dot(w, gs, input_precision=PREC, out_dtype=ACC)
    tl.store(dx_ptr + (n[None, :] * C + ci[:, None]) * (H * W) + p[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=q[None, :] < Q)


@autotune(_CONFIGS, key=["Q", "C", "C_OUT", "B"])
@triton.jit
def _dw(g_ptr, x_ptr, mask_ptr, tile_rows, col_idx, dw_ptr, part_ptr, Q, C, H, W, C_OUT, OH, OW, q_per_split,
             KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
             PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, B: tl.constexpr, SPLIT: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_Q: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    co = tl.load(tile_rows + t).to(tl.int64) * B + tl.arange(0, B)
    kb = tl.load(col_idx + t).to(tl.int64)
    tap, ci = kb // (C // B), (kb % (C // B)) * B + tl.arange(0, B)
    r, s = tap // KW, tap % KW
    q_lo = split.to(tl.int64) * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, Q)
    acc = tl.zeros((B, B), dtype=ACC)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        n, p = q // (OH * OW), q % (OH * OW)
        oh, ow = p // OW, p % OW
        g = tl.load(g_ptr + (n[None, :] * C_OUT + co[:, None]) * (OH * OW) + p[None, :],
                    mask=(co[:, None] < C_OUT) & (q[None, :] < q_hi), other=0)
        xs = x_at_tap(x_ptr, n, ci, oh, ow, r, s, q < q_hi, C, H, W, SH, SW, PH, PW, DH, DW)
        acc += tl.dot(g, tl.trans(xs), input_precision=PREC, out_dtype=ACC)
    w_at = co[:, None] * (C * KH * KW) + ci[None, :] * (KH * KW) + r * KW + s
    keep = tl.load(mask_ptr + w_at, mask=co[:, None] < C_OUT, other=0)
    acc = tl.where(keep != 0, acc, 0)
    if SPLIT == 1:
        tl.store(dw_ptr + w_at, acc.to(dw_ptr.dtype.element_ty), mask=co[:, None] < C_OUT)
    else:
        tile = (split * tl.num_programs(0) + t) * B * B
        tl.store(part_ptr + tile + tl.arange(0, B)[:, None] * B + tl.arange(0, B)[None, :], acc)


def _check(op, x, w, mask, layout, block, bias, stride, padding, dilation, grad=None):
    conv_check(op, x, w, bias, layout, stride, padding, dilation, grad, sizes=False)
    checks.dot_dtype(op, w)
    if mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(f"sparseops.{op}: mask must be bool with the shape of w {tuple(w.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if block not in (16, 32, 64) or w.shape[1] % block:
        raise ValueError(f"sparseops.{op}: block must be 16, 32 or 64 and divide C_in={w.shape[1]}, got {block}")
    row_ptr, col_idx, t_row_ptr, t_col_idx = layout
    taps = w.shape[2] * w.shape[3]
    checks.indices(op, w.device, row_ptr=(row_ptr, triton.cdiv(w.shape[0], block) + 1),
                   t_row_ptr=(t_row_ptr, taps * (w.shape[1] // block) + 1), col_idx=(col_idx, -1),
                   t_col_idx=(t_col_idx, col_idx.numel()))


def masked_conv2d_block(x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, bias, stride, padding, dilation):
    layout = (row_ptr, col_idx, t_row_ptr, t_col_idx)
    _check("masked_conv2d_block", x, w, mask, layout, block, bias, stride, padding, dilation)
    oh, ow, geo = conv_geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    xc = x.contiguous()
    y = torch.empty((nb, c_out, oh, ow), dtype=x.dtype, device=x.device)
    q = nb * oh * ow
    if q and c_out:
        wrap_triton(_fwd)[lambda meta: (triton.cdiv(q, meta["BLOCK_Q"]), triton.cdiv(c_out, block))](
            xc, w.contiguous(), mask.contiguous().view(torch.uint8), row_ptr, col_idx,
            bias if bias is not None else w, y, q, c, h, wd, c_out, oh, ow, **geo, B=block,
            HAS_BIAS=bias is not None, ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype))
    return like_x(y, x)


def masked_conv2d_block_backward(grad, x, w, mask, row_ptr, col_idx, t_row_ptr, t_col_idx, block, stride, padding,
                                 dilation, output_mask):
    op = "masked_conv2d_block_backward"
    layout = (row_ptr, col_idx, t_row_ptr, t_col_idx)
    _check(op, x, w, mask, layout, block, None, stride, padding, dilation, grad)
    oh, ow, geo = conv_geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    checks.grad_shape(op, grad, (nb, c_out, oh, ow))
    need_x, need_w, need_b = output_mask
    g, xc, w, mask8 = grad.contiguous(), x.contiguous(), w.contiguous(), mask.contiguous().view(torch.uint8)
    acc, prec = acc_type(w.dtype), dot_precision(w.dtype)
    dx, dw, db = (w.new_empty(0) for _ in range(3))  # distinct empties for outputs not asked for
    if need_x:
        dx = torch.empty_like(xc)
        qx = nb * h * wd
        if qx and c:
            wrap_triton(_dx)[lambda meta: (triton.cdiv(qx, meta["BLOCK_Q"]), c // block)](
                g, w, mask8, t_row_ptr, t_col_idx, dx, qx, c, h, wd, c_out, oh, ow, **geo, B=block, ACC=acc,
                PREC=prec)
        dx = like_x(dx, x)
    if need_w:
        dw = torch.zeros_like(w)
        tiles, q = col_idx.numel(), nb * oh * ow
        if tiles and q:
            tile_rows = entry_rows(row_ptr, tiles)
            split = split_count(tiles, q, w.device, 256)
            per = triton.cdiv(q, split)
            part = torch.empty((split, tiles, block, block), dtype=acc_dtype(w.dtype), device=w.device) \
                if split > 1 else dw
            wrap_triton(_dw)[(tiles, split)](g, xc, mask8, tile_rows, col_idx, dw, part, q, c, h, wd, c_out,
                                                  oh, ow, per, **geo, B=block, SPLIT=split, ACC=acc, PREC=prec)
            if split > 1:  # fixed-order sum of the partial tiles, then one scatter (rows past C_out dropped)
                taps, cblocks = w.shape[2] * w.shape[3], c // block
                co = tile_rows[:, None, None] * block + torch.arange(block, device=w.device)[None, :, None]
                kb = col_idx.long()
                ci = (kb % cblocks)[:, None, None] * block + torch.arange(block, device=w.device)[None, None, :]
                at = co * (c * taps) + ci * taps + (kb // cblocks)[:, None, None]
                inside = (co < c_out).expand_as(at)
                dw.view(-1)[at[inside]] = part.sum(0)[inside].to(w.dtype)
    if need_b:
        db = bias_grad(grad, (0, 2, 3), w.dtype)
    return dx, dw, db


define("masked_conv2d_block_backward", masked_conv2d_block_backward)
define("masked_conv2d_block", masked_conv2d_block)
