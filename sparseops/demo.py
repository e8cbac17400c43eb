"""`make demo`: a short IMP search, run twice with the same seed: on sparseops' kernels, and with
plain mask multiplication (what torch.nn.utils.prune and open_lth do; here the "reference" backend).
Same masks, same accuracy; the time per level differs.

What runs is an upstream preset scaled down (fewer epochs, the schedule scaled with them):
on scikit-learn's digits, open_lth's mnist_lenet_300_100 recipe on a wide MLP (64-hidden-hidden-10,
open_lth's mnist_lenet_<hidden>_<hidden>); on synthetic CIFAR-shaped data, open_lth's
cifar_resnet_20 (timing only: the labels are random)."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

import torch

from . import backend, tuning
from .tickets import presets
from .tickets.command import search

DEMOS = {"digits": ("mnist_lenet_300_100", "wide-mlp"), "synthetic-cifar": ("cifar_resnet_20", "resnet20")}


def run(levels: int = 10, epochs: int = 3, hidden: int = 2048, batch_size: int = 128, seed: int = 0,
        progress: bool = True, out=print, data: str = "digits", repeats: int = 2):
    name, model = DEMOS[data]
    preset = presets.get(name)
    args = argparse.Namespace(preset=name, method="imp", model=model, data=data, levels=levels, rate=None,
                              rewind=None, scope="global", budget="all", exclude=None, epochs=epochs,
                              batch_size=batch_size, lr=None, momentum=None, weight_decay=None, hidden=hidden,
                              seed=seed, checkpoint_dir=None, no_progress=not progress)
    net = f"MLP 64-{hidden}-{hidden}-10 (open_lth's mnist_lenet_{hidden}_{hidden})" if data == "digits" else \
        "ResNet-20 (open_lth's cifar_resnet_20)"
    out(f"IMP with rewinding on {data}: {net}, {levels} pruning levels; open_lth's {name} preset scaled down to {epochs} of "
        f"{preset.epochs} epochs per level (schedule scaled), batch {batch_size}, {torch.get_num_threads()} threads")
    # An untimed short run of each first, then the two searches alternately `repeats` times, the faster
    # of each kept (per level and whole): this VM's first seconds of a process, and its drift over
    # minutes, would otherwise count against whichever ran first. Every sparseops search measures
    # anew (as a first run on a machine would), and its measuring counts in its time.
    with tuning.measuring(False):
        for name in ("reference", None):
            warm = argparse.Namespace(**{**vars(args), "backend": name, "levels": 1, "epochs": 1})
            search(warm, out=lambda line: None)
    tries: dict[str, list] = {"mask multiply": [], "sparseops": []}
    for _ in range(repeats):
        for label, name in (("mask multiply", "reference"), ("sparseops", None)):
            args.backend = name
            with _fresh_tuning_cache():
                result, _ = search(argparse.Namespace(**vars(args)), out=lambda line: None)
                measured = tuning.measured_seconds()
            tries[label].append((sum(r.wall_time for r in result.levels), measured, result))
    runs = {label: t[-1][2] for label, t in tries.items()}
    ref, ours = runs["mask multiply"].levels, runs["sparseops"].levels
    out(f"{'level':>5} | {'sparsity':>8} | {'acc (mask mult.)':>16} | {'acc (sparseops)':>15} | "
        f"{'epoch (mask mult.)':>18} | {'epoch (sparseops)':>17} | speed-up")
    for i, (a, b) in enumerate(zip(ref, ours, strict=True)):
        ta, tb = (min(t[2].levels[i].metrics["epoch_time"] for t in tries[label]) for label in tries)
        out(f"{a.level:>5} | {b.sparsity:>8.2%} | {a.metrics['accuracy']:>16.4f} | {b.metrics['accuracy']:>15.4f} | "
            f"{ta * 1e3:>15.1f} ms | {tb * 1e3:>14.1f} ms | {ta / tb:>6.2f}x")
    (total_a, _, _), (total_b, measured, _) = (min(t, key=lambda e: e[0]) for t in tries.values())
    out(f"whole search: {total_a:.1f} s with mask multiplication, {total_b:.1f} s with sparseops "
        f"({total_a / total_b:.2f}x; the faster of {repeats} runs each), of which {measured:.2f} s "
        f"({measured / total_b:.1%}) auto's measuring; dense fallback above density "
        f"{backend.max_density('masked_linear', 'cpu'):g}")
    return runs


@contextlib.contextmanager
def _fresh_tuning_cache():
    """auto's cache empty, in a directory of its own: each search measures as on a new machine (the
    user's cache is neither read nor written)."""
    saved = os.environ.get("SPARSEOPS_CACHE_DIR")
    with tempfile.TemporaryDirectory() as d:
        os.environ["SPARSEOPS_CACHE_DIR"] = d
        tuning.clear(memory_only=True)
        try:
            yield
        finally:
            tuning.clear(memory_only=True)
            if saved is None:
                del os.environ["SPARSEOPS_CACHE_DIR"]
            else:
                os.environ["SPARSEOPS_CACHE_DIR"] = saved
