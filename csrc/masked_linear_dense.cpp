// masked_linear_dense (schema in csrc/ops.cpp): the dense fallback of masked_linear, used where the
// mask is too dense for the sparse kernels to win. Plain ATen, so one function serves every device
// the extension registers (CPU here; CUDA tensors run the same ATen calls on cuBLAS).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/where_mask.h"

namespace sparseops {
namespace {

// The masked weight is a temporary, freed when the GEMM returns.
at::Tensor masked_linear_dense(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask,
                               const std::optional<at::Tensor>& bias) {
  const char* op = "masked_linear_dense";
  check_defined(op, x, "x");
  check_defined(op, w, "w");
  check_defined(op, mask, "mask");
  TORCH_CHECK_VALUE(w.dim() == 2, "sparseops.", op, ": w must be 2-D, got shape ", w.sizes());
  TORCH_CHECK_VALUE(mask.sizes() == w.sizes(), "sparseops.", op, ": mask must have the shape of w ", w.sizes(),
                    ", got ", mask.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "sparseops.", op, ": mask must be bool, got ",
                   mask.scalar_type());
  check_same_device(op, w, "w", x, "x");
  check_same_device(op, w, "w", mask, "mask");
  check_same_dtype(op, w, "w", x, "x");
  if (bias.has_value() && bias->defined()) check_same_dtype(op, w, "w", *bias, "bias");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == w.size(1), "sparseops.", op, ": x has shape ", x.sizes(),
                    " but w expects ", w.size(1), " input features");
  // Into a fresh output of x's leading shape (at::linear returns a view of its 2-D result for
  // batched x, and an op must not return a view).
  const int64_t N = w.size(0), K = w.size(1), M = leading_rows(x);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto out = at::empty(out_shape, x.options());
  auto y = out.view({M, N});
  // A pruned weight contributes exactly nothing (sparseops/reference.py): where(mask, w, 0), not
  // w * mask, which would turn an inf or NaN weight at a pruned entry into NaN.
  // On the CPU torch.where is several times slower than the one-pass select of cpu::where_mask.
  auto wt = (w.device().is_cpu() ? cpu::where_mask(w, mask) : at::where(mask, w, at::zeros({}, w.options()))).t();
  auto x2 = x.reshape({M, K});
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(y, *bias, x2, wt);
  } else {
    at::mm_out(y, x2, wt);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) { m.impl("masked_linear_dense", &masked_linear_dense); }
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) { m.impl("masked_linear_dense", &masked_linear_dense); }

}  // namespace sparseops
