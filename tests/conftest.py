import contextlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, replace

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter (on CPU tensors): set before
# sparseops imports them (on first use), so that the `triton` implementation of the
# `impl` fixture executes them in CI.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `auto` measures implementations on first use (sparseops.tuning); the tests check the prior's
# choices, so measuring is off unless a test turns it on, and nothing touches the user's cache.
os.environ.setdefault("SPARSEOPS_TUNE", "0")
os.environ.setdefault("SPARSEOPS_CACHE_DIR", tempfile.mkdtemp(prefix="sparseops-test-cache-"))

import sparseops  # noqa: F401,E402  (registers the ops)

SUPPORTED_ISAS = list(torch.ops.sparseops._cpu_isa_supported())


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Runs a test once per CPU kernel variant this machine can execute."""
    previous = torch.ops.sparseops._set_cpu_isa(request.param)
    yield request.param
    torch.ops.sparseops._set_cpu_isa(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def one_thread():
    """Tiny searches: on a loaded 2-core machine one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_mask(shape, sparsity, generator=None):
    if sparsity <= 0:
        return torch.ones(shape, dtype=torch.bool)
    if sparsity >= 1:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator) >= sparsity


# ---------------------------------------------------------------------------------------------
# The implementations an op test runs on (the `impl` fixture)

GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton runs on CUDA tensors where a GPU exists, else under the interpreter on CPU tensors
TRITON_DEVICE = "cuda" if GPU else "cpu"
TRITON_INTERPRETED = not GPU
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

_F64, _F32, _F16, _BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# (rtol, atol) per implementation and dtype, against the reference run in float64
TOLERANCES = {
    "cpu": {_F64: (1e-12, 1e-12), _F32: (1e-4, 1e-4)},
    "reference": {_F64: (1e-12, 1e-12), _F32: (1e-4, 1e-4)},
    "triton": {_F64: (1e-10, 1e-10), _F32: (1e-4, 1e-4), _F16: (1e-2, 1e-2), _BF16: (5e-2, 5e-2)},
    "cuda": {_F64: (1e-10, 1e-10), _F32: (1e-4, 1e-4), _F16: (2e-3, 1e-3), _BF16: (1.6e-2, 1e-2)},
}


@dataclass(frozen=True)
class Impl:
    """One implementation of the ops: the device its tensors live on, the backend name that forces
    it, the dtypes it takes and its tolerances against the reference."""
    name: str  # cpu, reference, triton, cuda
    backend: str  # forced with sparseops.backend(backend)
    device: str
    dtypes: tuple
    interpreted: bool = False  # Triton under TRITON_INTERPRET=1: small shapes only, it is slow
    isa: str | None = None  # the CPU kernel variant, where a test runs once per ISA

    @property
    def dot64(self):
        """The wide dtype of the tl.dot kernels (block, fused soft mask): float64 only under the
        interpreter (and on the CPU), float32 on a GPU."""
        return torch.float64 if self.device == "cpu" else torch.float32

    def force(self):
        return sparseops.backend(self.backend)

    def tol(self, dtype) -> dict:
        rtol, atol = TOLERANCES[self.name][dtype]
        return {"rtol": rtol, "atol": atol}

    def leaf(self, *shape, dtype=torch.float64, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, device=self.device) * scale).requires_grad_()

    def check(self, out, inputs, ref_fn, dtype):
        """Values and every input gradient of `out` against `ref_fn` run on float64 copies of `inputs`.
        In half precision the absolute tolerance scales with the largest value: kernels that round an
        operand (the fused soft mask rounds w*m to the input dtype) err by about sqrt(K) ulps of the
        output's scale, also where an element cancels to near 0."""
        ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
        ref = ref_fn(*ref_inputs)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, inputs, g.to(out.dtype), retain_graph=True)
        want = torch.autograd.grad(ref, ref_inputs, g)
        for a, r in zip((out, *got), (ref, *want), strict=True):
            tol = self.tol(dtype)
            if dtype in (torch.float16, torch.bfloat16):
                tol["atol"] *= max(1.0, float(r.abs().max()))
            torch.testing.assert_close(a.double(), r.detach(), **tol)
        return ref_inputs


IMPLS = {
    "cpu": Impl("cpu", "cpu", "cpu", (_F64, _F32)),
    "reference": Impl("reference", "reference", "cpu", (_F64, _F32)),
    "triton": Impl("triton", "triton", TRITON_DEVICE, (_F64, _F32) if TRITON_INTERPRETED else (_F64, _F32, _F16, _BF16),
                   interpreted=TRITON_INTERPRETED),
    "cuda": Impl("cuda", "cuda", "cuda", (_F64, _F32, _F16, _BF16)),
}
TRITON = IMPLS["triton"]
_MARKS = {"cpu": (), "reference": (), "triton": (needs_triton,), "cuda": (pytest.mark.cuda, needs_gpu)}


