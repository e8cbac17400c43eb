"""Measures where the sparse CPU masked_linear kernels stop beating the dense fallback and writes
those densities to sparseops/thresholds.json (the data behind the `auto` backend's choice): one
cap from the wide layers, and a table by layer width h = N*K/(N+K) for the narrow ones, where the
kernels' fixed O(M*(N+K)) cost decides.

    python benchmarks/tune_thresholds.py            # measure, print, rewrite thresholds.json
    python benchmarks/tune_thresholds.py --dry-run  # measure and print only
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import sparseops
from common import median_time

SHAPES = [(512, 768, 3072), (256, 1024, 1024), (128, 2048, 2048)]  # (rows, in, out): these set the cap
NARROW = [(256, 64, 300), (256, 300, 100), (256, 256, 256), (256, 512, 512)]  # LeNet/MLP-sized layers
DENSITIES = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]
PATH = Path(sparseops.__file__).with_name("thresholds.json")


def step_time(backend, x, w, b, mask, g):
    def step():
        x.grad = w.grad = b.grad = None
        sparseops.masked_linear(x, w, mask, b).backward(g)

    # "auto" with max_density 0 runs exactly the fallback auto would pick for this layer
    with sparseops.backend(backend, max_density=0.0 if backend == "auto" else None):
        return median_time(step, repeat=5)


def width(shape) -> float:
    _, k, n = shape
    return n * k / (n + k)


def break_even(shape) -> tuple[float, list]:
    rows, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen, requires_grad=True)
    w = torch.randn(n, k, generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True)
    g = torch.randn(rows, n, generator=gen)
    table, best = [], 0.0
    for d in tqdm(DENSITIES, desc="x".join(map(str, shape)), leave=False):
        mask = torch.rand(n, k, generator=gen) < d
        sparse, dense = step_time("cpu", x, w, b, mask, g), step_time("auto", x, w, b, mask, g)
        table.append((d, sparse * 1e3, dense * 1e3))
        if sparse <= dense:
            best = d
        else:
            break
    return best, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    results = {}
    for shape in SHAPES + NARROW:
        best, table = break_even(shape)
        results["x".join(map(str, shape))] = best
        print(f"{shape} (width {width(shape):.0f}): sparse fwd+bwd wins up to density {best}")
        for d, s, dn in table:
            print(f"  density {d:.3f}: sparse {s:.3f} ms, dense fallback {dn:.3f} ms")
    threshold = min(results["x".join(map(str, s))] for s in SHAPES)  # the first to stop winning decides
    by_width = {}
    for shape in SHAPES + NARROW:
        h = round(width(shape))
        by_width[h] = min(by_width.get(h, 1.0), results["x".join(map(str, shape))])
    by_width = [[h, d] for h, d in sorted(by_width.items())]
    print(f"cap (max density for the sparse kernels): {threshold}; by width: {by_width}")
    if not args.dry_run:
        data = json.loads(PATH.read_text())
        data.setdefault("cpu", {})["masked_linear"] = threshold
        data["cpu"]["masked_linear_by_width"] = by_width
        data["measured"] = {"masked_linear": {"machine": platform.processor() or platform.machine(),
                                              "threads": torch.get_num_threads(), "break_even": results}}
        PATH.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
