"""masked_linear on torch.sparse: y^T = W_csr @ x^T and dx^T = (W^T)_csr @ grad^T through
`torch.sparse.mm` (MKL on the CPU, cuSPARSE on GPUs); dw at the kept entries only, by sparseops'
SDDMM on the CPU (torch's `sampled_addmm` there costs about a dense GEMM) and `sampled_addmm`
(cuSPARSE) on GPUs. The CSR values are gathered from the dense w on every call (weights change
every step), through flat indices cached per layout."""
from __future__ import annotations

import warnings

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._library import define_variant, has_kernel, lib, schema

_NAME = "torch_sparse_masked_linear"
_lib = torch.library.Library("sparseops", "FRAGMENT")
for _op in ("masked_linear", "masked_linear_backward"):
    _args = str(schema(_op))
    _lib.define(_NAME + ("_backward" if _op.endswith("_backward") else "") + _args[_args.index("("):])

_FLAT: WeakIdKeyDictionary = WeakIdKeyDictionary()
# torch says so for every CSR tensor built; these are internal and used only through torch.sparse.mm.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def _flat_index(row_ptr: torch.Tensor, col_idx: torch.Tensor, row_stride: int, col_stride: int) -> torch.Tensor:
    """Element offsets into w of the CSR's entries (row r, column c -> r*row_stride + c*col_stride)."""
    hit = _FLAT.get(col_idx)
    if hit is not None and hit[0] == (row_stride, col_stride, col_idx._version):
        return hit[1]
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device), row_ptr.diff(),
                                   output_size=col_idx.numel())
    flat = rows * row_stride + col_idx.long() * col_stride
    _FLAT[col_idx] = ((row_stride, col_stride, col_idx._version), flat)
    return flat


def _csr(row_ptr, col_idx, w, shape, row_stride, col_stride):
    vals = w.reshape(-1)[_flat_index(row_ptr, col_idx, row_stride, col_stride)]
    return torch.sparse_csr_tensor(row_ptr, col_idx, vals, shape, check_invariants=False)


def _check(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx):
    # The same rules as the C++ op, by running its checks on an empty batch (one place for the rules).
    lib.masked_linear(x[..., :0, :] if x.dim() > 1 else x.new_empty((0, x.shape[-1])), w, row_ptr, col_idx,
                      t_row_ptr, t_col_idx, None)


def masked_linear(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, bias):
    _check(x, w, row_ptr, col_idx, t_row_ptr, t_col_idx)
    n, k = w.shape
    x2 = x.reshape(-1, k)
    yt = torch.sparse.mm(_csr(row_ptr, col_idx, w.contiguous(), (n, k), k, 1), x2.t())
    y = x.new_empty((*x.shape[:-1], n))  # fresh, in the output's shape: an op returns no views
    y.view(-1, n).copy_(yt.t())
    if bias is not None:
        y += bias
    return y


def masked_linear_backward(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx, output_mask):
    need_x, need_w, need_b = output_mask
    n, k = w.shape
    g2, x2 = grad.reshape(-1, n), x.reshape(-1, k)
    empty = w.new_empty(0)
    dx = empty
    if need_x:  # W^T's CSR: row kk holds W[:, kk]'s kept entries, at w[c, kk] = c*k + kk
        wt = _csr(t_row_ptr, t_col_idx, w.contiguous(), (k, n), 1, k)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dx.view(-1, k).copy_(torch.sparse.mm(wt, g2.t()).t())
    dw = db = empty
    if need_w and w.device.type == "cpu" and has_kernel("masked_linear", "cpu"):
        _, dw, db = lib.masked_linear_backward(grad, x, w, row_ptr, col_idx, t_row_ptr, t_col_idx,
                                               [False, True, need_b])
    elif need_w:
        pattern = torch.sparse_csr_tensor(row_ptr, col_idx, w.new_zeros(col_idx.numel()), (n, k),
                                          check_invariants=False)
        vals = torch.sparse.sampled_addmm(pattern, g2.t().contiguous(), x2.contiguous(), beta=0.0).values()
        dw = w.new_zeros((n, k))
        dw.view(-1)[_flat_index(row_ptr, col_idx, k, 1)] = vals
    if need_b and db.numel() == 0:
        db = g2.sum(0)
    return dx, dw, db


for _key in ("CPU", "CUDA"):
    _lib.impl(_NAME, masked_linear, _key)
    _lib.impl(f"{_NAME}_backward", masked_linear_backward, _key)
define_variant("masked_linear_backward", f"{_NAME}_backward")  # its fake (torch.compile, export)
define_variant("masked_linear", _NAME)
