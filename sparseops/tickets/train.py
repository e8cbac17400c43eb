"""A small classification trainer for ticket search: the optimiser, learning-rate schedule, batches
and evaluation that IMP and the CLI use when the user brings no training function of their own."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("sgd", "adam", "adamw")


def batches(data, batch_size: int, *, shuffle: bool, device=None, generator: torch.Generator | None = None):
    """Yields (inputs, targets) from a pair of tensors, a Dataset or any iterable of batches.
    A tensor pair is shuffled with `generator`, else torch's global generator, so `torch.manual_seed`
    fixes the order."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield _to(x[idx], device), _to(y[idx], device)
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    if not isinstance(data, Iterable):
        raise TypeError("sparseops.tickets: data must be (inputs, targets) tensors, a Dataset or a DataLoader, "
                        f"got {type(data).__name__}")
    for x, y in data:
        yield _to(x, device), _to(y, device)


def _to(t, device):
    return t if device is None else t.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 1024, loss_fn=F.cross_entropy, device=None) -> dict:
    """Accuracy and mean loss of a classifier on `data` (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches(data, batch_size, shuffle=False, device=device):
        out = model(x)
        loss += float(loss_fn(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("sparseops.tickets.evaluate: the evaluation data is empty")
    return {"accuracy": correct / total, "loss": loss / total}


class Trainer:
    """Trains a classifier for one search level: `trainer(model, level)` -> metrics.

    A fresh optimiser per call (as open_lth does per level). With a `level` from imp, training
    follows open_lth: it starts at the level's start point (`level.start_iteration`: the rewind
    point at levels after 0; the batches of that epoch before it are skipped) and runs to the end
    of `epochs`, so T - k steps with the learning rate where the schedule is at step k; at level 0
    a fresh optimiser takes over at the rewind point (open_lth pretrains to it with an optimiser of
    its own). The learning rate is set before every step from the epoch it falls in: "step" drops
    it by `gamma` at each of `milestones` (epochs, as open_lth's "80ep,120ep"), "cosine" anneals it
    per epoch to 0 at `epochs`. `data_order_seed` shuffles epoch e with seed + e (open_lth's
    data_order_seed), so every level sees the same batches at the same step; None draws from
    torch's global generator. `level` may be None (plain training from step 0).
    """

    def __init__(self, train_data, test_data=None, *, epochs: int = 10, batch_size: int = 128,
                 optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, schedule: str = "constant", milestones: tuple[int, ...] = (),
                 gamma: float = 0.1, data_order_seed: int | None = None, loss_fn=F.cross_entropy, device=None,
                 progress: bool = False):
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Trainer: epochs must be a positive integer, got {epochs!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Trainer: batch_size must be a positive integer, got {batch_size!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Trainer: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"Trainer: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not lr > 0:
            raise ValueError(f"Trainer: lr must be positive, got {lr!r}")
        self.train_data, self.test_data = train_data, test_data
        self.epochs, self.batch_size = epochs, batch_size
        self.optimizer, self.lr, self.momentum, self.nesterov = optimizer, lr, momentum, nesterov
        self.weight_decay, self.schedule, self.milestones, self.gamma = weight_decay, schedule, tuple(milestones), gamma
        self.data_order_seed = data_order_seed
        self.loss_fn, self.device, self.progress = loss_fn, device, progress

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of every step in `epoch` (0-based)."""
        if self.schedule == "cosine":
            return self.lr * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        return self.lr

    def __call__(self, model: nn.Module, level=None) -> dict:
        start_epoch, skip = (level.start_epoch, level.start_batch) if level is not None else (0, 0)
        opt = self.make_optimizer(model.parameters())
        times, losses, steps = [], [], 0
        epochs = range(start_epoch, self.epochs)
        if self.progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc="epochs", leave=False)
        model.train()
        for epoch in epochs:
            t0 = time.perf_counter()
            total, count = 0.0, 0
            lr = self.lr_at(epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            generator = None if self.data_order_seed is None else torch.Generator().manual_seed(
                self.data_order_seed + epoch)
            for b, (x, y) in enumerate(batches(self.train_data, self.batch_size, shuffle=True, device=self.device,
                                               generator=generator)):
                if epoch == start_epoch and b < skip:
                    continue  # before the level's start point
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(model(x), y)
                loss.backward()
                opt.step()
                steps += 1
                total = total + loss.detach() * len(y)  # a tensor: no device sync per step
                count += len(y)
                if level is not None and level.step():  # the rewind point: open_lth's level 0 starts here
                    opt = self.make_optimizer(model.parameters())
                    for group in opt.param_groups:
                        group["lr"] = lr
            times.append(time.perf_counter() - t0)
            losses.append(float(total) / max(count, 1))
            if level is not None and level.end_epoch():
                opt = self.make_optimizer(model.parameters())
        metrics = {"train_loss": losses[-1] if losses else float("nan"),
                   "epoch_time": statistics.median(times) if times else 0.0, "train_time": sum(times),
                   "steps": steps, "start_iteration": 0 if level is None else level.start_iteration}
        if self.test_data is not None:
            ev = evaluate(model, self.test_data, loss_fn=self.loss_fn, device=self.device)
            metrics.update(accuracy=ev["accuracy"], test_loss=ev["loss"])
        return metrics
