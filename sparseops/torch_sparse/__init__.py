"""Implementations of sparseops ops on torch.sparse (MKL's sparse BLAS on the CPU, cuSPARSE on
GPUs), one module per op: a well-kept library as a candidate beside sparseops' own kernels, which
`auto` measures against each other (sparseops.tuning). Each registers `sparseops::torch_sparse_<op>`
with the schema, fake and autograd formula of `<op>` (sparseops._library.define_variant)."""
from . import masked_linear  # noqa: F401  (registers the op)
