"""A small classification trainer for ticket search: the optimiser, learning-rate schedule, batches
and evaluation that IMP and the CLI use when the user brings no training function of their own."""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("sgd", "adam", "adamw")


def batches(data, batch_size: int, *, shuffle: bool, device=None):
    """Yields (inputs, targets) from a pair of tensors, a Dataset or any iterable of batches.
    A tensor pair is shuffled with torch's global generator, so `torch.manual_seed` fixes the order."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield _to(x[idx], device), _to(y[idx], device)
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle)
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

    A fresh optimiser and schedule per call (as open_lth does per level). `level` (from imp) is told
    of every step and epoch so the search can save its rewind point; it may be None.
    """

    def __init__(self, train_data, test_data=None, *, epochs: int = 10, batch_size: int = 128,
                 optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, schedule: str = "constant", milestones: tuple[int, ...] = (),
                 gamma: float = 0.1, loss_fn=F.cross_entropy, device=None, progress: bool = False):
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
        self.loss_fn, self.device, self.progress = loss_fn, device, progress

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    def make_schedule(self, opt):
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        if self.schedule == "step":
            return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.milestones), gamma=self.gamma)
        return None

    def __call__(self, model: nn.Module, level=None) -> dict:
        opt = self.make_optimizer(model.parameters())
        sched = self.make_schedule(opt)
        times, losses = [], []
        epochs = range(self.epochs)
        if self.progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc="epochs", leave=False)
        model.train()
        for _ in epochs:
            t0 = time.perf_counter()
            total, count = 0.0, 0
            for x, y in batches(self.train_data, self.batch_size, shuffle=True, device=self.device):
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(model(x), y)
                loss.backward()
                opt.step()
                total = total + loss.detach() * len(y)  # a tensor: no device sync per step
                count += len(y)
                if level is not None:
                    level.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(total) / max(count, 1))
            if sched is not None:
                sched.step()
            if level is not None:
                level.end_epoch()
        metrics = {"train_loss": losses[-1], "epoch_time": statistics.median(times), "train_time": sum(times)}
        if self.test_data is not None:
            ev = evaluate(model, self.test_data, loss_fn=self.loss_fn, device=self.device)
            metrics.update(accuracy=ev["accuracy"], test_loss=ev["loss"])
        return metrics
