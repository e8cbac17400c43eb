"""Fused soft mask (forward + backward, and the L1 penalty) vs eager torch on a 3072x768 weight."""
import itertools

import pytest
import torch

import sparseops
from common import memory_in_child
from sparseops import reference

SHAPE = (3072, 768)
CONFIGS = [dict(what=w, provider=p) for w, p in itertools.product(["soft_mask", "soft_mask+l1"], ["eager", "sparseops"])]
CONFIGS.append(dict(what="soft_mask+l1", provider="sparseops_with_l1"))  # both from one pass each way


def make_step(what, provider):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=gen, requires_grad=True)
    s = (torch.randn(SHAPE, generator=gen) * 3).requires_grad_()
    g = torch.randn(SHAPE, generator=gen)
    impl = reference if provider == "eager" else sparseops
    beta, scale = 5.0, 2.0

    def clear():
        w.grad = s.grad = None

    def step():
        clear()
        if provider == "sparseops_with_l1":
            out, l1 = sparseops.soft_mask_with_l1(w, s, beta, scale)
            torch.autograd.backward([out, 1e-8 * l1], [g, torch.tensor(1.0)])
            return
        out = impl.soft_mask(w, s, beta, scale)
        if what == "soft_mask":
            out.backward(g)
        else:
            torch.autograd.backward([out, 1e-8 * impl.soft_mask_l1(s, beta, scale)], [g, torch.tensor(1.0)])

    step.clear = clear
    return step


@pytest.fixture(scope="module")
def peak_bytes():
    return dict(zip(map(str, CONFIGS), memory_in_child("bench_soft_mask", CONFIGS), strict=True))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "{what}-{provider}".format(**c))
def test_soft_mask_fwd_bwd(benchmark, peak_bytes, config):
    benchmark.group = f"{config['what']} {SHAPE[0]}x{SHAPE[1]} fwd_bwd"
    benchmark.extra_info.update(op=config["what"], shape=list(SHAPE), mode="fwd_bwd", provider=config["provider"],
                                threads=torch.get_num_threads(), peak_bytes=peak_bytes[str(config)])
    benchmark.pedantic(make_step(**config), rounds=20, iterations=1, warmup_rounds=2)
