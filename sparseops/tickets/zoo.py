"""Models and data for the `ticket` command and the demo: scikit-learn's digits (8x8 images, 10
classes, shipped with scikit-learn) and small networks sized for it."""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("mlp", "lenet300", "lenet5", "wide-mlp")
DATASETS = ("digits",)


def load_digits(seed: int = 0, test_size: float = 0.2):
    """(x_train, y_train), (x_test, y_test): digits standardised with the training split's statistics,
    flattened to 64 features (the conv models reshape to 1x8x8 themselves)."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    x, y = _load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return (f(x_tr), torch.tensor(y_tr)), (f(x_te), torch.tensor(y_te))


def load_data(name: str, seed: int = 0):
    if name not in DATASETS:
        raise ValueError(f"sparseops: unknown dataset {name!r}; choose one of {DATASETS}")
    return load_digits(seed)


def build_model(name: str, *, inputs: int = 64, classes: int = 10, hidden: int = 2048) -> nn.Module:
    """mlp: 64-256-128-10; lenet300: LeNet-300-100; wide-mlp: 64-hidden-hidden-10 (where sparse
    kernels pay); lenet5: two 3x3 convs and three linear layers on the 8x8 image."""
    if name == "mlp":
        return nn.Sequential(nn.Linear(inputs, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, classes))
    if name == "lenet300":
        return nn.Sequential(nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, classes))
    if name == "wide-mlp":
        return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, classes))
    if name == "lenet5":
        side = int(round(inputs ** 0.5))
        return nn.Sequential(nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * (side // 2) ** 2, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                             nn.Linear(84, classes))
    raise ValueError(f"sparseops: unknown model {name!r}; choose one of {MODELS}")
