"""What the Triton kernels share: the interpreter switch, autotuning, accumulator types, split
reductions, row ordering, the conv geometry and tap-shifted tiles, the sigmoid, and `define`,
which registers a kernel as the `triton_op` `sparseops::triton_<op>`."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.utils.weak import WeakIdKeyDictionary

from .. import checks
from .._library import define_variant
from ..reference import SIGMOID_OFF_BELOW

# Read once: Triton itself reads the variable when a kernel is first launched.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable_on(device: torch.device) -> str | None:
    """None if the Triton kernels can run on tensors on `device`, else why not."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (f"Triton kernels need CUDA tensors (got tensors on {device}); on the CPU they run only under "
            "TRITON_INTERPRET=1, for testing")


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """triton.autotune on a GPU; under the interpreter (which cannot time) the first config only."""
    return triton.autotune(configs[:1] if INTERPRET else configs, key=key, **kwargs)


def acc_type(dtype: torch.dtype):
    """The accumulator: float64 for float64 inputs (CPU tests against the reference), else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """acc_type in torch, for partial-sum buffers and reductions done in torch."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_grad(grad: torch.Tensor, dims, dtype: torch.dtype) -> torch.Tensor:
    """dbias: grad summed over `dims` in the accumulator type, returned in `dtype`."""
    return grad.sum(dims, dtype=acc_dtype(dtype)).to(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 GEMMs follow torch's TF32 switch (off by default)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: small, so that tests exercise split reductions


def split_count(units: int, reduction: int, device: torch.device, chunk: int) -> int:
    """How many programs share each output unit's reduction (of length `reduction`, at least `chunk`
    each): enough programs to fill the GPU when the units are few; 1 when they are many."""
    want = triton.cdiv(4 * multiprocessors(device), max(units, 1))
    return max(1, min(want, triton.cdiv(reduction, chunk)))


def entry_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of each entry of a CSR (no host sync: the output size is given)."""
    return torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device), row_ptr.diff(),
                                   output_size=nnz)


def define(op: str, fn):
    """Registers `fn` as the triton_op `sparseops::triton_<op>` with the schema of `sparseops::<op>`."""
    schema = str(getattr(torch.ops.sparseops, op).default._schema)
    schema = schema[schema.index("("):]  # drop "sparseops::<op>"
    name = f"triton_{op}"
    triton_op(f"sparseops::{name}", fn, mutates_args=(), schema=schema)
    define_variant(op, name)
    return fn


_ORDER = WeakIdKeyDictionary()


def row_order(row_ptr: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.argsort(row_ptr.diff(), descending=True, stable=True)
    order = _ORDER.get(row_ptr)
    if order is None:
        order = _ORDER[row_ptr] = torch.argsort(row_ptr.diff(), descending=True, stable=True)
    return order


def nnz_bucket(nnz: int) -> int:
    """Autotune key: the kept-entry count to the next power of two (re-tune per density class)."""
    return 1 << max(nnz - 1, 0).bit_length()


def scatter_partials(out2d: torch.Tensor, row_ptr, col_idx, part) -> None:
    """out2d[row, col] = the fixed-order sum over splits of part[split, j], for each kept entry j of
    the CSR: deterministic, no atomics."""
    out2d[entry_rows(row_ptr, col_idx.numel()), col_idx.long()] = part.sum(0).to(out2d.dtype)


# ---- conv: tap-shifted tiles and the host-side geometry


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


def conv_check(op, x, w, bias, layout, stride, padding, dilation, grad=None, sizes=True):
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


def conv_geometry(x, w, stride, padding, dilation):
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
    return oh, ow, dict(KH=w.shape[2], KW=w.shape[3], SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
                        DH=dilation[0], DW=dilation[1])


def like_x(t, x):
    """The CPU op's convention: the result takes x's memory format (NCHW or channels_last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


# ---- the sigmoid of the soft-mask kernels, and the fused GEMMs' epilogue


_SIGMOID_OFF_BELOW = tl.constexpr(SIGMOID_OFF_BELOW)  # (a jit function reads a global only as a constexpr)


@triton.jit
def sigmoid_pair(z):
    # both exactly 0 below the cut -63 ln 2 (sparseops.reference.SIGMOID_OFF_BELOW), which includes
    # where exp overflows; a NaN z stays NaN
    e = tl.exp(-z)
    off = z < _SIGMOID_OFF_BELOW
    m = tl.where(off, 0.0, 1.0 / (1.0 + e))
    dm = tl.where(off, 0.0, m * (e * m))
    return m, dm


def soft_epilogue(dwt, w, s, beta, scale):
    """dw and ds from the summed dW~ (what _dws's epilogue does for SPLIT == 1), in the accumulator type."""
    z = beta * s.to(dwt.dtype)
    e = torch.exp(-z)
    off = z < SIGMOID_OFF_BELOW
    m = torch.where(off, 0, 1 / (1 + e))
    dm = torch.where(off, 0, m * (e * m))
    ds = torch.where(dm == 0, 0, dwt * w.to(dwt.dtype) * (scale * beta) * dm)  # 0 where flat, even if beta*scale = inf
    return (dwt * scale * m).to(w.dtype), ds.to(w.dtype)


SPLIT_BLOCK = 1024  # the dW~ GEMMs split their reduction only in slices of at least this many rows


SPLIT_BLOCK = 1024  # the fused dW~ GEMMs split their reduction only in slices of at least this many rows
