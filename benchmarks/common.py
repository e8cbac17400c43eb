"""Shared pieces of the benchmarks: the providers compared in one run, peak-memory measurement, and
the timed training function of the whole-search benchmarks."""
from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.utils.prune as prune
import torch.nn.functional as F
from torch import nn

import sparseops


def warm_up(fn, most: int = 40) -> None:
    """Runs `fn` once, then again while `auto` is still measuring a key (its first calls run the
    candidates in turn, sparseops.tuning): what is timed after this is the measured choice."""
    fn()
    for _ in range(most):
        if not sparseops.tuning._cache.exploring:
            return
        fn()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_memory(fn) -> int:
    """Bytes of memory a call adds at its peak over what was resident before it (Linux VmHWM).

    Only meaningful in a process where malloc hands large blocks back to the OS on free (see
    memory.py, which measures in a child process so the timings keep glibc's default behaviour).
    """
    fn()  # warm: first-call allocations (layouts, caches) are not part of a step
    getattr(fn, "clear", lambda: None)()  # drop the gradients it left, so they count in the step
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    base = _status("VmRSS:")
    fn()
    return max(0, _status("VmHWM:") - base)


def exact_memory_mode():
    """Serve every allocation over 64 KiB with mmap and return it on free, so the resident set
    tracks live tensor memory (glibc would otherwise keep freed blocks). Slows allocation down:
    call it only in a process that measures memory, never in one that measures time."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD


def layer_state_bytes(module: nn.Module) -> int:
    """Bytes held by a layer between steps: parameters, buffers, and (sparseops) the cached layout."""
    seen, total = set(), 0
    tensors = []
    for t in list(module.parameters()) + list(module.buffers()):
        if t.layout == torch.sparse_csr:
            tensors += [t.crow_indices(), t.col_indices(), t.values()]
        else:
            tensors.append(t)
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    if isinstance(module, sparseops.MaskedLinear):
        lay = sparseops.csr_layout(module.weight_mask)
        total += sum(t.numel() * t.element_size() for t in lay.tensors())
    return total


def make_linear(provider: str, in_features: int, out_features: int, mask: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features)
    if provider == "dense":
        return lin
    if provider == "prune":
        return prune.custom_from_mask(lin, "weight", mask)
    if provider == "sparseops":
        return sparseops.MaskedLinear.from_linear(lin, mask)
    if provider == "torch_sparse_csr":
        return CsrLinear(lin, mask)
    raise ValueError(provider)


class CsrLinear(nn.Module):
    """The strongest peer: a torch.sparse CSR weight with autograd through torch.sparse.mm."""

    def __init__(self, lin: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter((lin.weight.detach() * mask).to_sparse_csr())
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return torch.sparse.mm(self.weight, x.t()).t() + self.bias


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def clear():
        for p in layer.parameters():
            p.grad = None
        x.grad = None

    def step():
        clear()
        layer(x).backward(grad)

    step.clear = clear
    return step


def forward_only(layer: nn.Module, x: torch.Tensor):
    def fwd():
        with torch.no_grad():
            layer(x)
    return fwd


def median_time(fn, repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def memory_in_child(module: str, configs: list[dict]) -> list[int]:
    """Peak bytes of each config's step, measured in a fresh process (see memory.py)."""
    out = subprocess.run([sys.executable, __file__.replace("common.py", "memory.py"), module],
                         input=json.dumps(configs), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_sgd_train(batch: int, steps: int, seed: int, step_times: dict | None = None):
    """An IMP `train_fn` over `steps` random CIFAR-shaped batches (a private generator): one SGD pass
    (momentum 0.9) per level, each step timed; the times also kept in `step_times[level]` if given."""
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(steps)]

    def train(m, level):
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        times = []
        for x, y in data:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            level.step()
        if step_times is not None:
            step_times[level.index] = times
        return {"step_time": statistics.median(times)}

    return train
