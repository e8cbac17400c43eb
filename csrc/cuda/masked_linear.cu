// CUDA implementations of masked_linear and its backward (schemas in csrc/ops.cpp); the dense
// fallback masked_linear_dense is registered for CUDA from csrc/cpu/masked_linear.cpp (plain ATen).
//
// Data flow (as on the CPU): x [M, K] is transposed once into xt [K, ld] (ld = M rounded up to a
// 16-byte vector, padding zeroed), so that each kept weight w[n, k] multiplies one contiguous,
// aligned row xt[k, :].
//   forward: yt [N, ld] = CSR SpMM of W's layout with xt (Sputnik style, spmm_kernel), y = yt^T.
//   dx:      dxt [K, ld] = the same kernel on W^T's layout with gt = grad^T [N, ld], dx = dxt^T.
//   dw:      SDDMM: dw[n, k] = dot(gt[n, :], xt[k, :]) at kept entries only (linear_sddmm_kernel),
//            zero elsewhere; the reduction over M is split over CTAs into a partial buffer that a
//            second kernel sums in a fixed order (deterministic, no atomics).
//   db:      grad summed over rows (at::sum; fp32 accumulation for the half types).
// NOTE: the kernels write yt / dxt (batch-minor) and ATen's copy transposes them back. Writing
// y[m, n] directly from spmm_kernel would put consecutive lanes N elements apart (one memory
// transaction per lane); the separate transpose reads and writes coalesced tiles.
// Weight values are read from the dense w through the indices on every call (weights change every
// step, masks rarely). All work runs on the current stream with no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "csr_common.cuh"

namespace sparseops {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int64_t kMaxGridY = 65535;

// C [rows, ld] = A @ B (+ bias), A a CSR matrix [rows, cols] whose value at (r, c) is
// w[r * ldr + c * ldc] (W's layout: ldr = K, ldc = 1; W^T's layout: ldr = 1, ldc = K), B [cols, ld].
//
// Parallelisation: one warp per output row, kWarpsPerBlock rows per CTA, rows taken in the order
// perm gives (longest first, so the CTAs with most work start first and the tail is short).
// gridDim.y CTAs split the row's columns: lane l of tile t owns the 16-byte vector t * 32 + l of
// the row, so a warp reads 512 contiguous bytes of a B row per kept entry. The warp walks its row's
// entries 32 at a time: each lane loads one (column, value) pair and shuffles broadcast them, so
// the index and weight loads are coalesced too. Accumulation in Acc<T> (fp32, fp64 for double).
// Every loop bound is uniform across a warp, so all lanes reach every __shfl_sync.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    spmm_kernel(const I* __restrict__ rp, const I* __restrict__ col, const int64_t* __restrict__ perm,
                const T* __restrict__ w, int64_t ldr, int64_t ldc, const T* __restrict__ B,
                const T* __restrict__ bias, T* __restrict__ C, int64_t rows, int64_t cols, int64_t nnz,
                int64_t ld) {
  using A = typename Acc<T>::type;
  using V = Vec<T>;
  constexpr int VN = V::N;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t slot = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (slot >= rows) return;  // the whole warp leaves together
  const int64_t row = perm[slot];
  if (row < 0 || row >= rows) return;  // perm comes from argsort: always in range
  int64_t begin, end;
  row_range(rp, row, nnz, begin, end);
  const A init = bias != nullptr ? A(bias[row]) : A(0);
  const int64_t nvec = ld / VN;  // ld is a multiple of VN
  const int64_t tiles = (nvec + kWarp - 1) / kWarp;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t v = t * kWarp + lane;  // this lane's vector in the row
    const bool active = v < nvec;
    A acc[VN];
#pragma unroll
    for (int e = 0; e < VN; ++e) acc[e] = init;
    for (int64_t j0 = begin; j0 < end; j0 += kWarp) {
      long long my_k = -1;  // -1: no entry (past the row's end, or a column out of range)
      A my_val = A(0);
      const int64_t j = j0 + lane;
      if (j < end) {
        const int64_t c = int64_t(col[j]);
        if (c >= 0 && c < cols) {
          my_k = c;
          my_val = A(w[row * ldr + c * ldc]);
        }
      }
      const int cnt = static_cast<int>(min(int64_t(kWarp), end - j0));
      for (int i = 0; i < cnt; ++i) {
        const long long k = __shfl_sync(kFullMask, my_k, i);
        const A val = __shfl_sync(kFullMask, my_val, i);
        if (k >= 0 && active) {
          const V b = reinterpret_cast<const V*>(B + k * ld)[v];
#pragma unroll
          for (int e = 0; e < VN; ++e) acc[e] += val * static_cast<A>(b.v[e]);
        }
      }
    }
    if (active) {
      V out;
#pragma unroll
      for (int e = 0; e < VN; ++e) out.v[e] = static_cast<T>(acc[e]);
      reinterpret_cast<V*>(C + row * ld)[v] = out;
    }
  }
}

