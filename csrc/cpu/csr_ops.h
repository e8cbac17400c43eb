// Pieces shared by the CPU ops that run on a CSR layout (masked_linear.cpp, masked_conv2d.cpp):
// layout checks, transposes into the kernels' padded batch-minor layout, value gathers, SpMM calls.
#pragma once
#include <ATen/ATen.h>

#include <array>

#include "../checks.h"
#include "dispatch.h"

namespace sparseops {
inline namespace csr_ops {

// Raises if a CSR structure is broken, so a bad layout never reads out of bounds.
inline void check_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& col, int64_t rows, int64_t cols,
               const char* which) {
  auto rp = row_ptr.contiguous(), c = col.contiguous();
  int64_t bad = 0;
  AT_DISPATCH_INDEX_TYPES(rp.scalar_type(), "check_csr", [&] {
    bad = cpu::count_invalid_csr(rp.data_ptr<index_t>(), c.data_ptr<index_t>(), rows, cols, c.numel());
  });
  TORCH_CHECK_VALUE(bad == 0, "sparseops.", op, ": the layout's ", which,
                    " CSR is invalid (row pointers must rise from 0 to nnz and columns lie in [0, ", cols,
                    ")); rebuild it with sparseops.layout.csr_layout(mask)");
}

// NOTE: the SpMM and SDDMM want x^T and grad^T (the batch dimension contiguous). Transposing the
// whole batch would hold copies as large as x and grad through the backward; instead the batch is
// cut into at most kMaxSlabs slabs of rows, each transposed just before use (into one reused
// buffer), so the extra memory is about a quarter of x and grad, while the SDDMM adds only
// kMaxSlabs partial dot products per kept weight.
constexpr int64_t kMaxSlabs = 4;

inline int64_t slab_rows(int64_t M, at::ScalarType st) {
  const int64_t MB = st == at::kDouble ? cpu::spmm_m_block<double>() : cpu::spmm_m_block<float>();
  const int64_t rows = (M + kMaxSlabs - 1) / kMaxSlabs;
  return std::max<int64_t>(1, (rows + MB - 1) / MB) * MB;
}

// Rows [m0, m0 + rows) of a [M, C] (row-major, contiguous) -> out [C, ld], zero-padded past rows.
// A scratch buffer reused across calls, one per thread and slot. Large fresh allocations are
// returned to the OS when freed, so each call would page-fault its buffers in again; for a
// transposed conv input that costs more than the sparse work at high sparsity (12 ms for 38 MB
// here, against 1 ms to write the same memory once it is mapped). Never returned to the caller.
// scratch_generation(slot) counts the slot's allocations (what it held before is gone when it changes).
inline uint64_t& scratch_generation(int slot) {
  thread_local std::array<uint64_t, 4> generation{};
  return generation.at(slot);
}

inline at::Tensor scratch(int slot, int64_t numel, const at::TensorOptions& opts) {
  thread_local std::array<at::Tensor, 4> bufs;
  auto& b = bufs.at(slot);
  if (!b.defined() || b.numel() < numel || b.scalar_type() != opts.dtype().toScalarType()) {
    b = at::empty({std::max<int64_t>(numel, 1)}, opts.device(at::kCPU));
    ++scratch_generation(slot);
  }
  return b.narrow(0, 0, numel);
}

// With rowmap (int64, one per column of a), column k lands in row rowmap[k] of out instead of k;
// with colsum ([C], a's dtype), colsum[k] = the sum of column k over the slab's rows.
inline void transpose_slab(const at::Tensor& a, int64_t m0, int64_t rows, at::Tensor& out,
                           const at::Tensor& rowmap = at::Tensor(), const at::Tensor& colsum = at::Tensor()) {
  const int64_t C = a.size(1), ld = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "transpose_pad", [&] {
    cpu::transpose_pad(a.data_ptr<scalar_t>() + m0 * C, rows, C, C, out.data_ptr<scalar_t>(), ld,
                       rowmap.defined() ? rowmap.data_ptr<int64_t>() : nullptr,
                       colsum.defined() ? colsum.data_ptr<scalar_t>() : nullptr);
  });
}

// Values of a CSR layout of W (ldr = K, ldc = 1) or of W^T (ldr = 1, ldc = K), gathered from w.
inline at::Tensor gather_values(const at::Tensor& w, const at::Tensor& row_ptr, const at::Tensor& col, int64_t ldr,
                         int64_t ldc) {
  auto vals = at::empty({col.numel()}, w.options());
  const int64_t rows = row_ptr.numel() - 1;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "gather_values", [&] {
    AT_DISPATCH_INDEX_TYPES(row_ptr.scalar_type(), "gather_values", [&] {
      cpu::GatherArgs<scalar_t, index_t> g{row_ptr.data_ptr<index_t>(), col.data_ptr<index_t>(),
                                           w.data_ptr<scalar_t>(), ldr, ldc, vals.data_ptr<scalar_t>()};
      cpu::gather(g, rows);
    });
  });
  return vals;
}

// y [M, rows] = A (CSR, rows x cols) @ B where bt = B^T padded [cols, ldt].
inline void spmm_into(at::Tensor& y, const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& vals,
               const at::Tensor& bt, int64_t M, const at::Tensor& bias) {
  const int64_t rows = row_ptr.numel() - 1;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "spmm", [&] {
    AT_DISPATCH_INDEX_TYPES(row_ptr.scalar_type(), "spmm", [&] {
      cpu::SpmmArgs<scalar_t, index_t> a{rows,
                                         M,
                                         bt.size(1),
                                         rows,
                                         row_ptr.data_ptr<index_t>(),
                                         col.data_ptr<index_t>(),
                                         vals.data_ptr<scalar_t>(),
                                         bt.data_ptr<scalar_t>(),
                                         bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                         y.data_ptr<scalar_t>()};
      cpu::spmm(a);
    });
  });
}

}  // namespace csr_ops
}  // namespace sparseops
