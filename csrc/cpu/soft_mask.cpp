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

// `op` names the arguments' errors; NaN scores are soft_mask's error (the public soft_mask runs the
// pair op on the CPU, with_l1 or not).
std::tuple<at::Tensor, at::Tensor> soft_mask_fwd_cpu(const char* op, const at::Tensor& w, const at::Tensor& s,
                                                      double beta, double scale) {
  check_soft_mask_args(op, w, s, beta, scale, false);
  auto wc = w.contiguous(), sc = s.contiguous();
  auto out = at::empty_like(wc);
  int64_t nan = 0;
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_mask", [&] {
    cpu::SoftMaskArgs<scalar_t> a{wc.numel(), wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), nullptr,
                                  static_cast<scalar_t>(beta), static_cast<scalar_t>(scale),
                                  out.data_ptr<scalar_t>(), nullptr};
    nan = cpu::soft_mask_fwd(a, &total);
  });
  raise_nan("soft_mask", nan);
  return {out, at::scalar_tensor(scale * total, s.options())};
}

at::Tensor soft_mask_cpu(const at::Tensor& w, const at::Tensor& s, double beta, double scale) {
  return std::get<0>(soft_mask_fwd_cpu("soft_mask", w, s, beta, scale));
}

std::tuple<at::Tensor, at::Tensor> soft_mask_with_l1_cpu(const at::Tensor& w, const at::Tensor& s, double beta,
                                                          double scale) {
  return soft_mask_fwd_cpu("soft_mask_with_l1", w, s, beta, scale);
}

std::tuple<at::Tensor, at::Tensor> soft_mask_bwd_cpu(const char* op, const at::Tensor& grad,
                                                      const at::Tensor& grad_l1, const at::Tensor& w,
                                                      const at::Tensor& s, double beta, double scale) {
  check_soft_mask_args(op, w, s, beta, scale, false);
  check_soft_mask_grad(op, grad, w, false);
  double l1 = 0;
  if (grad_l1.defined()) {
    check_floating(op, grad_l1, "grad_l1", false);
    check_same_device(op, s, "s", grad_l1, "grad_l1");
    TORCH_CHECK_VALUE(grad_l1.numel() == 1, "sparseops.", op, ": grad_l1 must be a scalar, got shape ",
                      grad_l1.sizes());
    l1 = grad_l1.item<double>();
  }
  auto gc = grad.contiguous(), wc = w.contiguous(), sc = s.contiguous();
  auto dw = at::empty_like(wc), ds = at::empty_like(sc);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_mask_backward", [&] {
    cpu::SoftMaskArgs<scalar_t> a{wc.numel(), wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                                  gc.data_ptr<scalar_t>(), static_cast<scalar_t>(beta),
                                  static_cast<scalar_t>(scale), dw.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(),
                                  static_cast<scalar_t>(l1)};
    cpu::soft_mask_bwd(a);
  });
  return {dw, ds};
}

std::tuple<at::Tensor, at::Tensor> soft_mask_backward_cpu(const at::Tensor& grad, const at::Tensor& w,
                                                          const at::Tensor& s, double beta, double scale) {
  return soft_mask_bwd_cpu("soft_mask_backward", grad, at::Tensor(), w, s, beta, scale);
}

std::tuple<at::Tensor, at::Tensor> soft_mask_with_l1_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_l1,
                                                                  const at::Tensor& w, const at::Tensor& s,
                                                                  double beta, double scale) {
  return soft_mask_bwd_cpu("soft_mask_with_l1_backward", grad, grad_l1, w, s, beta, scale);
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
  m.impl("soft_mask_with_l1", &soft_mask_with_l1_cpu);
  m.impl("soft_mask_with_l1_backward", &soft_mask_with_l1_backward_cpu);
  m.impl("soft_mask_l1", &soft_mask_l1_cpu);
  m.impl("soft_mask_l1_backward", &soft_mask_l1_backward_cpu);
}

}  // namespace sparseops
