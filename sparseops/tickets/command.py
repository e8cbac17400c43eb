"""`python -m sparseops ticket`: a ticket search on a built-in model and dataset, with progress bars
and a final table (level, sparsity, accuracy, epoch time)."""
from __future__ import annotations

import argparse
import json

import torch

from .. import backend
from .cs import continuous_sparsification
from .imp import imp
from .masks import Ticket, sparsity_report
from .train import Trainer
from .zoo import DATASETS, MODELS, build_model, load_data

METHODS = ("imp", "cs", "random")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="imp", help="imp: IMP with rewinding; random: the same "
                   "levels with random pruning; cs: Continuous Sparsification")
    p.add_argument("--model", choices=MODELS, default="lenet300")
    p.add_argument("--data", choices=DATASETS, default="digits")
    p.add_argument("--levels", type=int, default=10, help="IMP/random: pruning levels after the dense level 0")
    p.add_argument("--rate", type=float, default=0.2, help="IMP/random: fraction of the kept weights pruned per level")
    p.add_argument("--rewind", default="0", help="IMP/random: rewind point, 0 (init), '<N>it' or '<N>ep'")
    p.add_argument("--scope", choices=("global", "layerwise"), default="global", help="IMP: magnitude threshold scope")
    p.add_argument("--exclude", nargs="*", default=[], help="layer names never pruned (e.g. the output layer)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per level (IMP) or per round (CS)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--rounds", type=int, default=3, help="CS: rounds before the ticket is trained")
    p.add_argument("--s0", type=float, default=0.0, help="CS: initial score (lower gives sparser tickets)")
    p.add_argument("--lmbda", type=float, default=1e-8, help="CS: mask penalty weight")
    p.add_argument("--final-temp", type=float, default=200.0, help="CS: beta at the end of each round")
    p.add_argument("--rewind-epoch", type=int, default=2, help="CS: epoch of round 0 the ticket rewinds to")
    p.add_argument("--hidden", type=int, default=2048, help="wide-mlp: hidden width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="force a backend (reference = plain mask multiplication)")
    p.add_argument("--checkpoint-dir", default=None, help="IMP/random: save each level here and resume from it")
    p.add_argument("--save-ticket", default=None, help="write the final ticket (bit-packed masks) to this file")
    p.add_argument("--json", default=None, help="write the per-level results to this JSON file")
    p.add_argument("--no-progress", action="store_true")


def search(args: argparse.Namespace, out=print):
    """Runs the search `args` describes and returns (SearchResult, model)."""
    torch.manual_seed(args.seed)
    train, test = load_data(args.data, args.seed)
    model = build_model(args.model, hidden=args.hidden)
    progress = not args.no_progress
    with backend.backend(args.backend):
        if args.method == "cs":
            result = continuous_sparsification(
                model, train, test, rounds=args.rounds, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                mask_lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, s0=args.s0,
                lmbda=args.lmbda, final_temp=args.final_temp, rewind_epoch=args.rewind_epoch, progress=progress)
        else:
            trainer = Trainer(train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              momentum=args.momentum, weight_decay=args.weight_decay)
            rewind = int(args.rewind) if str(args.rewind).isdigit() else args.rewind
            result = imp(model, trainer, levels=args.levels, rate=args.rate, rewind=rewind, scope=args.scope,
                         exclude=args.exclude, pruning="magnitude" if args.method == "imp" else "random",
                         checkpoint_dir=args.checkpoint_dir, generator=torch.Generator().manual_seed(args.seed),
                         progress=progress)
    return result, model


def run(args: argparse.Namespace, out=print) -> int:
    result, model = search(args, out)
    label = {"imp": "IMP with rewinding", "random": "random pruning", "cs": "Continuous Sparsification"}[args.method]
    out(f"{label} on {args.data} with {args.model} ({torch.get_num_threads()} threads, backend "
        f"{args.backend or backend.get_backend()})")
    out(result.table())
    if args.method == "cs":
        out("(levels 0..{0}: CS rounds with the soft mask, sparsity of s > 0; level {1}: the ticket, "
            "retrained from the rewind point)".format(args.rounds - 1, args.rounds))
    out(str(sparsity_report(result.final_masks)))
    if args.save_ticket:
        Ticket(result.final_masks, {"method": args.method, "model": args.model, "data": args.data,
                                    "seed": args.seed, "accuracy": result.levels[-1].metrics.get("accuracy")}
               ).save(args.save_ticket)
        out(f"ticket written to {args.save_ticket}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "levels": result.to_dict()}, f, indent=1)
    return 0
