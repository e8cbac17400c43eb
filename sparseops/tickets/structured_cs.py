"""Structured Continuous Sparsification (Yuan, Savarese & Maire, ICLR 2021), as a ticket search.

A gate `sigmoid(beta * s) / sigmoid(s0)` per output channel of every Conv2d/Linear but the output
layer (after the batch norm reading the layer, see sparseops.tickets.units) and per residual block
(`post(shortcut(x) + g * F(x))`, sparseops.gates); the loss gains `lmbda * sum(w_u * gate_u)`, with
w_u = 1 or each unit's multiply-accumulates over the mean of all units' (`flops_weighted`). The rest
is CS's (sparseops.tickets.cs): beta goes 1 -> final_temp over each round (`temperature="global"`), or
per gate, rising only while the gate's hard value s > 0 stays as it was at the previous epoch
(`"per_unit"`, our reading of the paper's per-unit schedule); between rounds beta is reset and
s = clamp(s, max=s0); weights are saved at `rewind_epoch` of round 0; the ticket keeps the units
with s > 0 (hard gates at 1 / sigmoid(s0)) and is trained from the saved weights with a fresh
optimiser. Gates that are exactly 0 are put into the layers' masks before every step
(`skip_zero_units`): their rows and columns cost nothing on kernels that skip them, and the result
is that of multiplying by the gates (`skip_zero_units=False`). With `checkpoint_dir`, every finished
round (and the ticket) is saved as IMP saves its levels (sparseops.tickets.files) and a second call
resumes after the last one. docs/tickets.md lists each choice.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import gates as sgates
from .cs import default_milestones
from .files import resume_rounds, save_round
from .gating import Structure, get_gates, kept_fraction, prepare
from .imp import LevelResult, SearchResult
from .train import batches, evaluate

TEMPERATURES = ("global", "per_unit")


def _int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"sparseops.tickets.structured_cs: {name} must be an integer >= {low}, got {v!r}")
    return v


def penalty(structure: Structure, weights) -> torch.Tensor:
    """sum over units of w * gate (soft gates: CS's L0 surrogate, per channel and per block)."""
    unit_w, block_w = weights
    terms = [(g() * w.to(g.score.device)).sum() for g, w in zip(structure.channel_gates(), unit_w, strict=True)]
    terms += [b.gate_value() * w for (_, b), w in zip(structure.blocks, block_w, strict=True)]
    return torch.stack(terms).sum()


class _Temperature:
    """beta per gate: global (every gate's beta times `factor` each epoch) or per unit (only the gates
    whose s > 0 did not change since the previous epoch)."""

    def __init__(self, structure: Structure, factor: float, mode: str):
        self.structure, self.factor, self.mode = structure, factor, mode
        self.reset()

    def signs(self):
        return ([g.score.detach() > 0 for g in self.structure.channel_gates()],
                [bool(b.gate_score > 0) for _, b in self.structure.blocks])

    @torch.no_grad()
    def reset(self):
        for g in self.structure.channel_gates():
            g.beta.fill_(1.0)
        for _, b in self.structure.blocks:
            b.gate_beta = 1.0
        self.last = self.signs()

    @torch.no_grad()
    def step(self):
        now = self.signs()
        for g, before, after in zip(self.structure.channel_gates(), self.last[0], now[0], strict=True):
            g.beta.mul_(self.factor if self.mode == "global" else torch.where(before == after, self.factor, 1.0))
        for (_, b), before, after in zip(self.structure.blocks, self.last[1], now[1], strict=True):
            if self.mode == "global" or before == after:
                b.gate_beta *= self.factor
        self.last = now

    def mean(self) -> float:
        betas = [g.beta for g in self.structure.channel_gates()]
        betas += [torch.tensor([b.gate_beta for _, b in self.structure.blocks])] if self.structure.blocks else []
        return float(torch.cat([b.cpu() for b in betas]).mean())


def _ticket_gates(structure: Structure, keep_min: int) -> None:
    """Hard gates s > 0; a unit keeping fewer than `keep_min` channels keeps its `keep_min` best scores."""
    for g in structure.channel_gates():
        keep = g.score.detach() > 0
        if int(keep.sum()) < keep_min:
            keep = torch.zeros_like(keep)
            keep[g.score.detach().topk(min(keep_min, keep.numel())).indices] = True
        g.set_ticket(keep)
    for _, b in structure.blocks:
        sgates.set_gate_ticket(b)


def structured_cs(model: nn.Module, train_data, test_data=None, *, rounds: int = 3, epochs: int = 85,
                  batch_size: int = 128, lr: float = 0.1, mask_lr: float | None = None, momentum: float = 0.9,
                  nesterov: bool = True, weight_decay: float = 1e-4, lr_milestones=None, lr_gamma: float = 0.1,
                  s0: float = 0.0, lmbda: float = 1e-3, flops_weighted: bool = False, final_temp: float = 200.0,
                  temperature: str = "global", rewind_epoch: int = 2, clamp_with_final_beta: bool = False,
                  layer_gates=None, filter_fn=None, exclude=None, keep_min: int = 1, skip_zero_units: bool = True,
                  loss_fn=F.cross_entropy, device=None, checkpoint_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> SearchResult:
    """Searches a structured ticket and trains it; returns one result per round and one for the ticket.

    Each result's `sparsity` is the fraction of the units' channels pruned (s <= 0); its metrics hold
    `kept_channels` (the fraction kept), `kept_blocks`, `macs_kept` (the fraction of the units' and
    blocks' multiply-accumulates kept), `gates` ({"channels": {layer: [bool]}, "blocks": {block: bool}}),
    `epoch_time`, `history` and `accuracy` (with `test_data`). Defaults follow `continuous_sparsification`
    (rounds 3, epochs 85, batch 128, lr 0.1, Nesterov momentum 0.9, weight decay 1e-4 on the weights
    only, s0 0, final_temp 200, rewind_epoch 2) except: `lr_milestones` None scales CS's 56 and 71 of 85
    to `epochs`; `lmbda` 1e-3 (sum over channels, not weights). `layer_gates`: None gates the residual
    blocks sparseops knows, False none, True / a filter as in `patch`. `filter_fn(module, name)` and
    `exclude` pick the channel units (the output layer never is one). `keep_min`: each unit's ticket
    keeps at least this many channels (its best scores). The model ends in ticket mode: hard gates,
    masks with the pruned rows and columns.

    With `checkpoint_dir`, each finished round and the ticket are saved (`round_NNN.pt`: the model's
    state, gates and masks included, both optimisers' states, the rewind weights, the result, torch's
    and Python's RNG states); calling structured_cs again with the same directory and settings resumes
    after the last saved one and gives the same result as an uninterrupted run.
    """
    for name, v, low in (("rounds", rounds, 1), ("epochs", epochs, 2), ("batch_size", batch_size, 1),
                         ("rewind_epoch", rewind_epoch, 0), ("keep_min", keep_min, 0)):
        _int(name, v, low)
    if rewind_epoch >= epochs:
        raise ValueError(f"sparseops.tickets.structured_cs: rewind_epoch ({rewind_epoch}) must be < epochs ({epochs})")
    mask_lr = lr if mask_lr is None else mask_lr
    for name, v in (("lr", lr), ("mask_lr", mask_lr), ("final_temp", final_temp)):
        if not v > 0:
            raise ValueError(f"sparseops.tickets.structured_cs: {name} must be positive, got {v!r}")
    if not lmbda >= 0:
        raise ValueError(f"sparseops.tickets.structured_cs: lmbda must be >= 0, got {lmbda!r}")
    if temperature not in TEMPERATURES:
        raise ValueError(f"sparseops.tickets.structured_cs: temperature must be one of {TEMPERATURES}, "
                         f"got {temperature!r}")
    milestones = default_milestones(epochs) if lr_milestones is None else list(lr_milestones)

    example = next(iter(batches(train_data, batch_size, shuffle=False, device=device)))[0]
    structure = prepare(model, example, layer_gates=layer_gates, filter_fn=filter_fn, exclude=exclude, s0=s0)
    score_ids = {id(p) for p in structure.score_parameters()}
    weight_params = [p for p in model.parameters() if p.requires_grad and id(p) not in score_ids]
    weight_opt = torch.optim.SGD(weight_params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    score_opt = torch.optim.SGD(structure.score_parameters(), lr=mask_lr, momentum=momentum, nesterov=nesterov)
    weights = structure.penalty_weights(flops_weighted)
    temp = _Temperature(structure, final_temp ** (1.0 / (epochs - 1)), temperature)
    gate_keys = ("channel_gate.score", "channel_gate.beta", "channel_gate.hard", "gate_score", "weight_mask")
    state = {"rewind": None}
    config = {"rounds": rounds, "epochs": epochs, "batch_size": batch_size, "lr": lr, "mask_lr": mask_lr,
              "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay, "milestones": milestones,
              "lr_gamma": lr_gamma, "s0": s0, "lmbda": lmbda, "flops_weighted": flops_weighted,
              "final_temp": final_temp, "temperature": temperature, "rewind_epoch": rewind_epoch,
              "clamp_with_final_beta": clamp_with_final_beta, "keep_min": keep_min,
              "skip_zero_units": skip_zero_units, "units": [u.name for u in structure.units],
              "blocks": [n for n, _ in structure.blocks]}
    results = []
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        results = _resume(model, structure, checkpoint_dir, config, state, (weight_opt, score_opt), rounds, keep_min)
        if len(results) == rounds + 1:  # the ticket too: the model is the ticket
            return SearchResult("structured_cs", results)
        temp.reset()  # beta 1 and the signs of the clamped scores, as after the round that was saved

    def save(result: LevelResult) -> None:
        if checkpoint_dir is not None:
            save_round(checkpoint_dir, config, result, {k: v.detach().clone() for k, v in model.state_dict().items()},
                       (weight_opt, score_opt), state["rewind"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(rounds + 1) * epochs, initial=len(results) * epochs, desc="structured CS", unit="epoch")

    def run(index: int, optimizers, ticket: bool) -> LevelResult:
        base_lrs = [opt.defaults["lr"] for opt in optimizers]
        history = []
        t_round = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            if epoch > 0 and not ticket:
                temp.step()
            if index == 0 and epoch == rewind_epoch and not ticket:
                state["rewind"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                   if not k.endswith(gate_keys)}
            drop = lr_gamma ** sum(epoch >= m for m in milestones)
            for opt, base in zip(optimizers, base_lrs, strict=True):
                for group in opt.param_groups:
                    group["lr"] = base * drop
            total, count = 0.0, 0
            t0 = time.perf_counter()
            for x, y in batches(train_data, batch_size, shuffle=True, device=device):
                structure.sync(skip_zero_units)  # the gates exactly 0 now: pruned rows and columns
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                if not ticket and lmbda:
                    loss = loss + lmbda * penalty(structure, weights)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                total, count = total + loss.detach() * len(y), count + len(y)
            channels_off, blocks_off = structure.sync.off()
            off = torch.cat([c.cpu() for c in channels_off])
            record = {"epoch": epoch, "beta": 0.0 if ticket else temp.mean(), "lr": base_lrs[0] * drop,
                      "time": time.perf_counter() - t0, "loss": float(total) / max(count, 1),
                      "channels_off": float(off.float().mean()), "blocks_off": sum(blocks_off)}
            if test_data is not None:
                structure.sync(skip_zero_units)
                record["accuracy"] = evaluate(model, test_data, loss_fn=loss_fn, device=device)["accuracy"]
            history.append(record)
            if bar is not None:
                bar.set_postfix(round=index if not ticket else "ticket", beta=f"{record['beta']:.3g}",
                                **({"acc": f"{record['accuracy']:.3f}"} if "accuracy" in record else {}))
                bar.update()
        return _result(structure, index, history, time.perf_counter() - t_round, test_data is not None)

    for r in range(len(results), rounds):
        results.append(run(r, [weight_opt, score_opt], ticket=False))
        final = [g.beta.clone() for g in structure.channel_gates()], [b.gate_beta for _, b in structure.blocks]
        temp.reset()
        if r != rounds - 1:
            with torch.no_grad():  # s = clamp(beta * s, max=s0), beta reset to 1 (CS) or the round's final beta
                for g, fb in zip(structure.channel_gates(), final[0], strict=True):
                    g.score.copy_(torch.clamp((fb if clamp_with_final_beta else 1.0) * g.score, max=s0))
                for (_, b), fb in zip(structure.blocks, final[1], strict=True):
                    b.gate_score.copy_(torch.clamp((fb if clamp_with_final_beta else 1.0) * b.gate_score, max=s0))
            temp.last = temp.signs()
        save(results[-1])
    _ticket_gates(structure, keep_min)
    model.load_state_dict({**model.state_dict(), **state["rewind"]})
    structure.sync()
    ticket_opt = torch.optim.SGD(weight_params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    results.append(run(rounds, [ticket_opt], ticket=True))
    save(results[-1])
    if bar is not None:
        bar.close()
    return SearchResult("structured_cs", results)


_KEYS = ("config", "round", "sparsity", "metrics", "wall_time", "masks", "state", "optimizers", "rewind",
         "torch_rng", "python_rng")


def _resume(model, structure, checkpoint_dir, config, state, optimizers, rounds, keep_min) -> list[LevelResult]:
    """The saved rounds' results; the model, optimisers and RNGs as the last saved round left them."""
    checkpoints = resume_rounds(checkpoint_dir, config, "structured_cs", "structured CS round checkpoint", _KEYS,
                                model, optimizers)
    if checkpoints:
        state["rewind"] = checkpoints[0]["rewind"]
        if checkpoints[-1]["round"] == rounds:
            _ticket_gates(structure, keep_min)  # hard or soft is not in the state dict: the ticket's, from its scores
    return [LevelResult(ck["round"], ck["sparsity"], ck["metrics"], ck["wall_time"], ck["masks"])
            for ck in checkpoints]


def _result(structure: Structure, index: int, history, wall: float, with_accuracy: bool) -> LevelResult:
    chosen = get_gates(structure)
    kept = kept_fraction(chosen)
    macs_kept, macs_total = structure.macs()
    masks = structure.sync.masks_for([~k for k in chosen["channels"].values()],
                                     [not on for on in chosen["blocks"].values()])
    metrics = {"epoch_time": statistics.median(h["time"] for h in history), "history": history,
               "kept_channels": kept, "kept_blocks": sum(chosen["blocks"].values()),
               "macs_kept": macs_kept / macs_total if macs_total else 1.0,
               "gates": {"channels": {k: v.tolist() for k, v in chosen["channels"].items()},
                         "blocks": dict(chosen["blocks"])}}
    if with_accuracy:
        metrics["accuracy"] = history[-1]["accuracy"]
    return LevelResult(index, 1.0 - kept, metrics, wall, {k: v.detach().cpu().clone() for k, v in masks.items()})


__all__ = ["TEMPERATURES", "penalty", "structured_cs"]
