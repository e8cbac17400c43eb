"""Which implementation of an op runs for a call: the one place that decides.

Every public op function (sparseops/ops/) asks `choose(op, device, **facts)` once and runs the
implementation it names; layers, the CLI, benchmarks and tests read policy only through this
module's public functions. Implementations, by name:

  cpu, cuda        the compiled C++ / CUDA C++ sparse kernels (sparseops._C, sparseops._cuda)
  triton           the Triton kernels (sparseops/triton), CSR, block or fused soft-mask
  element          a block layout run on the element (CSR) path instead of its tiles
  dense            the same math through dense GEMMs in one op (masked_linear_dense)
  mask_multiply    plain autograd over `where(mask, w, 0)` (torch.nn.utils.prune's `w * mask`, exact)
  unmasked         nothing is pruned: exactly the dense layer (F.linear, F.conv2d)
  channels         whole channels pruned: one dense product of the kept channels (channel_masked_*)
  unfused          soft-masked ops: sparseops.soft_mask, then the dense op
  skip_zeros       soft-masked ops late in CS: the masked op over the entries whose mask is not 0
  reference        sparseops.reference, the plain-torch ground truth

`SPARSEOPS_BACKEND` or the `backend(...)` context manager forces one of BACKENDS; a forced
backend that cannot run raises (`require`) with the reason. In `auto` the sparse kernels run only
where the mask is sparser than the measured break-even (thresholds.json), so a patched model is
never slower than the unpatched one.
"""
from __future__ import annotations

import contextlib
import sys
import types
import math
import os
import threading

import torch

from . import checks, tuning
from . import thresholds as _thresholds
from .thresholds import CHANNEL_MAX_WORK, CHANNEL_MEASURE_MAX_WORK, measured_faster, thresholds  # noqa: F401 (API)
from ._library import CUDA_EXTENSION_ERROR, has_kernel, kernel_dtypes, tracing

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference", "dense")
SMALL_WEIGHT = 1 << 18  # weights up to 512x512: the dense fallback is a plain mask multiply


# ---- state ----------------------------------------------------------------------------------


