"""`python -m sparseops tune`: measures `auto`'s choices ahead of time for the shapes of the README's
benchmarks (or a given list), on this machine, and shows what the cache holds."""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import tuning

# (kind, rows or batch, sizes): the README's linear layers and CIFAR VGG-16 conv layers
LINEAR = [(512, 3072, 768), (512, 768, 3072), (128, 2048, 2048)]
CONV = [(128, 64, 32, 64), (128, 128, 16, 128), (128, 256, 8, 256), (128, 512, 4, 512)]  # N, C_in, H=W, C_out
DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda where a GPU is, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--rows", type=int, default=None, help="rows of x for the linear layers (default: 512 on "
                   "the CPU, 8192 on a GPU)")
    p.add_argument("--no-conv", action="store_true", help="linear layers only")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop measuring after this many seconds")
    p.add_argument("--out", default=None, help="also write the measured entries to this JSON file")
    p.add_argument("--show", action="store_true", help="only print what the cache holds")
    p.add_argument("--tiny", action="store_true", help="small shapes, two densities: a smoke test of the tuner")


TINY_LINEAR, TINY_CONV = [(512, 256, 128)], [(8, 32, 8, 32)]


def _cases(args):
    rows = args.rows or (64 if args.tiny else 8192 if args.device.startswith("cuda") else 512)
    linear, conv = (TINY_LINEAR, TINY_CONV) if args.tiny else (LINEAR, CONV)
    if args.tiny:
        args.densities = args.densities[:2]
    for m, n, k in linear:
        for d in args.densities:
            yield f"linear {k}->{n}, {rows if m == 512 else m} rows", "linear", (rows if m == 512 else m, n, k), d
    if not args.no_conv:
        for b, c, hw, co in conv:
            for d in args.densities:
                yield f"conv {c}->{co} 3x3 @{hw}x{hw}, batch {b}", "conv", (b, c, hw, co), d


def _case(kind, sizes, density, device, dtype):
    """One forward and backward of the case's op, as a function (the same inputs every call)."""
    import sparseops

    g = torch.Generator(device=device).manual_seed(0)
    if kind == "linear":
        m, n, k = sizes
        x = torch.randn(m, k, device=device, dtype=dtype, generator=g, requires_grad=True)
        w = torch.randn(n, k, device=device, dtype=dtype, generator=g, requires_grad=True)
        mask = torch.rand(n, k, device=device, generator=g) < density
        return lambda: sparseops.masked_linear(x, w, mask).float().sum().backward()
    b, c, hw, co = sizes
    x = torch.randn(b, c, hw, hw, device=device, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(co, c, 3, 3, device=device, dtype=dtype, generator=g, requires_grad=True)
    mask = torch.rand(co, c, 3, 3, device=device, generator=g) < density
    return lambda: sparseops.masked_conv2d(x, w, mask, None, 1, 1).float().sum().backward()


def run(args) -> int:
    if args.show:
        print(f"tuning cache: {tuning.cache_file()}")
        for k, v in sorted(tuning.entries().items()):
            print(f"  {k}: {v['winner']}  {v.get('times_ms', {})}")
        return 0
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start, done, skipped = time.perf_counter(), {}, []
    print(f"measuring on {device} ({tuning.machine()}); cache {tuning.cache_file()}")
    for label, kind, sizes, density in _cases(args):
        if time.perf_counter() - start > args.budget_s:
            skipped.append(f"{label} at density {density:g}")
            continue
        # (one set of inputs per case: a call measures the candidates over several steps)
        for key in tuning.until_measured(_case(kind, sizes, density, device, dtype)):
            entry = tuning.entries()[key]
            done[key] = entry
            times = ", ".join(f"{i} {t:.2f} ms" for i, t in sorted(entry["times_ms"].items(), key=lambda p: p[1]))
            print(f"{label}, density {density:g}: {entry['winner']}  ({times})")
    spent = time.perf_counter() - start
    print(f"measured {len(done)} keys in {spent:.1f} s (measuring itself: {tuning.measured_seconds():.1f} s)"
          + (f"; budget reached, skipped {len(skipped)} cases" if skipped else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": tuning.machine(), "entries": done, "skipped": skipped, "seconds": spent}, f,
                      indent=1)
    return 0
