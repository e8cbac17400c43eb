"""Measured choice for `auto`: the fastest implementation of an op on the machine in use.

`backend.choose` hands `pick` the implementations that compute the same thing for a call (dense
torch, sparseops' kernel, torch.sparse) and the call's `trial` (ops/_common.trial). The first calls
for a key (op, device and its name, dtype, problem shape, density bucket) measure: each runs one
candidate, timed the way training runs it (forward and backward, on the call's own inputs), until
each has been timed a few times; the fastest is kept in memory and in a per-machine file in the
user's cache directory, and later calls and later processes run it. Measuring inside the calls
costs only what the slower candidates took on them, no extra runs (sparseops.tune and
`python -m sparseops tune` do the same ahead of time). The thresholds (thresholds.json) stay the
prior: what runs where measuring is off, and the first candidate measured.

Correctness guard: the first time an implementation other than a dense one runs for a layer in a
process, its result on a few rows of the call is compared with the dense path's (on detached
copies; half-precision ones in float32, so that a kernel more exact than half-precision torch is
not taken for a wrong one; float64 was tried and dropped: it cost 150-170 ms per check on a
2048x2048 layer, for a tolerance of 1e-3 that float32 rounding never nears); one that disagrees (or raises) is
excluded for that layer, with one warning naming it. So a kernel never run before (a new GPU) is a
safe candidate.

Reproducible: measuring changes results only by the rounding of the implementation each call ran
(the checks run on detached copies with a private random generator: no RNG state, parameter or
statistic changes). Under `torch.use_deterministic_algorithms(True)`, with `SPARSEOPS_TUNE=0` or
`sparseops.tuning.measuring(False)`, choices come only from the cache and the prior, so two runs
take the same paths. Nothing is measured while torch.compile traces or a CUDA graph captures.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from . import tuning_infer as infer
from ._library import cpu_isa, saved_tensors_hooked
from .tuning_infer import DENSE_PATHS  # noqa: F401  (public here)
from .tuning_sample import Measuring, Sample, a_candidate_runs, inside_a_run
from .tuning_cache import _Cache, _device_name, cache_dir, cache_file, machine  # noqa: F401  (cache_dir: public here)

_cache = _Cache()

_lock = threading.Lock()


def _env_measuring() -> bool:
    return os.environ.get("SPARSEOPS_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


class _State(threading.local):
    def __init__(self):
        self.measuring = _env_measuring()
        self.forced: set[str] | None = None  # inside sparseops.tune(): the keys measured again, cached or not


_state = _State()


@contextlib.contextmanager
def measuring(enabled: bool = True, *, force: bool = False):
    """Turns measuring on or off inside a block (`force`: measure again even where cached)."""
    saved = (_state.measuring, _state.forced)
    _state.measuring, _state.forced = bool(enabled), (set() if force else None)
    try:
        yield
    finally:
        _state.measuring, _state.forced = saved


def measuring_allowed(device: torch.device) -> bool:
    if not _state.measuring or torch.are_deterministic_algorithms_enabled():
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():  # (vmap, grad: no timing)
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def clear(memory_only: bool = False) -> None:
    """Forgets what was measured (and, unless `memory_only`, deletes this machine's file)."""
    with _lock:
        if not memory_only:
            with contextlib.suppress(OSError):
                cache_file().unlink()
        _cache.__init__()


def entries() -> dict[str, dict]:
    """What is cached for this machine: key -> {"winner", "times_ms", ...}."""
    with _lock:
        return dict(_cache.load())


def measured_seconds() -> float:
    """Time this process has spent measuring: the correctness checks, and what the measured calls
    took beyond the winner's time."""
    return _cache.measured_s


# ---- keys, trials, the choice ---------------------------------------------------------------

_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def density_bucket(density: float) -> float:
    return next(b for b in _BUCKETS if density <= b)


def rows_bucket(rows: int) -> int:
    """Batch rows rounded up to a power of two: one measurement serves nearby batch sizes."""
    return 1 << max(0, math.ceil(math.log2(max(rows, 1))))


def key(op: str, device: torch.device, dtype: torch.dtype, shape: Sequence[int], density: float) -> str:
    name = _device_name(device) if device.type == "cuda" else cpu_isa()
    dims = "x".join(s if isinstance(s, str) else str(int(s)) for s in shape)  # (a str: a tagged bucket, "c500")
    return f"{op}|{device.type}:{name}|{str(dtype).removeprefix('torch.')}|{dims}|d<={density_bucket(density):g}"


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-3}.get(dtype, 3e-2)


