"""sparseops: fused sparse kernels for pruning and lottery-ticket search in PyTorch."""
from importlib.metadata import PackageNotFoundError, version as _version

from . import layout, reference
from .layout import BlockLayout, CsrLayout, block_layout, csr_layout
from .nn import MaskedConv2d, MaskedLinear, SoftMaskedConv2d, SoftMaskedLinear
from . import backend  # the module, callable as the context manager: `with sparseops.backend("cpu"):`
from .backend import get_backend
from .ops.masked_conv2d import masked_conv2d
from .ops.masked_linear import masked_linear
from .ops.soft_mask import soft_mask, soft_mask_l1, soft_mask_with_l1
from .ops.soft_masked_conv2d import soft_masked_conv2d
from .ops.soft_masked_linear import soft_masked_linear
from .patch import PatchReport, as_torch_prune, patch, patch_report, unpatch
from .distributed import sync_masks
from . import gates  # noqa: E402  (layer and channel gates)
from .shrink import shrink
from .tuning import tune
from . import tuning  # noqa: E402
from . import tickets  # noqa: E402  (needs patch)

try:
    __version__ = _version("sparseops")
except PackageNotFoundError:  # running from a source tree that was built in place
    __version__ = "0+unknown"

__all__ = [
    "BlockLayout",
    "CsrLayout",
    "MaskedConv2d",
    "MaskedLinear",
    "PatchReport",
    "as_torch_prune",
    "SoftMaskedConv2d",
    "SoftMaskedLinear",
    "backend",
    "block_layout",
    "csr_layout",
    "gates",
    "get_backend",
    "layout",
    "masked_conv2d",
    "masked_linear",
    "patch",
    "patch_report",
    "reference",
    "soft_mask",
    "soft_mask_l1",
    "soft_mask_with_l1",
    "soft_masked_conv2d",
    "soft_masked_linear",
    "sync_masks",
    "shrink",
    "tickets",
    "tune",
    "tuning",
    "unpatch",
]
