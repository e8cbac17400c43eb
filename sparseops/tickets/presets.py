"""Presets: the published setups of open_lth and of the official Continuous Sparsification code, as
config objects (like torchao's configs) that `imp`, `continuous_sparsification` and `patch` take.

    from sparseops.tickets import imp, presets
    p = presets.cifar_resnet_20
    model = p.model()                                   # open_lth's ResNet-20 and initialisers
    imp(model, p.trainer(train, test), levels=16, preset=p)

    p = presets.cs_resnet_20
    continuous_sparsification(p.model(), train, test, preset=p)
    sparseops.patch(model, **p.patch_kwargs())          # the official layer set, soft mode

The values are those of open_lth's `default_hparams()` (models/mnist_lenet.py, cifar_resnet.py,
cifar_vgg.py; pruning/sparse_global.py) and of the official main.py's argument defaults and
models/networks.py. Data is the caller's: open_lth trains MNIST without augmentation and CIFAR-10
with random flips and 4-pixel crops; main.py holds 5,000 CIFAR-10 training images out for
validation and uses the same augmentation. `preset.scaled(epochs)` shrinks a run (the schedule
scaled with it) for demos; docs/tickets.md lists every value next to its upstream source.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .train import Trainer
from .zoo import build_model, open_lth_init

# The official CS code's facts (lolemacs/continuous-sparsification main.py, models/): its learning-rate
# drops at epochs 56 and 71, and the layers it soft-masks.
OFFICIAL_MILESTONES = (56, 71)


def official_layers(module: nn.Module, name: str = "") -> bool:
    """The layers the official code soft-masks, as a `filter_fn`: its ResNet builds every 3x3 conv
    (the first one included) as a SoftMaskedConv2d and leaves the 1x1 downsample convs and the
    linear classifier plain. `patch(mode="soft")` without a filter masks every Conv2d and Linear."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3)


def _scale(steps, old: int, new: int) -> tuple[int, ...]:
    return tuple(max(1, round(m * new / old)) for m in steps)


@dataclass(frozen=True)
class IMPPreset:
    """One open_lth lottery run: model, training hyperparameters and the sparse_global pruning setup."""

    name: str
    model_name: str              # sparseops.tickets.zoo name of the network
    upstream_model: str          # open_lth's name
    dataset: str                 # what upstream trains on
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()  # epochs
    gamma: float = 0.1
    rate: float = 0.2
    exclude: tuple[str, ...] = ()
    rewind: int | str = 0
    scope: str = "global"
    budget: str = "all"
    inputs: int = 784
    note: str = ""

    def model(self, *, inputs: int | None = None, hidden: int = 2048, init: bool = True) -> nn.Module:
        """The network with open_lth's initialisers (Kaiming-normal weights, batch norm uniform)."""
        kw = {"inputs": self.inputs if inputs is None else inputs, "hidden": hidden}
        m = build_model(self.model_name, **kw)
        return open_lth_init(m) if init else m

    def trainer(self, train_data, test_data=None, **overrides) -> Trainer:
        """A `tickets.Trainer` with this run's training hyperparameters (SGD, step schedule)."""
        kw = dict(epochs=self.epochs, batch_size=self.batch_size, optimizer="sgd", lr=self.lr,
                  momentum=self.momentum, weight_decay=self.weight_decay,
                  schedule="step" if self.milestones else "constant", milestones=self.milestones, gamma=self.gamma)
        kw.update(overrides)
        return Trainer(train_data, test_data, **kw)

    def imp_kwargs(self) -> dict:
        """What `imp(..., preset=self)` fills in."""
        return {"rate": self.rate, "rewind": self.rewind, "scope": self.scope, "budget": self.budget,
                "exclude": self.exclude}

    def scaled(self, epochs: int) -> IMPPreset:
        """The same run in `epochs` epochs: milestones scaled (an epoch rewind point too)."""
        rewind = self.rewind
        if isinstance(rewind, str) and rewind.strip().endswith("ep"):
            rewind = f"{max(1, round(int(rewind.strip()[:-2]) * epochs / self.epochs))}ep"
        return dataclasses.replace(self, epochs=epochs, milestones=_scale(self.milestones, self.epochs, epochs),
                                   rewind=rewind)

    def describe(self) -> str:
        ms = f", lr x{self.gamma} at epochs {', '.join(map(str, self.milestones))}" if self.milestones else ""
        return (f"{self.name} (open_lth {self.upstream_model} on {self.dataset}): {self.epochs} epochs, batch "
                f"{self.batch_size}, SGD lr {self.lr:g} momentum {self.momentum:g} weight decay {self.weight_decay:g}"
                f"{ms}; pruning {self.rate:g} per level ({self.scope}, budget {self.budget}), excluded: "
                f"{', '.join(self.exclude) or 'none'}; rewind {self.rewind}")


