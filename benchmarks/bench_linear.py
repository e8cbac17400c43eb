"""Masked linear, forward and forward+backward, against dense nn.Linear, torch.nn.utils.prune
(mask multiplication) and a torch.sparse CSR weight, in one run. Run with `make bench`."""
import pytest
import torch

from common import forward_only, layer_state_bytes, make_linear, peak_memory, train_step

SHAPES = [(512, 768, 3072), (256, 1024, 1024)]  # (rows, in_features, out_features)
SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
PROVIDERS = ["dense", "prune", "torch_sparse_csr", "sparseops"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masked_linear(benchmark, shape, mode, sparsity, provider):
    rows, k, n = shape
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(n, k, generator=gen) >= sparsity
    layer = make_linear(provider, k, n, mask)
    x = torch.randn(rows, k, generator=gen, requires_grad=(mode == "fwd_bwd"))
    fn = forward_only(layer, x) if mode == "fwd" else train_step(layer, x, torch.randn(rows, n, generator=gen))
    benchmark.group = f"linear {'x'.join(map(str, shape))} {mode} sparsity={sparsity}"
    benchmark.extra_info.update(op="masked_linear", shape=list(shape), mode=mode, sparsity=sparsity,
                                provider=provider, threads=torch.get_num_threads(),
                                peak_bytes=peak_memory(fn), state_bytes=layer_state_bytes(layer))
    benchmark.pedantic(fn, rounds=7 if mode == "fwd_bwd" else 10, iterations=1, warmup_rounds=1)
