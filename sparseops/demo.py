"""`make demo`: a short IMP search with rewinding on scikit-learn's digits, run twice with the same
seed: on sparseops' kernels, and with plain mask multiplication (what torch.nn.utils.prune and
open_lth do; here the "reference" backend). Same masks, same accuracy; the time per level differs."""
from __future__ import annotations

import argparse

import torch

from . import backend
from .tickets.command import search


def run(levels: int = 10, epochs: int = 3, hidden: int = 2048, batch_size: int = 128, seed: int = 0,
        progress: bool = True, out=print):
    args = argparse.Namespace(method="imp", model="wide-mlp", data="digits", levels=levels, rate=0.2, rewind="0",
                              scope="global", exclude=[], epochs=epochs, batch_size=batch_size, lr=0.05,
                              momentum=0.9, weight_decay=1e-4, hidden=hidden, seed=seed, checkpoint_dir=None,
                              no_progress=not progress)
    out(f"IMP with rewinding on digits: MLP 64-{hidden}-{hidden}-10, {levels} levels at rate 0.2, {epochs} epochs "
        f"per level, batch {batch_size}, {torch.get_num_threads()} threads")
    runs = {}
    for label, name in (("mask multiply", "reference"), ("sparseops", None)):
        args.backend = name
        runs[label], _ = search(args)
    ref, ours = runs["mask multiply"].levels, runs["sparseops"].levels
    out(f"{'level':>5} | {'sparsity':>8} | {'acc (mask mult.)':>16} | {'acc (sparseops)':>15} | "
        f"{'epoch (mask mult.)':>18} | {'epoch (sparseops)':>17} | speed-up")
    for a, b in zip(ref, ours, strict=True):
        ta, tb = a.metrics["epoch_time"], b.metrics["epoch_time"]
        out(f"{a.level:>5} | {b.sparsity:>8.2%} | {a.metrics['accuracy']:>16.4f} | {b.metrics['accuracy']:>15.4f} | "
            f"{ta * 1e3:>15.1f} ms | {tb * 1e3:>14.1f} ms | {ta / tb:>6.2f}x")
    total_a, total_b = sum(r.wall_time for r in ref), sum(r.wall_time for r in ours)
    out(f"whole search: {total_a:.1f} s with mask multiplication, {total_b:.1f} s with sparseops "
        f"({total_a / total_b:.2f}x); dense fallback above density {backend.max_density('masked_linear', 'cpu'):g}")
    return runs
