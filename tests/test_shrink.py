"""sparseops.shrink: a model with channel masks (and gated-off blocks) becomes a physically smaller
dense model with the same outputs, in train and eval mode, BatchNorm statistics included, on
torchvision's resnet18 / vgg11 / vgg16 and the zoo's ResNet-20 and VGG-16."""
import warnings

import pytest
import torch
from torch import nn

import sparseops
from sparseops.tickets import zoo

pytest.importorskip("torch_pruning")  # the `structured` extra (make installs it)
try:  # not a dependency of sparseops: its models are tested where it is installed
    import torchvision
except ImportError:
    torchvision = None
needs_torchvision = pytest.mark.skipif(torchvision is None, reason="torchvision is not installed")


def kill(model, conv_name, channels, norm_name=None):
    """Prunes output channels `channels` of `conv_name` (a channel mask through set_mask) and makes
    them dead: its bias and the following BatchNorm's bias and running mean 0 there."""
    conv = model.get_submodule(conv_name)
    keep = torch.ones(conv.weight.shape[0], *[1] * (conv.weight.dim() - 1), dtype=torch.bool)
    keep[channels] = False
    conv.set_mask(conv.weight_mask & keep)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias[channels] = 0
        if norm_name is not None:
            norm = model.get_submodule(norm_name)
            norm.bias[channels] = 0
            norm.running_mean[channels] = 0


def params(model):
    return sum(p.numel() for p in model.parameters())


def check_same(masked, shrunk, x):
    """Same outputs in eval mode, in train mode (which moves the BatchNorm statistics), and in eval
    mode again (so the moved statistics agree too); fewer parameters."""
    assert params(shrunk) < params(masked)
    for mode in ("eval", "train", "eval"):
        masked.train(mode == "train")
        shrunk.train(mode == "train")
        with torch.no_grad():
            torch.testing.assert_close(shrunk(x), masked(x), rtol=1e-9, atol=1e-9)


