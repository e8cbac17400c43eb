// Input checks shared by the op implementations. Every message starts with the op's Python name
// and names the argument; TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE raises ValueError.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace sparseops {

inline void check_defined(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "sparseops.", op, ": ", name, " is undefined");
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name, bool allow_half) {
  check_defined(op, t, name);
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kDouble ||
                  (allow_half && (st == at::kHalf || st == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, "sparseops.", op, ": ", name, " must be ",
                   allow_half ? "float32, float64, float16 or bfloat16" : "float32 or float64",
                   " on this device, got ", st);
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "sparseops.", op, ": ", name,
                    " must be a dense (strided) tensor, got layout ", t.layout());
}

inline void check_same_dtype(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b,
                             const char* bn) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "sparseops.", op, ": ", bn, " must have the dtype of ",
                   an, " (", a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "sparseops.", op, ": ", bn, " is on ", b.device(), " but ", an,
                    " is on ", a.device(), "; move them to one device");
}

inline void check_finite(const char* op, double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "sparseops.", op, ": ", name, " must be finite, got ", v);
}

inline void check_index(const char* op, const at::Tensor& t, const char* name, int64_t numel) {
  check_defined(op, t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "sparseops.", op, ": ", name,
                   " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "sparseops.", op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, "sparseops.", op, ": ", name, " must have ", numel,
                    " entries, got ", t.numel());
}

// Soft-mask ops: w and s of one shape, dtype and device; finite beta and scale.
inline void check_soft_mask_args(const char* op, const at::Tensor& w, const at::Tensor& s, double beta,
                                 double scale, bool allow_half) {
  check_floating(op, w, "w", allow_half);
  check_floating(op, s, "s", allow_half);
  check_same_device(op, w, "w", s, "s");
  check_same_dtype(op, w, "w", s, "s");
  TORCH_CHECK_VALUE(w.sizes() == s.sizes(), "sparseops.", op, ": s must have the shape of w ", w.sizes(),
                    ", got ", s.sizes());
  check_finite(op, beta, "beta");
  check_finite(op, scale, "scale");
}

// The incoming gradient of a soft-mask backward: like w.
inline void check_soft_mask_grad(const char* op, const at::Tensor& grad, const at::Tensor& w, bool allow_half) {
  check_floating(op, grad, "grad", allow_half);
  check_same_device(op, w, "w", grad, "grad");
  check_same_dtype(op, w, "w", grad, "grad");
  TORCH_CHECK_VALUE(grad.sizes() == w.sizes(), "sparseops.", op, ": grad must have the shape of w ", w.sizes(),
                    ", got ", grad.sizes());
}

inline void check_scores(const char* op, const at::Tensor& s, double beta, double scale, bool allow_half) {
  check_floating(op, s, "s", allow_half);
  check_finite(op, beta, "beta");
  check_finite(op, scale, "scale");
}

}  // namespace sparseops