// partial[s, j] = the s-th slice of dot(gt[n, :], xt[k, :]) for kept entry j = (n, k) of W's CSR.
//
// Parallelisation: one warp per (entry, split), kWarpsPerBlock consecutive entries per CTA (mostly
// one row n, so its gt row is shared through the cache), gridDim.y = splits slices of the ld / VN
// vectors. Lanes stride through the slice's vectors (coalesced 16-byte loads of both rows), then a
// warp-shuffle reduction; lane 0 writes the partial. Padding columns of gt and xt are zero.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    linear_sddmm_kernel(const I* __restrict__ rp, const I* __restrict__ col, const T* __restrict__ gt,
                        const T* __restrict__ xt, int64_t rows, int64_t cols, int64_t nnz, int64_t ld,
                        int64_t splits, typename Acc<T>::type* __restrict__ partial) {
  using A = typename Acc<T>::type;
  using V = Vec<T>;
  constexpr int VN = V::N;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t j = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (j >= nnz) return;  // the whole warp leaves together
  const int64_t s = blockIdx.y;
  const int64_t n = row_of(rp, rows, j);
  const int64_t k = int64_t(col[j]);
  A acc = A(0);
  if (k >= 0 && k < cols) {
    const int64_t nvec = ld / VN;
    const int64_t chunk = (nvec + splits - 1) / splits;
    const int64_t v0 = s * chunk, v1 = min(nvec, v0 + chunk);
    const V* a = reinterpret_cast<const V*>(gt + n * ld);
    const V* b = reinterpret_cast<const V*>(xt + k * ld);
    for (int64_t v = v0 + lane; v < v1; v += kWarp) {
      const V av = a[v], bv = b[v];
#pragma unroll
      for (int e = 0; e < VN; ++e) acc += static_cast<A>(av.v[e]) * static_cast<A>(bv.v[e]);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) partial[s * nnz + j] = acc;
}

// Rows of a CSR by number of kept entries, longest first (int64 row ids, on the device). One small
// sort per call; the layout could cache it, but the op schema carries only the CSR itself.
at::Tensor rows_by_length(const at::Tensor& rp) {
  const int64_t rows = rp.numel() - 1;
  auto lengths = rp.narrow(0, 1, rows) - rp.narrow(0, 0, rows);
  return at::argsort(lengths, /*stable=*/true, /*dim=*/0, /*descending=*/true);
}

// C [rows, ld] = A (CSR rp/col with values from w, see spmm_kernel) @ B [cols, ld] (+ bias).
void spmm(const at::Tensor& rp, const at::Tensor& col, const at::Tensor& w, int64_t ldr, int64_t ldc,
          const at::Tensor& B, const at::Tensor& bias, at::Tensor& C) {
  const int64_t rows = rp.numel() - 1, cols = B.size(0), ld = B.size(1), nnz = col.numel();
  if (rows == 0 || ld == 0) return;
  auto perm = rows_by_length(rp);
  const int64_t nvec = ld / vec_width(B.scalar_type());
  const int64_t tiles = (nvec + kWarp - 1) / kWarp;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "sparseops: too many rows for one launch (", rows, ")");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min(tiles, kMaxGridY)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.scalar_type(), "sparseops_spmm_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(rp.scalar_type(), "sparseops_spmm_cuda", [&] {
      spmm_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
          rp.data_ptr<index_t>(), col.data_ptr<index_t>(), perm.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), ldr,
          ldc, B.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, C.data_ptr<scalar_t>(),
          rows, cols, nnz, ld);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor masked_linear_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                              const std::optional<at::Tensor>& bias) {
  const char* op = "masked_linear";
  check_x(op, x, w, "x", /*allow_half=*/true);
  auto d = check_layout(op, w, row_ptr, col_idx, t_row_ptr, t_col_idx);
  check_bias(op, w, bias, /*allow_half=*/true);
  TORCH_CHECK_VALUE(x.size(-1) == d.K, "sparseops.masked_linear: x has ", x.size(-1),
                    " features in its last dimension but w expects ", d.K);
  const c10::cuda::CUDAGuard guard(w.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = d.N;
  const int64_t M = leading_rows(x);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  // Allocated in its final shape, written through a 2-D view: an op returns fresh tensors, not views
  // (autograd refuses in-place edits of a custom op's view outputs, e.g. a following ReLU(inplace)).
  auto out = at::empty(out_shape, x.options());
  if (M == 0 || d.N == 0) return out;
  auto y = out.view({M, d.N});
  if (d.nnz == 0) {  // fully pruned (or K == 0): y is the bias
    if (b.defined()) y.copy_(b.expand({M, d.N}));
    else y.zero_();
    return out;
  }
  auto xt = transpose_padded(x.reshape({M, d.K}).contiguous(), M, d.K);
  auto yt = at::empty({d.N, xt.size(1)}, x.options());
  spmm(row_ptr.contiguous(), col_idx.contiguous(), w.contiguous(), d.K, 1, xt, b, yt);
  y.copy_(yt.narrow(1, 0, M).t());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_linear_backward";
  check_x(op, x, w, "x", /*allow_half=*/true);
  check_x(op, grad, w, "grad", /*allow_half=*/true);
  auto d = check_layout(op, w, row_ptr, col_idx, t_row_ptr, t_col_idx);
  TORCH_CHECK_VALUE(x.size(-1) == d.K, "sparseops.", op, ": x has ", x.size(-1), " features, w expects ", d.K);
  TORCH_CHECK_VALUE(grad.size(-1) == d.N && leading_rows(grad) == leading_rows(x),
                    "sparseops.", op, ": grad has shape ", grad.sizes(), ", expected the output shape of x ",
                    x.sizes(), " through a ", d.N, "x", d.K, " weight");
  const c10::cuda::CUDAGuard guard(w.device());
  const auto [need_dx, need_dw, need_db] = output_mask;
  const int64_t M = leading_rows(x);
  const bool work = M > 0 && d.nnz > 0;  // else dx and dw are zero
  auto g2 = grad.reshape({M, d.N}).contiguous();
  auto wc = w.contiguous();
  at::Tensor dx, dw, db, gt;
  if ((need_dx || need_dw) && work) gt = transpose_padded(g2, M, d.N);
  if (need_dx) {
    if (work) {
      auto dxt = at::empty({d.K, gt.size(1)}, x.options());
      spmm(t_row_ptr.contiguous(), t_col_idx.contiguous(), wc, 1, d.K, gt, at::Tensor(), dxt);
      dx = at::empty(x.sizes(), x.options());  // fresh, in x's shape
      dx.view({M, d.K}).copy_(dxt.narrow(1, 0, M).t());
    } else {
      dx = at::zeros(x.sizes(), x.options());
    }
  }
  if (need_dw) {
    dw = at::zeros({d.N, d.K}, w.options());
    if (work) {
      auto xt = transpose_padded(x.reshape({M, d.K}).contiguous(), M, d.K);
      auto rp = row_ptr.contiguous(), ci = col_idx.contiguous();
      const int64_t ld = xt.size(1), nvec = ld / vec_width(x.scalar_type());
      const int64_t splits = sddmm_splits(d.nnz, nvec);
      auto partial = at::empty({splits, d.nnz}, x.options().dtype(acc_type(x.scalar_type())));
      const int64_t blocks = (d.nnz + kWarpsPerBlock - 1) / kWarpsPerBlock;
      TORCH_CHECK(blocks <= INT32_MAX, "sparseops.", op, ": too many kept entries for one launch (", d.nnz, ")");
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
      auto stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_linear_sddmm_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(rp.scalar_type(), "masked_linear_sddmm_cuda", [&] {
          using A = typename Acc<scalar_t>::type;
          linear_sddmm_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
              rp.data_ptr<index_t>(), ci.data_ptr<index_t>(), gt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), d.N,
              d.K, d.nnz, ld, splits, partial.data_ptr<A>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          launch_sddmm_scatter<scalar_t, index_t>(partial, splits, rp, ci, d.N, d.K, dw);
        });
      });
    }
  }
  if (need_db) db = g2.sum(0);
  // Outputs not asked for are distinct empty tensors (outputs of an op must not alias).
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, w.options()); };
  return {or_empty(dx), or_empty(dw), or_empty(db)};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("masked_linear", &cuda::masked_linear_cuda);
  m.impl("masked_linear_backward", &cuda::masked_linear_backward_cuda);
}

}  // namespace sparseops
