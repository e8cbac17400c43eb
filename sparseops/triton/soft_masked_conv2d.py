"""Conv2d with Continuous Sparsification's soft mask fused in (groups=1), as implicit GEMMs tap by
tap: for tap (r, s), W[:, :, r, s] is a [C_out, C_in] matrix and x shifted by the tap is the other
operand, so every tile is a tl.dot.
forward: y[co, q] = sum over taps and C_in tiles of (w*m)[co, ci, r, s] @ x[ci, q shifted]
dx:      dx[ci, q'] = sum over taps and C_out tiles of (w*m)^T @ grad[co, q' shifted back]
dw, ds:  dW~[co, ci, r, s] = grad[co, q] @ x[ci, q shifted]^T, then the epilogue
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
    conv_check,
    conv_geometry,
    define,
    dot_precision,
    grad_at_tap,
    like_x,
    sigmoid_pair,
    soft_epilogue,
    split_count,
    x_at_tap,
)

_CONFIGS = [triton.Config({"BN": bn, "BK": bk, "BQ": bq}, num_warps=w, num_stages=st)
                 for bn, bk, bq, w, st in ((64, 32, 64, 4, 3), (64, 64, 128, 8, 3), (128, 32, 128, 8, 3),
                                           (32, 32, 128, 4, 3), (64, 32, 256, 8, 3))]


@triton.jit
def _mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH: tl.constexpr, KW: tl.constexpr, beta, scale,
                    ACC: tl.constexpr):
    """m, dm and addresses of the [co, ci] tile of tap (r, s) of a [C_out, C_in, kh, kw] tensor."""
    at = co[:, None] * (C * KH * KW) + ci[None, :] * (KH * KW) + r * KW + s
    inside = (co[:, None] < C_OUT) & (ci[None, :] < C)
    sv = tl.load(s_ptr + at, mask=inside, other=0).to(ACC)
    m, dm = sigmoid_pair(beta * sv)
    return tl.where(inside, m * scale, 0.0), tl.where(inside, dm, 0.0), at, inside


@autotune(_CONFIGS, key=["Q", "C", "C_OUT"])
@triton.jit
def _fwd(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, Q, C, H, W, C_OUT, OH, OW, beta, scale,
              KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
              PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr):
    co = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)  # positions on grid axis 0: no 65535 limit
    q = tl.program_id(0).to(tl.int64) * BQ + tl.arange(0, BQ)
    n, p = q // (OH * OW), q % (OH * OW)
    oh, ow = p // OW, p % OW
    acc = tl.zeros((BN, BQ), dtype=ACC)
    for tap in range(KH * KW):
        r, s = tap // KW, tap % KW
        for c0 in range(0, C, BK):
            ci = c0 + tl.arange(0, BK)
            m, _, at, inside = _mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH, KW, beta, scale, ACC)
            if tl.max(tl.max(m, axis=1), axis=0) > 0:  # else this weight tile is masked to exactly 0
                w = tl.load(w_ptr + at, mask=inside, other=0)
                xs = x_at_tap(x_ptr, n, ci, oh, ow, r, s, q < Q, C, H, W, SH, SW, PH, PW, DH, DW)
                acc += tl.dot((w.to(ACC) * m).to(x_ptr.dtype.element_ty), xs, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co < C_OUT, other=0).to(ACC)[:, None]
    tl.store(y_ptr + (n[None, :] * C_OUT + co[:, None]) * (OH * OW) + p[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(co[:, None] < C_OUT) & (q[None, :] < Q))


@autotune(_CONFIGS, key=["Q", "C", "C_OUT"])
@triton.jit
def _dx(g_ptr, w_ptr, s_ptr, dx_ptr, Q, C, H, W, C_OUT, OH, OW, beta, scale,
             KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
             PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr):
    """BK tiles the output's C_in and BN the reduction over C_out; q runs over input positions."""
    ci = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    q = tl.program_id(0).to(tl.int64) * BQ + tl.arange(0, BQ)
    n, p = q // (H * W), q % (H * W)
    ih, iw = p // W, p % W
    acc = tl.zeros((BK, BQ), dtype=ACC)
    for tap in range(KH * KW):
        r, s = tap // KW, tap % KW
        for c0 in range(0, C_OUT, BN):
            co = c0 + tl.arange(0, BN)
            m, _, at, inside = _mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH, KW, beta, scale, ACC)
            if tl.max(tl.max(m, axis=1), axis=0) > 0:
                w = tl.load(w_ptr + at, mask=inside, other=0)
                gs = grad_at_tap(g_ptr, n, co, ih, iw, r, s, q < Q, C_OUT, OH, OW, SH, SW, PH, PW, DH, DW)
                wm = (w.to(ACC) * m).to(g_ptr.dtype.element_ty)
                acc += tl.dot(tl.trans(wm), gs, input_precision=PREC, out_dtype=ACC)
    tl.store(dx_ptr + (n[None, :] * C + ci[:, None]) * (H * W) + p[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(ci[:, None] < C) & (q[None, :] < Q))


@autotune(_CONFIGS, key=["Q", "C", "C_OUT"])
@triton.jit
def _dws(g_ptr, x_ptr, w_ptr, s_ptr, dw_ptr, ds_ptr, part_ptr, Q, C, H, W, C_OUT, OH, OW, q_per_split, beta,
              scale, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
              PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr):
    """A program per ([co, ci] tile, tap) and slice of positions; BQ tiles the reduction."""
    tiles_ci = tl.cdiv(C, BK)
    tile, tap = tl.program_id(0) // (KH * KW), tl.program_id(0) % (KH * KW)
    co = (tile // tiles_ci).to(tl.int64) * BN + tl.arange(0, BN)
    ci = (tile % tiles_ci).to(tl.int64) * BK + tl.arange(0, BK)
    r, s = tap // KW, tap % KW
    split = tl.program_id(1)
    q_lo = split.to(tl.int64) * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, Q)
    m, dm, at, inside = _mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH, KW, beta, scale, ACC)
    acc = tl.zeros((BN, BK), dtype=ACC)
    if tl.max(tl.max(m, axis=1), axis=0) > 0:  # else dw = ds = 0 on this tile: skip the GEMM
        for q0 in range(q_lo, q_hi, BQ):
            q = q0 + tl.arange(0, BQ)
            n, p = q // (OH * OW), q % (OH * OW)
            oh, ow = p // OW, p % OW
            g = tl.load(g_ptr + (n[None, :] * C_OUT + co[:, None]) * (OH * OW) + p[None, :],
                        mask=(co[:, None] < C_OUT) & (q[None, :] < q_hi), other=0)
            xs = x_at_tap(x_ptr, n, ci, oh, ow, r, s, q < q_hi, C, H, W, SH, SW, PH, PW, DH, DW)
            acc += tl.dot(g, tl.trans(xs), input_precision=PREC, out_dtype=ACC)
    if SPLIT == 1:
        w = tl.load(w_ptr + at, mask=inside, other=0).to(ACC)
        tl.store(dw_ptr + at, (acc * m).to(dw_ptr.dtype.element_ty), mask=inside)
        tl.store(ds_ptr + at, tl.where(dm == 0, 0.0, acc * w * (scale * beta) * dm).to(ds_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(part_ptr + split * (C_OUT * C * KH * KW) + at, acc, mask=inside)


def _check(op, x, w, s, beta, scale, bias, stride, padding, dilation, grad=None):
    conv_check(op, x, w, bias, None, stride, padding, dilation, grad)
    checks.like(op, "w", w, s=s)
    checks.dot_dtype(op, w)
    if s.shape != w.shape:
        raise ValueError(f"sparseops.{op}: s must have the shape of w {tuple(w.shape)}, got {tuple(s.shape)}")
    checks.finite(op, beta=beta, scale=scale)


def soft_masked_conv2d(x, w, s, beta, scale, bias, stride, padding, dilation):
    _check("soft_masked_conv2d", x, w, s, beta, scale, bias, stride, padding, dilation)
    oh, ow, geo = conv_geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    y = torch.empty((nb, c_out, oh, ow), dtype=x.dtype, device=x.device)
    q = nb * oh * ow
    if q and c_out:
        wrap_triton(_fwd)[lambda meta: (triton.cdiv(q, meta["BQ"]), triton.cdiv(c_out, meta["BN"]))](
            x.contiguous(), w.contiguous(), s.contiguous(), bias if bias is not None else w, y, q, c, h, wd, c_out,
            oh, ow, beta, scale, **geo, HAS_BIAS=bias is not None, ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype))
    return like_x(y, x)


def soft_masked_conv2d_backward(grad, x, w, s, beta, scale, stride, padding, dilation, output_mask):
    op = "soft_masked_conv2d_backward"
    _check(op, x, w, s, beta, scale, None, stride, padding, dilation, grad)
    oh, ow, geo = conv_geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    checks.grad_shape(op, grad, (nb, c_out, oh, ow))
    need_x, need_w, need_s, need_b = output_mask
    g, xc, w, s = grad.contiguous(), x.contiguous(), w.contiguous(), s.contiguous()
    acc, prec = acc_type(w.dtype), dot_precision(w.dtype)
    dx, dw, ds, db = (w.new_empty(0) for _ in range(4))  # distinct empties for outputs not asked for
    if need_x:
        dx = torch.empty_like(xc)
        qx = nb * h * wd
        if qx and c:
            wrap_triton(_dx)[lambda meta: (triton.cdiv(qx, meta["BQ"]), triton.cdiv(c, meta["BK"]))](
                g, w, s, dx, qx, c, h, wd, c_out, oh, ow, beta, scale, **geo, ACC=acc, PREC=prec)
        dx = like_x(dx, x)
    if need_w or need_s:
        full_dw, full_ds = torch.empty_like(w), torch.empty_like(s)
        q = nb * oh * ow
        if not q:
            full_dw.zero_(), full_ds.zero_()
        elif w.numel():
            taps = w.shape[2] * w.shape[3]
            split = split_count(triton.cdiv(c_out, 64) * triton.cdiv(c, 64) * taps, q, w.device, SPLIT_BLOCK)
            part = torch.zeros((split, *w.shape), dtype=acc_dtype(w.dtype),
                               device=w.device) if split > 1 else full_dw
            wrap_triton(_dws)[lambda meta: (triton.cdiv(c_out, meta["BN"]) * triton.cdiv(c, meta["BK"]) * taps,
                                                 split)](
                g, xc, w, s, full_dw, full_ds, part, q, c, h, wd, c_out, oh, ow, triton.cdiv(q, split), beta, scale,
                **geo, SPLIT=split, ACC=acc, PREC=prec)
            if split > 1:
                full_dw, full_ds = soft_epilogue(part.sum(0), w, s, beta, scale)
        dw, ds = (full_dw if need_w else dw), (full_ds if need_s else ds)
    if need_b:
        db = bias_grad(grad, (0, 2, 3), w.dtype)
    return dx, dw, ds, db


define("soft_masked_conv2d_backward", soft_masked_conv2d_backward)
define("soft_masked_conv2d", soft_masked_conv2d)
