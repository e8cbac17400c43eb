"""Masked conv2d as an implicit GEMM over W viewed as [C_out, C_in*kh*kw] (groups=1): the same
row-split SpMM and SDDMM as spmm.py, with the im2col matrix never materialised: a kept entry
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
from . import acc_dtype, acc_type, autotune, bias_grad, define, split_count
from .spmm import _nnz_bucket, row_order, scatter_partials

_CONFIGS = [triton.Config({"BLOCK_Q": bq, "BLOCK_J": bj}, num_warps=w)
            for bq, bj, w in ((64, 16, 2), (128, 16, 4), (256, 8, 4), (128, 32, 4))]


@triton.jit
def x_at_tap(x_ptr, n, ci, oh, ow, r, s, valid, C, H, W, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
             PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """The [channels, positions] tile of x that tap (r, s) reads for output positions (n, oh, ow):
    x[n, ci, oh*SH - PH + r*DH, ow*SW - PW + s*DW], 0 in the padding and where `valid` is False."""
    ih, iw = oh * SH - PH + r * DH, ow * SW - PW + s * DW
    ok = valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_ptr + ((n[None, :] * C + ci[:, None]) * H + ih[None, :]) * W + iw[None, :],
                   mask=(ci[:, None] < C) & ok[None, :], other=0)


@triton.jit
def grad_at_tap(g_ptr, n, co, ih, iw, r, s, valid, C_OUT, OH, OW, SH: tl.constexpr, SW: tl.constexpr,
                PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """The [channels, positions] tile of grad that tap (r, s) sends back to input positions
    (n, ih, iw): grad[n, co, oh, ow] where oh*SH = ih + PH - r*DH (and likewise ow) divides, else 0."""
    th, tw = ih + PH - r * DH, iw + PW - s * DW
    oh, ow = tl.maximum(th, 0) // SH, tl.maximum(tw, 0) // SW  # clamped: never divide a negative
    ok = valid & (th >= 0) & (th % SH == 0) & (oh < OH) & (tw >= 0) & (tw % SW == 0) & (ow < OW)
    return tl.load(g_ptr + ((n[None, :] * C_OUT + co[:, None]) * OH + oh[None, :]) * OW + ow[None, :],
                   mask=(co[:, None] < C_OUT) & ok[None, :], other=0)


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


def _check(op, x, w, bias, layout, stride, padding, dilation, grad=None, sizes=True):
    """`sizes`: check `layout` as the CSR of W (the block ops check their tile CSR themselves; the
    soft-masked conv has none)."""
    checks.like(op, "w", w, x=x, bias=bias, grad=grad)
    if x.dim() != 4:
        raise ValueError(f"sparseops.{op}: x must be 4-D [N, C_in, H, W], got shape {tuple(x.shape)}")
    if w.dim() != 4:
        raise ValueError(f"sparseops.{op}: w must be 4-D [C_out, C_in, kh, kw], got shape {tuple(w.shape)}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError(f"sparseops.{op}: stride, padding and dilation must have 2 entries each")
    if min(stride) <= 0:
        raise ValueError(f"sparseops.{op}: stride must be positive, got {list(stride)}")
    if min(dilation) <= 0:
        raise ValueError(f"sparseops.{op}: dilation must be positive, got {list(dilation)}")
    if min(padding) < 0:
        raise ValueError(f"sparseops.{op}: padding must be >= 0, got {list(padding)}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"sparseops.{op}: x has {x.shape[1]} channels but w expects {w.shape[1]} (groups=1)")
    for i, name in ((0, "height"), (1, "width")):
        if x.shape[2 + i] + 2 * padding[i] < dilation[i] * (w.shape[2 + i] - 1) + 1:
            raise ValueError(f"sparseops.{op}: the padded input {name} ({x.shape[2 + i] + 2 * padding[i]}) is "
                             f"smaller than the dilated kernel ({dilation[i] * (w.shape[2 + i] - 1) + 1})")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"sparseops.{op}: bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
    if sizes and layout is not None:
        row_ptr, col_idx, t_row_ptr, t_col_idx = layout
        checks.indices(op, w.device, row_ptr=(row_ptr, w.shape[0] + 1), t_row_ptr=(t_row_ptr, w[0].numel() + 1),
                       col_idx=(col_idx, -1), t_col_idx=(t_col_idx, col_idx.numel()))


def _geometry(x, w, stride, padding, dilation):
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
    return oh, ow, dict(KH=w.shape[2], KW=w.shape[3], SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
                        DH=dilation[0], DW=dilation[1])


def _like_x(t, x):
    """The CPU op's convention: the result takes x's memory format (NCHW or channels_last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def masked_conv2d(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias, stride, padding, dilation):
    _check("masked_conv2d", x, w, bias, (row_ptr, col_idx, t_row_ptr, t_col_idx), stride, padding, dilation)
    oh, ow, geo = _geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    xc, w = x.contiguous(), w.contiguous()
    out = torch.empty((nb, c_out, oh, ow), dtype=x.dtype, device=x.device)
    q = nb * oh * ow
    if q and c_out:
        wrap_triton(_fwd)[lambda meta: (triton.cdiv(q, meta["BLOCK_Q"]), c_out)](
            row_order(row_ptr), row_ptr, col_idx, xc, w, bias if bias is not None else w, out, c_out, q,
            _nnz_bucket(col_idx.numel()), c, h, wd, oh, ow, **geo, HAS_BIAS=bias is not None,
            ACC=acc_type(x.dtype))
    return _like_x(out, x)


def masked_conv2d_backward(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, stride, padding, dilation,
                           output_mask):
    op = "masked_conv2d_backward"
    _check(op, x, w, None, (row_ptr, col_idx, t_row_ptr, t_col_idx), stride, padding, dilation, grad)
    oh, ow, geo = _geometry(x, w, stride, padding, dilation)
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
                t_row_ptr, t_col_idx, g, w, dx, c, qx, _nnz_bucket(col_idx.numel()), c_out, h, wd, oh, ow, **geo,
                ACC=acc)
        dx = _like_x(dx, x)
    if need_w:
        dw = torch.zeros_like(w)
        nnz, q = col_idx.numel(), nb * oh * ow
        if nnz and q:
            split = split_count(c_out, q, w.device, 128)
            per = triton.cdiv(q, split)
            part = torch.empty((split, nnz), dtype=acc_dtype(w.dtype), device=w.device) if split > 1 else dw
            wrap_triton(_dw)[(c_out, split)](
                row_order(row_ptr), row_ptr, col_idx, g, xc, dw, part, c_out, q, _nnz_bucket(nnz), nnz, per,
                c, h, wd, oh, ow, **geo, SPLIT=split, ACC=acc)
            if split > 1:
                scatter_partials(dw.view(c_out, -1), row_ptr, col_idx, part)
    if need_b:
        db = bias_grad(grad, (0, 2, 3), w.dtype)
    return dx, dw, db


define("masked_conv2d_backward", masked_conv2d_backward)
define("masked_conv2d", masked_conv2d)
