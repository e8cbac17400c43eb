"""sparseops: fused sparse kernels for pruning and lottery-ticket search in PyTorch."""
from importlib.metadata import PackageNotFoundError, version as _version

from . import layout, reference
from .layout import CsrLayout, csr_layout
from .nn import MaskedLinear
from .ops import backend, get_backend, masked_linear, soft_mask, soft_mask_l1

try:
    __version__ = _version("sparseops")
except PackageNotFoundError:  # running from a source tree that was built in place
    __version__ = "0+unknown"

__all__ = [
    "CsrLayout",
    "MaskedLinear",
    "backend",
    "csr_layout",
    "get_backend",
    "layout",
    "masked_linear",
    "reference",
    "soft_mask",
    "soft_mask_l1",
]
