// Whole-tensor CPU kernels: split into tasks, run in parallel on torch's thread pool, each task
// on the kernel variant for the instruction set in use (kernels.h).
#pragma once
#include "kernels.h"

namespace sparseops::cpu {

template <typename T, typename I> void spmm(const SpmmArgs<T, I>& a);
// This CPU's L2 cache per core (sysconf; 1 MiB where it does not say): what blocked kernels size to.
int64_t l2_cache_bytes();
// starts[r * (blocks + 1) + b]: the first entry of CSR row r with a column >= b * col_block (b =
// blocks: the row's end), for spmm's column blocks. False if a row's columns are not sorted (they
// are, from csr_layout): then they cannot be cut into blocks.
template <typename I> bool column_block_starts(const I* row_ptr, const I* col, int64_t rows, int64_t col_block,
                                               int64_t blocks, int64_t* starts);
template <typename T, typename I> void sddmm(const SddmmArgs<T, I>& a);
// dw values (one per kept entry, CSR order) of the implicit-im2col convolution, written to out (or
// added to it: later passes over the batch); positions are split between threads, each summing
// into its own buffer.
template <typename T, typename I> void conv_dw(const SddmmArgs<T, I>& a, int64_t nnz, T* out, bool accumulate);
template <typename T, typename I> void gather(const GatherArgs<T, I>& a, int64_t rows);
// Number of broken CSR entries: row_ptr not rising within [0, nnz], or a column outside [0, cols).
template <typename I> int64_t count_invalid_csr(const I* row_ptr, const I* col, int64_t rows, int64_t cols, int64_t nnz);
// xt[k, m] = x[m, k], rows zero-padded to ldt; with rowmap, column k of x goes to row rowmap[k]; with
// colsum, colsum[k] = the sum of column k over the M rows (from the registers the transpose loads).
template <typename T> void transpose_pad(const T* x, int64_t M, int64_t K, int64_t ldx, T* xt, int64_t ldt,
                                         const int64_t* rowmap = nullptr, T* colsum = nullptr);
// returns the NaN count of s; *total: sum of sigmoid(beta * s) (the L1 penalty without its scale)
template <typename T> int64_t soft_mask_fwd(const SoftMaskArgs<T>& a, double* total);
template <typename T> void soft_mask_bwd(const SoftMaskArgs<T>& a);
template <typename T> double soft_mask_sum(const T* s, T beta, int64_t n, int64_t* nan_count);
template <typename T> void soft_mask_l1_bwd(const T* s, T coef, T beta, T* ds, int64_t n);

}  // namespace sparseops::cpu
