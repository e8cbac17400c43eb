"""Triton kernels for CUDA tensors, one module per op (the op's stem, as in csrc/ and sparseops/ops/),
with what they share in `_common`.

Each module registers `torch.library.triton_op`s named `sparseops::triton_<op>`: a variant of the
op `<op>` declared in csrc/ops.cpp, with the same schema (read from that declaration, so the schema
stays in one place), the same fake implementation and the same autograd formula
(`sparseops._library.define_variant`). torch.compile traces into them (`wrap_triton`) instead of
treating them as opaque calls. `sparseops.backend` chooses them for CUDA tensors (backend "triton",
or "auto" where the measured tables say so).

Without a GPU the kernels still run, slowly, under Triton's interpreter (TRITON_INTERPRET=1, on
CPU tensors); the test suite runs them that way in CI.
"""
from ._common import INTERPRET, split_count, usable_on  # noqa: F401
from . import (  # noqa: F401,E402  (importing them registers the ops)
    masked_conv2d, masked_conv2d_block, masked_linear, masked_linear_block, soft_mask, soft_masked_conv2d,
    soft_masked_linear)
