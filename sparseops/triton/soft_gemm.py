"""Linear layer with Continuous Sparsification's soft mask fused into the GEMM.

The weight tile is multiplied by scale*sigmoid(beta*s) as it is loaded, so the masked weight is
never written to memory; the backward computes dW~ = G^T X once and, in that GEMM's epilogue,
dw = dW~ * scale*m and ds = dW~ * w * scale*beta*m*(1-m). A tile whose mask is exactly 0 (sigmoid
underflowed, as it does for most entries late in CS) contributes nothing to y or dx and has zero
dw and ds, so its loads and its tl.dot are skipped: exact, and the late rounds get cheaper.

Tiles follow the grouped ordering of Triton's matmul tutorial for L2 reuse.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import checks
from . import acc_dtype, acc_type, autotune, bias_grad, conv, define, dot_precision, split_count
from .soft_mask import _sigmoid_pair

_CONV_CONFIGS = [triton.Config({"BN": bn, "BK": bk, "BQ": bq}, num_warps=w, num_stages=st)
                 for bn, bk, bq, w, st in ((64, 32, 64, 4, 3), (64, 64, 128, 8, 3), (128, 32, 128, 8, 3),
                                           (32, 32, 128, 4, 3), (64, 32, 256, 8, 3))]
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
    m, dm = _sigmoid_pair(beta * s)
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
        tl.store(ds_ptr + out, (acc * w * (scale * beta) * dm).to(ds_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(part_ptr + split * N * K + out, acc, mask=inside)


def _epilogue(dwt, w, s, beta, scale):
    """dw and ds from the summed dW~ (what _dws's epilogue does for SPLIT == 1), in the accumulator type."""
    z = beta * s.to(dwt.dtype)
    e = torch.exp(-z)
    m = 1 / (1 + e)
    dm = torch.where(torch.isinf(e), 0, m * (e * m))
    return (dwt * scale * m).to(w.dtype), (dwt * w.to(dwt.dtype) * (scale * beta) * dm).to(w.dtype)


SPLIT_BLOCK = 1024  # the dW~ GEMMs split their reduction only in slices of at least this many rows


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
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        wrap_triton(_fwd)[_grid(m, n, "BM", "BN")](
            x2, w.contiguous(), s.contiguous(), bias if bias is not None else w, y, m, n, k, beta, scale,
            HAS_BIAS=bias is not None, ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype))
    return y.reshape(*x.shape[:-1], n)


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
        dx = torch.empty_like(x2)
        if m and k:
            wrap_triton(_dx)[_grid(m, k, "BM", "BK")](g2, w, s, dx, m, n, k, beta, scale, ACC=acc, PREC=prec)
        dx = dx.reshape(x.shape)
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
                full_dw, full_ds = _epilogue(part.sum(0), w, s, beta, scale)
        dw, ds = (full_dw if need_w else dw), (full_ds if need_s else ds)
    if need_b:
        db = bias_grad(g2, 0, w.dtype)
    return dx, dw, ds, db


# ---------------------------------------------------------------------------------------------
# The same for conv2d (groups=1), as implicit GEMMs tap by tap: for tap (r, s), W[:, :, r, s] is a
# [C_out, C_in] matrix and x shifted by the tap is the other operand, so every tile is a tl.dot.
#   forward: y[co, q] = sum over taps and C_in tiles of (w*m)[co, ci, r, s] @ x[ci, q shifted]
#   dx:      dx[ci, q'] = sum over taps and C_out tiles of (w*m)^T @ grad[co, q' shifted back]
#   dw, ds:  dW~[co, ci, r, s] = grad[co, q] @ x[ci, q shifted]^T, then the epilogue


@triton.jit
def _conv_mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH: tl.constexpr, KW: tl.constexpr, beta, scale,
                    ACC: tl.constexpr):
    """m, dm and addresses of the [co, ci] tile of tap (r, s) of a [C_out, C_in, kh, kw] tensor."""
    at = co[:, None] * (C * KH * KW) + ci[None, :] * (KH * KW) + r * KW + s
    inside = (co[:, None] < C_OUT) & (ci[None, :] < C)
    sv = tl.load(s_ptr + at, mask=inside, other=0).to(ACC)
    m, dm = _sigmoid_pair(beta * sv)
    return tl.where(inside, m * scale, 0.0), tl.where(inside, dm, 0.0), at, inside


