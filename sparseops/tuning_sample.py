"""Measuring a key in its own calls (sparseops.tuning): which candidate each call runs, and timing
that call forward and backward.

Each call runs one candidate (the prior first, then in turn) on the call's own inputs, timed
forward and, where it trains, backward: from the output's gradient arriving to the inputs'
gradients leaving. So measuring costs no extra runs, only the calls a slower candidate took. A
dense candidate's first call for a layer in a process is untimed (first touches of its buffers; a
sparse one's first run is tuning's few-row check, and a new mask's layout is built before its first
call), and one far behind the best after its first timed call is not run again."""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SAMPLES, CLOSE_SAMPLES, CLOSE, DROP = 2, 3, 1.15, 1.5  # timed calls each; more within CLOSE of the best

_runs = threading.local()


@contextlib.contextmanager
def a_candidate_runs():
    """Marks a candidate's run for a check or a timed call. An op it calls inside (the masked op a
    mostly-zero soft mask runs, the element-wise op of the channel path) is part of that run: measured
    there, its own measuring would start in calls that may never come again and stay open."""
    _runs.depth = getattr(_runs, "depth", 0) + 1
    try:
        yield
    finally:
        _runs.depth -= 1


def inside_a_run() -> bool:
    return getattr(_runs, "depth", 0) > 0


class Measuring:
    """A key being measured: the candidates, what each call took, which candidate runs next."""

    def __init__(self, k: str, layer: str, candidates: Sequence[str], warm: set[str]):
        self.k, self.layer, self.order = k, layer, list(candidates)
        self.calls = dict.fromkeys(self.order, 0)
        self.times: dict[str, list[float]] = {c: [] for c in self.order}
        self.warm = set(warm)  # candidates whose next call is timed (their first one is not)
        self.spent: list[float] = []  # every timed call, untimed-first ones included: the cost
        # Samples handed out and not recorded yet: many calls of a key can run before one backward (a
        # model's repeated blocks, gradient accumulation). One whose graph is freed unrun drops out.
        self.pending: weakref.WeakSet[Sample] = weakref.WeakSet()
        self.decided = False

    def waiting(self, impl: str | None = None) -> int:
        return sum(1 for s in list(self.pending) if not s.done and (impl is None or s.impl == impl and s.timed))

    def best(self) -> dict[str, float]:
        """Each timed candidate's fastest call (seconds)."""
        return {c: min(t) for c, t in self.times.items() if t}

    def wanted(self, impl: str) -> bool:
        t = self.times[impl]
        best = min(self.best().values(), default=None)
        if best is not None and t and min(t) > DROP * best:
            return False
        close = best is not None and t and min(t) <= CLOSE * best
        return len(t) + self.waiting(impl) < (CLOSE_SAMPLES if close else SAMPLES)

    def next(self) -> str | None:
        """The candidate the next call runs; None where none is wanted now (see `waiting`) or too
        many samples were lost (no backward came for them)."""
        live = [c for c in self.order if self.wanted(c)]
        lost = sum(self.calls.values()) - len(self.spent) - self.waiting()
        if not live or lost >= len(self.order) * (CLOSE_SAMPLES + 2):
            return None
        return min(live, key=lambda c: (self.calls[c], self.order.index(c)))

    def hand_out(self, sample: Sample) -> Sample:
        sample.timed = sample.impl in self.warm
        self.warm.add(sample.impl)
        self.pending.add(sample)
        return sample

    def record(self, impl: str, seconds: float, timed: bool) -> None:
        self.spent.append(seconds)
        if timed:
            self.times[impl].append(seconds)


class Sample:
    """One call of a key being measured: `run` times it (the forward now, the backward when it comes)."""

    def __init__(self, m: Measuring, impl: str, device: torch.device, train: bool, record: Callable):
        self.m, self.impl, self.device, self.train, self.record = m, impl, device, train, record
        self.forward_s = self.backward_t0 = None
        self.done, self.timed = False, False

    def run(self, fn: Callable, tensors: Sequence):
        wrap = [i for i, t in enumerate(tensors) if self.train and isinstance(t, torch.Tensor) and t.requires_grad]
        if wrap and torch.is_grad_enabled():
            ends = _BackwardEnd.apply(self, *(tensors[i] for i in wrap))
            tensors = list(tensors)
            for i, t in zip(wrap, ends, strict=True):
                tensors[i] = t
        else:
            wrap = []
        sync(self.device)
        t0 = time.perf_counter()
        with a_candidate_runs():
            out = fn(*tensors)
        sync(self.device)
        self.forward_s = time.perf_counter() - t0
        nodes = {o.grad_fn for o in (out if isinstance(out, (tuple, list)) else (out,))
                 if isinstance(o, torch.Tensor) and o.grad_fn is not None}
        if wrap and nodes:
            for node in nodes:
                node.register_prehook(self._backward_starts)
        else:
            self._finish(0.0)
        return out

    def _backward_starts(self, grad_outputs):
        if self.backward_t0 is None:
            sync(self.device)
            self.backward_t0 = time.perf_counter()

    def backward_ends(self) -> None:
        if self.backward_t0 is not None:
            sync(self.device)
            self._finish(time.perf_counter() - self.backward_t0)

    def _finish(self, backward_s: float) -> None:
        if not self.done:
            self.done = True
            self.record(self.m, self.impl, self.forward_s + backward_s, self.timed)


class _BackwardEnd(torch.autograd.Function):
    """Identity on a call's inputs: its backward runs once all the call's gradients are computed."""

    @staticmethod
    def forward(ctx, sample, *tensors):
        ctx.sample = sample
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.sample.backward_ends()
        return (None, *grads)
