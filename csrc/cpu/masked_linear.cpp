// CPU implementations of masked_linear and its backward (schemas in csrc/ops.cpp). The dense
// fallback, for any device, is csrc/masked_linear_dense.cpp.
//
// Data flow: x [M, K] is transposed once into xt [K, ldt] (zero-padded to the SpMM's M block) so
// that each kept weight w[n, k] multiplies a contiguous row xt[k, :]; the forward is a CSR SpMM of
// W's layout, dx the same kernel on W^T's layout and grad^T, dw an SDDMM of grad^T and xt rows at
// the kept entries. Weight values are gathered from the dense w through the indices on every call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "csr_ops.h"

namespace sparseops {
namespace {

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                             const std::optional<at::Tensor>& bias) {
  const char* op = "masked_linear";
  check_x(op, x, w);
  auto d = check_layout(op, w, row_ptr, col_idx, t_row_ptr, t_col_idx);
  check_bias(op, w, bias);
  TORCH_CHECK_VALUE(x.size(-1) == d.K, "sparseops.masked_linear: x has ", x.size(-1),
                    " features in its last dimension but w expects ", d.K);
  check_csr(op, row_ptr, col_idx, d.N, d.K, "row");
  auto out_shape = x.sizes().vec();
  out_shape.back() = d.N;
  const int64_t M = leading_rows(x);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  // The output is allocated in its final shape and written through a 2-D view: an op must return
  // a fresh tensor, not a view of a buffer (autograd refuses in-place edits of such views, e.g.
  // a following ReLU(inplace=True)).
  auto out = at::empty(out_shape, x.options());
  if (M == 0 || d.N == 0) return out;
  auto y = out.view({M, d.N});
  auto rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  auto x2 = x.reshape({M, d.K}).contiguous();
  const int64_t S = slab_rows(M, x.scalar_type());
  auto xt = at::empty({d.K, S}, x.options());
  auto vals = gather_values(w.contiguous(), rp, ci, d.K, 1);
  for (int64_t m0 = 0; m0 < M; m0 += S) {
    const int64_t rows = std::min(S, M - m0);
    transpose_slab(x2, m0, rows, xt);
    auto y_rows = y.narrow(0, m0, rows);
    spmm_into(y_rows, rp, ci, vals, xt, rows, b);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_linear_backward";
  check_x(op, x, w);
  check_x(op, grad, w, "grad");
  auto d = check_layout(op, w, row_ptr, col_idx, t_row_ptr, t_col_idx);
  TORCH_CHECK_VALUE(x.size(-1) == d.K, "sparseops.", op, ": x has ", x.size(-1), " features, w expects ", d.K);
  TORCH_CHECK_VALUE(grad.size(-1) == d.N && leading_rows(grad) == leading_rows(x),
                    "sparseops.", op, ": grad has shape ", grad.sizes(), ", expected the output shape of x ",
                    x.sizes(), " through a ", d.N, "x", d.K, " weight");
  const auto [need_dx, need_dw, need_db] = output_mask;
  const int64_t M = leading_rows(x);
  auto g2 = grad.reshape({M, d.N}).contiguous();
  at::Tensor dx, dx2, dw, db, t_rp, t_ci, t_vals, rp, ci, x2, gt, xt, sums;
  if (need_dx) {
    check_csr(op, t_row_ptr, t_col_idx, d.K, d.N, "transposed");
    dx = at::empty(x.sizes(), x.options());  // fresh, in x's shape; written through dx2 [M, K]
    dx2 = dx.view({M, d.K});
    t_rp = t_row_ptr.contiguous();
    t_ci = t_col_idx.contiguous();
    if (M > 0) t_vals = gather_values(w.contiguous(), t_rp, t_ci, 1, d.K);
  }
  if (need_dw) {
    check_csr(op, row_ptr, col_idx, d.N, d.K, "row");
    dw = M > 0 ? at::empty({d.N, d.K}, w.options()) : at::zeros_like(w);
    rp = row_ptr.contiguous();
    ci = col_idx.contiguous();
    x2 = x.reshape({M, d.K}).contiguous();
    sums = at::empty({ci.numel()}, w.options());  // dw's kept entries, summed over the slabs
  }
  const int64_t S = slab_rows(M, x.scalar_type());
  if (need_dx || need_dw) gt = at::empty({d.N, S}, x.options());
  if (need_dw) xt = at::empty({d.K, S}, x.options());
  // db from the grad's transposes (each column's sum from the registers they load), not another
  // pass over grad in memory.
  const bool db_from_slabs = need_db && (need_dx || need_dw) && M > 0;
  const auto slab_sums = db_from_slabs ? at::empty({d.N}, x.options()) : at::Tensor();
  for (int64_t m0 = 0; m0 < M && (need_dx || need_dw); m0 += S) {
    const int64_t rows = std::min(S, M - m0);
    transpose_slab(g2, m0, rows, gt, at::Tensor(), slab_sums);
    if (db_from_slabs) db = m0 == 0 ? slab_sums.clone() : db.add_(slab_sums);
    if (need_dx && d.K > 0) {
      auto dx_rows = dx2.narrow(0, m0, rows);
      spmm_into(dx_rows, t_rp, t_ci, t_vals, gt, rows, at::Tensor());
    }
    if (need_dw) {
      transpose_slab(x2, m0, rows, xt);
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sddmm", [&] {
        AT_DISPATCH_INDEX_TYPES(rp.scalar_type(), "sddmm", [&] {
          cpu::SddmmArgs<scalar_t, index_t> a{d.N,
                                              d.K,
                                              S,
                                              rp.data_ptr<index_t>(),
                                              ci.data_ptr<index_t>(),
                                              gt.data_ptr<scalar_t>(),
                                              xt.data_ptr<scalar_t>(),
                                              dw.data_ptr<scalar_t>(),
                                              sums.data_ptr<scalar_t>(),
                                              /*first=*/m0 == 0,
                                              /*last=*/m0 + S >= M};
          cpu::sddmm(a);
        });
      });
    }
  }
  if (need_db && !db_from_slabs) db = g2.sum(0);
  // Outputs not asked for are distinct empty tensors (outputs of an op must not alias).
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, w.options()); };
  return {or_empty(dx), or_empty(dw), or_empty(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_backward", &masked_linear_backward_cpu);
}

}  // namespace sparseops
