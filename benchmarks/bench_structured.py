"""Channel-masked layers (channel_masked_linear / channel_masked_conv2d, reached through MaskedLinear /
MaskedConv2d with a channel mask) against a dense layer of the kept size and the full dense layer,
forward+backward, on the CIFAR VGG-16 conv layers (batch 128, 3x3, padding 1) and 768->3072 linear
layers (512 rows), with 50%, 75% and 90% of the output channels removed (and small fractions, for
the crossover `auto`'s prior uses: backend.CHANNEL_MAX_WORK).

    pytest benchmarks/bench_structured.py --benchmark-only          # pytest-benchmark
    python benchmarks/bench_structured.py [--rounds 5] [--threads 2] [--only linear|conv] [--keep-freed-memory]
                                          [--cpu-time (with --threads 1)] [--out results/structured-<cpu>.md]

The script mode interleaves the providers (each once per round, in one process) and reports medians
and the ratios; the machines this runs on are shared and noisy, so it also records `uptime`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseops
from sparseops.layout_channels import channel_layout

from common import warm_up

CONVS = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, H = W), batch 128, C -> C
LINEAR = (512, 768, 3072)  # rows, in, out
REMOVED = [0.5, 0.75, 0.9]
CROSSOVER = [0.02, 0.05, 0.1]
PROVIDERS = ["channel_op", "auto", "dense_kept", "dense_full"]


class ChannelOp(nn.Module):
    """The masked layer's parameters through the channel op itself (what `auto` may choose)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        ch = channel_layout(layer.weight_mask)
        self.out_idx, self.in_idx = ch.out_idx, ch.in_idx

    def forward(self, x):
        lay = self.layer
        if isinstance(lay, nn.Conv2d):
            return torch.ops.sparseops.channel_masked_conv2d(x, lay.weight, self.out_idx, self.in_idx, lay.bias,
                                                             lay.stride, lay.padding, lay.dilation)
        return torch.ops.sparseops.channel_masked_linear(x, lay.weight, self.out_idx, self.in_idx, lay.bias)


def _layers(kind, shape, removed, dim="out"):
    """(x, grad, {provider: layer}) for one case; the masked layer prunes whole channels along `dim`."""
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        c, hw = shape
        co, ci, batch = c, c, 128
    else:
        batch, ci, co = shape
    out_kept = co - round(co * removed) if dim == "out" else co
    in_kept = ci - round(ci * removed) if dim == "in" else ci
    make = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if kind == "conv" else nn.Linear
    torch.manual_seed(0)
    masked = (sparseops.MaskedConv2d(ci, co, 3, padding=1) if kind == "conv" else sparseops.MaskedLinear(ci, co))
    keep = torch.zeros(co if dim == "out" else ci, dtype=torch.bool)
    keep[torch.randperm(keep.numel(), generator=g)[:out_kept if dim == "out" else in_kept]] = True
    view = [1] * masked.weight.dim()
    view[0 if dim == "out" else 1] = -1
    masked.set_mask(keep.view(view))
    x_shape = (batch, ci, hw, hw) if kind == "conv" else (batch, ci)
    kept_x_shape = (batch, in_kept, hw, hw) if kind == "conv" else (batch, in_kept)
    layers = {"channel_op": (ChannelOp(masked), x_shape), "auto": (masked, x_shape),
              "dense_kept": (make(in_kept, out_kept), kept_x_shape), "dense_full": (make(ci, co), x_shape)}
    return layers


def step(layer, x_shape):
    x = torch.randn(x_shape, requires_grad=True)
    with torch.no_grad():
        grad = torch.randn_like(layer(x))

    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)
    return run


def cases(crossover=True, only=None):
    if only in (None, "conv"):
        for (c, hw), removed in itertools.product(CONVS, REMOVED + (CROSSOVER if crossover else [])):
            yield f"conv {c}->{c} 3x3 @{hw}x{hw}, batch 128", "conv", (c, hw), removed, "out"
    if only in (None, "linear"):
        for removed in REMOVED + (CROSSOVER if crossover else []):
            yield "linear 768->3072, 512 rows", "linear", LINEAR, removed, "out"
        for removed in REMOVED:
            yield "linear 768->3072, 512 rows, input features", "linear", LINEAR, removed, "in"


