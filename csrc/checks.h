// Input checks shared by the op implementations. Every message starts with the op's Python name
// and names the argument; TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE raises ValueError.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

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

// ---- CSR-layout ops (masked_linear, masked_conv2d): shared by the CPU and CUDA kernels. The CPU
// kernels take float32/float64 only (allow_half = false); the CUDA ones also float16/bfloat16.

struct Dims {
  int64_t M, K, N, nnz;
};

// Shapes, dtypes and devices of a layout for a [N, K] weight. Cheap: reads no index values (a full
// CSR validation is the CPU ops' check_csr; the CUDA kernels bound every index they read instead).
inline Dims check_layout(const char* op, const at::Tensor& w, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                         const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx) {
  TORCH_CHECK_VALUE(w.dim() == 2, "sparseops.", op, ": w must be 2-D [out_features, in_features], got shape ",
                    w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  check_index(op, row_ptr, "layout.row_ptr", N + 1);
  const int64_t nnz = col_idx.numel();
  check_index(op, col_idx, "layout.col_idx", -1);
  check_index(op, t_row_ptr, "layout.t_row_ptr", K + 1);
  check_index(op, t_col_idx, "layout.t_col_idx", nnz);
  for (const auto* t : {&row_ptr, &col_idx, &t_row_ptr, &t_col_idx}) {
    TORCH_CHECK_TYPE(t->scalar_type() == row_ptr.scalar_type(), "sparseops.", op,
                     ": the layout's index tensors must share one dtype, got ", row_ptr.scalar_type(), " and ",
                     t->scalar_type());
    check_same_device(op, w, "w", *t, "layout");
  }
  TORCH_CHECK_VALUE(nnz <= N * K, "sparseops.", op, ": layout has ", nnz, " entries for a ", N, "x", K,
                    " weight");
  return {0, K, N, nnz};
}

// Rows of x seen as a matrix: the product of its leading dimensions.
inline int64_t leading_rows(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

inline void check_bias(const char* op, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       bool allow_half = false) {
  if (!bias.has_value() || !bias->defined()) return;
  check_floating(op, *bias, "bias", allow_half);
  check_same_dtype(op, w, "w", *bias, "bias");
  check_same_device(op, w, "w", *bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.size(0), "sparseops.", op,
                    ": bias must have shape [", w.size(0), "], got ", bias->sizes());
}

inline void check_x(const char* op, const at::Tensor& x, const at::Tensor& w, const char* name = "x",
                    bool allow_half = false) {
  check_floating(op, x, name, allow_half);
  check_floating(op, w, "w", allow_half);
  check_same_dtype(op, w, "w", x, name);
  check_same_device(op, w, "w", x, name);
  TORCH_CHECK_VALUE(x.dim() >= 1, "sparseops.", op, ": ", name, " must have at least one dimension");
}

struct ConvGeom {
  int64_t N, Cin, H, W, Cout, KH, KW, sh, sw, ph, pw, dh, dw, Hp, Wp, Ho, Wo, K;
};

inline ConvGeom check_conv(const char* op, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, bool allow_half = false) {
  check_floating(op, x, "x", allow_half);
  check_floating(op, w, "w", allow_half);
  check_same_dtype(op, w, "w", x, "x");
  check_same_device(op, w, "w", x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, "sparseops.", op, ": x must be 4-D [N, C_in, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 4, "sparseops.", op, ": w must be 4-D [C_out, C_in, kh, kw], got shape ", w.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "sparseops.", op,
                    ": stride, padding and dilation must have 2 values each");
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, "sparseops.", op, ": stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0, "sparseops.", op, ": dilation must be positive, got ",
                    dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "sparseops.", op, ": padding must be >= 0, got ", padding);
  ConvGeom g{};
  g.N = x.size(0), g.Cin = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.Cout = w.size(0), g.KH = w.size(2), g.KW = w.size(3);
  TORCH_CHECK_VALUE(w.size(1) == g.Cin, "sparseops.", op, ": x has ", g.Cin, " channels but w expects ", w.size(1),
                    " (groups other than 1 run through the reference)");
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.Hp = g.H + 2 * g.ph, g.Wp = g.W + 2 * g.pw;
  const int64_t eh = g.dh * (g.KH - 1) + 1, ew = g.dw * (g.KW - 1) + 1;
  TORCH_CHECK_VALUE(g.Hp >= eh && g.Wp >= ew, "sparseops.", op, ": the padded input (", g.Hp, "x", g.Wp,
                    ") is smaller than the dilated kernel (", eh, "x", ew, ")");
  g.Ho = (g.Hp - eh) / g.sh + 1, g.Wo = (g.Wp - ew) / g.sw + 1;
  g.K = g.Cin * g.KH * g.KW;
  return g;
}

// The memory format conv results take: channels-last when x is (and is not also plain contiguous).
inline at::MemoryFormat format_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

}  // namespace sparseops
