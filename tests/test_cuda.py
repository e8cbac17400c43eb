"""CUDA kernels: built whenever a CUDA torch and nvcc are present; run only with a GPU."""
import shutil

import pytest
import torch
from torch.library import opcheck

import sparseops
from sparseops import ops, reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None,
                    reason="CPU-only torch or no nvcc: the CUDA extension is not built here")
def test_cuda_extension_is_built_and_registered():
    assert ops.CUDA_EXTENSION_ERROR is None, ops.CUDA_EXTENSION_ERROR
    for op in ("soft_mask", "soft_mask_l1", "masked_linear_dense"):
        assert ops.has_kernel(op, "cuda"), op
    for op in ("soft_mask_backward", "soft_mask_l1_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseops::{op}", "CUDA")
    assert "8.0" in torch.ops.sparseops._cuda_arch_list() or torch.ops.sparseops._cuda_arch_list()


TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (2e-2, 1e-2)}


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("n", [1, 1000, 3072 * 768 + 5])
def test_soft_mask_cuda_matches_reference(dtype, n):
    rtol, atol = TOL[dtype]
    w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    s = (torch.randn(n, device="cuda") * 5).to(dtype).requires_grad_()
    out = sparseops.soft_mask(w, s, 3.0, 1.5)
    w64, s64 = w.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref = reference.soft_mask(w64, s64, 3.0, 1.5)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=rtol * 10, atol=atol * 10)
    l1 = sparseops.soft_mask_l1(s, 3.0, 1.5)
    torch.testing.assert_close(l1.double(), reference.soft_mask_l1(s64, 3.0, 1.5), rtol=rtol * 10, atol=1e-3)


@pytest.mark.cuda
@needs_gpu
def test_soft_mask_cuda_opcheck_and_bad_input():
    w = torch.randn(33, 17, device="cuda", requires_grad=True)
    s = torch.randn(33, 17, device="cuda", requires_grad=True)
    opcheck(torch.ops.sparseops.soft_mask.default, (w, s, 2.0, 1.5))
    opcheck(torch.ops.sparseops.soft_mask_l1.default, (s, 2.0, 1.5))
    with pytest.raises(ValueError, match="device"):
        sparseops.soft_mask(w, s.cpu(), 1.0)
    with pytest.raises(ValueError, match="beta"):
        sparseops.soft_mask(w, s, float("nan"))


@pytest.mark.cuda
@needs_gpu
def test_masked_linear_on_cuda_uses_the_dense_fallback():
    x = torch.randn(5, 12, device="cuda", requires_grad=True)
    w = torch.randn(7, 12, device="cuda", requires_grad=True)
    mask = torch.rand(7, 12, device="cuda") > 0.5
    y = sparseops.masked_linear(x, w, mask)
    torch.testing.assert_close(y, reference.masked_linear(x, w, mask))
    y.sum().backward()
    assert torch.all(w.grad[~mask] == 0)
