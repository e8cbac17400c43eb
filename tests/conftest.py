import pytest
import torch

import sparseops  # noqa: F401  (registers the ops)

SUPPORTED_ISAS = list(torch.ops.sparseops._cpu_isa_supported())


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Runs a test once per CPU kernel variant this machine can execute."""
    previous = torch.ops.sparseops._set_cpu_isa(request.param)
    yield request.param
    torch.ops.sparseops._set_cpu_isa(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_mask(shape, sparsity, generator=None):
    if sparsity <= 0:
        return torch.ones(shape, dtype=torch.bool)
    if sparsity >= 1:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator) >= sparsity