def _env_backend() -> str:
    name = os.environ.get("SPARSEOPS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"sparseops: SPARSEOPS_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def _env_max_density() -> float | None:
    v = os.environ.get("SPARSEOPS_MAX_DENSITY")
    if v is None or not v.strip():
        return None
    try:
        number = float(v)
    except ValueError:
        raise ValueError(f"sparseops: SPARSEOPS_MAX_DENSITY must be a number in [0, 1], got {v!r}") from None
    return checks.density(number, "SPARSEOPS_MAX_DENSITY")


class _State(threading.local):
    def __init__(self):
        self.backend = _env_backend()
        self.max_density = _env_max_density()


_state = _State()


@contextlib.contextmanager
def backend(name: str | None = None, *, max_density: float | None = None):
    """Forces a backend (and/or the density above which masked ops run dense) inside a block.

    >>> with sparseops.backend("reference"):
    ...     y = sparseops.masked_linear(x, w, mask)
    """
    if name is not None:
        name = str(name).lower()
        if name not in BACKENDS:
            raise ValueError(f"sparseops.backend: name must be one of {BACKENDS}, got {name!r}")
    if max_density is not None:
        max_density = checks.density(max_density, "sparseops.backend: max_density")
    saved = (_state.backend, _state.max_density)
    _state.backend = name or saved[0]
    _state.max_density = saved[1] if max_density is None else max_density
    try:
        yield
    finally:
        _state.backend, _state.max_density = saved


def get_backend() -> str:
    return _state.backend


# What is built here, for tools that report it (re-exported from the leaf that loads the libraries):
# has_kernel(op, device_type) and CUDA_EXTENSION_ERROR.
__all__ = ["BACKENDS", "CUDA_EXTENSION_ERROR", "backend", "choose", "get_backend", "gpu_kernel", "has_kernel",
           "max_density", "measured_faster", "require", "thresholds", "triton_unavailable"]


# ---- what is available here -----------------------------------------------------------------

_TRITON: dict = {}


def triton_unavailable(device: torch.device) -> str | None:
    """None if sparseops' Triton kernels can run on `device`, else why not. Imports (and so
    registers) them on first use: importing triton costs about a second."""
    if "error" not in _TRITON:
        try:
            from . import triton as kernels

            _TRITON["error"], _TRITON["module"] = None, kernels
        except ImportError as exc:
            _TRITON["error"] = f"Triton is not installed (pip install 'sparseops[triton]'): {exc}"
    if _TRITON["error"] is not None:
        return _TRITON["error"]
    return _TRITON["module"].usable_on(device)


def _takes(op: str, impl: str | None, device: torch.device, dtype: torch.dtype | None) -> bool:
    return impl is None or dtype is None or impl not in ("cpu", "cuda", "triton") or \
        dtype in kernel_dtypes(op, impl, device)


def require(op: str, impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """`impl` (cpu, cuda or triton) if it can run `op` on `device` (for tensors of `dtype`, when
    given), else raises with the reason."""
    if dtype is not None and not _takes(op, impl, device, dtype):
        names = ", ".join(str(d).removeprefix("torch.") for d in kernel_dtypes(op, impl, device))
        raise TypeError(f"sparseops.{op}: the {impl} backend's kernel takes {names} tensors, got "
                        f"{str(dtype).removeprefix('torch.')}; use backend 'auto' (which runs the dense path for "
                        "this dtype), 'dense' or 'reference'")
    if impl == "triton":
        why = triton_unavailable(device)
        if why is not None:
            raise NotImplementedError(f"sparseops.{op}: the triton backend cannot run here: {why}")
        return impl
    if not has_kernel(op, impl):
        why = f" ({CUDA_EXTENSION_ERROR})" if impl == "cuda" and CUDA_EXTENSION_ERROR else ""
        raise NotImplementedError(f"sparseops.{op}: no compiled {impl} kernel for this op{why}")
    if device.type != impl:
        raise ValueError(f"sparseops.{op}: backend {impl!r} needs {impl} tensors, got tensors on {device}")
    return impl


def _kernel_here(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """The sparse kernel `auto` may use on `device` (for `dtype`): the compiled one, else Triton on
    a GPU; None where none takes the call (the dense path then runs)."""
    if device.type in ("cpu", "cuda") and has_kernel(op, device.type) and _takes(op, device.type, device, dtype):
        return device.type
    if device.type == "cuda" and _takes(op, "triton", device, dtype) and triton_unavailable(device) is None:
        return "triton"
    return None


# ---- the measured tables (the prior: sparseops/thresholds.py) ---------------------------------


def max_density(op: str, device_type: str, shape: tuple[int, int] | None = None, *,
                plane: int | None = None) -> float:
    """The density above which `op` runs its dense fallback on `device_type`: the measured
    break-even (thresholds.break_even: by layer width for a weight of `shape`, by output positions
    `plane` for a convolution), unless `backend(max_density=...)` or SPARSEOPS_MAX_DENSITY set it."""
    if _state.max_density is not None:
        return _state.max_density
    return _thresholds.break_even(op, device_type, shape, plane=plane)


def gpu_kernel(op: str, device: torch.device, shape: tuple[int, int], density: float) -> str | None:
    """"cuda" (C++) or "triton" for `op` on a GPU: the winner of the nearest measured point in
    thresholds.json ("cuda": {"kernels": {op: [[h, density, winner], ...]}}, h = N*K/(N+K), written
    by benchmarks/bench_gpu.py), among the kernels that exist here; Triton where nothing is
    measured; None if neither exists."""
    have = [k for k in ("triton", "cuda") if (k == "cuda" and has_kernel(op, "cuda"))
            or (k == "triton" and triton_unavailable(device) is None)]
    points = [p for p in thresholds().get("cuda", {}).get("kernels", {}).get(op, []) if p[2] in have]
    if not points:
        return have[0] if have else None
    n, k = shape
    h = max(n * k / (n + k), 1.0) if n + k else 1.0
    nearest = min(points, key=lambda p: abs(math.log(max(p[0], 1.0) / h)) + 4 * abs(p[1] - density))
    return nearest[2]


# ---- the choice -----------------------------------------------------------------------------


def choose(op: str, device: torch.device, **facts) -> str:
    """The implementation (a name from this module's docstring) that runs `op` for a call on
    `device`, from the active backend and the facts of the call:

      soft_mask(_l1, _with_l1)   numel
      masked_linear              density, shape (of w), full (nothing pruned), numel, rows (of x),
                                 channels (ChannelLayout.work of a mask with whole pruned channels)
      masked_linear_block        tile_density
      masked_conv2d              density, shape (w as 2-D), full, supported (geometry the kernels
                                 cover), unit_stride, reduction (C_in*kh*kw), plane, problem (the
                                 call's sizes), channels; block and tile_density for a BlockLayout

    and `dtype` (of w; every op): in `auto` a kernel that lacks it (kernel_dtypes: the C++ CPU
    kernels take float32/float64) is never chosen, the dense path runs; a forced backend whose
    kernel lacks it raises TypeError naming it. For `auto`'s measured choice (sparseops.tuning),
    `trial` (ops/_common.trial): where more than one implementation could win, the first call for
    a key times them.
      soft_masked_linear/conv2d  supported (conv), nonzero: a function giving the MaskStats of
                                 `sigmoid(beta*s) != 0` when it is worth a look, else None
    `traced=True`: masked_linear/conv2d given a mask tensor while torch.compile or export traces.
    """
    if facts.pop("traced", False):
        return _traced(op, _state.backend, device, **facts)
    return _CHOOSERS[op](op, _state.backend, device, **facts)


def _traced(op, name, device, *, dtype=None, supported=True, symmetric=True):
    """While a graph is traced the mask's values are unknown (a graph that baked in a density or layout
    would ignore later mask edits): it holds `<op>_runtime`, which takes the mask and, each time it
    runs, finds (or builds) its layout and asks `choose` with the facts and backend then in force.
    A forced kernel that cannot take the call raises now; no int padding pair: a mask multiply."""
    if name in ("cpu", "cuda", "triton"):
        require(op, name, device, dtype)
        if not supported:
            raise NotImplementedError(f"sparseops.{op}: the {name} kernel covers groups=1 and symmetric "
                                      "padding; use the auto or reference backend for this convolution")
    return "runtime" if symmetric else "mask_multiply"


def _soft_mask(op, name, device, *, numel=0, dtype=None, trial=None):
    if name == "reference":
        return "reference"
    if name in ("cpu", "cuda", "triton"):
        return require(op, name, device, dtype)
    prior = _kernel_here(op, device, dtype) or "reference"
    if name != "auto":
        return prior
    # Eager torch (the reference) is the dense candidate: the fused kernel runs only where it wins.
    return _measured(op, device, dtype, (numel,), 0.0, ["reference", prior], prior, "reference", trial)


def _dense_fallback(name: str, full: bool, numel: int) -> str:
    if full:  # nothing pruned (IMP's level 0): exactly nn.Linear
        return "unmasked"
    if name == "auto" and numel <= SMALL_WEIGHT:
        # Small layers: the op's Python autograd costs more than the masked copy of w that plain
        # autograd keeps (what torch.nn.utils.prune does); large ones keep the memory.
        return "mask_multiply"
    return "dense"


# Denser: only the dense paths race (the kernel lost 1.5-1.9x at 0.5; torch.sparse 7x, 1.0-1.5x at 0.1).
MEASURE_MAX_DENSITY, TORCH_SPARSE_MAX_DENSITY = 0.5, 0.25


def _torch_sparse_here(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether torch.sparse's CSR matmul (MKL on the CPU, cuSPARSE on GPUs) takes this call."""
    ok = dtype in (torch.float32, torch.float64) or (device.type == "cuda" and dtype in (torch.float16,
                                                                                          torch.bfloat16))
    return ok and device.type in ("cpu", "cuda")


def _measured(op, device, dtype, problem, density, candidates, prior, dense, trial):
    """`auto`'s measured choice among `candidates` (tuning.pick), or `prior` where there is nothing to
    measure, nor where the prior is the channel path (it wins there: only the correctness guard runs)."""
    candidates = list(dict.fromkeys(c for c in candidates if c))
    if trial is None or dtype is None or len(candidates) < 2 or tracing():
        return prior  # (nothing is measured or looked up while torch.compile or export traces)
    key = tuning.key(op + ("" if trial.train else ":infer"), device, dtype, problem, density)
    with tuning.measuring(False) if prior == "channels" else contextlib.nullcontext():
        return tuning.pick(op, key, device, dtype, candidates, prior, dense, trial)


def _masked_linear(op, name, device, *, density, shape, full, numel, rows=1, dtype=None, channels=None, trial=None):
    if name == "reference":
        return "reference"
    if name in ("cpu", "cuda", "triton"):
        return require(op, name, device, dtype)
    channel, channel_key = _channels(name, full, channels)
    dense = _dense_fallback(name, full, numel)
    kernel = _kernel_here(op, device, dtype) if name == "auto" else None
    if kernel is not None and kernel != "cpu":
        kernel = gpu_kernel(op, device, shape, density)
    prior = dense if kernel is None or density > max_density(op, device.type, shape) else kernel
    prior = channel if channel and channels <= CHANNEL_MAX_WORK else prior
    if name != "auto" or full:
        return prior
    other = "torch_sparse" if _torch_sparse_here(device, dtype) and density <= TORCH_SPARSE_MAX_DENSITY else None
    # Both dense paths compute the same; which is faster (the op's recomputed masked weight against
    # plain autograd's saved copy) depends on the layer and the machine.
    alt = "mask_multiply" if dense == "dense" else "dense"
    sparse = [kernel, other] if density <= MEASURE_MAX_DENSITY else []  # denser: only the dense paths race
    problem = (tuning.rows_bucket(rows), *shape, *channel_key)
    return _measured(op, device, dtype, problem, density, [dense, alt, *sparse, channel], prior, dense, trial)


def _channels(name: str, full: bool, channels: float | None):
    """("channels" where `auto` may run a mask of kept work fraction `channels` (thresholds.py: taken
    unmeasured up to CHANNEL_MAX_WORK, measured up to CHANNEL_MEASURE_MAX_WORK), else None; its bucket
    ("c<per mille>") in the tuning key: measured once per bucket, guarded once per layer)."""
    if name != "auto" or full or channels is None or channels > CHANNEL_MEASURE_MAX_WORK:
        return None, ()
    return "channels", (f"c{int(1000 * tuning.density_bucket(channels))}",)


def _block(op, name, device, *, tile_density, dtype=None):
    if name == "reference":
        return "reference"
    if name == "triton" or (name == "auto" and device.type == "cuda" and _takes(op, "triton", device, dtype)
                            and triton_unavailable(device) is None and tile_density <= max_density(op, "cuda")):
        return require(op, "triton", device, dtype)
    return "element"


def _masked_conv2d(op, name, device, *, density, shape, full, supported, unit_stride, reduction, plane,
                   block=False, tile_density=1.0, problem=None, dtype=None, channels=None, trial=None):
    if block and supported and _block("masked_conv2d_block", name, device, tile_density=tile_density,
                                      dtype=dtype) == "triton":
        return "triton_block"
    if name in ("cpu", "cuda", "triton"):
        require(op, name, device, dtype)
        if not supported:
            raise NotImplementedError(f"sparseops.{op}: the {name} kernel covers groups=1 and symmetric "
                                      "padding; use the auto or reference backend for this convolution")
        return name
    if name == "reference":
        return "reference"
    channel, channel_key = _channels(name, full, channels if supported else None)
    dense = "unmasked" if full else "mask_multiply"
    if name != "auto" or not supported:
        return dense
    kernel = None
    if device.type == "cpu" and has_kernel(op, "cpu"):
        kernel = "cpu" if _takes(op, "cpu", device, dtype) else None
    elif device.type == "cuda":
        kernel = gpu_kernel(op, device, shape, density)
    prior = dense
    if kernel is not None and density <= max_density(op, device.type, plane=plane):
        # Measured (bench_masked_conv2d.py): on the CPU strided convolutions lose at 90-95% sparsity
        # (dx works on the stride-dilated grad) and so do layers with tiny C_in*kh*kw (a 3-channel
        # input layer); the prior keeps both dense, measuring may still find them faster.
        prior = kernel if device.type != "cpu" or (unit_stride and reduction >= 64) else dense
    prior = channel if channel and channels <= CHANNEL_MAX_WORK else prior
    if full:
        return prior
    problem = (*(problem or ()), *channel_key)
    candidates = [dense, kernel if density <= MEASURE_MAX_DENSITY else None, channel]
    return _measured(op, device, dtype, problem, density, candidates, prior, dense, trial)


def _fused(op, name, device, supported, dtype=None):
    """Whether the soft mask runs fused into the GEMM (Triton): forced, or in `auto` on a GPU where
    it was measured faster than soft_mask + the dense op."""
    if name == "triton":
        require(op, "triton", device, dtype)
        if not supported:
            raise NotImplementedError(f"sparseops.{op}: the triton kernel covers groups=1 and "
                                      "symmetric padding; use the auto or reference backend for this convolution")
        return True
    return (supported and name == "auto" and device.type == "cuda" and measured_faster(op, "cuda")
            and _takes(op, "triton", device, dtype) and triton_unavailable(device) is None)


def _soft_masked(op, name, device, *, nonzero, supported=True, dtype=None):
    if name == "reference":
        return "reference"
    if _fused(op, name, device, supported, dtype):
        return "triton"
    if name in ("auto", "cpu") and device.type == "cpu":
        # Late in CS most of the mask underflows to exactly 0: those entries contribute 0 and get
        # exactly 0 gradient, so running the masked op over the others is exact.
        stats = nonzero()
        masked = "masked_conv2d" if op == "soft_masked_conv2d" else "masked_linear"
        if stats is not None and stats.density <= max_density(masked, "cpu", stats.shape):
            return "skip_zeros"
    return "unfused"


class _Module(types.ModuleType):
    """`sparseops.backend` is this module and, called, the `backend(...)` context manager, so that
    both `with sparseops.backend("cpu"):` and `sparseops.backend.choose(...)` read naturally."""

    def __call__(self, name: str | None = None, *, max_density: float | None = None):
        return backend(name, max_density=max_density)


sys.modules[__name__].__class__ = _Module

_CHOOSERS = {
    "soft_mask": _soft_mask,
    "soft_mask_l1": _soft_mask,
    "soft_mask_with_l1": _soft_mask,
    "masked_linear": _masked_linear,
    "masked_linear_block": _block,
    "masked_conv2d": _masked_conv2d,
    "soft_masked_linear": _soft_masked,
    "soft_masked_conv2d": _soft_masked,
}
