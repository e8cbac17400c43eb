"""`python -m sparseops ticket`: a ticket search on a built-in model and dataset, with progress bars
and a final table (level, sparsity, accuracy, epoch time)."""
from __future__ import annotations

import argparse
import json

import torch

from .. import backend
from . import presets
from .cs import continuous_sparsification, default_milestones
from .imp import imp
from .masks import Ticket, sparsity_report
from .structured_cs import TEMPERATURES, structured_cs
from .train import Trainer
from .zoo import DATASETS, MODELS, build_model, load_data, open_lth_init

METHODS = ("imp", "cs", "random", "structured-cs")


# The command's own defaults where no preset is given (a quick search on digits).
DEFAULTS = {"method": "imp", "model": "lenet300", "data": "digits", "rate": 0.2, "rewind": "0", "epochs": 20,
            "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "rounds": 3, "s0": 0.0,
            "lmbda": 1e-8, "final_temp": 200.0, "rewind_epoch": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(presets.PRESETS), default=None,
                   help="an upstream run (open_lth's mnist_lenet_300_100, cifar_resnet_20, cifar_vgg_16; the official "
                        "CS cs_resnet_20): its model, hyperparameters and pruning setup; --epochs scales it down "
                        "(schedule scaled), other flags override single values")
    p.add_argument("--method", choices=METHODS, default=None, help="imp: IMP with rewinding; random: the same "
                   "levels with random pruning; cs: Continuous Sparsification; structured-cs: its structured "
                   "variant (channel and block gates) (default: imp, or the preset's)")
    p.add_argument("--granularity", choices=("weight", "channel"), default="weight",
                   help="IMP/random: prune single weights or whole filters (channel IMP, by --norm)")
    p.add_argument("--norm", choices=("l1", "l2"), default="l1", help="IMP --granularity channel: filter norm")
    p.add_argument("--shrink", action="store_true", help="IMP --granularity channel: train each pruned level on "
                   "the physically smaller model (sparseops.shrink; needs torch-pruning)")
    p.add_argument("--flops-weighted", action="store_true", help="structured-cs: weight each unit's gate by its "
                   "multiply-accumulates")
    p.add_argument("--temperature", choices=TEMPERATURES, default="global", help="structured-cs: one beta schedule "
                   "for all gates, or per unit (a gate's beta rises only while its s > 0 holds)")
    p.add_argument("--model", choices=MODELS, default=None, help="default: lenet300, or the preset's")
    p.add_argument("--data", choices=DATASETS, default=None,
                   help="default: digits; synthetic-cifar for the CIFAR presets")
    p.add_argument("--levels", type=int, default=10, help="IMP/random: pruning levels after the dense level 0")
    p.add_argument("--rate", type=float, default=None, help="IMP/random: fraction of the kept weights pruned per "
                   "level (0.2)")
    p.add_argument("--rewind", default=None, help="IMP/random: rewind point, 0 (init), '<N>it' or '<N>ep'; later "
                   "levels train from it to the end (open_lth)")
    p.add_argument("--scope", choices=("global", "layerwise"), default=None, help="IMP: magnitude threshold scope "
                   "(global; with --granularity channel: layerwise, as Li et al.)")
    p.add_argument("--budget", choices=("all", "prunable"), default=None, help="IMP: prune rate of all kept "
                   "weights, excluded layers' included (open_lth, the default), or of the prunable layers' only "
                   "(--granularity channel: rate of each layer's filters)")
    p.add_argument("--exclude", nargs="*", default=None, help="layer names never pruned ('output': the output "
                   "layer); default: open_lth's for the model (the output layer, except for ResNets); "
                   "--exclude alone prunes every layer")
    p.add_argument("--epochs", type=int, default=None, help="epochs per level (IMP) or per round (CS) (20, or the "
                   "preset's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--rounds", type=int, default=None, help="CS: rounds before the ticket is trained")
    p.add_argument("--s0", type=float, default=None, help="CS: initial score (lower gives sparser tickets)")
    p.add_argument("--lmbda", type=float, default=None, help="CS: mask penalty weight (1e-8; structured-cs: 1e-3)")
    p.add_argument("--final-temp", type=float, default=None, help="CS: beta at the end of each round")
    p.add_argument("--rewind-epoch", type=int, default=None, help="CS: epoch of round 0 the ticket rewinds to")
    p.add_argument("--hidden", type=int, default=2048, help="wide-mlp: hidden width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="force a backend (reference = plain mask multiplication)")
    p.add_argument("--checkpoint-dir", default=None, help="save each level (IMP/random) or round (CS, structured CS) "
                   "here and resume from it")
    p.add_argument("--save-ticket", default=None, help="write the final ticket (bit-packed masks) to this file")
    p.add_argument("--json", default=None, help="write the per-level results to this JSON file")
    p.add_argument("--no-progress", action="store_true")


def _get(args, name, fallback=None):
    value = getattr(args, name, None)
    return (DEFAULTS.get(name) if fallback is None else fallback) if value is None else value


def resolve(args: argparse.Namespace):
    """(preset or None, a line saying what runs): fills args' unset values from the preset (scaled to
    --epochs) or the command's defaults."""
    preset = presets.get(args.preset) if getattr(args, "preset", None) else None
    if getattr(args, "method", None) == "structured-cs":
        if preset is not None:
            raise SystemExit("--method structured-cs has no preset (no upstream run to copy)")
        args.lmbda = 1e-3 if args.lmbda is None else args.lmbda
    if preset is None:
        for k, v in DEFAULTS.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
        return None, None
    full = preset.epochs
    if args.epochs is not None and args.epochs != full:
        preset = preset.scaled(args.epochs)
    cifar = preset.dataset.startswith("CIFAR")
    if isinstance(preset, presets.CSPreset):
        args.method = args.method or "cs"
        if args.method != "cs":
            raise SystemExit(f"--preset {preset.name} is a Continuous Sparsification run; --method {args.method} "
                             "needs an IMP preset")
    else:
        args.method = args.method or "imp"
        if args.method == "cs":
            raise SystemExit(f"--preset {preset.name} is an IMP run; --method cs needs --preset cs_resnet_20")
    args.model = args.model or preset.model_name
    args.data = args.data or ("synthetic-cifar" if cifar else "digits")
    args.epochs = preset.epochs
    scaled = f"scaled down to {preset.epochs} of {full} epochs" if preset.epochs != full else "full length"
    line = f"preset {preset.describe()} [{scaled}; model {args.model} on {args.data}]"
    return preset, line


def search(args: argparse.Namespace, out=print):
    """Runs the search `args` describes and returns (SearchResult, model)."""
    preset, line = resolve(args)
    if line:
        out(line)
    torch.manual_seed(args.seed)
    train, test = load_data(args.data, args.seed)
    model = build_model(args.model, hidden=args.hidden)
    if isinstance(preset, presets.IMPPreset):
        open_lth_init(model)
    progress = not args.no_progress
    with backend.backend(args.backend):
        if args.method == "cs":
            kw = {k: getattr(args, k) for k in ("rounds", "batch_size", "lr", "momentum", "weight_decay", "s0",
                                                 "lmbda", "final_temp", "rewind_epoch")}
            if preset is None:  # the command's quick runs keep the official drops at 56/85 and 71/85 of --epochs
                kw.update(lr_milestones=default_milestones(args.epochs), mask_lr=args.lr)
            result = continuous_sparsification(model, train, test, epochs=args.epochs, preset=preset,
                                               checkpoint_dir=getattr(args, "checkpoint_dir", None),
                                               progress=progress, **kw)
        elif args.method == "structured-cs":
            kw = {k: getattr(args, k) for k in ("rounds", "batch_size", "lr", "momentum", "weight_decay", "s0",
                                                 "lmbda", "final_temp", "rewind_epoch")}
            kw.update(flops_weighted=getattr(args, "flops_weighted", False),
                      temperature=getattr(args, "temperature", "global"),
                      checkpoint_dir=getattr(args, "checkpoint_dir", None))
            result = structured_cs(model, train, test, epochs=args.epochs, progress=progress, **kw)
        else:
            overrides = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                                           ("momentum", args.momentum), ("weight_decay", args.weight_decay))
                         if v is not None}
            if preset is not None:
                trainer = preset.trainer(train, test, **overrides)
            else:
                trainer = Trainer(train, test, epochs=args.epochs, **overrides)
            rewind = None if args.rewind is None else (int(args.rewind) if str(args.rewind).isdigit() else args.rewind)
            result = imp(model, trainer, levels=args.levels, rate=args.rate, rewind=rewind, scope=args.scope,
                         budget=args.budget, exclude=args.exclude,
                         pruning="magnitude" if args.method == "imp" else "random", preset=preset,
                         granularity=getattr(args, "granularity", "weight"), norm=getattr(args, "norm", "l1"),
                         shrink=getattr(args, "shrink", False),
                         example_inputs=train[0][:2] if getattr(args, "shrink", False) else None,
                         checkpoint_dir=args.checkpoint_dir, generator=torch.Generator().manual_seed(args.seed),
                         progress=progress)
    return result, model


