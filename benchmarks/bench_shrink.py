"""sparseops.shrink's target (issue 16): the shrunk model's SGD training step (forward, backward,
optimiser step) runs as fast as a model built at that size.

For torchvision's resnet18 and vgg11 and the zoo's ResNet-20 and VGG-16 (CIFAR inputs, 32x32), with
L1 channel masks (Li et al., `tickets.channel_masks`, layerwise) removing 50% and 75% of the channels
of every layer shrink can cut (VGGs: every conv and hidden linear layer; ResNets: the inner channel of
every block, as the residual stream is shared by several writers), it times one training step of
  shrunk: `sparseops.shrink(masked, x)`;
  built:   the same architecture built by its constructors at the shrunk widths (a fresh model whose
           Conv2d / Linear / BatchNorm2d modules are constructed anew with the shrunk one's shapes);
  masked:  the masked, unshrunk model (sparseops layers with the channel masks; reference).
Each is checked first: the shrunk and built models have the same modules (names and types), the same
parameter and buffer shapes and strides, no hooks, and run the same aten ops in a training step.
Rounds are interleaved in one process (the 6 orders of the three cycled); the report gives medians, the
median of the per-round ratios shrunk/built (and its spread across rounds: the noise) and masked/built.

    python benchmarks/bench_shrink.py [--threads 1 2] [--rounds 12] [--batch 64] [--out results/shrink-<cpu>]
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import platform
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparseops
from sparseops.patch import patched_layers
from sparseops.tickets import channel_masks, set_masks, zoo

from common import warm_up

try:  # not a dependency of sparseops
    import torchvision
except ImportError:
    torchvision = None

REMOVED = [0.5, 0.75]
PROVIDERS = ["shrunk", "built", "masked"]
# Every order of the three, cycled: each provider follows each other equally often (over 6 rounds, the
# round boundaries included). A step right after the masked vgg11's (128M parameters with their
# gradients and momentum) ran 10-17% slower, so a rotation where one provider follows it more often
# biased the ratio by that much.
ORDERS = list(itertools.permutations(PROVIDERS))


def factories() -> dict:
    out = {"resnet20": zoo.resnet20, "vgg16": zoo.vgg16}
    if torchvision is not None:
        out = {"resnet18": lambda: torchvision.models.resnet18(num_classes=10),
               "vgg11": lambda: torchvision.models.vgg11(num_classes=10), **out}
    return out


def cuttable(model: nn.Module) -> list[str]:
    """The layers whose output channels shrink can remove: in a residual block its first conv (the
    block's inner channel); in a plain chain every Conv2d and Linear but the output layer."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    blocks = [n for n, m in model.named_modules() if hasattr(m, "conv1") and hasattr(m, "conv2") and n]
    if blocks:
        return [f"{b}.conv1" for b in blocks]
    return [n for n, _ in layers[:-1]]


def masked_model(factory, removed: float) -> nn.Module:
    """The model with L1 channel masks removing `removed` of the channels of every cuttable layer,
    and those channels dead (bias 0; a fresh BatchNorm has bias and running mean 0), so shrink cuts them."""
    torch.manual_seed(0)
    model = factory()
    sparseops.patch(model)
    keep = cuttable(model)
    exclude = [n for n, m in patched_layers(model) if n not in keep]
    set_masks(model, channel_masks(model, removed, norm="l1", scope="layerwise", exclude=exclude))
    with torch.no_grad():
        for n in keep:
            m = model.get_submodule(n)
            rows = ~m.weight_mask.flatten(1).any(1)
            if m.bias is not None:
                m.bias[rows] = 0
    return model


def _fresh(m: nn.Module, like: nn.Module) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(like.in_channels, like.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         m.groups, m.bias is not None, m.padding_mode)
    if isinstance(m, nn.Linear):
        return nn.Linear(like.in_features, like.out_features, m.bias is not None)
    return nn.BatchNorm2d(like.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)


def built_model(factory, shrunk: nn.Module) -> nn.Module:
    """The architecture from its constructor, each Conv2d / Linear / BatchNorm2d constructed anew at the
    shrunk model's shape: what a user writing the model at those widths gets."""
    torch.manual_seed(1)
    model = factory()
    for name, m in list(model.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _fresh(m, shrunk.get_submodule(name)))
    return model


def _hooks(model: nn.Module) -> int:
    return sum(len(getattr(m, h)) for m in model.modules() for h in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def trainer(model: nn.Module, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def structure(model: nn.Module, x, y) -> dict:
    """What the shrunk and the built model must share: modules, tensor shapes and strides, hooks, the
    aten ops of a training step (counted on a copy, the second step: the first creates momentum)."""
    copy = __import__("copy").deepcopy(model)
    step = trainer(copy, x, y)
    step()
    with _CountOps() as count:
        step()
    return {"modules": [[n, type(m).__name__] for n, m in model.named_modules()],
            "tensors": [[n, list(t.shape), list(t.stride())] for n, t in
                        [*model.named_parameters(), *model.named_buffers()]],
            "hooks": _hooks(model), "ops": dict(sorted(count.ops.items()))}


def case(name, factory, removed, batch, rounds, device) -> dict:
    torch.manual_seed(2)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    masked = masked_model(factory, removed).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kept not-dead channel would make the shapes differ from the plan
        shrunk = sparseops.shrink(masked, x[:2])
    built = built_model(factory, shrunk).to(device)
    checks = {p: structure(m, x, y) for p, m in (("shrunk", shrunk), ("built", built))}
    same = {k: checks["shrunk"][k] == checks["built"][k] for k in ("modules", "tensors", "hooks", "ops")}
    steps = {"shrunk": trainer(shrunk, x, y), "built": trainer(built, x, y), "masked": trainer(masked, x, y)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in steps.values():  # warm up (and `auto`'s measuring on the masked model)
        fn(), warm_up(fn)
    sync()
    times = {p: [] for p in steps}
    for r in range(rounds):
        for p in ORDERS[r % len(ORDERS)]:
            sync()
            t0 = time.perf_counter()
            steps[p]()
            sync()
            times[p].append(time.perf_counter() - t0)
    ratio = [a / b for a, b in zip(times["shrunk"], times["built"])]
    params = {p: sum(t.numel() for t in m.parameters()) for p, m in (("shrunk", shrunk), ("built", built),
                                                                      ("masked", masked))}
    return dict(model=name, removed=removed, batch=batch, threads=torch.get_num_threads(),
                ms={p: statistics.median(t) * 1e3 for p, t in times.items()},
                min_ms={p: min(t) * 1e3 for p, t in times.items()},
                shrunk_vs_built=statistics.median(ratio), shrunk_vs_built_range=[min(ratio), max(ratio)],
                masked_vs_built=statistics.median(a / b for a, b in zip(times["masked"], times["built"])),
                params=params, same=same, ops=sum(checks["shrunk"]["ops"].values()),
                modules=len(checks["shrunk"]["modules"]), hooks=checks["shrunk"]["hooks"],
                widths=[list(m.weight.shape[:2]) for m in shrunk.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])


def table(rows, meta) -> str:
    out = [f"Machine: {meta['machine']}; torch {meta['torch']}; batch {meta['batch']} at 32x32; {meta['rounds']} "
           "interleaved rounds; one SGD step (momentum 0.9, weight decay) = forward, backward, optimiser step (ms, "
           "medians). `shrunk/built`: median of the per-round ratios [lowest, highest round]; the models are "
           "checked to have the same modules, tensor shapes and strides, hooks (0) and aten ops per step "
           "(`same`). `masked`: the unshrunk model with its channel masks (sparseops layers, backend auto).",
           f"Load (`uptime`) before: {meta['load_before']}; after: {meta.get('load_after')}.", "",
           "| model | removed | threads | shrunk | built | masked | shrunk/built | masked/built | params shrunk "
           "(full) | same modules/tensors/hooks/ops |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["shrunk_vs_built_range"]
        same = "/".join("yes" if r["same"][k] else "NO" for k in ("modules", "tensors", "hooks", "ops"))
        out.append(f"| {r['model']} | {r['removed']:.0%} | {r['threads']} | {r['ms']['shrunk']:.1f} | "
                   f"{r['ms']['built']:.1f} | {r['ms']['masked']:.1f} | {r['shrunk_vs_built']:.3f} [{lo:.2f}, "
                   f"{hi:.2f}] | {r['masked_vs_built']:.2f} | {r['params']['shrunk'] / 1e6:.2f}M "
                   f"({r['params']['masked'] / 1e6:.2f}M) | {same} ({r['ops']} ops) |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: all of " + ", ".join(factories()))
    ap.add_argument("--removed", nargs="*", type=float, default=REMOVED)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=12, help="a multiple of 6: every order equally often")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="path without suffix (default results/shrink-<machine>)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    machine = sparseops.tuning.machine()
    label = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{machine['cpu']} {machine['isa']}")
    meta = dict(machine=f"{label} ({platform.machine()})", torch=torch.__version__, batch=args.batch,
                rounds=args.rounds, load_before=uptime())
    chosen = factories() if args.models is None else {k: factories()[k] for k in args.models}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, factory in chosen.items():
            for removed in args.removed:
                rows.append(case(name, factory, removed, args.batch, args.rounds, device))
                print(table(rows[-1:], meta).splitlines()[-1], flush=True)
    meta["load_after"] = uptime()
    text = table(rows, meta)
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", label.lower())).strip("-")
    out = Path(args.out or Path(__file__).parent / "results" / f"shrink-{slug}")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
