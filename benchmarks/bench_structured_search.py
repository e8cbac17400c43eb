"""Whole structured ticket searches on CIFAR VGG-16 (synthetic CIFAR-shaped data: only speed is measured):

- Structured CS (`tickets.structured_cs`): the same search twice, same seed, once with the channels
  whose gate is exactly 0 put into the layers' masks before every step (`skip_zero_units=True`: whole
  zero rows and the readers' zero columns, which sparseops runs as smaller dense products) and once with
  the gates only multiplied (`skip_zero_units=False`: plain dense layers, what a PyTorch implementation
  does). The penalty and learning rate of the scores are set so that the gates reach exact zeros within
  a few epochs (a search compressed into a benchmark).
- Channel IMP (`tickets.imp(granularity="channel")`): levels of L1 filter pruning with a fixed number
  of SGD steps each, with sparseops (`auto`) and with plain mask multiplication (the `reference`
  backend: conv(x, w * mask)), same seed. A pruned filter's channel is removed (its readers' columns
  masked too, sparseops.tickets.removal) in both. `imp-shrink`: the same, sparseops with `shrink=True`
  (each pruned level trains the physically smaller model, sparseops.shrink, and writes it back).

Each pair must give the same result, and the script says whether it did: structured CS the same gates
every round and the same per-epoch losses, channel IMP the same masks every level and the same final
state (batch norm statistics of removed channels aside: shrunk levels leave those). Both run with
`auto` measuring (a fresh cache per search, as a first run gets; the time spent measuring,
tuning.measured_seconds(), reported apart) and without (the prior alone), unless `--tune` says one. One command writes results/structured-search-<cpu>-<isa>.{json,md}:

    python benchmarks/bench_structured_search.py [--method scs|imp|imp-shrink|all ...] [--tune both|on|off] \
        [--images 128] [--batch 32] [--epochs 4] [--rounds 1] [--levels 3] [--steps 2] [--out results/....json]

Not a test (a search takes minutes at realistic sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparseops
from sparseops import tickets, tuning
from sparseops.tickets.zoo import synthetic_cifar, vgg16

from common import timed_sgd_train


def _fresh_cache():
    """An empty tuning cache in a new directory: the search pays its own measuring, as a first run does."""
    os.environ["SPARSEOPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparseops-bench-cache-")
    tuning.clear(memory_only=True)


def scs_search(skip: bool, args) -> dict:
    torch.manual_seed(args.seed)
    model = vgg16()
    train, _ = synthetic_cifar(args.images, 16, seed=args.seed)
    measured = tuning.measured_seconds()
    t0 = time.perf_counter()
    result = tickets.structured_cs(model, train, None, rounds=args.rounds, epochs=args.epochs,
                                   batch_size=args.batch, lr=0.01, mask_lr=args.mask_lr, lmbda=args.lmbda,
                                   final_temp=args.final_temp, rewind_epoch=0, flops_weighted=True,
                                   skip_zero_units=skip, progress=False)
    wall = time.perf_counter() - t0
    return {"wall_time": wall, "measuring_s": tuning.measured_seconds() - measured, "rounds": [
        {"round": r.level, "kept_channels": r.metrics["kept_channels"], "macs_kept": r.metrics["macs_kept"],
         "round_time": r.wall_time, "gates": r.metrics["gates"],
         "epochs": [{k: h[k] for k in ("epoch", "loss", "time", "channels_off")} for h in r.metrics["history"]]}
        for r in result.levels]}


def imp_search(backend: str | None, args, shrink: bool = False) -> dict:
    torch.manual_seed(args.seed)
    model = vgg16()
    train = timed_sgd_train(args.batch, args.steps, args.seed)
    measured = tuning.measured_seconds()
    t0 = time.perf_counter()
    with sparseops.backend(backend):
        result = tickets.imp(model, train, levels=args.levels, rate=0.3, granularity="channel", progress=False,
                             shrink=shrink, example_inputs=torch.zeros(2, 3, 32, 32) if shrink else None)
    wall = time.perf_counter() - t0
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("weight_mask")}
    return {"wall_time": wall, "measuring_s": tuning.measured_seconds() - measured, "_state": state, "levels": [
        {"level": r.level, "sparsity": r.sparsity, "round_time": r.wall_time, "step_time": r.metrics["step_time"],
         "work_kept": _work_kept(r.masks), "_masks": r.masks,
         "kept_filters": {k: int(m.flatten(1).any(1).sum()) for k, m in r.masks.items()}} for r in result.levels]}


def _work_kept(masks) -> float:
    """The kept rows x kept columns of every mask over its full size (weights, not MACs)."""
    kept = sum(int(m.flatten(1).any(1).sum()) * int(m.transpose(0, 1).flatten(1).any(1).sum()) * m[0, 0].numel()
               for m in masks.values())
    return kept / sum(m.numel() for m in masks.values())


def _same_scs(a, b) -> dict:
    gates = all(x["gates"] == y["gates"] for x, y in zip(a["rounds"], b["rounds"], strict=True))
    la = [e["loss"] for r in a["rounds"] for e in r["epochs"]]
    lb = [e["loss"] for r in b["rounds"] for e in r["epochs"]]
    return {"same_gates": gates, "max_loss_diff": max(abs(x - y) for x, y in zip(la, lb, strict=True))}


def _same_imp(a, b) -> dict:
    masks = all(torch.equal(x["_masks"][k], y["_masks"][k]) for x, y in zip(a["levels"], b["levels"], strict=True)
                for k in x["_masks"])
    diff = max(float((_live(a["_state"], k) - _live(b["_state"], k)).abs().max()) for k in a["_state"]
               if a["_state"][k].is_floating_point())
    # Filters kept by one search and not the other, per level: where float rounding reorders two filters of
    # nearly equal norm, the searches part ways (and their weights with them) from that level on.
    filters = [sum(int((x["_masks"][k].flatten(1).any(1) != y["_masks"][k].flatten(1).any(1)).sum())
                   for k in x["_masks"]) for x, y in zip(a["levels"], b["levels"], strict=True)]
    # (Layerwise pruning keeps as many filters per layer on both sides whichever they are: the same shapes.)
    counts = all(x["kept_filters"] == y["kept_filters"] for x, y in zip(a["levels"], b["levels"], strict=True))
    return {"same_masks": masks, "max_weight_diff": diff, "filters_differing": filters, "same_filter_counts": counts}


def _live(state: dict, k: str) -> torch.Tensor:
    """state[k] in float64, a batch norm's running statistics zeroed at removed (dead) channels: a
    search on shrunk models (imp shrink=True) does not update those, and no output depends on them."""
    t = state[k].double()
    base, _, leaf = k.rpartition(".")
    if leaf in ("running_mean", "running_var") and base + ".weight" in state and base + ".bias" in state:
        t = t * ((state[base + ".weight"] != 0) | (state[base + ".bias"] != 0))
    return t


def pair(method: str, args) -> dict:
    """The search with sparseops, then with mask multiplication; ratios of the whole and of each round."""
    if method == "scs":
        ours, ref = scs_search(True, args), scs_search(False, args)
        same = _same_scs(ours, ref)
    else:
        ours, ref = imp_search(None, args, shrink=method == "imp-shrink"), imp_search("reference", args)
        same = _same_imp(ours, ref)
        for run in (ours, ref):
            run.pop("_state")
            for r in run["levels"]:
                r.pop("_masks")
    key = "rounds" if method == "scs" else "levels"
    per_round = [b["round_time"] / a["round_time"] for a, b in zip(ours[key], ref[key], strict=True)]
    return {"sparseops": ours, "mask_multiply": ref, **same, "speedup": ref["wall_time"] / ours["wall_time"],
            "speedup_without_measuring": ref["wall_time"] / max(ours["wall_time"] - ours["measuring_s"], 1e-9),
            "round_speedups": per_round}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def _warm(method: str, args) -> None:
    """A short untimed search on each side first: the process's first-time costs (fresh pages for new
    buffers, oneDNN's primitives for each shape) otherwise land on whichever side runs first (they made
    IMP's level 0, the same dense model on both sides, 0.90x for sparseops, which runs first)."""
    small = argparse.Namespace(**{**vars(args), "levels": 1, "steps": 1, "epochs": 2, "images": args.batch})
    if method == "scs":
        scs_search(True, small), scs_search(False, small)
    else:
        imp_search(None, small, shrink=method == "imp-shrink"), imp_search("reference", small)


