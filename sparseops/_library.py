"""The compiled libraries and the op registry: a leaf module (it imports nothing of sparseops' own
but the compiled extensions), so every other module can use it without an import cycle.

- Loading `sparseops._C` registers every schema (csrc/ops.cpp) and the CPU kernels; `sparseops._cuda`
  the CUDA kernels, where it was built and can be loaded.
- `lib` is `torch.ops.sparseops`; `has_kernel(op, device_type)` says which compiled kernels exist,
  `kernel_dtypes(op, impl, device)` which dtypes a kernel takes.
- `define(op, fake, grads=...)` gives an op its fake (meta) implementation and, with `grads`, its
  autograd formula, built generically from the schema; `define_variant(op, name)` gives another
  op with the same schema (a Triton implementation, `triton_<op>`) the same fake and formula, whose
  backward then runs `<name>_backward`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _C  # noqa: F401  (loading the library registers the ops)

try:  # the CUDA kernels live in a second library, built only where nvcc and a CUDA torch are
    from . import _cuda  # noqa: F401

    CUDA_EXTENSION_ERROR: str | None = None
except ImportError as exc:  # a CPU-only build, or CUDA libraries that cannot be loaded here
    CUDA_EXTENSION_ERROR = str(exc)

lib = torch.ops.sparseops

_COMPILED = ("soft_mask", "soft_mask_l1", "soft_mask_with_l1", "masked_linear", "masked_linear_dense", "masked_conv2d")
# Read once: a plain dict is cheap and torch.compile-friendly.
_KERNELS = {(op, dev): torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseops::{op}", key)
            for op in _COMPILED for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether a compiled (C++ or CUDA C++) kernel of `op` is registered for `device_type`."""
    return _KERNELS.get((op, device_type), False)


def tracing(*tensors) -> bool:
    """Whether this call is being traced (torch.compile, torch.export, or any tracer running on fake
    tensors) rather than run: then the mask's values are not known, and nothing may read them, nor
    key a Python-side cache by a tensor's identity or data_ptr (a fake tensor has neither)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    # (plain tensors and parameters are never fake: skip is_fake's subclass walk, ~6 us a tensor)
    return any(isinstance(t, torch.Tensor) and type(t) not in _PLAIN and is_fake(t) for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are in force (a non-reentrant activation checkpoint, offloading):
    the checkpoint runs a call again in the backward and compares the tensors each run saved."""
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None


_ISA = [None]
_CPU_ISA = lib._cpu_isa.default  # (the overload itself: ~0.15 us less than the packet, 3 calls per op call)


def cpu_isa() -> str:
    """The CPU kernel variant in use (default, avx2, avx512). Under torch.compile (which cannot trace
    an op returning a string) the value last read outside it."""
    if not torch.compiler.is_compiling() or _ISA[0] is None:
        _ISA[0] = _CPU_ISA()
    return _ISA[0]


_HALF = (torch.float16, torch.bfloat16)
# The tl.dot kernels: float64 compiles only under the interpreter (CPU tensors).
_DOT_OPS = ("masked_linear_block", "masked_conv2d_block", "soft_masked_linear", "soft_masked_conv2d")


def kernel_dtypes(op: str, impl: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes the `impl` kernel (cpu, cuda or triton) of `op` takes on `device`: the C++ CPU
    kernels float32/float64, the CUDA C++ ones also float16/bfloat16, Triton all four (float64
    not in its tensor-core kernels on GPUs). Other dtypes run the dense path in `auto`."""
    if impl == "cpu":
        return (torch.float32, torch.float64)
    if impl == "triton" and device.type == "cuda" and op in _DOT_OPS:
        return (torch.float32, *_HALF)
    return (torch.float32, torch.float64, *_HALF)


def schema(op: str) -> torch.FunctionSchema:
    return getattr(lib, op).default._schema


class _Spec:
    """What `define` registered for an op, so that `define_variant` can give a variant the same."""

    def __init__(self, op: str, fake: Callable, grads: Sequence[str], backward: Callable | None):
        self.op, self.fake, self.grads, self.backward = op, fake, tuple(grads), backward
        args = schema(op).arguments
        self.names = [a.name for a in args]
        self.tensors = [str(a.type).startswith("Tensor") for a in args]
        # The backward op takes grad, then the forward's arguments less bias, then output_mask if
        # its schema has one (one flag per differentiable argument, in order).
        self.positions = [self.names.index(g) for g in self.grads]


_SPECS: dict[str, _Spec] = {}
_PENDING: dict[str, list[str]] = {}


def define(op: str, fake: Callable, *, grads: Sequence[str] = (), backward: Callable | None = None) -> None:
    """Registers `fake` for `sparseops::<op>` and, where `grads` names its differentiable arguments,
    an autograd formula whose backward calls `sparseops::<op>_backward` (or `backward`, a Python
    function with the same signature) with `output_mask` built from what autograd needs."""
    _SPECS[op] = _Spec(op, fake, grads, backward)
    for name in [op, *_PENDING.pop(op, [])]:
        _register(_SPECS[op], name)


def define_variant(op: str, name: str) -> None:
    """Gives `sparseops::<name>` (same schema as `<op>`) the fake and autograd formula of `<op>`."""
    if op in _SPECS:
        _register(_SPECS[op], name)
    else:  # `<op>` is defined later (import order): registered then
        _PENDING.setdefault(op, []).append(name)


def _register(spec: _Spec, name: str) -> None:
    torch.library.register_fake(f"sparseops::{name}", spec.fake)
    if not spec.grads:
        return
    python_backward = spec.backward if name == spec.op else None
    bwd_name = f"{name}_backward"
    # The variant's backward has the schema of `<op>_backward` (and may be registered after this).
    has_mask = python_backward is not None or "output_mask" in [a.name for a in schema(f"{spec.op}_backward").arguments]
    # What the backward receives: every argument but bias (only its presence matters).
    passed = [n != "bias" for n in spec.names]
    saved_slots = [t and p for t, p in zip(spec.tensors, passed)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(v for v, s in zip(inputs, saved_slots) if s))
        ctx.present = [v is not None for v in inputs]
        ctx.attrs = [None if s else v for v, s, p in zip(inputs, saved_slots, passed) if p]

    def backward(ctx, grad):
        if torch.is_grad_enabled() and (grad.requires_grad or any(t.requires_grad for t in ctx.saved_tensors)):
            # (the backward ops have no autograd of their own: a second derivative through the compiled
            # ones would be silently wrong, through the Python ones fail on an out= GEMM)
            raise NotImplementedError(f"sparseops.{name}: double backward (create_graph=True) is not implemented by "
                                      "its sparse kernels; compute it under sparseops.backend('reference')")
        saved = iter(ctx.saved_tensors)
        rest = [next(saved) if s else attr
                for s, attr in zip((s for s, p in zip(saved_slots, passed) if p), ctx.attrs)]
        need = [ctx.needs_input_grad[i] and ctx.present[i] for i in spec.positions]
        fn = python_backward or getattr(lib, bwd_name)  # looked up when called: registered after this op
        out = fn(grad, *rest, need) if has_mask else fn(grad, *rest)
        out = out if isinstance(out, (tuple, list)) else (out,)
        grads: list = [None] * len(spec.names)
        for i, g, wanted in zip(spec.positions, out, need, strict=True):
            grads[i] = g if wanted else None
        return tuple(grads)

    torch.library.register_autograd(f"sparseops::{name}", backward, setup_context=setup_context)