def agrees(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], dtype: torch.dtype) -> bool:
    """Every output within a tolerance relative to the largest magnitude of the reference result,
    the same values finite. A guard against wrong kernels, not a unit test of rounding."""
    tol = _tolerance(dtype)
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return False
        if a.numel() == 0:
            continue
        # In the wider of the two dtypes, float32 at least (float64 copies of a 2048x2048 dw cost ~100 ms),
        # with one temporary: the difference.
        wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        a, b = a.detach().to(wide), b.detach().to(wide)
        # (the largest magnitude is inf or NaN exactly where some value is not finite: one pass each)
        top_a, scale = float(torch.linalg.vector_norm(a, math.inf)), float(torch.linalg.vector_norm(b, math.inf))
        if math.isfinite(top_a) != math.isfinite(scale):
            return False
        if not math.isfinite(scale):  # both hold non-finite values: nothing to scale a difference by
            continue
        # Relative to the largest magnitude, with a small absolute floor: where every value is tiny
        # (saturated sigmoids) float rounding of the reference itself dominates.
        if not float(torch.linalg.vector_norm(a - b, math.inf)) <= tol * (scale + 1e-30 + 1e-3):
            return False
    return True


# ---- measuring in the calls themselves (tuning_sample) ----------------------------------------

def _record(m: Measuring, impl: str, seconds: float, timed: bool) -> None:
    with _lock:
        if not m.decided:
            m.record(impl, seconds, timed)
            _cache.warm.add((m.layer, impl))  # (its buffers' first touches are behind it, for every mask)
            if m.next() is None and not m.waiting():
                _decide(m)


def _decide(m: Measuring, prior: str | None = None) -> str:
    """The fastest candidate measured (else `prior`, else the first), cached and written (under _lock)."""
    best = m.best()
    winner = min(best, key=best.get) if best else (prior or m.order[0])
    m.decided = True
    _cache.exploring.pop(m.k, None)
    cost = sum(s - best.get(winner, s) for s in m.spent if s > best.get(winner, s))
    _cache.measured_s += cost
    _store(m.k, {"winner": winner, "times_ms": {i: round(t * 1e3, 4) for i, t in best.items()},
                 "calls": len(m.spent), "cost_ms": round(cost * 1e3, 2)})
    return winner


def _store(k: str, entry: dict) -> None:
    """Caches `entry` for key `k` in memory and the machine's file (under _lock)."""
    _cache.touched.append(k)
    _cache.load()[k] = entry
    _cache.save()


def pick(op: str, k: str, device: torch.device, dtype: torch.dtype, candidates: Sequence[str], prior: str,
         dense: str, trial: Callable | None) -> str:
    """The implementation to run for key `k`: the cached winner; else, measuring allowed and a `trial`
    given, the candidate this call measures (`trial.sample` then times the call), or the winner once
    measured; else `prior`. Candidates that failed the guard for this layer are never returned."""
    with _lock:
        entries_now = _cache.load()
        cached = entries_now.get(k)
        excluded = set(_cache.excluded.get(infer.layer(k), ()))
        m = _cache.exploring.get(k)
        # A non-reentrant checkpoint runs the call again in the backward and compares what each run
        # saved: under saved-tensor hooks a key runs one implementation for the process, unmeasured.
        hooked = saved_tensors_hooked()
        pinned = _cache.pinned.get(k) if hooked else None
        if pinned is not None:
            return pinned
        restart = _state.forced is not None and k not in _state.forced
        if restart:
            _state.forced.add(k)
            _cache.exploring.pop(k, None)
            m = None
    live = [c for c in candidates if c not in excluded]
    if prior not in live:
        prior = dense
    measure = trial is not None and not hooked and not inside_a_run() and len(live) > 1 and \
        measuring_allowed(device) and (m is not None or restart or cached is None or
                                       cached.get("winner") not in live) and _plain(trial.tensors)
    if not measure:
        choice = cached["winner"] if cached and cached.get("winner") in live else prior
        choice = _guard(op, k, device, dtype, choice, dense, trial)
        if hooked:
            with _lock:
                choice = _cache.pinned.setdefault(k, choice)
        return choice
    if m is None:
        winner, timed = (None, live) if restart else infer.inferred(k, live, entries_now)
        if winner is None and len(timed) == 1:
            winner = timed[0]
        if winner is not None:
            with _lock:
                _store(k, {"winner": winner, "times_ms": {}, "inferred": True})
            return _guard(op, k, device, dtype, winner, dense, trial)
        order = [prior, *(c for c in timed if c != prior)] if prior in timed else timed
        layer = infer.layer(k)
        m = Measuring(k, layer, order, {c for c in order if (layer, c) in _cache.warm})
        with _lock:  # (another thread may have met the key meanwhile: one Measuring per key)
            m = _cache.exploring.setdefault(k, m)
    while True:
        with _lock:
            impl = None if m.decided else m.next()
            if impl is None and not m.decided and m.waiting():  # the samples handed out are enough for now
                best = m.best()
                untimed = min(best, key=best.get) if best else prior
                break  # (impl None: this call runs it untimed)
            if impl is None:
                return _cache.load()[k]["winner"] if m.decided else _decide(m, prior)
            m.calls[impl] += 1
        if impl in DENSE_PATHS:
            break
        checked = (m.layer, impl) in _cache.guarded
        if _guard(op, k, device, dtype, impl, dense, trial) == impl:
            if checked and m.calls[impl] == 1:  # this mask's layout, built before the timed call (the check built it)
                start = time.perf_counter()
                trial.prepare(impl)
                _cache.measured_s += time.perf_counter() - start
            with _lock:  # (its first run on the layer was the check's: this call is timed)
                m.warm.add(impl)
            break
        with _lock:
            m.times.pop(impl, None), m.calls.pop(impl, None)
            m.order.remove(impl)
    if impl is None:
        return _guard(op, k, device, dtype, untimed, dense, trial)
    with _lock:
        trial.sample = m.hand_out(Sample(m, impl, device, trial.train, _record))
    return impl


