"""Whole structured ticket searches on CIFAR VGG-16 (synthetic CIFAR-shaped data: only speed is measured):

- Structured CS (`tickets.structured_cs`): the same search twice, same seed, once with the channels
  whose gate is exactly 0 put into the layers' masks before every step (`skip_zero_units=True`: whole
  zero rows and the readers' zero columns, which sparseops' kernels skip) and once with the gates only
  multiplied (`skip_zero_units=False`: plain dense layers, what a PyTorch implementation does). Both
  must give the same gates and losses. The penalty and learning rate of the scores are set so that
  the gates reach exact zeros within a few epochs (a search compressed into a benchmark).
- Channel IMP (`tickets.imp(granularity="channel")`): levels of L1 filter pruning with a fixed number
  of SGD steps each, with sparseops (`auto`) and with plain mask multiplication (the `reference`
  backend), same seed, so the same masks.

    python benchmarks/bench_structured_search.py [--method scs|imp|both] [--images 256] [--batch 64] \
        [--epochs 4] [--rounds 1] [--levels 4] [--out results/structured-search-....json]

Not a test (a search takes minutes); the speed-up depends on the kernels that skip zero rows and
columns of a mask (issue 16, item 1): without them it is about 1x.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparseops
from sparseops import tickets
from sparseops.tickets.zoo import synthetic_cifar, vgg16

from common import timed_sgd_train


def scs_search(skip: bool, args) -> dict:
    torch.manual_seed(args.seed)
    model = vgg16()
    train, _ = synthetic_cifar(args.images, 16, seed=args.seed)
    t0 = time.perf_counter()
    result = tickets.structured_cs(model, train, None, rounds=args.rounds, epochs=args.epochs,
                                   batch_size=args.batch, lr=0.01, mask_lr=args.mask_lr, lmbda=args.lmbda,
                                   final_temp=args.final_temp, rewind_epoch=0, flops_weighted=True,
                                   skip_zero_units=skip, progress=True)
    wall = time.perf_counter() - t0
    return {"wall_time": wall, "rounds": [
        {"round": r.level, "kept_channels": r.metrics["kept_channels"], "macs_kept": r.metrics["macs_kept"],
         "round_time": r.wall_time, "gates": r.metrics["gates"],
         "epochs": [{k: h[k] for k in ("epoch", "loss", "time", "channels_off")} for h in r.metrics["history"]]}
        for r in result.levels]}


def imp_search(backend: str | None, args) -> dict:
    torch.manual_seed(args.seed)
    model = vgg16()
    train = timed_sgd_train(args.batch, args.steps, args.seed)

    t0 = time.perf_counter()
    with sparseops.backend(backend):
        result = tickets.imp(model, train, levels=args.levels, rate=0.3, granularity="channel", progress=True)
    return {"wall_time": time.perf_counter() - t0, "levels": [
        {"level": r.level, "sparsity": r.sparsity, "level_time": r.wall_time, "step_time": r.metrics["step_time"],
         "kept_filters": {k: int(m.flatten(1).any(1).sum()) for k, m in r.masks.items()}} for r in result.levels]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("scs", "imp", "both"), default="both")
    ap.add_argument("--images", type=int, default=256, help="structured CS: synthetic training images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4, help="structured CS: epochs per round (and of the ticket)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lmbda", type=float, default=1e-3)
    ap.add_argument("--mask-lr", type=float, default=2.0)
    ap.add_argument("--final-temp", type=float, default=1e4)
    ap.add_argument("--levels", type=int, default=4, help="channel IMP: levels at rate 0.3")
    ap.add_argument("--steps", type=int, default=2, help="channel IMP: SGD steps per level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = {"machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "sparseops": sparseops.__version__}, "args": vars(args)}
    warm = vgg16()
    F.cross_entropy(warm(torch.randn(args.batch, 3, 32, 32)), torch.randint(0, 10, (args.batch,))).backward()
    if args.method in ("scs", "both"):
        ours, ref = scs_search(True, args), scs_search(False, args)
        same = all(a["gates"] == b["gates"] for a, b in zip(ours["rounds"], ref["rounds"], strict=True))
        out["scs"] = {"sparseops": ours, "mask_multiply": ref, "same_gates": same}
        print(f"{'round':>5} | {'kept ch.':>8} | {'MACs kept':>9} | {'mask mult.':>10} | {'sparseops':>10} | speed-up")
        for a, b in zip(ref["rounds"], ours["rounds"], strict=True):
            print(f"{b['round']:>5} | {b['kept_channels']:>8.1%} | {b['macs_kept']:>9.1%} | {a['round_time']:>8.1f} s "
                  f"| {b['round_time']:>8.1f} s | {a['round_time'] / b['round_time']:>6.2f}x")
        print(f"structured CS, whole search: {ref['wall_time']:.1f} s with mask multiplication, {ours['wall_time']:.1f} s "
              f"with sparseops ({ref['wall_time'] / ours['wall_time']:.2f}x); same gates: {same}")
    if args.method in ("imp", "both"):
        ours, ref = imp_search(None, args), imp_search("reference", args)
        same = all(a["kept_filters"] == b["kept_filters"] for a, b in zip(ours["levels"], ref["levels"], strict=True))
        out["imp"] = {"sparseops": ours, "mask_multiply": ref, "same_masks": same}
        for a, b in zip(ref["levels"], ours["levels"], strict=True):
            print(f"channel IMP level {b['level']}: sparsity {b['sparsity']:.1%}, step {a['step_time'] * 1e3:.0f} ms "
                  f"with mask multiplication, {b['step_time'] * 1e3:.0f} ms with sparseops "
                  f"({a['step_time'] / b['step_time']:.2f}x)")
        print(f"channel IMP, whole search: {ref['wall_time']:.1f} s with mask multiplication, {ours['wall_time']:.1f} s "
              f"with sparseops ({ref['wall_time'] / ours['wall_time']:.2f}x); same masks: {same}")
    path = Path(args.out or Path(__file__).with_name("results") /
                f"structured-search-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