@autotune(_CONV_CONFIGS, key=["Q", "C", "C_OUT"])
@triton.jit
def _conv_fwd(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, Q, C, H, W, C_OUT, OH, OW, beta, scale,
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
            m, _, at, inside = _conv_mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH, KW, beta, scale, ACC)
            if tl.max(tl.max(m, axis=1), axis=0) > 0:  # else this weight tile is masked to exactly 0
                w = tl.load(w_ptr + at, mask=inside, other=0)
                xs = conv.x_at_tap(x_ptr, n, ci, oh, ow, r, s, q < Q, C, H, W, SH, SW, PH, PW, DH, DW)
                acc += tl.dot((w.to(ACC) * m).to(x_ptr.dtype.element_ty), xs, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co < C_OUT, other=0).to(ACC)[:, None]
    tl.store(y_ptr + (n[None, :] * C_OUT + co[:, None]) * (OH * OW) + p[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(co[:, None] < C_OUT) & (q[None, :] < Q))


@autotune(_CONV_CONFIGS, key=["Q", "C", "C_OUT"])
@triton.jit
def _conv_dx(g_ptr, w_ptr, s_ptr, dx_ptr, Q, C, H, W, C_OUT, OH, OW, beta, scale,
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
            m, _, at, inside = _conv_mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH, KW, beta, scale, ACC)
            if tl.max(tl.max(m, axis=1), axis=0) > 0:
                w = tl.load(w_ptr + at, mask=inside, other=0)
                gs = conv.grad_at_tap(g_ptr, n, co, ih, iw, r, s, q < Q, C_OUT, OH, OW, SH, SW, PH, PW, DH, DW)
                wm = (w.to(ACC) * m).to(g_ptr.dtype.element_ty)
                acc += tl.dot(tl.trans(wm), gs, input_precision=PREC, out_dtype=ACC)
    tl.store(dx_ptr + (n[None, :] * C + ci[:, None]) * (H * W) + p[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(ci[:, None] < C) & (q[None, :] < Q))


@autotune(_CONV_CONFIGS, key=["Q", "C", "C_OUT"])
@triton.jit
def _conv_dws(g_ptr, x_ptr, w_ptr, s_ptr, dw_ptr, ds_ptr, part_ptr, Q, C, H, W, C_OUT, OH, OW, q_per_split, beta,
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
    m, dm, at, inside = _conv_mask_tile(s_ptr, co, ci, r, s, C, C_OUT, KH, KW, beta, scale, ACC)
    acc = tl.zeros((BN, BK), dtype=ACC)
    if tl.max(tl.max(m, axis=1), axis=0) > 0:  # else dw = ds = 0 on this tile: skip the GEMM
        for q0 in range(q_lo, q_hi, BQ):
            q = q0 + tl.arange(0, BQ)
            n, p = q // (OH * OW), q % (OH * OW)
            oh, ow = p // OW, p % OW
            g = tl.load(g_ptr + (n[None, :] * C_OUT + co[:, None]) * (OH * OW) + p[None, :],
                        mask=(co[:, None] < C_OUT) & (q[None, :] < q_hi), other=0)
            xs = conv.x_at_tap(x_ptr, n, ci, oh, ow, r, s, q < q_hi, C, H, W, SH, SW, PH, PW, DH, DW)
            acc += tl.dot(g, tl.trans(xs), input_precision=PREC, out_dtype=ACC)
    if SPLIT == 1:
        w = tl.load(w_ptr + at, mask=inside, other=0).to(ACC)
        tl.store(dw_ptr + at, (acc * m).to(dw_ptr.dtype.element_ty), mask=inside)
        tl.store(ds_ptr + at, (acc * w * (scale * beta) * dm).to(ds_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(part_ptr + split * (C_OUT * C * KH * KW) + at, acc, mask=inside)


def _conv_check(op, x, w, s, beta, scale, bias, stride, padding, dilation, grad=None):
    conv._check(op, x, w, bias, None, stride, padding, dilation, grad)
    checks.like(op, "w", w, s=s)
    checks.dot_dtype(op, w)
    if s.shape != w.shape:
        raise ValueError(f"sparseops.{op}: s must have the shape of w {tuple(w.shape)}, got {tuple(s.shape)}")
    checks.finite(op, beta=beta, scale=scale)


def soft_masked_conv2d(x, w, s, beta, scale, bias, stride, padding, dilation):
    _conv_check("soft_masked_conv2d", x, w, s, beta, scale, bias, stride, padding, dilation)
    oh, ow, geo = conv._geometry(x, w, stride, padding, dilation)
    nb, c, h, wd = x.shape
    c_out = w.shape[0]
    y = torch.empty((nb, c_out, oh, ow), dtype=x.dtype, device=x.device)
    q = nb * oh * ow
    if q and c_out:
        wrap_triton(_conv_fwd)[lambda meta: (triton.cdiv(q, meta["BQ"]), triton.cdiv(c_out, meta["BN"]))](
            x.contiguous(), w.contiguous(), s.contiguous(), bias if bias is not None else w, y, q, c, h, wd, c_out,
            oh, ow, beta, scale, **geo, HAS_BIAS=bias is not None, ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype))
    return conv._like_x(y, x)


def soft_masked_conv2d_backward(grad, x, w, s, beta, scale, stride, padding, dilation, output_mask):
    op = "soft_masked_conv2d_backward"
    _conv_check(op, x, w, s, beta, scale, None, stride, padding, dilation, grad)
    oh, ow, geo = conv._geometry(x, w, stride, padding, dilation)
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
            wrap_triton(_conv_dx)[lambda meta: (triton.cdiv(qx, meta["BQ"]), triton.cdiv(c, meta["BK"]))](
                g, w, s, dx, qx, c, h, wd, c_out, oh, ow, beta, scale, **geo, ACC=acc, PREC=prec)
        dx = conv._like_x(dx, x)
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
            wrap_triton(_conv_dws)[lambda meta: (triton.cdiv(c_out, meta["BN"]) * triton.cdiv(c, meta["BK"]) * taps,
                                                 split)](
                g, xc, w, s, full_dw, full_ds, part, q, c, h, wd, c_out, oh, ow, triton.cdiv(q, split), beta, scale,
                **geo, SPLIT=split, ACC=acc, PREC=prec)
            if split > 1:
                full_dw, full_ds = _epilogue(part.sum(0), w, s, beta, scale)
        dw, ds = (full_dw if need_w else dw), (full_ds if need_s else ds)
    if need_b:
        db = bias_grad(grad, (0, 2, 3), w.dtype)
    return dx, dw, ds, db


define("soft_masked_conv2d_backward", soft_masked_conv2d_backward)
define("soft_masked_conv2d", soft_masked_conv2d)


define("soft_masked_linear_backward", soft_masked_linear_backward)
define("soft_masked_linear", soft_masked_linear)
