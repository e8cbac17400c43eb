// CPU implementations of the Continuous Sparsification soft-mask ops (schemas in csrc/ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "dispatch.h"

namespace sparseops {
namespace {

void raise_nan(const char* op, int64_t count) {
  TORCH_CHECK_VALUE(count == 0, "sparseops.", op, ": s contains ", count,
                    " NaN value(s); the scores have diverged (check the learning rate)");
}

at::Tensor soft_mask_cpu(const at::Tensor& w, const at::Tensor& s, double beta, double scale) {
  check_soft_mask_args("soft_mask", w, s, beta, scale, false);
  auto wc = w.contiguous(), sc = s.contiguous();
  auto out = at::empty_like(wc);
  int64_t nan = 0;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_mask", [&] {
    cpu::SoftMaskArgs<scalar_t> a{wc.numel(), wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), nullptr,
                                  static_cast<scalar_t>(beta), static_cast<scalar_t>(scale),
                                  out.data_ptr<scalar_t>(), nullptr};
    nan = cpu::soft_mask_fwd(a);
  });
  raise_nan("soft_mask", nan);
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_mask_backward_cpu(const at::Tensor& grad, const at::Tensor& w,
                                                          const at::Tensor& s, double beta, double scale) {
  check_soft_mask_args("soft_mask_backward", w, s, beta, scale, false);
  check_soft_mask_grad("soft_mask_backward", grad, w, false);
  auto gc = grad.contiguous(), wc = w.contiguous(), sc = s.contiguous();
  auto dw = at::empty_like(wc), ds = at::empty_like(sc);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_mask_backward", [&] {
    cpu::SoftMaskArgs<scalar_t> a{wc.numel(), wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                                  gc.data_ptr<scalar_t>(), static_cast<scalar_t>(beta),
                                  static_cast<scalar_t>(scale), dw.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>()};
    cpu::soft_mask_bwd(a);
  });
  return {dw, ds};
}

at::Tensor soft_mask_l1_cpu(const at::Tensor& s, double beta, double scale) {
  check_scores("soft_mask_l1", s, beta, scale, false);
  auto sc = s.contiguous();
  int64_t nan = 0;
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "soft_mask_l1", [&] {
    total = cpu::soft_mask_sum(sc.data_ptr<scalar_t>(), static_cast<scalar_t>(beta), sc.numel(), &nan);
  });
  raise_nan("soft_mask_l1", nan);
  return at::scalar_tensor(scale * total, s.options());
}

at::Tensor soft_mask_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& s, double beta, double scale) {
  check_scores("soft_mask_l1_backward", s, beta, scale, false);
  check_floating("soft_mask_l1_backward", grad, "grad", false);
  check_same_device("soft_mask_l1_backward", s, "s", grad, "grad");
  TORCH_CHECK_VALUE(grad.numel() == 1, "sparseops.soft_mask_l1_backward: grad must be a scalar, got shape ",
                    grad.sizes());
  auto sc = s.contiguous();
  auto ds = at::empty_like(sc);
  const double coef = grad.item<double>() * scale * beta;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "soft_mask_l1_backward", [&] {
    cpu::soft_mask_l1_bwd(sc.data_ptr<scalar_t>(), static_cast<scalar_t>(coef), static_cast<scalar_t>(beta),
                          ds.data_ptr<scalar_t>(), sc.numel());
  });
  return ds;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("soft_mask", &soft_mask_cpu);
  m.impl("soft_mask_backward", &soft_mask_backward_cpu);
  m.impl("soft_mask_l1", &soft_mask_l1_cpu);
  m.impl("soft_mask_l1_backward", &soft_mask_l1_backward_cpu);
}

}  // namespace sparseops
