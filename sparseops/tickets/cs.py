"""Continuous Sparsification (Savarese, Silva & Maire, 2020) as the official code runs it
(github.com/lolemacs/continuous-sparsification, main.py and models/layers.py).

Every masked weight gets a score s (initialised to s0); the mask is sigmoid(beta * s) / sigmoid(s0).
In each round beta starts at 1 and is multiplied by final_temp^(1 / (epochs - 1)) at the start of
every epoch after the first; the loss gains lambda * sum(mask). Weights and scores have separate SGD
optimisers (momentum 0.9, Nesterov; weight decay on the weights only) that persist across rounds,
and one step learning-rate schedule drives both. At the start of epoch `rewind_epoch` of round 0
all weights and buffers (not the scores) are saved. Between rounds beta is reset to 1 and then the
scores are clamped, s = clamp(beta * s, max=s0). The ticket is s > 0; it is trained with a fresh
weight optimiser from the saved weights, with the mask (s > 0) / sigmoid(s0).

One detail differs from the paper's Algorithm 1 and is kept as the code has it: the clamp happens
after beta is reset to 1, so it is clamp(s, max=s0). `clamp_with_final_beta=True` uses the round's
final beta instead, as the paper writes it. The official ResNet masks only its 3x3 convs: pass
`filter_fn=official_layers` (or the `cs_resnet_20` preset) for that layer set. Under Python 3 the
official main.py stops before the ticket phase (its weight-parameter iterator is used up by the
first optimiser); this does what it does under Python 2, the ticket phase included. With
`checkpoint_dir`, every finished round (and the ticket) is saved as IMP saves its levels
(sparseops.tickets.files) and a second call resumes after the last one.
docs/tickets.md compares every default with main.py.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as snn
from ..patch import check_model, patch, patched_layers
from ..reference import cut_sigmoid
from .files import resume_rounds, save_round
from .imp import LevelResult, SearchResult
from .presets import OFFICIAL_MILESTONES, CSPreset
from .masks import get_masks
from .train import batches, evaluate


def soft_layers(model: nn.Module) -> list:
    return [m for _, m in patched_layers(model) if isinstance(m, snn._SoftMaskedMixin)]


def set_beta(model: nn.Module, beta: float) -> None:
    for m in soft_layers(model):
        m.beta = float(beta)


def penalty(model: nn.Module) -> torch.Tensor:
    """sum over soft layers of sum(sigmoid(beta * s) / sigmoid(s0)): CS's L0 surrogate."""
    terms = [m.penalty() for m in soft_layers(model)]
    return torch.stack(terms).sum()


def default_milestones(epochs: int) -> list[int]:
    """The official schedule's drops (epochs 56 and 71 of 85), scaled to `epochs` (what the scaled-down
    presets and the CLI use; `continuous_sparsification` itself keeps 56 and 71 as main.py does)."""
    return [round(epochs * 56 / 85), round(epochs * 71 / 85)]


