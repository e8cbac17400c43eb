"""Measures where the sparse CPU masked_linear kernels stop beating the dense fallback and writes
that density to sparseops/thresholds.json (the data behind the `auto` backend's choice).

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

SHAPES = [(512, 768, 3072), (256, 1024, 1024), (128, 2048, 2048)]
DENSITIES = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]
PATH = Path(sparseops.__file__).with_name("thresholds.json")


def step_time(backend, x, w, b, mask, g):
    def step():
        x.grad = w.grad = b.grad = None
        sparseops.masked_linear(x, w, mask, b).backward(g)

    with sparseops.backend(backend):
        return median_time(step, repeat=5)


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
        sparse, dense = step_time("cpu", x, w, b, mask, g), step_time("dense", x, w, b, mask, g)
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
    for shape in SHAPES:
        best, table = break_even(shape)
        results["x".join(map(str, shape))] = best
        print(f"{shape}: sparse fwd+bwd wins up to density {best}")
        for d, s, dn in table:
            print(f"  density {d:.2f}: sparse {s:.2f} ms, dense fallback {dn:.2f} ms")
    threshold = min(results.values())  # the shape where sparse stops winning first decides
    print(f"threshold (max density for the sparse kernels): {threshold}")
    if not args.dry_run:
        data = json.loads(PATH.read_text())
        data.setdefault("cpu", {})["masked_linear"] = threshold
        data["measured"] = {"masked_linear": {"machine": platform.processor() or platform.machine(),
                                              "threads": torch.get_num_threads(), "break_even": results}}
        PATH.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
