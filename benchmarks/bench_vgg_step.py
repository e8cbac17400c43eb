"""One CIFAR VGG-16 training step (batch 128, SGD with momentum) at a layerwise random sparsity:
sparseops `auto` against mask multiplication (the reference backend, what torch.nn.utils.prune
computes), interleaved steps in one process, medians. Every conv but the 3-channel input layer is
masked (as the searches in bench_search.py leave it).

    python benchmarks/bench_vgg_step.py [--sparsity 0.95 0.988] [--rounds 5] [--warmup 12] [--batch 128]

auto measures in its first calls (in the warm-up steps) in a cache directory of its own. Both sides
train the same model from the same weights on the same batch; their first losses are checked to
agree (the two compute the same thing) before anything is timed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import sparseops
from sparseops import backend
from sparseops.tickets import zoo


def _model(sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = zoo.vgg16()
    sparseops.patch(model)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, sparseops.MaskedConv2d) and m.weight.shape[1] > 3:
            m.weight_mask.copy_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return model


def run(sparsity: float, rounds: int, warmup: int, batch: int = 128) -> dict[str, float]:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    sides = {"mask multiply": "reference", "sparseops": None}
    models = {k: _model(sparsity) for k in sides}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(k):
        with backend.backend(sides[k]):
            opts[k].zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(models[k](x), y)
            loss.backward()
            opts[k].step()
        return float(loss)

    losses = {k: [step(k) for _ in range(max(warmup, 1))] for k in sides}
    # The first step's losses (same weights, same batch) may differ by float rounding only. Later
    # ones drift apart: twelve steps on one batch amplify that rounding to ~1e-3 of the loss.
    a, b = (losses[k][0] for k in sides)
    if abs(a - b) > 1e-4 * max(abs(a), 1.0):
        raise SystemExit(f"the two sides' first losses differ: {a} vs {b}")
    times = {k: [] for k in sides}
    for _ in range(rounds):
        for k in sides:
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 0.988])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    os.environ.setdefault("SPARSEOPS_CACHE_DIR", tempfile.mkdtemp())
    print(f"{torch.get_num_threads()} threads, CPU kernels {sparseops._library.cpu_isa()}")
    for sp in args.sparsity:
        t = run(sp, args.rounds, args.warmup, args.batch)
        print(f"sparsity {sp:.3f}: mask multiply {t['mask multiply']:.0f} ms, sparseops {t['sparseops']:.0f} ms, "
              f"{t['mask multiply'] / t['sparseops']:.2f}x")


if __name__ == "__main__":
    main()
