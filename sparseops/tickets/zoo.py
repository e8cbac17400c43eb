"""Models and data for the `ticket` command, the demo and the benchmarks: scikit-learn's digits
(8x8 images, 10 classes, shipped with scikit-learn) with small networks sized for it, and the
CIFAR-10 networks of the seed papers (VGG-16, ResNet-20) with CIFAR-shaped synthetic data (no
download: for timing, not accuracy)."""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("mlp", "lenet300", "lenet5", "wide-mlp", "vgg16", "resnet20", "cs-resnet20")
DATASETS = ("digits", "synthetic-cifar")


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


def synthetic_cifar(n_train: int = 1024, n_test: int = 256, seed: int = 0):
    """Random 3x32x32 images with random labels among 10: CIFAR's shapes, for timing only."""
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))  # noqa: E731
    return make(n_train), make(n_test)


def load_data(name: str, seed: int = 0):
    if name not in DATASETS:
        raise ValueError(f"sparseops: unknown dataset {name!r}; choose one of {DATASETS}")
    return load_digits(seed) if name == "digits" else synthetic_cifar(seed=seed)


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _excluding(model: nn.Module, exclude: tuple[str, ...]) -> nn.Module:
    """Tags `model` with the layers open_lth leaves unpruned by default for it (what
    `tickets.imp(exclude=None)` reads): "output" for its LeNets and VGGs, nothing for ResNets."""
    model.default_exclude = exclude
    return model


def vgg16(classes: int = 10) -> nn.Module:
    """CIFAR VGG-16 as in open_lth (cifar_vgg_16): 13 3x3 convs with batch norm, one linear layer."""
    layers, cin = [], 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    return _excluding(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)),
                      ("output",))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet20(classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 as in open_lth (cifar_resnet_20): 3 stages of 3 blocks, 16/32/64 channels."""
    layers, cin = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for i, cout in enumerate((16, 32, 64)):
        for b in range(3):
            layers.append(_Block(cin, cout, 2 if (i > 0 and b == 0) else 1))
            cin = cout
    return _excluding(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)), ())


class _CSBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(cout)
        self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(cout)
        # The official shortcut: a strided 1x1 conv without batch norm where the shape changes.
        self.downsample = nn.Conv2d(cin, cout, 1, 2, 0, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = torch.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class CSResNet(nn.Module):
    """The ResNet of the official Continuous Sparsification code (lolemacs/continuous-sparsification,
    models/networks.py; its README calls it ResNet-18, its shape is CIFAR ResNet-20's): a 3x3 stem
    conv, 3 stages of 3 blocks at 16/32/64 channels, 1x1 strided downsample convs without batch norm,
    8x8 average pooling, a linear classifier; Xavier-normal conv and linear weights, batch norm at
    weight 1 and bias 0, classifier bias 0. Module names follow the official ones (conv0, stage1.block1.conv_a,
    ..., classifier)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        cin = 16
        for i, cout in enumerate((16, 32, 64), 1):
            stage = nn.Module()
            for b in (1, 2, 3):
                setattr(stage, f"block{b}", _CSBlock(cin, cout, 2 if (i > 1 and b == 1) else 1))
                cin = cout
            setattr(self, f"stage{i}", stage)
        self.avgpool = nn.AvgPool2d(8)
        self.classifier = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = torch.relu(self.bn0(self.conv0(x)))
        for i in (1, 2, 3):
            stage = getattr(self, f"stage{i}")
            for b in (1, 2, 3):
                out = getattr(stage, f"block{b}")(out)
        return self.classifier(self.avgpool(out).flatten(1))


def open_lth_init(model: nn.Module) -> nn.Module:
    """open_lth's default initialisers (model_init kaiming_normal, batchnorm_init uniform): Kaiming-normal
    weights for Conv2d and Linear (biases as torch initialises them), batch-norm weights uniform in
    [0, 1) and biases 0. In place; returns the model."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape))
                m.bias.zero_()
    return model


def build_model(name: str, *, inputs: int = 64, classes: int = 10, hidden: int = 2048) -> nn.Module:
    """mlp: 64-256-128-10; lenet300: LeNet-300-100; wide-mlp: 64-hidden-hidden-10 (where sparse
    kernels pay); lenet5: two 3x3 convs and three linear layers on the 8x8 image; vgg16, resnet20:
    open_lth's CIFAR networks; cs-resnet20: the official CS code's ResNet. Each carries open_lth's
    default exclusions as `model.default_exclude` (the output layer, except for the ResNets)."""
    if name in ("mlp", "lenet300", "wide-mlp"):  # open_lth's mnist_lenet_<widths> family
        w1, w2 = {"mlp": (256, 128), "lenet300": (300, 100), "wide-mlp": (hidden, hidden)}[name]
        return _excluding(nn.Sequential(nn.Linear(inputs, w1), nn.ReLU(), nn.Linear(w1, w2), nn.ReLU(),
                                        nn.Linear(w2, classes)), ("output",))
    if name == "lenet5":
        side = int(round(inputs ** 0.5))
        return _excluding(nn.Sequential(nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                        nn.Linear(32 * (side // 2) ** 2, 120), nn.ReLU(), nn.Linear(120, 84),
                                        nn.ReLU(), nn.Linear(84, classes)), ("output",))
    if name == "vgg16":
        return vgg16(classes)
    if name == "resnet20":
        return resnet20(classes)
    if name == "cs-resnet20":
        return CSResNet(classes)
    raise ValueError(f"sparseops: unknown model {name!r}; choose one of {MODELS}")
