"""Fused soft mask (forward + backward, and the L1 penalty) vs eager torch on a 3072x768 weight."""
import pytest
import torch

import sparseops
from sparseops import reference
from common import peak_memory

SHAPE = (3072, 768)


@pytest.mark.parametrize("provider", ["eager", "sparseops"])
@pytest.mark.parametrize("what", ["soft_mask", "soft_mask+l1"])
def test_soft_mask_fwd_bwd(benchmark, what, provider):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=gen, requires_grad=True)
    s = (torch.randn(SHAPE, generator=gen) * 3).requires_grad_()
    g = torch.randn(SHAPE, generator=gen)
    impl = reference if provider == "eager" else sparseops
    beta, scale = 5.0, 2.0

    def step():
        w.grad = s.grad = None
        out = impl.soft_mask(w, s, beta, scale)
        if what == "soft_mask":
            out.backward(g)
        else:
            torch.autograd.backward([out, 1e-8 * impl.soft_mask_l1(s, beta, scale)], [g, torch.tensor(1.0)])

    benchmark.group = f"{what} {SHAPE[0]}x{SHAPE[1]} fwd_bwd"
    benchmark.extra_info.update(op=what, shape=list(SHAPE), mode="fwd_bwd", provider=provider,
                                threads=torch.get_num_threads(), peak_bytes=peak_memory(step))
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
