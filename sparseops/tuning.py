"""Measured choice for `auto`: the fastest implementation of an op on the machine in use.

`backend.choose` hands `pick` the implementations that compute the same thing for a call (dense
torch, sparseops' kernel, torch.sparse) and a `trial(impl)` that runs one of them forward and
backward on (detached copies of) the call's own inputs. The first call for a key (op, device and
its name, dtype, problem shape, density bucket) times each candidate the way training runs it and
keeps the winner in memory and in a per-machine file in the user's cache directory; later calls
and later processes read it. The thresholds (thresholds.json) stay the prior: what runs where
measuring is off, and the order candidates are tried in.

Correctness guard: the first time an implementation other than the dense one runs for a key in a
process, its result is compared with the dense path's on the same inputs (computed in float64, so
that a kernel more exact than float32 torch is not taken for a wrong one); one that disagrees is
excluded for that key, with one warning naming it. So a kernel never run before (a new GPU) is a
safe candidate.

Reproducible: trials run on detached copies with a private random generator (no RNG state, no
parameter, no statistic changes), so measuring changes results only by the rounding of the
implementation chosen. Under `torch.use_deterministic_algorithms(True)`, with
`SPARSEOPS_TUNE=0` or `sparseops.tuning.measuring(False)`, choices come only from the cache and the
prior, so two runs take the same paths. Nothing is measured while torch.compile traces or a CUDA
graph captures.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from ._library import cpu_isa
from .tuning_cache import _Cache, _device_name, cache_dir, cache_file, machine  # noqa: F401  (cache_dir: public here)

_cache = _Cache()

_lock = threading.Lock()


def _env_measuring() -> bool:
    return os.environ.get("SPARSEOPS_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


class _State(threading.local):
    def __init__(self):
        self.measuring = _env_measuring()
        self.forced = False  # inside sparseops.tune(): measure even where a key is cached


_state = _State()


@contextlib.contextmanager
def measuring(enabled: bool = True, *, force: bool = False):
    """Turns measuring on or off inside a block (`force`: measure again even where cached)."""
    saved = (_state.measuring, _state.forced)
    _state.measuring, _state.forced = bool(enabled), bool(force)
    try:
        yield
    finally:
        _state.measuring, _state.forced = saved


def measuring_allowed(device: torch.device) -> bool:
    if not _state.measuring or torch.are_deterministic_algorithms_enabled():
        return False
    if torch.compiler.is_compiling():
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
    """Time this process has spent measuring (trials and correctness checks)."""
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        a64, b64 = a.detach().double(), b.detach().double()
        scale = float(b64.abs().max()) + 1e-30
        if not bool(torch.isfinite(a64).all() == torch.isfinite(b64).all()):
            return False
        # Relative to the largest magnitude, with a small absolute floor: where every value is tiny
        # (saturated sigmoids) float rounding of the reference itself dominates.
        if float((a64 - b64).nan_to_num(0.0).abs().max()) > tol * (scale + 1e-3):
            return False
    return True


def _timed(trial: Callable, impl: str, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = trial(impl)
    _sync(device)
    return time.perf_counter() - t0, out


# The implementations that compute densely: a mask denser than one where they won makes them win again.
DENSE_PATHS = frozenset({"dense", "mask_multiply", "unmasked", "reference", "unfused"})


def _split(k: str) -> tuple[str, float]:
    """(the key without its density bucket, the bucket)."""
    prefix, bucket = k.rsplit("|", 1)
    return prefix, float(bucket.removeprefix("d<="))


def _inferred(k: str, live: Sequence[str], entries: dict) -> tuple[str | None, list[str]]:
    """What the same call at other densities says, as a winner or fewer candidates. Time grows with
    density for the sparse paths and not for the dense ones: where dense won at a sparser mask it
    wins here; where a sparse path beat dense clearly at a denser mask, dense cannot win here."""
    prefix, bucket = _split(k)
    keep = list(live)
    trained = entries.get(k.replace(":infer|", "|", 1)) if ":infer|" in k else None
    if trained and trained.get("winner") in live:  # an evaluation pass runs what its training measured
        return trained["winner"], keep
    batchless = _without_batch(k.replace(":infer|", "|", 1))
    for other, e in entries.items():  # another batch size of this layer (a last, partial batch)
        if e.get("winner") in live and _without_batch(other.replace(":infer|", "|", 1)) == batchless:
            return e["winner"], keep
    if all(c in DENSE_PATHS for c in live):  # which dense path is faster does not depend on the mask
        for other, e in entries.items():
            times = e.get("times_ms", {})
            if "|d<=" in other and _split(other)[0] == prefix and all(c in times for c in live):
                return min(live, key=times.get), keep
    for other, e in entries.items():
        p2, b2 = _split(other) if "|d<=" in other else (None, 0.0)
        if p2 != prefix or e.get("winner") not in live:
            continue
        times = e.get("times_ms", {})
        dense_best = min((t for i, t in times.items() if i in DENSE_PATHS), default=None)
        if b2 < bucket and e["winner"] in DENSE_PATHS:
            return e["winner"], keep
        if b2 > bucket and e["winner"] not in DENSE_PATHS and dense_best is not None \
                and times.get(e["winner"], dense_best) <= 0.8 * dense_best:
            keep = [c for c in keep if c not in DENSE_PATHS]
    return None, _undominated(prefix, bucket, keep, entries)


# Implementations of one kind keep their order across densities (the dense paths do the same work
# at any density; the sparse ones all scale with the kept weights): one that lost to another of its
# kind by this margin at the nearest density timed with both is not timed again.
_DOMINATED = {True: 1.15, False: 1.4}


def _undominated(prefix: str, bucket: float, keep: list[str], entries: dict) -> list[str]:
    for dense_kind, margin in _DOMINATED.items():
        kind = [c for c in keep if (c in DENSE_PATHS) == dense_kind]
        if len(kind) < 2:
            continue
        timed = [(abs(math.log(b / bucket)), e["times_ms"]) for other, e in entries.items() if "|d<=" in other
                 for p, b in [_split(other)] if p == prefix and all(c in e.get("times_ms", {}) for c in kind)]
        if timed:
            times = min(timed, key=lambda t: t[0])[1]
            best = min(times[c] for c in kind)
            keep = [c for c in keep if c not in kind or times[c] <= margin * best]
    return keep


def pick(op: str, k: str, device: torch.device, dtype: torch.dtype, candidates: Sequence[str], prior: str,
         dense: str, trial: Callable | None) -> str:
    """The implementation to run for key `k`: the cached winner, else (measuring allowed and a
    `trial` given) the fastest candidate that agrees with `dense`, else `prior`. Candidates that
    failed the guard for this key are never returned."""
    with _lock:
        entries_now = _cache.load()
        cached = entries_now.get(k)
        excluded = _cache.excluded.setdefault(k, set())
    live = [c for c in candidates if c not in excluded]
    if prior not in live:
        prior = dense
    measure = trial is not None and len(live) > 1 and measuring_allowed(device) and (
        _state.forced or cached is None or cached.get("winner") not in live)
    if not measure:
        choice = cached["winner"] if cached and cached.get("winner") in live else prior
        if choice not in DENSE_PATHS and trial is not None and not torch.compiler.is_compiling():
            choice = _guard(op, k, device, dtype, choice, dense, trial)
        return choice
    start = time.perf_counter()
    times: dict[str, float] = {}
    winner, timed = (None, live) if _state.forced else _inferred(k, live, entries_now)
    try:
        if winner is None and len(timed) == 1:
            winner = timed[0]
        if winner is None:
            layer = _shape(k)
            for impl in timed:
                # One-time costs stay out of the timed run: a candidate's first run in this process
                # (first touches of its buffers) is untimed, and a sparse one builds this mask's
                # layout in the check, that run, or else a few-row run first.
                unchecked = impl not in DENSE_PATHS and (layer, impl) not in _cache.guarded
                if unchecked and not _check(op, k, device, dtype, impl, dense, trial):
                    continue
                if (layer, impl) not in _cache.warm:
                    trial(impl)
                    _cache.warm.add((layer, impl))
                elif impl not in DENSE_PATHS and not unchecked:
                    trial(impl, rows=CHECK_ROWS)
                times[impl] = _timed(trial, impl, device)[0]
            best = min(times.values())
            for impl in list(times):  # close calls get one more run: noise decides less often
                if times[impl] <= 1.3 * best:
                    times[impl] = min(times[impl], _timed(trial, impl, device)[0])
            winner = min(times, key=times.get)
        elif winner not in DENSE_PATHS:
            winner = _guard(op, k, device, dtype, winner, dense, trial)
    finally:
        _cache.measured_s += time.perf_counter() - start
    with _lock:
        _cache.touched.append(k)
        _cache.load()[k] = {"winner": winner, "times_ms": {i: round(t * 1e3, 4) for i, t in times.items()},
                            "prior": prior, **({} if times else {"inferred": True})}
        _cache.save()
    return winner


def _without_batch(k: str) -> str:
    """The key without its first problem size (the batch rows)."""
    parts = k.split("|")
    if len(parts) >= 4:
        parts[3] = parts[3].partition("x")[2]
    return "|".join(parts)


def _shape(k: str) -> str:
    """The guard's key: the layer without its density, batch and channel-work bucket (a kernel right for
    one is right for all)."""
    return re.sub(r"xc\d+$", "", _without_batch(_split(k)[0].replace(":infer", "", 1) if "|d<=" in k else k))


# The correctness check runs this many rows of the call (every kept weight, a fraction of the cost).
CHECK_ROWS = 16


def _check(op: str, k: str, device: torch.device, dtype: torch.dtype, impl: str, dense: str,
           trial: Callable) -> bool:
    """`impl` against the dense path in float64 on a few rows, once per layer and process; one that
    disagrees is excluded for `k`."""
    ok = agrees(trial(impl, rows=CHECK_ROWS), trial(dense, exact=True, rows=CHECK_ROWS), dtype)
    _cache.guarded.add((_shape(k), impl))
    if not ok:
        _exclude(op, k, impl)
    return ok


def _guard(op: str, k: str, device: torch.device, dtype: torch.dtype, impl: str, dense: str,
           trial: Callable) -> str:
    if (_shape(k), impl) in _cache.guarded:
        return impl
    start = time.perf_counter()
    try:
        ok = _check(op, k, device, dtype, impl, dense, trial)
    finally:
        _cache.measured_s += time.perf_counter() - start
    return impl if ok else dense


def _exclude(op: str, k: str, impl: str) -> None:
    _cache.excluded.setdefault(k, set()).add(impl)
    if (k, impl) not in _cache.warned:
        _cache.warned.add((k, impl))
        warnings.warn(f"sparseops.{op}: the {impl!r} implementation disagrees with the dense result for {k}; "
                      "it is excluded for this shape (please report this)", RuntimeWarning, stacklevel=5)


# ---- measuring ahead of time ----------------------------------------------------------------


def tune(model: torch.nn.Module, example_inputs, *, loss_fn: Callable | None = None) -> dict[str, dict]:
    """Measures every sparseops op of `model` for these inputs now (forward and, if the model has
    trainable parameters, backward), so that training starts on the measured choices; returns the
    entries measured. The model is left as it was: gradients, buffers (BatchNorm statistics) and the
    RNG state are restored."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparseops.tune: model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    grads = {p: p.grad for p in model.parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    first = len(_cache.touched)
    try:
        with measuring(True, force=True):
            out = model(*inputs)
            loss = loss_fn(out) if loss_fn is not None else _sum(out)
            if loss.requires_grad:
                loss.backward()
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        torch.set_rng_state(rng)
    now = entries()
    return {k: now[k] for k in dict.fromkeys(_cache.touched[first:]) if k in now}


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
