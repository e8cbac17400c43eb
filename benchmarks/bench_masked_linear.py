"""Masked linear, forward and forward+backward, against dense nn.Linear, torch.nn.utils.prune
(mask multiplication) and a torch.sparse CSR weight, in one run. Run with `make bench`."""
import itertools

import pytest
import torch

from common import forward_only, layer_state_bytes, make_linear, memory_in_child, train_step

SHAPES = [(512, 768, 3072), (256, 1024, 1024)]  # (rows, in_features, out_features)
SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
PROVIDERS = ["dense", "prune", "torch_sparse_csr", "sparseops"]
MODES = ["fwd", "fwd_bwd"]
CONFIGS = [dict(shape=list(sh), mode=m, sparsity=sp, provider=p)
           for sh, m, sp, p in itertools.product(SHAPES, MODES, SPARSITIES, PROVIDERS)]


def make_step(shape, mode, sparsity, provider, with_layer=False):
    rows, k, n = shape
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(n, k, generator=gen) >= sparsity
    layer = make_linear(provider, k, n, mask)
    x = torch.randn(rows, k, generator=gen, requires_grad=(mode == "fwd_bwd"))
    fn = forward_only(layer, x) if mode == "fwd" else train_step(layer, x, torch.randn(rows, n, generator=gen))
    return (fn, layer) if with_layer else fn


@pytest.fixture(scope="module")
def peak_bytes():
    return dict(zip(map(str, CONFIGS), memory_in_child("bench_masked_linear", CONFIGS), strict=True))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "{}-{mode}-{sparsity}-{provider}".format(
    "x".join(map(str, c["shape"])), **c))
def test_masked_linear(benchmark, peak_bytes, config):
    fn, layer = make_step(**config, with_layer=True)
    benchmark.group = "linear {} {mode} sparsity={sparsity}".format("x".join(map(str, config["shape"])), **config)
    benchmark.extra_info.update(op="masked_linear", threads=torch.get_num_threads(), **config,
                                peak_bytes=peak_bytes[str(config)], state_bytes=layer_state_bytes(layer))
    benchmark.pedantic(fn, rounds=7 if config["mode"] == "fwd_bwd" else 10, iterations=1, warmup_rounds=1)