def run(args: argparse.Namespace, out=print) -> int:
    result, model = search(args, out)
    label = {"imp": "IMP with rewinding", "random": "random pruning", "cs": "Continuous Sparsification",
             "structured-cs": "Structured Continuous Sparsification"}[args.method]
    out(f"{label} on {args.data} with {args.model} ({torch.get_num_threads()} threads, backend "
        f"{args.backend or backend.get_backend()})")
    out(result.table())
    if args.method == "structured-cs":
        out("(levels 0..{0}: rounds, sparsity = the units' channels with s <= 0; level {1}: the ticket, retrained "
            "from the rewind point; kept MACs {2:.1%})".format(args.rounds - 1, args.rounds,
                                                                result.levels[-1].metrics["macs_kept"]))
    if args.method == "cs":
        out("(levels 0..{0}: CS rounds with the soft mask, sparsity of s > 0; level {1}: the ticket, "
            "retrained from the rewind point)".format(args.rounds - 1, args.rounds))
    out(str(sparsity_report(result.final_masks)))
    if args.save_ticket:
        Ticket(result.final_masks, {"method": args.method, "model": args.model, "data": args.data,
                                    "preset": args.preset or "",
                                    "seed": args.seed, "accuracy": result.levels[-1].metrics.get("accuracy")}
               ).save(args.save_ticket)
        out(f"ticket written to {args.save_ticket}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "levels": result.to_dict()}, f, indent=1)
    return 0
