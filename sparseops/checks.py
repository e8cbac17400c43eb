"""Argument checks on the Python side, in one place: the public functions' arguments (bottom), and
the Triton ops' inputs (top), which follow the C++ ops' rules and messages (csrc/checks.h, the one
place for the C++ kernels), since no C++ code runs before a Triton kernel. Every message starts
with the op and names the argument."""
from numbers import Real

import torch

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def like(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Floating tensors with the dtype and device of `ref` (None entries are skipped)."""
    for name, t in {ref_name: ref, **tensors}.items():
        if t is None:
            continue
        if t.dtype not in FLOATS:
            raise TypeError(f"sparseops.{op}: {name} must be float32, float64, float16 or bfloat16 on this device, "
                            f"got {t.dtype}")
        if t.dtype != ref.dtype:
            raise TypeError(f"sparseops.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"sparseops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "move them to one device")


def indices(op: str, device: torch.device, **tensors) -> None:
    """1-D int32/int64 index tensors on `device`; each given as (tensor, expected size or -1)."""
    for name, (t, size) in tensors.items():
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"sparseops.{op}: {name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1 or (size >= 0 and t.numel() != size):
            raise ValueError(f"sparseops.{op}: {name} must be 1-D with {size} entries, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"sparseops.{op}: {name} is on {t.device} but w is on {device}; move them to one device")


def linear(op: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """w [N, K], x [..., K], bias [N] or None."""
    if w.dim() != 2:
        raise ValueError(f"sparseops.{op}: w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"sparseops.{op}: x must end in in_features={w.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"sparseops.{op}: bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")


def conv(op: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, groups) -> None:
    """w [C_out, C_in/groups, kh, kw], x [N, C_in, H, W] or unbatched [C_in, H, W], bias [C_out]."""
    if w.dim() != 4:
        raise ValueError(f"sparseops.{op}: w must be 4-D [C_out, C_in/groups, kh, kw], got shape {tuple(w.shape)}")
    if w.shape[0] == 0:  # torch's conv2d refuses it too; say so on every path
        raise ValueError(f"sparseops.{op}: w has 0 output channels (shape {tuple(w.shape)}); conv2d needs at least 1")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"sparseops.{op}: groups must be a positive int, got {groups!r}")
    if x.dim() not in (3, 4) or x.shape[-3] != w.shape[1] * groups:
        raise ValueError(f"sparseops.{op}: x must be [N, C_in, H, W] with C_in={w.shape[1] * groups} "
                         f"(w's {w.shape[1]} times groups={groups}), got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"sparseops.{op}: bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")


def grad_shape(op: str, grad: torch.Tensor, shape) -> None:
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"sparseops.{op}: grad must have shape {tuple(shape)}, got {tuple(grad.shape)}")


def finite(op: str, **scalars) -> None:
    for name, v in scalars.items():
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"sparseops.{op}: {name} must be finite, got {v}")


def dot_dtype(op: str, w: torch.Tensor) -> None:
    """The tl.dot kernels (block, fused soft mask) compile for float32/float16/bfloat16 on GPUs;
    float64 runs only under the interpreter (the CPU tests)."""
    if w.dtype == torch.float64 and w.device.type == "cuda":
        raise TypeError(f"sparseops.{op}: float64 is not supported by the Triton tensor-core kernels on GPUs; "
                        "use float32, float16 or bfloat16 (or the CSR layout, whose kernels take float64)")


# ---- the public functions' arguments (sparseops.<op>, before any implementation is chosen) ----


def tensors(op: str, bias=None, **named) -> None:
    """The named arguments are tensors; bias a tensor or None."""
    if not all(isinstance(t, torch.Tensor) for t in named.values()):
        what = "must be tensors" if len(named) > 1 else "must be a tensor"
        raise TypeError(f"sparseops.{op}: {' and '.join(named)} {what}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"sparseops.{op}: bias must be a tensor or None, got {type(bias).__name__}")


def same_device(op: str, **named) -> None:
    """Dense tensors on one device (the dispatcher would otherwise pick a device silently)."""
    device, mixed = None, False
    for name, t in named.items():
        if t is None:
            continue
        if t.layout != torch.strided:
            raise ValueError(f"sparseops.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
        mixed = mixed or (device is not None and t.device != device)
        device = t.device if device is None else device
    if mixed:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named.items() if t is not None)
        raise ValueError(f"sparseops.{op}: all tensors must be on one device, got {listing}")


def number(op: str, v, name: str) -> float:
    """A Python number (not a tensor, not a bool), as float."""
    if isinstance(v, torch.Tensor) or not isinstance(v, Real) or isinstance(v, bool):
        raise TypeError(f"sparseops.{op}: {name} must be a Python number, got {type(v).__name__}")
    return float(v)


def density(v, name: str) -> float:
    if not isinstance(v, Real) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"sparseops: {name} must be a number in [0, 1], got {v!r}")
    return float(v)


def pair(op: str, v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not (isinstance(t[0], int) and isinstance(t[1], int)) or isinstance(t[0], bool) or \
            isinstance(t[1], bool):  # (no generator: three pairs per conv call)
        raise TypeError(f"sparseops.{op}: {name} must be an int or a pair of ints, got {v!r}")
    return t
