"""Input checks of the Triton ops: the C++ ops' rules and messages (csrc/checks.h), in Python,
since no C++ code runs before a Triton kernel. Every message starts with the op and names the
argument."""
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