def _plain(tensors) -> bool:
    """Whether a call's tensors are plain (tensor subclasses, DTensor under FSDP2 say, run the cached or
    prior choice: their calls are not timed)."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors if isinstance(t, torch.Tensor))


# The correctness check runs this many rows of the call (every kept weight, a fraction of the cost).
CHECK_ROWS = 16


def _check(op: str, k: str, device: torch.device, dtype: torch.dtype, impl: str, dense: str,
           trial: Callable) -> bool:
    """`impl` against the dense path (float32 at least) on a few rows, once per layer and process; one
    that disagrees (or raises) is excluded for the layer."""
    with a_candidate_runs():
        try:
            got, failed = trial(impl, rows=CHECK_ROWS), None
        except Exception as exc:  # noqa: BLE001  (a candidate's failure must not become the call's)
            got, failed = None, f"{type(exc).__name__}: {exc}"
        ok = got is not None and agrees(got, trial(dense, exact=True, rows=CHECK_ROWS), dtype)
    _cache.guarded.add((infer.layer(k), impl))
    if not ok:
        _exclude(op, k, impl, failed)
    return ok


def _guard(op: str, k: str, device: torch.device, dtype: torch.dtype, impl: str, dense: str,
           trial: Callable | None) -> str:
    """`impl`, checked once per layer and process where it is not a dense path; `dense` if it disagrees."""
    if impl in _cache.excluded.get(infer.layer(k), ()):  # (it failed for another density of the layer)
        return dense
    if impl in DENSE_PATHS or trial is None or torch.compiler.is_compiling() or \
            (infer.layer(k), impl) in _cache.guarded:
        return impl
    start = time.perf_counter()
    try:
        ok = _check(op, k, device, dtype, impl, dense, trial)
    finally:
        _cache.measured_s += time.perf_counter() - start
    return impl if ok else dense


def _exclude(op: str, k: str, impl: str, failed: str | None = None) -> None:
    _cache.excluded.setdefault(infer.layer(k), set()).add(impl)  # (for every density of the layer)
    if (k, impl) not in _cache.warned:
        _cache.warned.add((k, impl))
        what = f"failed ({failed})" if failed else "disagrees with the dense result"
        warnings.warn(f"sparseops.{op}: the {impl!r} implementation {what} for {k}; "
                      "it is excluded for this layer (please report this)", RuntimeWarning, stacklevel=5)


# ---- measuring ahead of time ----------------------------------------------------------------


def until_measured(step: Callable[[], None], passes: int = 40) -> list[str]:
    """Runs `step` (the calls to measure, forward and backward) until every key it meets is measured,
    cached ones again (at most `passes` times); returns those keys."""
    first = len(_cache.touched)
    with measuring(True, force=True):
        for _ in range(passes):
            step()
            if not _state.forced & set(_cache.exploring):
                break
    return list(dict.fromkeys(_cache.touched[first:]))


def tune(model: torch.nn.Module, example_inputs, *, loss_fn: Callable | None = None) -> dict[str, dict]:
    """Measures every sparseops op of `model` for these inputs now (forward and, if the model has
    trainable parameters, backward; as many steps as measuring takes), so that training starts on
    the measured choices; returns the entries measured. The model is left as it was: gradients,
    buffers (BatchNorm statistics) and the RNG state are restored."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparseops.tune: model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    grads = {p: p.grad for p in model.parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()

    def step():
        out = model(*inputs)
        loss = loss_fn(out) if loss_fn is not None else _sum(out)
        if loss.requires_grad:
            loss.backward()

    try:
        keys = until_measured(step)
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        torch.set_rng_state(rng)
    now = entries()
    return {k: now[k] for k in keys if k in now}


def _sum(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [_sum(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))]
        return torch.stack(parts).sum() if parts else torch.zeros(())
    if hasattr(out, "logits"):
        return out.logits.float().sum()
    raise TypeError(f"sparseops.tune: cannot reduce the model's output ({type(out).__name__}); pass loss_fn")
