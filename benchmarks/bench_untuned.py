"""masked linear fwd+bwd on shapes nobody tuned for, at every sparsity: `auto` against the best of
dense nn.Linear, torch.nn.utils.prune's mask multiply and torch.sparse CSR (MKL), per CPU ISA, in one
process each (interleaved rounds, medians). The issue's bar: never below 0.95x of the best of them.

    python benchmarks/bench_untuned.py [--isa avx2 avx512] [--rounds 5] [--out results/untuned-<cpu>.md]
        [--shapes 200x1000x1500 ...] [--sparsities 0.5 0.9 ...]   (rows x in x out)

torch CSR is timed only at density <= 0.5 (above that it is several times slower than dense)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench_isa import child, per_isa, write

SHAPES = ((200, 1000, 1500), (96, 4096, 1024), (1024, 512, 512), (33, 2000, 300), (384, 768, 2304))
SPARSITIES = (0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def _cases(shapes=SHAPES, sparsities=SPARSITIES):
    from common import make_linear

    g = torch.Generator().manual_seed(1)
    for rows, k, n in shapes:
        x = torch.randn(rows, k, generator=g, requires_grad=True)
        grad = torch.randn(rows, n, generator=g)
        for sp in sparsities:
            mask = torch.rand(n, k, generator=g) >= sp
            providers = ("dense", "prune", "sparseops") + (("torch_sparse_csr",) if sp >= 0.5 else ())
            layers = {p: make_linear(p, k, n, mask) for p in providers}

            def step(layer, x=x, grad=grad):  # (bound now: the loop rebinds x and grad)
                def run():
                    x.grad = None
                    for prm in layer.parameters():
                        prm.grad = None
                    layer(x).backward(grad)
                return run

            names = {"dense": "dense", "prune": "prune", "torch_sparse_csr": "torch CSR", "sparseops": "sparseops auto"}
            yield f"{k}->{n}, {rows} rows, {sp:.0%} sparse", {names[p]: step(lay) for p, lay in layers.items()}


def table(results: list[dict]) -> str:
    out = [f"CPU: {results[0]['cpu']}, {results[0]['threads']} threads, torch {results[0]['torch']}. masked linear "
           "fwd+bwd; medians of interleaved rounds (ms); ratio: best of the others / auto (>1: auto faster).", ""]
    for r in results:
        ratios = []
        out += [f"### {r['isa']}", "", "| case | dense | prune | torch CSR | auto | auto vs best other | auto ran |",
                "|---|---|---|---|---|---|---|"]
        for label, t in r["medians_ms"].items():
            best = min(v for p, v in t.items() if p != "sparseops auto")
            ratios.append(best / t["sparseops auto"])
            csr = f"{t['torch CSR']:.2f}" if "torch CSR" in t else "-"
            ran = sorted({v for k, v in r["auto_choices"].items() if _same_case(k, label)}) or ["unmasked/prior"]
            out.append(f"| {label} | {t['dense']:.2f} | {t['prune']:.2f} | {csr} | {t['sparseops auto']:.2f} | "
                       f"{ratios[-1]:.2f}x | {', '.join(ran)} |")
        below = sum(x < 0.95 for x in ratios)
        out += ["", f"auto vs the best other: min {min(ratios):.2f}x, median {sorted(ratios)[len(ratios) // 2]:.2f}x; "
                f"{below} of {len(ratios)} cases below 0.95x. auto measured for {r['measured_s']:.2f} s in all.", ""]
    return "\n".join(out)


def _same_case(key: str, label: str) -> bool:
    """Whether tuning key `key` (masked_linear|cpu:..|float32|<rows>x<n>x<k>|d<=..) is the case `label`."""
    from sparseops import tuning

    shape, _, sparsity = label.split(", ")
    k, n = shape.split("->")
    density = 1 - float(sparsity.split("%")[0]) / 100  # (a random mask's own density is within 2% of it)
    buckets = {f"|d<={tuning.density_bucket(min(1.0, density * f)):g}" for f in (0.98, 1.02)}
    return key.startswith("masked_linear|") and f"x{n}x{k}|" in key and any(key.endswith(b) for b in buckets)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--isa", nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--shapes", nargs="+", default=[])
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] or list(SHAPES)
    if args.child:
        print(json.dumps(child(args.child, args.rounds, lambda: _cases(shapes, args.sparsities))))
        return 0
    extra = ("--shapes", *args.shapes) if args.shapes else ()
    results = per_isa(__file__, args.isa, args.rounds, (*extra, "--sparsities", *map(str, args.sparsities)))
    if results is None:
        return 1
    write(table(results), results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
