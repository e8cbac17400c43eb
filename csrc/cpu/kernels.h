// ISA-independent interface of the CPU kernels. Each kernel body (kernels_impl.h) is compiled
// once per instruction set (isa_default.cpp, isa_avx2.cpp, isa_avx512.cpp) and the variant is
// chosen at run time (dispatch.cpp), so one binary runs on any x86-64 and uses AVX-512 where
// the CPU has it. Kernels work on one task (a tile or a block of rows); dispatch.cpp runs the
// tasks in parallel on torch's OpenMP pool.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../sigmoid_cut.h"

namespace sparseops::cpu {

enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };
Isa active_isa();
void set_active_isa(const std::string& name);  // "default", "avx2", "avx512" or "auto"
std::vector<Isa> supported_isas();
std::string isa_name(Isa isa);

// Y[m, r] = bias[r] + sum_{j in row r} vals[j] * bt[col[j] * ldb + m]    (Y is M x rows, row stride ldy)
// bt holds B transposed, zero-padded to ldb columns (a multiple of spmm_m_block<T>(isa) of the ISA that runs).
//
// Convolution as an implicit-im2col SpMM (eoff non-null): output row r is position p = r % plane
// of CSR row r / plane (so Y is NCHW), and kept entry j reads bt at eoff[j] + poff[p] (element
// offsets that place the kernel tap and the output position in a transposed, padded input)
// instead of col[j] * ldb. Tiles then cover positions of one CSR row; see dispatch.cpp for order.
template <typename T, typename I>
struct SpmmArgs {
  int64_t rows, M, ldb, ldy;
  const I* row_ptr;
  const I* col;
  const T* vals;
  const T* bt;
  const T* bias;  // may be null
  T* y;
  int64_t plane = 1;
  const int64_t* eoff = nullptr;
  const int64_t* poff = nullptr;
  // Convolution only: the entries in column blocks (dispatch.cpp, spmm), where each CSR row's
  // entries of each block start (col_blocks + 1 per row: column_block_starts); null: one pass.
  const int64_t* block_starts = nullptr;
  int64_t col_blocks = 1;
};

// out[r, c] = the sum over the batch's slabs of dot(a[r, :], b[c, :]) over ld columns where (r, c) is
// kept, 0 elsewhere. a and b are zero-padded to ld (a multiple of spmm_m_block<T>(isa), 4 vectors) so
// the dot needs no tail. Each slab adds its dots to sums[j] (one per kept entry, CSR order: in cache,
// where out's scattered entries of a large weight would miss on every slab); the first starts them
// afresh, the last writes them into out's rows (zero elsewhere).
// conv_dw_positions (the weight gradient of the implicit-im2col convolution) uses plane, eoff and
// poff as the convolution's SpMM does, with a position-major a[p * rows + r, :] and per-entry sums.
template <typename T, typename I>
struct SddmmArgs {
  int64_t rows, cols, ld;
  const I* row_ptr;
  const I* col;
  const T* a;
  const T* b;
  T* out;   // rows x cols, dense
  T* sums;  // nnz
  bool first, last;
  int64_t plane = 1;
  const int64_t* eoff = nullptr;
  const int64_t* poff = nullptr;
  const int64_t* a_off = nullptr;  // conv_dw: position p's rows of a start at a + a_off[p] (else p * rows * ld)
};

// Values of a CSR matrix read from a dense matrix through its indices:
// vals[j] = w[r * ldr + col[j] * ldc] for j in row r (ldr, ldc pick W or W^T).
template <typename T, typename I>
struct GatherArgs {
  const I* row_ptr;
  const I* col;
  const T* w;
  int64_t ldr, ldc;
  T* vals;
};

// Soft mask: m = sigmoid(beta * s); out = w * scale * m;
// backward dw = g * scale * m, ds = g * w * scale * beta * m * (1 - m).
template <typename T>
struct SoftMaskArgs {
  int64_t n;
  const T* w;
  const T* s;
  const T* g;
  T beta, scale;
  T* out;  // forward output, or dw
  T* ds;   // backward only
  T l1 = 0;  // backward: the gradient reaching the L1 penalty scale * sum(sigmoid(beta * s))
};

#define SPARSEOPS_DECLARE_ISA(ns)                                                         \
  namespace ns {                                                                          \
  template <typename T, typename I> void spmm_tile(const SpmmArgs<T, I>&, int64_t r0,     \
                                                   int64_t r1, int64_t m0);               \
  template <typename T, typename I> void spmm_conv_blocked(const SpmmArgs<T, I>&, int64_t row0, \
      int64_t row1, int64_t p0, int64_t p1, int64_t m0, const int64_t* splits, int64_t blocks, T* acc); \
  template <typename T, typename I> void sddmm_rows(const SddmmArgs<T, I>&, int64_t r0,   \
                                                    int64_t r1);                          \
  template <typename T, typename I> void conv_dw_positions(const SddmmArgs<T, I>&,        \
                                                           int64_t p0, int64_t p1, T* acc); \
  template <typename T, typename I> void gather_rows(const GatherArgs<T, I>&, int64_t r0, \
                                                     int64_t r1);                         \
  template <typename T> void transpose_pad(const T* x, int64_t M, int64_t K, int64_t ldx, \
                                           T* xt, int64_t ldt, int64_t k0, int64_t k1,    \
                                           const int64_t* rowmap, T* colsum);             \
  /* forward; returns how many s in [i0, i1) are NaN */                                  \
  template <typename T> int64_t soft_mask_fwd(const SoftMaskArgs<T>&, int64_t i0, int64_t i1, \
                                               double* total);                                \
  template <typename T> void soft_mask_bwd(const SoftMaskArgs<T>&, int64_t i0, int64_t i1); \
  /* returns sum of sigmoid(beta*s) over [i0, i1); adds the NaN count of s to *bad */         \
  template <typename T> double soft_mask_sum(const T* s, T beta, int64_t i0, int64_t i1,  \
                                             int64_t* bad);                               \
  template <typename T> void soft_mask_l1_bwd(const T* s, T coef, T beta, T* ds,          \
                                              int64_t i0, int64_t i1);                    \
  }

SPARSEOPS_DECLARE_ISA(isa_default)
SPARSEOPS_DECLARE_ISA(isa_avx2)
SPARSEOPS_DECLARE_ISA(isa_avx512)

// Bytes of one vector register in an instruction set's kernels: 16 (SSE2 xmm), 32 (AVX2 ymm),
// 64 (AVX-512 zmm). Each variant's register tiles and transposes are sized by its own width.
constexpr int64_t isa_vector_bytes(Isa isa) {
  return isa == Isa::Avx512 ? 64 : isa == Isa::Avx2 ? 32 : 16;
}
// Rows of B^T an SpMM tile covers (its register block): 4 vectors of the ISA's width. Callers pad
// ldb (and the SDDMM's ld) to a multiple of the active ISA's block; dispatch.cpp runs a narrower
// variant if the ISA changed since (a wider block always divides into the narrower ones).
template <typename T>
constexpr int64_t spmm_m_block(Isa isa) { return 4 * isa_vector_bytes(isa) / static_cast<int64_t>(sizeof(T)); }
template <typename T>
inline int64_t spmm_m_block() { return spmm_m_block<T>(active_isa()); }
// Rows of the sparse operand per SpMM tile.
constexpr int64_t kSpmmRowBlock = 32;

}  // namespace sparseops::cpu