def impl_params(cases=None, *, small=None, per_isa=False, only=None, ids=None):
    """Parameters for `@pytest.mark.parametrize("impl", ..., indirect=True)` (cases None), or for
    `("impl,case", ..., indirect=["impl"])`: every case for every implementation in `only`, except
    that Triton under the interpreter runs only the `small` cases (when given). per_isa: the CPU
    kernel once per ISA variant this machine runs."""
    out = []
    for name in only or IMPLS:
        variants = [f"cpu-{isa}" for isa in SUPPORTED_ISAS] if name == "cpu" and per_isa else [name]
        for variant in variants:
            if cases is None:
                out.append(pytest.param(variant, id=variant, marks=_MARKS[name]))
                continue
            use = small if name == "triton" and TRITON_INTERPRETED and small is not None else cases
            for i, case in enumerate(use):
                out.append(pytest.param(variant, case, id=f"{variant}-{ids(case) if ids else i}", marks=_MARKS[name]))
    return out


@pytest.fixture(params=impl_params())
def impl(request):
    """An implementation the ops run on here (cpu, reference, triton, cuda where a GPU exists)."""
    name, _, isa = request.param.partition("-")
    if not isa:
        yield IMPLS[name]
        return
    previous = torch.ops.sparseops._set_cpu_isa(isa)
    try:
        yield replace(IMPLS[name], isa=isa)
    finally:
        torch.ops.sparseops._set_cpu_isa(previous)


def block_mask(n, k, block, keep_tiles, partial, device=TRITON_DEVICE):
    """A mask whose kept entries fill a random `keep_tiles` fraction of the tiles (partly, if asked)."""
    tiles = torch.rand(-(-n // block), -(-k // block)) < keep_tiles
    mask = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (mask & (torch.rand(n, k) < 0.7) if partial else mask).to(device)


# ---------------------------------------------------------------------------------------------
# The CUDA C++ kernels' tests: the ops called through torch.ops.sparseops.* with the layout's index
# tensors moved to the GPU. Inputs are made in the test dtype and the reference runs in float64 on
# the CPU on exactly those (rounded) values, so the only errors are the kernels' accumulation (fp32;
# fp64 for double) and one final rounding: float64 1e-10; float32 1e-4 (sums of up to a few hundred
# terms); float16 and bfloat16 a few units of their last place (2^-11, 2^-8) relative.
SPARSE_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-3),
              torch.bfloat16: (1.6e-2, 1e-2)}
INDEX_DTYPES = [torch.int32, torch.int64]


def cuda_layout(mask, index_dtype=torch.int32):
    """The CSR of `mask` (CPU-built, as the Python layer does) as CUDA index tensors of index_dtype."""
    from sparseops.layout import csr_layout

    return tuple(t.to(device="cuda", dtype=index_dtype) for t in csr_layout(mask).tensors())


def cuda_leaves(dtype, *shapes):
    """Random CPU tensors in dtype, and CUDA copies that require grad."""
    cpu = [torch.randn(*s, dtype=torch.float64).to(dtype) for s in shapes]
    return cpu, [t.cuda().requires_grad_() for t in cpu]


def compare_cuda_grads(outs, leaves, ref, ref_leaves, mask, dtype, w_index=1):
    """Backpropagates one random grad through both and compares every gradient."""
    rtol, atol = SPARSE_TOL[dtype]
    g = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
    outs.backward(g.cuda())
    ref.backward(g.double())
    for mine, theirs in zip(leaves, ref_leaves, strict=True):
        assert mine.grad.dtype == dtype and mine.grad.shape == mine.shape
        torch.testing.assert_close(mine.grad.cpu().double(), theirs.grad, rtol=rtol, atol=atol)
    dw = leaves[w_index].grad.cpu()
    assert bool((dw.reshape(mask.shape)[~mask] == 0).all()), "dw must be exactly zero at pruned entries"


@pytest.fixture
def tuning_on(tmp_path, monkeypatch):
    """auto's measuring on, over an empty cache in a private directory (the user's is untouched)."""
    from sparseops import tuning

    monkeypatch.setenv("SPARSEOPS_CACHE_DIR", str(tmp_path))
    tuning.clear(memory_only=True)
    with tuning.measuring(True):
        yield tmp_path
    tuning.clear(memory_only=True)
