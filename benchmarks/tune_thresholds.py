"""Measures where the sparse CPU masked_linear kernels stop beating the dense fallback and writes
those densities to sparseops/thresholds.json (the data behind the `auto` backend's choice): one
cap from the wide layers, and a table by layer width h = N*K/(N+K) for the narrow ones, where the
kernels' fixed O(M*(N+K)) cost decides.

    python benchmarks/tune_thresholds.py            # measure, print, rewrite thresholds.json
    python benchmarks/tune_thresholds.py --dry-run  # measure and print only

The table written is "cpu-<isa>", for the CPU kernel variant in use (SPARSEOPS_CPU_ISA); `auto`
reads it on machines running that variant, and "cpu" elsewhere. To measure the AVX2 table on an
AVX-512 machine, cap torch too, so that the dense side is what an AVX2-only machine runs:
    SPARSEOPS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python benchmarks/tune_thresholds.py
auto's measuring (sparseops.tuning) is off here: these tables are its prior.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

import sparseops
from common import median_time
from sparseops import tuning

SHAPES = [(512, 768, 3072), (256, 1024, 1024), (128, 2048, 2048)]  # (rows, in, out): these set the cap
NARROW = [(256, 64, 300), (256, 300, 100), (256, 256, 256), (256, 512, 512)]  # LeNet/MLP-sized layers
# masked_conv2d, 3x3 stride 1 (batch, C_in, C_out, side): one CIFAR VGG-16 layer per output-plane size,
# since the fixed cost (transposing the input, writing the output) scales with the plane.
CONV = [(128, 64, 64, 32), (128, 128, 128, 16), (128, 256, 256, 8), (128, 512, 512, 4), (128, 512, 512, 2)]
CONV_DENSITIES = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6]
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


def search(densities, label, time_pair) -> tuple[float, list]:
    """The largest density (walking up) at which the sparse path is not slower than the fallback."""
    table, best = [], 0.0
    for d in tqdm(densities, desc=label, leave=False):
        sparse, dense = time_pair(d)
        table.append((d, sparse * 1e3, dense * 1e3))
        if sparse <= dense:
            best = d
        else:
            break
    return best, table


def break_even(shape) -> tuple[float, list]:
    rows, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen, requires_grad=True)
    w = torch.randn(n, k, generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True)
    g = torch.randn(rows, n, generator=gen)

    def pair(d):
        mask = torch.rand(n, k, generator=gen) < d
        return step_time("cpu", x, w, b, mask, g), step_time("auto", x, w, b, mask, g)

    return search(DENSITIES, "x".join(map(str, shape)), pair)


def conv_break_even(shape) -> tuple[float, list]:
    batch, cin, cout, side = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, side, side, generator=gen, requires_grad=True)
    w = torch.randn(cout, cin, 3, 3, generator=gen, requires_grad=True)
    g = torch.randn(batch, cout, side, side, generator=gen)

    def time_with(backend, mask):
        def step():
            x.grad = w.grad = None
            sparseops.masked_conv2d(x, w, mask, None, 1, 1).backward(g)

        with sparseops.backend(backend, max_density=0.0 if backend == "auto" else None):
            return median_time(step, repeat=3)

    def pair(d):
        mask = torch.rand(w.shape, generator=gen) < d
        return time_with("cpu", mask), time_with("auto", mask)

    return search(CONV_DENSITIES, "conv " + "x".join(map(str, shape)), pair)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--op", choices=("all", "linear", "conv"), default="all")
    args = ap.parse_args()
    data = json.loads(PATH.read_text())
    isa = torch.ops.sparseops._cpu_isa()
    cpu = data.setdefault(f"cpu-{isa}", {})
    measured = data.setdefault("measured", {}).setdefault(f"cpu-{isa}", {})
    info = {"machine": tuning.machine()["cpu"], "isa": isa, "threads": torch.get_num_threads()}
    if args.op in ("all", "linear"):
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
        cpu["masked_linear"] = threshold
        cpu["masked_linear_by_width"] = [[h, d] for h, d in sorted(by_width.items())]
        measured["masked_linear"] = {**info, "break_even": results}
        print(f"cap (max density for the sparse kernels): {threshold}; by width: {cpu['masked_linear_by_width']}")
    if args.op in ("all", "conv"):
        results, by_plane = {}, []
        for shape in CONV:
            best, table = conv_break_even(shape)
            results["x".join(map(str, shape))] = best
            by_plane.append([shape[3] ** 2, best])
            print(f"conv {shape}: sparse fwd+bwd wins up to density {best}")
            for d, s, dn in table:
                print(f"  density {d:.3f}: sparse {s:.1f} ms, mask multiply {dn:.1f} ms")
        cpu["masked_conv2d"] = max(d for _, d in by_plane)
        cpu["masked_conv2d_by_plane"] = sorted(by_plane)
        measured["masked_conv2d"] = {**info, "break_even": results}
        print(f"conv: by output plane {cpu['masked_conv2d_by_plane']}")
    if not args.dry_run:
        PATH.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {PATH}")


if __name__ == "__main__":
    with tuning.measuring(False):
        main()
