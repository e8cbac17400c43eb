// _csr_from_mask (schema in csrc/ops.cpp): a 2-D bool mask's CSR (row_ptr, col_idx) and its
// transpose's (t_row_ptr, t_col_idx) in four passes over the mask, for sparseops/layout.py. torch's
// nonzero of the transposed view, a bool sum and two bincounts took ~50 ms for a 2048x2048 mask;
// a layout is built at each new mask version (every IMP level), so that was paid per layer and level.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "../checks.h"

namespace sparseops {
namespace {

int64_t row_counts(const uint8_t* m, int64_t R, int64_t C, std::vector<int64_t>& counts) {
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t n = 0;
      for (int64_t c = 0; c < C; ++c) n += m[r * C + c] != 0;
      counts[r] = n;
    }
  });
  int64_t nnz = 0;
  for (int64_t n : counts) nnz += n;
  return nnz;
}

template <typename I>
void fill_csr(const uint8_t* m, int64_t R, int64_t C, const std::vector<int64_t>& counts, I* row_ptr, I* col,
              I* t_row_ptr, I* t_col) {
  row_ptr[0] = 0;
  for (int64_t r = 0; r < R; ++r) row_ptr[r + 1] = static_cast<I>(row_ptr[r] + counts[r]);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      I* out = col + row_ptr[r];
      for (int64_t c = 0; c < C; ++c)
        if (m[r * C + c]) *out++ = static_cast<I>(c);
    }
  });
  // Columns, in strips of 64 (one cache line of the mask per row): each strip's counts, then its
  // entries in row order; strips are independent, so no two threads share a counter or cursor.
  constexpr int64_t kStrip = 64;
  std::vector<int64_t> ccounts(C, 0);
  at::parallel_for(0, (C + kStrip - 1) / kStrip, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c0 = s * kStrip, c1 = std::min(C, c0 + kStrip);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = c0; c < c1; ++c) ccounts[c] += m[r * C + c] != 0;
    }
  });
  t_row_ptr[0] = 0;
  for (int64_t c = 0; c < C; ++c) t_row_ptr[c + 1] = static_cast<I>(t_row_ptr[c] + ccounts[c]);
  at::parallel_for(0, (C + kStrip - 1) / kStrip, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c0 = s * kStrip, c1 = std::min(C, c0 + kStrip);
      int64_t cursor[kStrip];
      for (int64_t c = c0; c < c1; ++c) cursor[c - c0] = t_row_ptr[c];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = c0; c < c1; ++c)
          if (m[r * C + c]) t_col[cursor[c - c0]++] = static_cast<I>(r);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_from_mask_cpu(const at::Tensor& mask, bool int64) {
  const char* op = "_csr_from_mask";
  check_defined(op, mask, "mask");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "sparseops.", op, ": mask must be bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2, "sparseops.", op, ": mask must be 2-D, got shape ", mask.sizes());
  auto mc = mask.contiguous();
  const int64_t R = mc.size(0), C = mc.size(1);
  const auto* m = reinterpret_cast<const uint8_t*>(mc.const_data_ptr<bool>());
  std::vector<int64_t> counts(R);
  const int64_t nnz = row_counts(m, R, C, counts);
  TORCH_CHECK_VALUE(int64 || std::max({nnz, R, C}) <= INT32_MAX, "sparseops.", op, ": ", nnz,
                    " kept entries need int64 indices");
  const auto opts = mc.options().dtype(int64 ? at::kLong : at::kInt);
  auto row_ptr = at::empty({R + 1}, opts), t_row_ptr = at::empty({C + 1}, opts);
  auto col = at::empty({nnz}, opts), t_col = at::empty({nnz}, opts);
  AT_DISPATCH_INDEX_TYPES(opts.dtype().toScalarType(), "_csr_from_mask", [&] {
    fill_csr<index_t>(m, R, C, counts, row_ptr.data_ptr<index_t>(), col.data_ptr<index_t>(),
                      t_row_ptr.data_ptr<index_t>(), t_col.data_ptr<index_t>());
  });
  return {row_ptr, col, t_row_ptr, t_col};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) { m.impl("_csr_from_mask", &csr_from_mask_cpu); }

}  // namespace sparseops