_TITLES = {"scs": "structured CS", "imp": "channel IMP", "imp-shrink": "channel IMP, shrunk levels"}


def report(out: dict) -> str:
    m, a = out["machine"], out["args"]
    lines = [f"# Structured searches: CIFAR VGG-16, synthetic data ({m['cpu']}, {m['isa']} kernels, {m['threads']} "
             f"threads, torch {m['torch']})", "",
             f"Command: `{' '.join(['python benchmarks/bench_structured_search.py', *out['argv']])}`; "
             f"structured CS: {a['images']} images, batch {a['batch']}, {a['rounds']} round(s) of {a['epochs']} epochs + "
             f"the {a['epochs']}-epoch ticket; channel IMP: {a['levels']} levels at rate 0.3, {a['steps']} SGD steps "
             f"each, batch {a['batch']}.", f"Load before: {out['load_before']}; after: {out['load_after']}.", "",
             "| search | measuring | mask multiplication | sparseops | of which measuring | speed-up | without the "
             "measuring | per round (search rounds..., ticket / IMP levels 0...) | same result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, runs in out["runs"].items():
        for method, r in runs.items():
            same = (f"gates {r['same_gates']}, loss diff {r['max_loss_diff']:.1e}" if method == "scs" else
                    f"masks {r['same_masks']}, weight diff {r['max_weight_diff']:.1e}" +
                    ("" if r["same_masks"] else f" (filters differing per level: {r['filters_differing']}; same "
                     f"filter count per layer: {r['same_filter_counts']})"))
            lines.append(f"| {_TITLES[method]} | {mode} | "
                         f"{r['mask_multiply']['wall_time']:.1f} s | {r['sparseops']['wall_time']:.1f} s | "
                         f"{r['sparseops']['measuring_s']:.1f} s | {r['speedup']:.2f}x | "
                         f"{r['speedup_without_measuring']:.2f}x | "
                         f"{', '.join(f'{s:.2f}x' for s in r['round_speedups'])} | {same} |")
    lines += ["", "Kept per round (structured CS): " + "; ".join(
        f"{mode}: " + ", ".join(f"{x['kept_channels']:.0%} ch. / {x['macs_kept']:.0%} MACs"
                                for x in runs["scs"]["sparseops"]["rounds"])
        for mode, runs in out["runs"].items() if "scs" in runs)]
    lines += ["Work kept per level (channel IMP, kept rows x columns of the masked layers): " + "; ".join(
        f"{mode}: " + ", ".join(f"{x['work_kept']:.0%}" for x in runs[m]["sparseops"]["levels"])
        for mode, runs in out["runs"].items() for m in ("imp", "imp-shrink") if m in runs)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("scs", "imp", "imp-shrink", "all"), nargs="+", default=["all"],
                    help="one or more; imp-shrink: channel IMP with shrink=True (each level trains the shrunk model)")
    ap.add_argument("--tune", choices=("both", "on", "off"), default="both",
                    help="auto's measuring: on (a fresh cache per search), off (the prior), or both runs")
    ap.add_argument("--images", type=int, default=128, help="structured CS: synthetic training images")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4, help="structured CS: epochs per round (and of the ticket)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lmbda", type=float, default=1e-3)
    ap.add_argument("--mask-lr", type=float, default=2.0)
    ap.add_argument("--final-temp", type=float, default=1e4)
    ap.add_argument("--levels", type=int, default=3, help="channel IMP: levels at rate 0.3")
    ap.add_argument("--steps", type=int, default=2, help="channel IMP: SGD steps per level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="the json file (the markdown beside it, .md)")
    args = ap.parse_args(argv)
    machine = tuning.machine()
    slug = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-")
    path = Path(args.out or Path(__file__).with_name("results") / f"structured-search-{slug}-{machine['isa']}.json")
    out = {"machine": machine, "args": vars(args), "argv": sys.argv[1:] if argv is None else list(argv),
           "load_before": _uptime(), "runs": {}}
    warm = vgg16()
    F.cross_entropy(warm(torch.randn(args.batch, 3, 32, 32)), torch.randint(0, 10, (args.batch,))).backward()
    methods = ("scs", "imp", "imp-shrink") if "all" in args.method else tuple(dict.fromkeys(args.method))
    for mode in (("on", "off") if args.tune == "both" else (args.tune,)):
        runs = out["runs"].setdefault("on" if mode == "on" else "off", {})
        for method in methods:
            _warm(method, args)
            _fresh_cache()
            with tuning.measuring(mode == "on"):
                runs[method] = r = pair(method, args)
            print(f"{method} (measuring {mode}): {r['mask_multiply']['wall_time']:.1f} s with mask multiplication, "
                  f"{r['sparseops']['wall_time']:.1f} s with sparseops, {r['sparseops']['measuring_s']:.1f} s of it "
                  f"measuring: {r['speedup']:.2f}x ({r['speedup_without_measuring']:.2f}x without the measuring); per "
                  f"round {', '.join(f'{s:.2f}x' for s in r['round_speedups'])}; same result: "
                  f"{r.get('same_gates', r.get('same_masks'))}", flush=True)
    out["load_after"] = _uptime()
    for method in methods:  # the first mode's runs at the top level too (what tests and older readers look at)
        out[method] = out["runs"][next(iter(out["runs"]))][method]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    path.with_suffix(".md").write_text(report(out))
    print(report(out))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
