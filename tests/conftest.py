import os
import tempfile

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter (on CPU tensors): set before
# sparseops imports them (on first use), so that tests/test_triton.py executes them in CI.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `auto` measures implementations on first use (sparseops.tuning); the tests check the prior's
# choices, so measuring is off unless a test turns it on, and nothing touches the user's cache.
os.environ.setdefault("SPARSEOPS_TUNE", "0")
os.environ.setdefault("SPARSEOPS_CACHE_DIR", tempfile.mkdtemp(prefix="sparseops-test-cache-"))

import sparseops  # noqa: F401,E402  (registers the ops)

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
