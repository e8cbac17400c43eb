"""Whole ticket searches, timed end to end on CIFAR VGG-16 (synthetic CIFAR-shaped data; a fixed
number of SGD steps per level, so only speed is measured):

- IMP with rewinding, 20 levels at rate 0.2 (to 98.8% sparsity): every level's wall time with
  sparseops (`auto` backend) and with plain mask multiplication (the `reference` backend: what
  torch.nn.utils.prune and open_lth do), same seed, so the same masks. Pruning is layerwise by
  default: with a few steps per level the weights stay near their initialisation, whose scale
  falls with fan-in, so global magnitude pruning would empty the deep layers and leave the early,
  expensive ones nearly dense (`--scope global` shows that case).
- Continuous Sparsification along its beta schedule (1 -> 200): the time of a training step of the
  soft-masked network per beta, with sparseops (fused soft mask; entries whose mask is exactly 0
  skipped on the sparse kernels) and with the official code's eager soft mask. The scores are
  drawn once from a late-round distribution, so the fraction of the mask that is exactly 0 grows
  with beta as in a real search.

    python benchmarks/bench_search.py [--levels 20] [--steps 2] [--batch 128] [--out results/search-....json]

Not a pytest benchmark (one search takes minutes): `make bench-search` runs it; benchmarks/plot.py
draws the result.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparseops
from sparseops import tickets, tuning
from sparseops.patch import patched_layers
from sparseops.tickets.zoo import vgg16

from common import timed_sgd_train, warm_up as common_warm_up


def imp_search(backend: str | None, levels: int, steps: int, batch: int, scope: str, seed: int = 0):
    torch.manual_seed(seed)
    model = vgg16()
    step_times = {}
    train = timed_sgd_train(batch, steps, seed, step_times)

    with sparseops.backend(backend):
        result = tickets.imp(model, train, levels=levels, rate=0.2, rewind=0, scope=scope, progress=True)
    return [{"level": r.level, "sparsity": r.sparsity, "level_time": r.wall_time, "step_times": step_times[r.level]}
            for r in result.levels]


def warm_up(batch: int, steps: int = 2) -> None:
    """A few untimed VGG steps first, so neither timed search pays the process's warm-up (thread
    pool start, oneDNN primitive creation, first-touch of the allocator's memory)."""
    model = vgg16()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()


def cs_schedule(epochs: int, steps: int, batch: int, seed: int = 0, final_temp: float = 200.0):
    torch.manual_seed(seed)
    model = sparseops.patch(vgg16(), mode="soft")
    with torch.no_grad():  # a late-round score distribution: most weights well below 0
        for _, m in patched_layers(model):
            m.weight_score.normal_(-2.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(steps)]
    # Forward and backward only (no optimiser step), so every beta sees the same scores.
    rows = []
    for e in tqdm(range(epochs), desc="CS beta schedule"):
        beta = final_temp ** (e / (epochs - 1))
        tickets.cs.set_beta(model, beta)
        layers = tickets.cs.soft_layers(model)
        row = {"epoch": e, "beta": beta, "mask_exact_zero": tickets.cs.exact_zero_fraction(layers, beta)}
        for label, backend in (("sparseops", None), ("eager", "reference")):
            def step(x, y, backend=backend):
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                if backend == "reference":  # the official code's penalty: sum of the eager mask
                    loss = loss + 1e-8 * sum((torch.sigmoid(beta * m.weight_score) * m.scale).sum()
                                             for m in layers)
                else:
                    loss = loss + 1e-8 * tickets.cs.penalty(model)
                loss.backward()

            times = []
            with sparseops.backend(backend):
                # `auto` measures a new mask density in its first calls (sparseops.tuning): those are
                # counted apart (measuring_s), so that the steps timed are the ones a search runs after.
                measured = tuning.measured_seconds()
                t0 = time.perf_counter()
                common_warm_up(lambda: step(*data[0]))
                if label == "sparseops":
                    row["warm_up_s"] = time.perf_counter() - t0
                    row["measuring_s"] = tuning.measured_seconds() - measured
                for x, y in data:
                    t0 = time.perf_counter()
                    step(x, y)
                    times.append(time.perf_counter() - t0)
            row[label] = statistics.median(times)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, default=20)
    ap.add_argument("--steps", type=int, default=2, help="SGD steps per IMP level / per beta")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--cs-epochs", type=int, default=8, help="points along the beta schedule")
    ap.add_argument("--scope", choices=("layerwise", "global"), default="layerwise", help="IMP's pruning scope")
    ap.add_argument("--skip-cs", action="store_true")
    ap.add_argument("--repeats", type=int, choices=(1, 2), default=2,
                    help="2: run the searches in ABBA order and keep each level's faster run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = {"machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "sparseops": sparseops.__version__},
           "args": vars(args)}
    warm_up(args.batch)
    # ABBA order, best of two per level: this VM drifts by 10-20% over minutes, which would
    # otherwise favour whichever search runs in the faster phase.
    runs = {"sparseops": [], "mask_multiply": []}
    order = [("sparseops", None), ("mask_multiply", "reference")]
    for label, backend in order + order[::-1] if args.repeats > 1 else order:
        runs[label].append(imp_search(backend, args.levels, args.steps, args.batch, args.scope))
    out["imp"] = {label: [min(levels, key=lambda r: statistics.median(r["step_times"])) for levels in zip(*rs)]
                  for label, rs in runs.items()}
    out["imp_runs"] = runs
    if not args.skip_cs:
        out["cs"] = cs_schedule(args.cs_epochs, args.steps, args.batch)
    ours, ref = out["imp"]["sparseops"], out["imp"]["mask_multiply"]
    print(f"{'level':>5} | {'sparsity':>8} | {'step (mask mult.)':>17} | {'step (sparseops)':>16} | speed-up")
    for a, b in zip(ref, ours, strict=True):
        ta, tb = statistics.median(a["step_times"]), statistics.median(b["step_times"])
        print(f"{a['level']:>5} | {b['sparsity']:>8.2%} | {ta * 1e3:>14.0f} ms | {tb * 1e3:>13.0f} ms | {ta / tb:>6.2f}x")
    total_a, total_b = sum(r["level_time"] for r in ref), sum(r["level_time"] for r in ours)
    print(f"whole search: {total_a:.1f} s with mask multiplication, {total_b:.1f} s with sparseops "
          f"({total_a / total_b:.2f}x; each level's faster run of {args.repeats})")
    for r in out.get("cs", []):
        print(f"CS beta {r['beta']:7.2f}: mask exactly 0: {r['mask_exact_zero']:6.1%}; step eager "
              f"{r['eager'] * 1e3:.0f} ms, sparseops {r['sparseops'] * 1e3:.0f} ms ({r['eager'] / r['sparseops']:.2f}x); "
              f"before them, measuring the new density {r['measuring_s']:.2f} s ({r['warm_up_s']:.1f} s of warm-up steps)")
    path = Path(args.out or Path(__file__).with_name("results") / f"search-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
