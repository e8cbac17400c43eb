"""Triton kernels for CUDA tensors, one file per kernel family.

Each kernel family registers `torch.library.triton_op`s named `sparseops::triton_<op>`: the
twin of the op `<op>` declared in csrc/ops.cpp, with the same schema (read from that declaration,
so the schema stays in one place), the same fake implementation and the same autograd formula
(ops.register_twin). torch.compile traces into them (`wrap_triton`) instead of treating them as
opaque calls. sparseops.ops picks them for CUDA tensors (backend "triton", or "auto" where the
measured tables say so).

Without a GPU the kernels still run, slowly, under Triton's interpreter (TRITON_INTERPRET=1, on
CPU tensors); the test suite runs them that way in CI.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .._library import define_variant

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
    """acc_type's torch twin, for partial-sum buffers and reductions done in torch."""
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


from . import block, conv, soft_gemm, soft_mask, spmm  # noqa: E402,F401  (registers the ops)
