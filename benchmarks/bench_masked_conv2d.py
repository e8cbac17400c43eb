"""Masked conv2d, forward and forward+backward, on every conv shape of CIFAR VGG-16 and ResNet-20,
against dense nn.Conv2d (oneDNN) and torch.nn.utils.prune (mask multiplication) in one run.
sparseops runs as users get it: the `auto` backend (the dense fallback below the break-even)."""
import itertools

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import sparseops
from common import forward_only, train_step

# (C_in, C_out, spatial side, stride): VGG-16's 13 convs (9 shapes), ResNet-20's (stride 2 in the
# first block of stages 2 and 3, with 1x1 shortcuts).
VGG16 = [(3, 64, 32, 1), (64, 64, 32, 1), (64, 128, 16, 1), (128, 128, 16, 1), (128, 256, 8, 1), (256, 256, 8, 1),
         (256, 512, 4, 1), (512, 512, 4, 1), (512, 512, 2, 1)]
RESNET20 = [(3, 16, 32, 1), (16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]
SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
PROVIDERS = ["dense", "prune", "sparseops"]
CONFIGS = [dict(net=net, shape=list(sh), batch=128, mode=m, sparsity=sp, provider=p)
           for net, shapes in (("vgg16", VGG16), ("resnet20", RESNET20))
           for sh, m, sp, p in itertools.product(shapes, ("fwd", "fwd_bwd"), SPARSITIES, PROVIDERS)]
CONFIGS += [dict(net="vgg16", shape=list(sh), batch=32, mode="fwd_bwd", sparsity=sp, provider=p)
            for sh, sp, p in itertools.product(VGG16[1::2], (0.0, 0.9, 0.98), PROVIDERS)]


def make_conv(provider, cin, cout, stride, mask):
    conv = nn.Conv2d(cin, cout, 3, stride, 1)
    if provider == "prune":
        prune.custom_from_mask(conv, "weight", mask)
    elif provider == "sparseops":
        sparseops.patch(conv).set_mask(mask)
    return conv


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "{net}-{}-b{batch}-{mode}-{sparsity}-{provider}".format(
    "x".join(map(str, c["shape"])), **c))
def test_masked_conv2d(benchmark, config):
    cin, cout, side, stride = config["shape"]
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(cout, cin, 3, 3, generator=gen) >= config["sparsity"]
    conv = make_conv(config["provider"], cin, cout, stride, mask)
    x = torch.randn(config["batch"], cin, side, side, generator=gen, requires_grad=config["mode"] == "fwd_bwd")
    if config["mode"] == "fwd":
        fn = forward_only(conv, x)
    else:
        out = side // stride
        fn = train_step(conv, x, torch.randn(config["batch"], cout, out, out, generator=gen))
    benchmark.group = "conv {net} {} b{batch} {mode} sparsity={sparsity}".format("x".join(map(str, config["shape"])),
                                                                                 **config)
    benchmark.extra_info.update(op="masked_conv2d", threads=torch.get_num_threads(), **config)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
