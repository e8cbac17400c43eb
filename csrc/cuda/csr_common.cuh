// Device helpers shared by the CUDA kernels that run on a CSR layout (masked_linear.cu,
// masked_conv2d.cu): accumulator types, warp reductions, the row of a CSR entry, bounded row
// ranges, the padded batch-minor transposes and the deterministic SDDMM epilogue.
//
// NOTE on corrupt layouts: the CPU ops validate the whole CSR on the host (check_csr); here that
// would copy the indices to the host and synchronise on every call. The Python layer builds valid
// layouts, so instead every kernel bounds every index it reads: row ranges are clamped to
// [0, nnz] and entries whose column lies outside [0, cols) are skipped. A corrupt layout then
// gives a wrong answer, never an out-of-bounds access.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace sparseops {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// fp32 accumulation for float, half and bfloat16; fp64 for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// 16 bytes of T: one vector load (float4-sized) per lane. VEC = 4 floats, 2 doubles, 8 halves.
template <typename T> struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};
static_assert(sizeof(Vec<float>) == 16 && sizeof(Vec<double>) == 16 && sizeof(Vec<c10::Half>) == 16 &&
                  sizeof(Vec<c10::BFloat16>) == 16,
              "one Vec is one 16-byte load");

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;  // the total is in lane 0
}

// [begin, end) of CSR row r, clamped to [0, nnz] so that a corrupt row_ptr never leads outside
// the index arrays (an inverted range is empty).
template <typename I>
__device__ __forceinline__ void row_range(const I* __restrict__ rp, int64_t r, int64_t nnz, int64_t& begin,
                                          int64_t& end) {
  begin = max(int64_t(rp[r]), int64_t(0));
  end = min(int64_t(rp[r + 1]), nnz);
}

// The CSR row that holds entry j (0 <= j < nnz, rows >= 1): the largest r with rp[r] <= j, found by
// binary search. Empty rows share their rp value with the next row, and the largest such r is the
// one whose range is not empty. Reads rp[1 .. rows - 1] only; for any row_ptr the result lies in
// [0, rows).
template <typename I>
__device__ __forceinline__ int64_t row_of(const I* __restrict__ rp, int64_t rows, int64_t j) {
  int64_t lo = 0, hi = rows - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;  // in (lo, hi]
    if (int64_t(rp[mid]) <= j) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Deterministic SDDMM epilogue: out[r * cols + c] = sum over s of partial[s, j] for each kept entry
// j = (r, c) of the CSR (rp, col); out holds zeros elsewhere (the caller allocates it with zeros).
// One thread per entry, grid-stride; the splits are summed in a fixed order, so results do not
// depend on scheduling (no atomics).
template <typename T, typename I>
__global__ void sddmm_scatter_kernel(const typename Acc<T>::type* __restrict__ partial, int64_t splits,
                                     const I* __restrict__ rp, const I* __restrict__ col, int64_t rows,
                                     int64_t cols, int64_t nnz, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < nnz; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = row_of(rp, rows, j);
    const int64_t c = int64_t(col[j]);
    if (c < 0 || c >= cols) continue;  // corrupt layout: skip, never write out of bounds
    A sum = A(0);
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * nnz + j];
    out[r * cols + c] = static_cast<T>(sum);
  }
}

inline int grid_for(int64_t n, int threads, int64_t max_blocks = 65535 * 8) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), max_blocks));
}

// How many CTAs split each SDDMM reduction: enough warps to fill the GPU (~16k warps in flight)
// when there are few kept entries, never more than there are 32-wide steps of work, at most 64.
inline int64_t sddmm_splits(int64_t nnz, int64_t work) {
  constexpr int64_t kTargetWarps = 16384, kMaxSplits = 64;
  const int64_t want = (kTargetWarps + nnz - 1) / std::max<int64_t>(nnz, 1);
  const int64_t steps = (work + kWarp - 1) / kWarp;
  return std::max<int64_t>(1, std::min({want, steps, kMaxSplits}));
}

// partial [splits, nnz] (accumulator type) -> out [rows, cols], zero at pruned entries.
template <typename T, typename I>
void launch_sddmm_scatter(const at::Tensor& partial, int64_t splits, const at::Tensor& rp, const at::Tensor& col,
                          int64_t rows, int64_t cols, at::Tensor& out) {
  const int64_t nnz = col.numel();
  if (nnz == 0 || rows == 0) return;
  using A = typename Acc<T>::type;
  constexpr int threads = 256;
  sddmm_scatter_kernel<T, I><<<grid_for(nnz, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      partial.data_ptr<A>(), splits, rp.data_ptr<I>(), col.data_ptr<I>(), rows, cols, nnz, out.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The accumulator dtype of a storage dtype.
inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Elements per 16-byte vector of a storage dtype (Vec<T>::N).
inline int64_t vec_width(at::ScalarType st) { return 16 / static_cast<int64_t>(c10::elementSize(st)); }

// a [M, C] (contiguous) -> out [C, ld] with ld = M rounded up to the vector width and the padding
// columns zeroed, so that every row starts 16-byte aligned (whole-vector loads) and a dot product
// over the full ld adds only zeros past M. The copy is ATen's (on the current stream).
inline at::Tensor transpose_padded(const at::Tensor& a, int64_t M, int64_t C) {
  const int64_t V = vec_width(a.scalar_type());
  const int64_t ld = std::max<int64_t>(V, (M + V - 1) / V * V);
  auto out = at::empty({C, ld}, a.options());
  out.narrow(1, 0, M).copy_(a.t());
  if (ld > M) out.narrow(1, M, ld - M).zero_();
  return out;
}

}  // namespace cuda
}  // namespace sparseops