def resnet18_masked():
    model = torchvision.models.resnet18(num_classes=10).double()
    sparseops.patch(model)
    g = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        if isinstance(m, torchvision.models.resnet.BasicBlock):  # the inner channel of every block
            c = m.conv1.out_channels
            kill(model, f"{name}.conv1", torch.randperm(c, generator=g)[: c // 2], f"{name}.bn1")
    stream = [0, 5, 7]  # channels of layer1's residual stream: pruned in every layer that writes it
    for conv, norm in (("conv1", "bn1"), ("layer1.0.conv2", "layer1.0.bn2"), ("layer1.1.conv2", "layer1.1.bn2")):
        kill(model, conv, stream, norm)
    elementwise = model.layer2[0].conv2  # an elementwise mask inside a kept layer stays a sparse layer
    elementwise.set_mask(torch.rand(elementwise.weight.shape, generator=g) < 0.7)
    return model


@needs_torchvision
def test_resnet18():
    model = resnet18_masked()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    shrunk = sparseops.shrink(model, x)
    check_same(model, shrunk, x)
    assert shrunk.conv1.out_channels == 61 and shrunk.layer1[0].conv1.in_channels == 61
    assert shrunk.layer1[0].conv1.out_channels == 32 and shrunk.layer4[1].conv1.out_channels == 256
    assert type(shrunk.layer1[0].conv1) is nn.Conv2d  # what was a channel mask: a plain dense layer
    assert isinstance(shrunk.layer2[0].conv2, sparseops.MaskedConv2d)
    assert shrunk.layer2[0].conv2.weight_mask.shape == shrunk.layer2[0].conv2.weight.shape
    assert not isinstance(model.layer1[0].conv1, nn.Identity) and isinstance(model.conv1, sparseops.MaskedConv2d)


@needs_torchvision
def test_a_residual_channel_pruned_in_one_writer_only_is_kept_with_a_warning():
    model = torchvision.models.resnet18(num_classes=10).double()
    sparseops.patch(model)
    kill(model, "layer1.0.conv2", [1, 2], "layer1.0.bn2")  # layer1.1.conv2 and conv1 still write them
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not dead"):
        shrunk = sparseops.shrink(model, x)
    assert shrunk.layer1[0].conv2.out_channels == 64
    model = torchvision.models.resnet18(num_classes=10).double()
    sparseops.patch(model)
    kill(model, "layer2.0.conv1", [3, 4], "layer2.0.bn1")
    with torch.no_grad():
        model.layer2[0].bn1.bias[3] = 0.5  # channel 3 carries relu(0.5): a constant, kept; 4 is dead
    with pytest.warns(UserWarning, match="kept 1 channel"):
        assert sparseops.shrink(model, x).layer2[0].conv1.out_channels == 127


@needs_torchvision
@pytest.mark.parametrize("name", ["vgg11", "vgg16"])
def test_torchvision_vgg(name):
    model = getattr(torchvision.models, name)(num_classes=10).double()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # train mode draws dropout masks of each model's own shape: not comparable
    sparseops.patch(model)
    convs = [n for n, m in model.features.named_modules() if isinstance(m, nn.Conv2d)]
    g = torch.Generator().manual_seed(1)
    for conv in convs:  # no BatchNorm: a zero bias makes a pruned filter dead
        c = model.features.get_submodule(conv).out_channels
        kill(model, f"features.{conv}", torch.randperm(c, generator=g)[: c // 4])
    kill(model, "classifier.0", list(range(0, 4096, 3)))  # a linear layer's output features
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    shrunk = sparseops.shrink(model, x)
    check_same(model, shrunk, x)
    last = model.features.get_submodule(convs[-1]).out_channels
    assert shrunk.classifier[0].in_features == (last - last // 4) * 49  # the flatten's 7x7 per channel
    assert shrunk.classifier[0].out_features == 4096 - len(range(0, 4096, 3)) == shrunk.classifier[3].in_features
    assert shrunk.classifier[6].out_features == 10  # the output is never cut


class Gated(nn.Module):
    """The layer-gate contract: a block with `gate`; 0 means off, and then it is the identity."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.register_buffer("gate", torch.ones(()))

    def forward(self, x):
        return x if self.gate == 0 else self.block(x)


class GatedDownsample(Gated):
    """A gated block whose off state is not the identity says what it is instead (`gated_off`)."""

    def forward(self, x):
        return torch.relu(self.block.shortcut(x)) if self.gate == 0 else self.block(x)

    def gated_off(self):
        return nn.Sequential(self.block.shortcut, nn.ReLU())


def test_zoo_resnet20_with_a_gated_off_block():
    model = zoo.resnet20().double()
    model[4] = Gated(model[4])  # the second block of the first stage (shape-preserving)
    model[6] = GatedDownsample(model[6])  # the first block of the second stage (strided, a conv shortcut)
    sparseops.patch(model)
    model[4].gate.zero_()
    model[6].gate.zero_()
    for i in (3, 5, 8, 10):
        block = model[i]
        kill(model, f"{i}.conv1", list(range(0, block.conv1.out_channels, 2)), f"{i}.bn1")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    shrunk = sparseops.shrink(model, x)
    check_same(model, shrunk, x)
    assert isinstance(shrunk[4], nn.Identity) and shrunk[3].conv1.out_channels == 8
    assert isinstance(shrunk[6], nn.Sequential) and shrunk[8].conv1.out_channels == 16
    assert params(shrunk) < params(model) - params(model[4]) - params(model[6].block.conv1)


def test_blocks_gated_off_by_patch_layer_gates_become_what_they_compute_then():
    """patch(layer_gates=True)'s blocks off are post(shortcut(x)) (a ReLU of the shortcut), not x."""
    model = zoo.resnet20().double()
    sparseops.patch(model, layer_gates=True)
    with torch.no_grad():
        model[4].gate.zero_()  # shape-preserving
        model[6].gate.zero_()  # strided, a conv shortcut
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    shrunk = sparseops.shrink(model, x)
    check_same(model, shrunk, x)
    assert isinstance(shrunk[4], sparseops.gates.GatedOff) and not hasattr(shrunk[4], "conv1")
    assert params(shrunk) < params(model)


def test_zoo_vgg16():
    model = zoo.vgg16().double()
    sparseops.patch(model)
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            kill(model, str(i), list(range(1, m.out_channels, 3)), str(i + 1))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    shrunk = sparseops.shrink(model, x)
    check_same(model, shrunk, x)
    assert shrunk[-1].in_features == 512 - len(range(1, 512, 3))


def test_training_step_matches():
    """One SGD step on each gives the same model outputs after (the gradients of kept weights agree)."""
    model = zoo.resnet20().double()
    sparseops.patch(model)
    kill(model, "3.conv1", [0, 1, 2], "3.bn1")
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    shrunk = sparseops.shrink(model, x)
    for m in (model, shrunk):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    check_same(model, shrunk, x)


def test_bad_input_and_the_original_is_untouched():
    with pytest.raises(TypeError, match="sparseops.shrink: model must be a torch.nn.Module"):
        sparseops.shrink("not a model", torch.randn(1))
    model = zoo.resnet20()
    sparseops.patch(model)
    kill(model, "3.conv1", [0], "3.bn1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparseops.shrink(model, torch.randn(1, 3, 32, 32))
    assert isinstance(model[3].conv1, sparseops.MaskedConv2d) and model[3].conv1.out_channels == 16