def continuous_sparsification(model: nn.Module, train_data, test_data=None, *, rounds: int | None = None,
                              epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                              mask_lr: float | None = None, momentum: float | None = None,
                              nesterov: bool | None = None, weight_decay: float | None = None, lr_milestones=None,
                              lr_gamma: float = 0.1, lr_drops=None, s0: float | None = None,
                              lmbda: float | None = None, final_temp: float | None = None,
                              rewind_epoch: int | None = None, clamp_with_final_beta: bool = False,
                              filter_fn: Callable | None = None, loss_fn=F.cross_entropy, device=None,
                              checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
                              preset=None) -> SearchResult:
    """Searches a ticket with CS and trains it; returns one result per round and one for the ticket.

    Defaults are main.py's (None takes them, or the preset's): rounds 3, epochs 85, batch 128, lr 0.1,
    mask_lr = lr, momentum 0.9 with Nesterov, weight decay 1e-4 (weights only), lr_milestones
    (56, 71) whatever `epochs` is, each drop a factor from `lr_drops` (default `lr_gamma` = 0.1 for
    each), s0 0, lmbda 1e-8, final_temp 200, rewind_epoch 2. `preset` (a
    `sparseops.tickets.presets.CSPreset`) fills every argument left None, `filter_fn` included.
    The model is patched in soft mode (`filter_fn` picks layers: None masks every Conv2d and Linear;
    `official_layers` the official ResNet's 3x3 convs) and ends in ticket mode: its soft layers apply
    (s > 0) / sigmoid(s0) on the sparse kernels. `sparseops.tickets.get_masks(model)` gives the
    ticket; `unpatch(model)` folds it into plain layers.

    With `checkpoint_dir`, each finished round and the ticket are saved (`round_NNN.pt`: the model's
    state, scores, beta and ticket mode included, both optimisers' states, the rewind weights, the
    result, torch's and Python's RNG states); calling it again with the same directory and settings
    resumes after the last saved one and gives the same result as an uninterrupted run.
    """
    check_model(model, "tickets.cs")
    if preset is not None:

        if not isinstance(preset, CSPreset):
            raise TypeError(f"sparseops.tickets.cs: preset must be a CSPreset (sparseops.tickets.presets), "
                            f"got {type(preset).__name__}")
        given = dict(rounds=rounds, epochs=epochs, batch_size=batch_size, lr=lr, mask_lr=mask_lr, momentum=momentum,
                     nesterov=nesterov, weight_decay=weight_decay, lr_milestones=lr_milestones, lr_drops=lr_drops,
                     s0=s0, lmbda=lmbda, final_temp=final_temp, rewind_epoch=rewind_epoch, filter_fn=filter_fn)
        filled = {k: (getattr(preset, k) if v is None else v) for k, v in given.items()}
        (rounds, epochs, batch_size, lr, mask_lr, momentum, nesterov, weight_decay, lr_milestones, lr_drops, s0, lmbda,
         final_temp, rewind_epoch, filter_fn) = filled.values()
    rounds = 3 if rounds is None else rounds
    epochs = 85 if epochs is None else epochs
    batch_size = 128 if batch_size is None else batch_size
    lr = 0.1 if lr is None else lr
    mask_lr = lr if mask_lr is None else mask_lr
    momentum = 0.9 if momentum is None else momentum
    nesterov = True if nesterov is None else nesterov
    weight_decay = 1e-4 if weight_decay is None else weight_decay
    s0 = 0.0 if s0 is None else s0
    lmbda = 1e-8 if lmbda is None else lmbda
    final_temp = 200.0 if final_temp is None else final_temp
    rewind_epoch = 2 if rewind_epoch is None else rewind_epoch
    for name, v, low in (("rounds", rounds, 1), ("epochs", epochs, 2), ("batch_size", batch_size, 1),
                         ("rewind_epoch", rewind_epoch, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"sparseops.tickets.cs: {name} must be an integer >= {low}, got {v!r}")
    if rewind_epoch >= epochs:
        raise ValueError(f"sparseops.tickets.cs: rewind_epoch ({rewind_epoch}) must be < epochs ({epochs})")
    for name, v in (("lr", lr), ("mask_lr", mask_lr), ("final_temp", final_temp)):
        if not v > 0:
            raise ValueError(f"sparseops.tickets.cs: {name} must be positive, got {v!r}")
    if not lmbda >= 0:
        raise ValueError(f"sparseops.tickets.cs: lmbda must be >= 0, got {lmbda!r}")
    milestones = list(OFFICIAL_MILESTONES if lr_milestones is None else lr_milestones)
    drops = [lr_gamma] * len(milestones) if lr_drops is None else list(lr_drops)
    if len(drops) != len(milestones):
        raise ValueError(f"sparseops.tickets.cs: lr_drops ({drops}) needs one factor per milestone ({milestones})")
    schedule = sorted(zip(milestones, drops, strict=True))

    patch(model, mode="soft", s0=s0, filter_fn=filter_fn)
    layers = soft_layers(model)
    if not layers:
        raise ValueError("sparseops.tickets.cs: the model has no layer sparseops can soft-mask")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    weight_params = [p for n, p in named if not n.endswith("weight_score")]
    score_params = [p for n, p in named if n.endswith("weight_score")]
    weight_opt = torch.optim.SGD(weight_params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    score_opt = torch.optim.SGD(score_params, lr=mask_lr, momentum=momentum, nesterov=nesterov)
    temp_increase = final_temp ** (1.0 / (epochs - 1))
    state = {"beta": 1.0, "rewind": None}
    config = {"rounds": rounds, "epochs": epochs, "batch_size": batch_size, "lr": lr, "mask_lr": mask_lr,
              "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
              "schedule": [list(x) for x in schedule], "s0": s0, "lmbda": lmbda, "final_temp": final_temp,
              "rewind_epoch": rewind_epoch, "clamp_with_final_beta": clamp_with_final_beta,
              "layers": [n for n, m in patched_layers(model) if m in layers]}
    results = []
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        saved = resume_rounds(checkpoint_dir, config, "cs", "CS round checkpoint", _KEYS, model,
                              (weight_opt, score_opt))  # beta and ticket mode come back with the state dict
        state["rewind"] = saved[0]["rewind"] if saved else None
        results = [LevelResult(ck["round"], ck["sparsity"], ck["metrics"], ck["wall_time"], ck["masks"])
                   for ck in saved]
        if len(results) == rounds + 1:
            return SearchResult("cs", results)

    def save(result: LevelResult) -> None:
        if checkpoint_dir is not None:  # the state dict itself: its metadata carries beta and ticket mode
            save_round(checkpoint_dir, config, result, model.state_dict(), (weight_opt, score_opt), state["rewind"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(rounds + 1) * epochs, initial=len(results) * epochs, desc="CS", unit="epoch")

    def run(round_index: int, optimizers, ticket: bool) -> LevelResult:
        base_lrs = [opt.defaults["lr"] for opt in optimizers]
        history = []
        t_round = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            if epoch > 0:
                state["beta"] *= temp_increase
            set_beta(model, state["beta"])
            if round_index == 0 and epoch == rewind_epoch and not ticket:
                state["rewind"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                   if not k.endswith("weight_score")}
            drop = math.prod(d for m, d in schedule if epoch >= m)
            for opt, base in zip(optimizers, base_lrs, strict=True):
                for group in opt.param_groups:
                    group["lr"] = base * drop
            # main.py's loss adds lmbda * sum(mask) in the ticket phase too, where the mask is the constant
            # (s > 0) / sigmoid(s0): no gradient, so it is only added to the logged loss.
            constant = lmbda * sum(float(m.ticket_mask().sum()) * m.scale for m in layers) if ticket else 0.0
            total, count = 0.0, 0
            t0 = time.perf_counter()
            for x, y in batches(train_data, batch_size, shuffle=True, device=device):
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                if not ticket and lmbda:
                    loss = loss + lmbda * penalty(model)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                total, count = total + loss.detach() * len(y), count + len(y)
            record = {"epoch": epoch, "beta": state["beta"], "lr": base_lrs[0] * drop, "time": time.perf_counter() - t0,
                      "loss": float(total) / max(count, 1) + constant,
                      "mask_exact_zero": exact_zero_fraction(layers, state["beta"])}
            if test_data is not None:
                record["accuracy"] = evaluate(model, test_data, loss_fn=loss_fn, device=device)["accuracy"]
            history.append(record)
            if bar is not None:
                bar.set_postfix(round=round_index if not ticket else "ticket", beta=f"{state['beta']:.3g}",
                                **({"acc": f"{record['accuracy']:.3f}"} if "accuracy" in record else {}))
                bar.update()
        masks = get_masks(model)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        metrics = {"epoch_time": statistics.median(h["time"] for h in history), "history": history}
        if test_data is not None:
            metrics["accuracy"] = history[-1]["accuracy"]
        return LevelResult(round_index, 1.0 - kept / total, metrics, time.perf_counter() - t_round, masks)

    for r in range(len(results), rounds):
        results.append(run(r, [weight_opt, score_opt], ticket=False))
        final_beta = state["beta"]
        state["beta"] = 1.0
        if r != rounds - 1:
            factor = final_beta if clamp_with_final_beta else state["beta"]
            with torch.no_grad():
                for m in layers:
                    m.weight_score.copy_(torch.clamp(factor * m.weight_score, max=m.s0))
        save(results[-1])
    # The ticket: (s > 0) on the sparse kernels, weights rewound, a fresh weight optimiser.
    for m in layers:
        m.set_ticket(True)
    scores = {k: v for k, v in model.state_dict().items() if k.endswith("weight_score")}
    model.load_state_dict({**state["rewind"], **scores})
    ticket_opt = torch.optim.SGD(weight_params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    results.append(run(rounds, [ticket_opt], ticket=True))
    save(results[-1])
    if bar is not None:
        bar.close()
    return SearchResult("cs", results)


_KEYS = ("config", "round", "sparsity", "metrics", "wall_time", "masks", "state", "optimizers", "rewind",
         "torch_rng", "python_rng")


@torch.no_grad()
def exact_zero_fraction(layers, beta: float) -> float:
    """The fraction of soft-mask entries that are exactly 0 in the weight's precision: what a fused
    kernel may skip, exactly."""
    zero = total = 0
    for m in layers:
        zero += int((cut_sigmoid(beta * m.weight_score) == 0).sum())
        total += m.weight_score.numel()
    return zero / total if total else 0.0
