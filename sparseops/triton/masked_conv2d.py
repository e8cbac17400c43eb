"""Masked conv2d as an implicit GEMM over W viewed as [C_out, C_in*kh*kw] (groups=1): the same
row-split SpMM and SDDMM as masked_linear.py, with the im2col matrix never materialised: a kept entry
(c_in, r, s) of output channel c_out gathers x at (c_in, oh*sh - ph + r*dh, ow*sw - pw + s*dw) for
a block of flattened (n, oh, ow) positions, padding handled by the load masks.

- forward: a program per (output channel, block of positions), longest rows first.
- dx: a program per (input channel, block of input positions) walks the kh*kw rows of W^T that
  belong to its channel; each kept (c_out) reads grad at oh = (ih + ph - r*dh) / sh where that
  divides, so every dx element is written once (no atomics).
- dw: an SDDMM: for each kept entry, the sum over positions of grad * the gathered x; positions
  are split over programs when there are too few output channels to fill the GPU.
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
    like_x,
    nnz_bucket,
    row_order,
    scatter_partials,
    split_count,
)

_CONFIGS = [triton.Config({"BLOCK_Q": bq, "BLOCK_J": bj}, num_warps=w)
            for bq, bj, w in ((64, 16, 2), (128, 16, 4), (256, 8, 4), (128, 32, 4))]


@autotune(_CONFIGS, key=["C_OUT", "Q", "NNZ_BUCKET"])
@triton.jit
def _fwd(order_ptr, row_ptr, col_idx, x_ptr, w_ptr, bias_ptr, out_ptr, C_OUT, Q, NNZ_BUCKET, C, H, W, OH, OW,
         KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
         PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
         BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr):
    co = tl.load(order_ptr + tl.program_id(1)).to(tl.int64)  # positions on grid axis 0: no 65535 limit there
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_q = q < Q
    p = q % (OH * OW)
    n = q // (OH * OW)
    oh = p // OW
    ow = p % OW
    start = tl.load(row_ptr + co).to(tl.int64)
    end = tl.load(row_ptr + co + 1).to(tl.int64)
    kk = C * KH * KW
    acc = tl.zeros((BLOCK_Q,), dtype=ACC)
    for j0 in range(start, end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        in_j = js < end
        col = tl.load(col_idx + js, mask=in_j, other=0).to(tl.int64)
        v = tl.load(w_ptr + co * kk + col, mask=in_j, other=0).to(ACC)
        ci = col // (KH * KW)
        r = (col // KW) % KH
        s = col % KW
        ih = oh[None, :] * SH - PH + r[:, None] * DH
        iw = ow[None, :] * SW - PW + s[:, None] * DW
        ok = in_j[:, None] & in_q[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xs = tl.load(x_ptr + ((n[None, :] * C + ci[:, None]) * H + ih) * W + iw, mask=ok, other=0)
        acc += tl.sum(v[:, None] * xs.to(ACC), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co).to(ACC)
    tl.store(out_ptr + (n * C_OUT + co) * (OH * OW) + p, acc.to(out_ptr.dtype.element_ty), mask=in_q)


@autotune(_CONFIGS, key=["C", "Q", "NNZ_BUCKET"])
@triton.jit
def _dx(t_row_ptr, t_col_idx, g_ptr, w_ptr, dx_ptr, C, Q, NNZ_BUCKET, C_OUT, H, W, OH, OW,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, ACC: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr):
    ci = tl.program_id(1).to(tl.int64)
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_q = q < Q
    p = q % (H * W)
    n = q // (H * W)
    ih = p // W
    iw = p % W
    kk = C * KH * KW
    acc = tl.zeros((BLOCK_Q,), dtype=ACC)
    for r in range(KH):
        # oh*SH = ih + PH - r*DH; clamp before dividing so negative numerators never reach the division
        th = ih + PH - r * DH
        oh = tl.maximum(th, 0) // SH
        ok_h = (th >= 0) & (th % SH == 0) & (oh < OH)
        for s in range(KW):
            tw = iw + PW - s * DW
            ow = tl.maximum(tw, 0) // SW
            ok_q = in_q & ok_h & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            kc = ci * (KH * KW) + r * KW + s
            start = tl.load(t_row_ptr + kc).to(tl.int64)
            end = tl.load(t_row_ptr + kc + 1).to(tl.int64)
            for j0 in range(start, end, BLOCK_J):
                js = j0 + tl.arange(0, BLOCK_J)
                in_j = js < end
                co = tl.load(t_col_idx + js, mask=in_j, other=0).to(tl.int64)
                v = tl.load(w_ptr + co * kk + kc, mask=in_j, other=0).to(ACC)
                ok = in_j[:, None] & ok_q[None, :]
                gs = tl.load(g_ptr + ((n[None, :] * C_OUT + co[:, None]) * OH + oh[None, :]) * OW + ow[None, :],
                             mask=ok, other=0)
                acc += tl.sum(v[:, None] * gs.to(ACC), axis=0)
    tl.store(dx_ptr + (n * C + ci) * (H * W) + p, acc.to(dx_ptr.dtype.element_ty), mask=in_q)


@autotune(_CONFIGS, key=["C_OUT", "Q", "NNZ_BUCKET"])
@triton.jit
def _dw(order_ptr, row_ptr, col_idx, g_ptr, x_ptr, dw_ptr, part_ptr, C_OUT, Q, NNZ_BUCKET, NNZ, q_per_split,
        C, H, W, OH, OW, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SPLIT: tl.constexpr,
        ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr):
    co = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    split = tl.program_id(1)
    q_lo = split.to(tl.int64) * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, Q)
    start = tl.load(row_ptr + co).to(tl.int64)
    end = tl.load(row_ptr + co + 1).to(tl.int64)
    kk = C * KH * KW
    for j0 in range(start, end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        in_j = js < end
        col = tl.load(col_idx + js, mask=in_j, other=0).to(tl.int64)
        ci = col // (KH * KW)
        r = (col // KW) % KH
        s = col % KW
        acc = tl.zeros((BLOCK_J,), dtype=ACC)
        for q0 in range(q_lo, q_hi, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            in_q = q < q_hi
            p = q % (OH * OW)
            n = q // (OH * OW)
            oh = p // OW
            ow = p % OW
            g = tl.load(g_ptr + (n * C_OUT + co) * (OH * OW) + p, mask=in_q, other=0).to(ACC)
            ih = oh[None, :] * SH - PH + r[:, None] * DH
            iw = ow[None, :] * SW - PW + s[:, None] * DW
            ok = in_j[:, None] & in_q[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xs = tl.load(x_ptr + ((n[None, :] * C + ci[:, None]) * H + ih) * W + iw, mask=ok, other=0)
            acc += tl.sum(xs.to(ACC) * g[None, :], axis=1)
        if SPLIT == 1:
            tl.store(dw_ptr + co * kk + col, acc.to(dw_ptr.dtype.element_ty), mask=in_j)
        else:
            tl.store(part_ptr + split * NNZ + js, acc, mask=in_j)


def masked_conv2d(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation):
    conv_check("masked_conv2d", x, w, bias, (row_ptr, col_idx, t_row_ptr, t_col_idx), stride, padding, dilation)
    oh, ow, geo = conv_geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    xc, w = x.contiguous(), w.contiguous()
    out = torch.empty((nb, c_out, oh, ow), dtype=x.dtype, device=x.device)
    q = nb * oh * ow
    if q and c_out:
        wrap_triton(_fwd)[lambda meta: (triton.cdiv(q, meta["BLOCK_Q"]), c_out)](
            row_order(row_ptr), row_ptr, col_idx, xc, w, bias if bias is not None else w, out, c_out, q,
            nnz_bucket(col_idx.numel()), c, h, wd, oh, ow, **geo, HAS_BIAS=bias is not None,
            ACC=acc_type(x.dtype))
    return like_x(out, x)


def masked_conv2d_backward(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, stride, padding, dilation,
                           output_mask):
    op = "masked_conv2d_backward"
    conv_check(op, x, w, None, (row_ptr, col_idx, t_row_ptr, t_col_idx), stride, padding, dilation, grad)
    oh, ow, geo = conv_geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    checks.grad_shape(op, grad, (nb, c_out, oh, ow))
    need_x, need_w, need_b = output_mask
    g, xc, w = grad.contiguous(), x.contiguous(), w.contiguous()
    acc = acc_type(x.dtype)
    dx, dw, db = (w.new_empty(0) for _ in range(3))  # distinct empties for outputs not asked for
    if need_x:
        dx = torch.empty_like(xc)
        qx = nb * h * wd
        if qx and c:
            wrap_triton(_dx)[lambda meta: (triton.cdiv(qx, meta["BLOCK_Q"]), c)](
                t_row_ptr, t_col_idx, g, w, dx, c, qx, nnz_bucket(col_idx.numel()), c_out, h, wd, oh, ow, **geo,
                ACC=acc)
        dx = like_x(dx, x)
    if need_w:
        dw = torch.zeros_like(w)
        nnz, q = col_idx.numel(), nb * oh * ow
        if nnz and q:
            split = split_count(c_out, q, w.device, 128)
            per = triton.cdiv(q, split)
            part = torch.empty((split, nnz), dtype=acc_dtype(w.dtype), device=w.device) if split > 1 else dw
            wrap_triton(_dw)[(c_out, split)](
                row_order(row_ptr), row_ptr, col_idx, g, xc, dw, part, c_out, q, nnz_bucket(nnz), nnz, per,
                c, h, wd, oh, ow, **geo, SPLIT=split, ACC=acc)
            if split > 1:
                scatter_partials(dw.view(c_out, -1), row_ptr, col_idx, part)
    if need_b:
        db = bias_grad(grad, (0, 2, 3), w.dtype)
    return dx, dw, db


define("masked_conv2d_backward", masked_conv2d_backward)
define("masked_conv2d", masked_conv2d)