@dataclass(frozen=True)
class CSPreset:
    """One run of the official Continuous Sparsification main.py."""

    name: str
    model_name: str
    dataset: str
    rounds: int = 3
    epochs: int = 85
    batch_size: int = 128
    lr: float = 0.1
    mask_lr: float | None = None  # None: = lr, as main.py
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_milestones: tuple[int, ...] = OFFICIAL_MILESTONES
    lr_drops: tuple[float, ...] = (0.1, 0.1)
    s0: float = 0.0
    lmbda: float = 1e-8
    final_temp: float = 200.0
    rewind_epoch: int = 2
    filter_fn: Callable | None = official_layers
    seed: int = 1234
    note: str = ""

    def model(self) -> nn.Module:
        """The official code's network (its own initialisation)."""
        return build_model(self.model_name)

    def patch_kwargs(self) -> dict:
        """`sparseops.patch(model, **preset.patch_kwargs())`: soft mode, s0 and the official layer set."""
        return {"mode": "soft", "s0": self.s0, "filter_fn": self.filter_fn}

    def cs_kwargs(self) -> dict:
        """What `continuous_sparsification(..., preset=self)` fills in."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "model_name", "dataset", "seed", "note")}

    def scaled(self, epochs: int, rounds: int | None = None) -> CSPreset:
        """The same run in `epochs` epochs per round: milestones and the rewind epoch scaled."""
        return dataclasses.replace(self, epochs=epochs, rounds=self.rounds if rounds is None else rounds,
                                   lr_milestones=_scale(self.lr_milestones, self.epochs, epochs),
                                   rewind_epoch=min(epochs - 1, round(self.rewind_epoch * epochs / self.epochs)))

    def describe(self) -> str:
        return (f"{self.name} (official CS main.py on {self.dataset}): {self.rounds} rounds x {self.epochs} epochs, "
                f"batch {self.batch_size}, lr {self.lr:g} (masks: {self.lr if self.mask_lr is None else self.mask_lr:g}),"
                f" drops x{', x'.join(f'{d:g}' for d in self.lr_drops)} at epochs "
                f"{', '.join(map(str, self.lr_milestones))}, s0 {self.s0:g}, lambda {self.lmbda:g}, final temperature "
                f"{self.final_temp:g}, rewind to epoch {self.rewind_epoch}, masked: "
                f"{'3x3 convs only' if self.filter_fn is official_layers else 'every Conv2d and Linear'}")


mnist_lenet_300_100 = IMPPreset(
    "mnist_lenet_300_100", "lenet300", "mnist_lenet_300_100", "MNIST", epochs=40, batch_size=128, lr=0.1,
    exclude=("output",), inputs=784, note="plain SGD (momentum 0, no weight decay), no schedule")
cifar_resnet_20 = IMPPreset(
    "cifar_resnet_20", "resnet20", "cifar_resnet_20", "CIFAR-10", epochs=160, batch_size=128, lr=0.1,
    momentum=0.9, weight_decay=1e-4, milestones=(80, 120), gamma=0.1, exclude=(), inputs=3 * 32 * 32,
    note="the output layer is pruned too (no pruning_layers_to_ignore)")
cifar_vgg_16 = IMPPreset(
    "cifar_vgg_16", "vgg16", "cifar_vgg_16", "CIFAR-10", epochs=160, batch_size=128, lr=0.1,
    momentum=0.9, weight_decay=1e-4, milestones=(80, 120), gamma=0.1, exclude=("output",), inputs=3 * 32 * 32)
cs_resnet_20 = CSPreset("cs_resnet_20", "cs-resnet20", "CIFAR-10 (45,000 training images)")

PRESETS = {p.name: p for p in (mnist_lenet_300_100, cifar_resnet_20, cifar_vgg_16, cs_resnet_20)}


def get(name: str) -> IMPPreset | CSPreset:
    if name not in PRESETS:
        raise ValueError(f"sparseops.tickets.presets: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
