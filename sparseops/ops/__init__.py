"""The Python side of each op, one module per op (as pytorch/extension-cpp's ops.py): its fake
(meta) implementation and autograd formula for the schemas in csrc/ops.cpp, and the public
function, which checks its arguments, asks `sparseops.backend.choose` which implementation runs,
and runs it. The public functions are exported from `sparseops` itself."""
from . import channel_masked_conv2d, channel_masked_linear, masked_conv2d, masked_linear, soft_mask, soft_masked_conv2d, soft_masked_linear  # noqa: F401