def keep_freed_memory():
    """glibc malloc keeps freed blocks mapped (no trimming, no mmap per large block), so the next
    step's fresh full-size outputs do not page-fault in again (~1 us a 4 KiB page, several ms a
    step for the full-size dw, output and dx here); what jemalloc/tcmalloc (LD_PRELOAD) or
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=... give a process."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h; 32 MiB is the largest mmap threshold
    return bool(libc.mallopt(m_mmap_threshold, 1 << 25) and libc.mallopt(m_trim_threshold, 1 << 30))  # C ints


CONFIGS = [dict(label=label, kind=kind, shape=shape, removed=removed, dim=dim, provider=p)
           for (label, kind, shape, removed, dim), p in itertools.product(cases(False), PROVIDERS)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "{kind}-{shape}-{dim}-{removed}-{provider}".format(**c))
def test_channel_masked(benchmark, config):
    layer, x_shape = _layers(config["kind"], config["shape"], config["removed"], config["dim"])[config["provider"]]
    benchmark.group = "{label} {dim} {removed:.0%} removed".format(**config)
    benchmark.extra_info.update(op=f"channel_masked_{config['kind'] if config['kind'] == 'linear' else 'conv2d'}",
                                threads=torch.get_num_threads(), **config)
    benchmark.pedantic(step(layer, x_shape), rounds=5, iterations=1, warmup_rounds=1)


def measure(rounds: int, only=None, clock=time.perf_counter) -> list[dict]:
    rows = []
    for label, kind, shape, removed, dim in cases(only=only):
        fns = {p: step(*lx) for p, lx in _layers(kind, shape, removed, dim).items()}
        for fn in fns.values():
            warm_up(fn)
        times = {p: [] for p in fns}
        for _ in range(rounds):
            for p, fn in fns.items():
                t0 = clock()
                fn()
                times[p].append(clock() - t0)
        med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        best = {f"{p}_min": min(t) * 1e3 for p, t in times.items()}  # the least preempted round
        rows.append(dict(label=label, dim=dim, removed=removed, **med, **best))
    return rows


def table(rows, rounds, load_before, load_after, malloc="glibc malloc's defaults", clock="wall-clock") -> str:
    isa = torch.ops.sparseops._cpu_isa()
    cpu = platform.processor() or platform.machine()
    out = [f"CPU: {cpu} ({isa} kernels; torch's GEMM/convolution: oneDNN/MKL, torch.backends.cpu "
           f"capability {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, torch "
           f"{torch.__version__}. fwd+bwd medians of {rounds} interleaved rounds (ms, {clock}). `channel op`: the "
           "layer's parameters through channel_masked_*; `auto`: the MaskedLinear/MaskedConv2d in backend auto (its "
           "first calls measured the candidates: the channel op, the dense paths, the sparse kernels). `vs kept`: "
           "channel op time / dense layer of the kept size (target <= 1.25), of the medians and of the fastest rounds "
           "(preemption on a shared machine only adds time); `speedup`: full dense / channel op, and full dense / "
           "auto (medians).",
           f"Load (`uptime`) before: {load_before}; after: {load_after}. Allocator: {malloc}.", "",
           "| layer | channels removed | channel op | auto | dense kept | dense full | vs kept | vs kept (fastest) "
           "| speedup | auto speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['removed']:.0%} ({r['dim']}) | {r['channel_op']:.2f} | {r['auto']:.2f} | "
                   f"{r['dense_kept']:.2f} | {r['dense_full']:.2f} | {r['channel_op'] / r['dense_kept']:.2f} | "
                   f"{r['channel_op_min'] / r['dense_kept_min']:.2f} | {r['dense_full'] / r['channel_op']:.2f}x | "
                   f"{r['dense_full'] / r['auto']:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["linear", "conv"], default=None, help="only these layers")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc mallopt: freed memory stays mapped (no page faults on fresh outputs)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the thread's CPU time (time.thread_time; --threads 1 only): preemption by other "
                         "processes on a shared machine excluded, page faults and memory stalls included")
    ap.add_argument("--out", default=None, help="markdown table (default results/structured-<cpu>.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = "glibc malloc's defaults"
    if args.keep_freed_memory:
        if not keep_freed_memory():
            raise SystemExit("mallopt failed (not glibc?)")
        malloc = "glibc mallopt(M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=1 GiB): freed memory stays mapped"
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    before = uptime()
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time times one thread: use it with --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    rows = measure(args.rounds, args.only, clock)
    text = table(rows, args.rounds, before, uptime(), malloc,
                 "the thread's CPU time" if args.cpu_time else "wall-clock")
    slug = "".join(ch if ch.isalnum() else "-" for ch in sparseops.tuning.machine()["cpu"].lower()).strip("-")
    out = Path(args.out or Path(__file__).parent / "results" / f"structured-{slug}.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
