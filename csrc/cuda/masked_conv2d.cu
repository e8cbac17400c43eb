// CUDA implementation of masked_conv2d and its backward (schemas in csrc/ops.cpp), groups = 1, any
// stride, padding and dilation. x and grad are read as NCHW (a channels_last input is copied by
// .contiguous()); results take x's memory format, as the CPU kernels' do.
//
// NOTE: a direct (implicit-GEMM, gather) formulation: no im2col matrix, no transposed or padded
// copy of x, no atomics. The mask is the CSR of W viewed as [C_out, K = C_in*kh*kw]; column
// k = (ci, r, s) with ci = k / (kh*kw), r = (k % (kh*kw)) / kw, s = k % kw.
//   forward: y[n, co, oh, ow] = sum over kept k of row co: w[co, k] * x[n, ci, oh*sh - ph + r*dh,
//            ow*sw - pw + s*dw] (zero outside the input).
//   dx:      dx[n, ci, ih, iw] = sum over taps (r, s) and kept co of W^T's row (ci, r, s):
//            w[co, k] * grad[n, co, oh, ow], where oh = (ih + ph - r*dh) / sh when that divides
//            exactly and lies in [0, Ho) (likewise ow).
//   dw:      SDDMM: dw[co, k] = sum over (n, oh, ow) of grad[n, co, oh, ow] * x[n, ci, ih, iw] at
//            kept entries only; the reduction is split over CTAs into a partial buffer summed in a
//            fixed order by a second kernel (deterministic).
//   db:      grad summed over (n, h, w) (at::sum).
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

constexpr int kConvThreads = 256;  // also the number of CSR entries staged in shared memory at once
constexpr int kWarpsPerBlock = 4;  // dw: one warp per (entry, split)
constexpr int64_t kMaxGridY = 65535;

// Forward. Parallelisation: a CTA per (tile of 256 flattened output positions p = (n, oh, ow),
// output channel co); gridDim.y CTAs stride over co when C_out > 65535. The CTA stages the kept
// entries of W's row co in shared memory 256 at a time (each thread decodes one entry: channel
// offset, tap offsets, weight value), then every thread gathers its own position's inputs for all
// of them. Consecutive threads hold consecutive ow, so both the gather (for stride 1) and the
// NCHW store are coalesced. Inactive threads (p >= P) stay in the loops for the __syncthreads.
template <typename T, typename I>
__global__ void __launch_bounds__(kConvThreads)
    conv_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const I* __restrict__ rp,
                    const I* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y, ConvGeom g,
                    int64_t nnz) {
  using A = typename Acc<T>::type;
  __shared__ int64_t s_off[kConvThreads];  // ci * H * W, or -1 for a column out of range
  __shared__ int64_t s_dh[kConvThreads];   // r * dh
  __shared__ int64_t s_dw[kConvThreads];   // s * dw
  __shared__ A s_val[kConvThreads];        // w[co, k]
  const int64_t plane = g.Ho * g.Wo, P = g.N * plane, HW = g.H * g.W, KK = g.KH * g.KW;
  const int64_t p = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
  const bool active = p < P;
  const int64_t n = active ? p / plane : 0, q = active ? p % plane : 0;
  const int64_t oh = q / g.Wo, ow = q % g.Wo;
  const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
  const T* xn = x + n * g.Cin * HW;
  for (int64_t co = blockIdx.y; co < g.Cout; co += gridDim.y) {
    int64_t begin, end;
    row_range(rp, co, nnz, begin, end);
    A acc = bias != nullptr ? static_cast<A>(bias[co]) : A(0);
    for (int64_t j0 = begin; j0 < end; j0 += kConvThreads) {
      const int64_t cnt = min(int64_t(kConvThreads), end - j0);
      __syncthreads();  // every thread is done with the previous chunk
      if (threadIdx.x < cnt) {
        const int64_t k = int64_t(col[j0 + threadIdx.x]);
        if (k >= 0 && k < g.K) {  // (then K > 0, so kh, kw >= 1: the divisions are safe)
          const int64_t rs = k % KK;
          s_off[threadIdx.x] = (k / KK) * HW;
          s_dh[threadIdx.x] = (rs / g.KW) * g.dh;
          s_dw[threadIdx.x] = (rs % g.KW) * g.dw;
          s_val[threadIdx.x] = static_cast<A>(w[co * g.K + k]);
        } else {  // corrupt layout: the entry is skipped
          s_off[threadIdx.x] = -1;
          s_dh[threadIdx.x] = s_dw[threadIdx.x] = 0;
          s_val[threadIdx.x] = A(0);
        }
      }
      __syncthreads();
      if (active) {
        for (int64_t t = 0; t < cnt; ++t) {
          const int64_t ih = ih0 + s_dh[t], iw = iw0 + s_dw[t];
          if (s_off[t] >= 0 && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
            acc += s_val[t] * static_cast<A>(xn[s_off[t] + ih * g.W + iw]);
        }
      }
    }
    if (active) y[(n * g.Cout + co) * plane + q] = static_cast<T>(acc);
  }
}

// dx (the transposed convolution, as a gather). Parallelisation: a CTA per (tile of 256 flattened
// input positions (n, ih, iw), input channel ci); gridDim.y CTAs stride over ci when C_in > 65535.
// For each tap (r, s) the CTA stages the kept output channels of W^T's row k = (ci, r, s) in shared
// memory; each thread works out which output position (if any) that tap connects it to and
// gathers grad there. With stride > 1 most threads find no position for a given tap (they still
// join the __syncthreads). No two threads write the same dx element, so no atomics.
template <typename T, typename I>
__global__ void __launch_bounds__(kConvThreads)
    conv_dx_kernel(const T* __restrict__ grad, const T* __restrict__ w, const I* __restrict__ trp,
                   const I* __restrict__ tcol, T* __restrict__ dx, ConvGeom g, int64_t nnz) {
  using A = typename Acc<T>::type;
  __shared__ int64_t s_off[kConvThreads];  // co * Ho * Wo, or -1 for a column out of range
  __shared__ A s_val[kConvThreads];        // w[co, k]
  const int64_t plane = g.Ho * g.Wo, HW = g.H * g.W, P = g.N * HW, KK = g.KH * g.KW;
  const int64_t p = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
  const bool active = p < P;
  const int64_t n = active ? p / HW : 0, q = active ? p % HW : 0;
  const int64_t ih = q / g.W, iw = q % g.W;
  const T* gn = grad + n * g.Cout * plane;
  for (int64_t ci = blockIdx.y; ci < g.Cin; ci += gridDim.y) {
    A acc = A(0);
    for (int64_t r = 0; r < g.KH; ++r) {
      const int64_t th = ih + g.ph - r * g.dh;  // = oh * sh if output row oh reads row ih via tap r
      const bool row_ok = th >= 0 && th % g.sh == 0 && th / g.sh < g.Ho;
      for (int64_t s = 0; s < g.KW; ++s) {
        const int64_t tw = iw + g.pw - s * g.dw;
        const bool ok = active && row_ok && tw >= 0 && tw % g.sw == 0 && tw / g.sw < g.Wo;
        const int64_t goff = ok ? (th / g.sh) * g.Wo + tw / g.sw : 0;
        const int64_t k = ci * KK + r * g.KW + s;
        int64_t begin, end;
        row_range(trp, k, nnz, begin, end);
        for (int64_t j0 = begin; j0 < end; j0 += kConvThreads) {
          const int64_t cnt = min(int64_t(kConvThreads), end - j0);
          __syncthreads();  // every thread is done with the previous chunk
          if (threadIdx.x < cnt) {
            const int64_t co = int64_t(tcol[j0 + threadIdx.x]);
            const bool cok = co >= 0 && co < g.Cout;
            s_off[threadIdx.x] = cok ? co * plane : -1;
            s_val[threadIdx.x] = cok ? static_cast<A>(w[co * g.K + k]) : A(0);
          }
          __syncthreads();
          if (ok) {
            for (int64_t t = 0; t < cnt; ++t)
              if (s_off[t] >= 0) acc += s_val[t] * static_cast<A>(gn[s_off[t] + goff]);
          }
        }
      }
    }
    if (active) dx[(n * g.Cin + ci) * HW + q] = static_cast<T>(acc);
  }
}

// dw partials: partial[s, j] = the s-th slice (of the flattened output positions (n, oh, ow)) of
// sum grad[n, co, oh, ow] * x[n, ci, ih, iw] for kept entry j = (co, k) of W's CSR.
// Parallelisation: one warp per (entry, split), kWarpsPerBlock consecutive entries per CTA (mostly
// one co, sharing grad rows through the cache), gridDim.y = splits contiguous slices; lanes stride
// through the slice (consecutive ow: coalesced grad reads), then a warp-shuffle reduction.
template <typename T, typename I>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
    conv_dw_kernel(const T* __restrict__ grad, const T* __restrict__ x, const I* __restrict__ rp,
                   const I* __restrict__ col, ConvGeom g, int64_t nnz, int64_t splits,
                   typename Acc<T>::type* __restrict__ partial) {
  using A = typename Acc<T>::type;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t j = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (j >= nnz) return;  // the whole warp leaves together
  const int64_t sp = blockIdx.y;
  const int64_t co = row_of(rp, g.Cout, j);
  const int64_t k = int64_t(col[j]);
  A acc = A(0);
  if (k >= 0 && k < g.K) {
    const int64_t KK = g.KH * g.KW, ci = k / KK, rs = k % KK;
    const int64_t tap_h = (rs / g.KW) * g.dh - g.ph, tap_w = (rs % g.KW) * g.dw - g.pw;
    const int64_t plane = g.Ho * g.Wo, P = g.N * plane;
    const int64_t chunk = (P + splits - 1) / splits;
    const int64_t q0 = sp * chunk, q1 = min(P, q0 + chunk);
    for (int64_t q = q0 + lane; q < q1; q += kWarp) {
      const int64_t n = q / plane, pq = q % plane;
      const int64_t ih = (pq / g.Wo) * g.sh + tap_h, iw = (pq % g.Wo) * g.sw + tap_w;
      if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
        acc += static_cast<A>(grad[(n * g.Cout + co) * plane + pq]) *
               static_cast<A>(x[((n * g.Cin + ci) * g.H + ih) * g.W + iw]);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) partial[sp * nnz + j] = acc;
}

dim3 conv_grid(int64_t positions, int64_t channels) {
  const int64_t tiles = (positions + kConvThreads - 1) / kConvThreads;
  TORCH_CHECK(tiles <= INT32_MAX, "sparseops: too many positions for one launch (", positions, ")");
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(channels, kMaxGridY)));
}

at::Tensor masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "masked_conv2d";
  auto g = check_conv(op, x, w, stride, padding, dilation, /*allow_half=*/true);
  auto w2 = w.reshape({g.Cout, g.K}).contiguous();
  check_layout(op, w2, row_ptr, col_idx, t_row_ptr, t_col_idx);
  check_bias(op, w2, bias, /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(w.device());
  auto y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  if (y.numel() > 0) {
    auto xc = x.contiguous();
    auto rp = row_ptr.contiguous(), ci = col_idx.contiguous();
    at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    const dim3 grid = conv_grid(g.N * g.Ho * g.Wo, g.Cout);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_cuda", [&] {
      AT_DISPATCH_INDEX_TYPES(rp.scalar_type(), "masked_conv2d_cuda", [&] {
        conv_fwd_kernel<scalar_t, index_t><<<grid, kConvThreads, 0, stream>>>(
            xc.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), rp.data_ptr<index_t>(), ci.data_ptr<index_t>(),
            b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), g, ci.numel());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return y.contiguous(format_of(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const char* op = "masked_conv2d_backward";
  auto g = check_conv(op, x, w, stride, padding, dilation, /*allow_half=*/true);
  check_floating(op, grad, "grad", /*allow_half=*/true);
  check_same_dtype(op, w, "w", grad, "grad");
  check_same_device(op, w, "w", grad, "grad");
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == g.Cout && grad.size(2) == g.Ho &&
                        grad.size(3) == g.Wo,
                    "sparseops.", op, ": grad has shape ", grad.sizes(), ", expected [", g.N, ", ", g.Cout, ", ", g.Ho,
                    ", ", g.Wo, "]");
  auto w2 = w.reshape({g.Cout, g.K}).contiguous();
  check_layout(op, w2, row_ptr, col_idx, t_row_ptr, t_col_idx);
  const c10::cuda::CUDAGuard guard(w.device());
  const auto [need_dx, need_dw, need_db] = output_mask;
  const int64_t nnz = col_idx.numel(), plane = g.Ho * g.Wo;
  const bool work = g.N > 0 && g.Cout > 0 && nnz > 0 && plane > 0;
  at::Tensor dx, dw, db, gc, xc;
  if (work && (need_dx || need_dw)) gc = grad.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (need_dx) {
    if (work && g.Cin > 0 && g.H * g.W > 0) {
      auto trp = t_row_ptr.contiguous(), tci = t_col_idx.contiguous();
      dx = at::empty({g.N, g.Cin, g.H, g.W}, x.options());
      const dim3 grid = conv_grid(g.N * g.H * g.W, g.Cin);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_dx_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(trp.scalar_type(), "masked_conv2d_dx_cuda", [&] {
          conv_dx_kernel<scalar_t, index_t><<<grid, kConvThreads, 0, stream>>>(
              gc.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), trp.data_ptr<index_t>(), tci.data_ptr<index_t>(),
              dx.data_ptr<scalar_t>(), g, nnz);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
      dx = dx.contiguous(format_of(x));
    } else {
      dx = at::zeros_like(x, at::MemoryFormat::Preserve);
    }
  }
  if (need_dw) {
    dw = at::zeros(w.sizes(), w.options());  // fresh, in w's shape (an op returns no views)
    auto dw2 = dw.view({g.Cout, g.K});
    if (work) {
      xc = x.contiguous();
      auto rp = row_ptr.contiguous(), ci = col_idx.contiguous();
      const int64_t splits = sddmm_splits(nnz, g.N * plane);
      auto partial = at::empty({splits, nnz}, x.options().dtype(acc_type(x.scalar_type())));
      const int64_t blocks = (nnz + kWarpsPerBlock - 1) / kWarpsPerBlock;
      TORCH_CHECK(blocks <= INT32_MAX, "sparseops.", op, ": too many kept entries for one launch (", nnz, ")");
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_dw_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(rp.scalar_type(), "masked_conv2d_dw_cuda", [&] {
          using A = typename Acc<scalar_t>::type;
          conv_dw_kernel<scalar_t, index_t><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
              gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), rp.data_ptr<index_t>(), ci.data_ptr<index_t>(), g,
              nnz, splits, partial.data_ptr<A>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          launch_sddmm_scatter<scalar_t, index_t>(partial, splits, rp, ci, g.Cout, g.K, dw2);
        });
      });
    }
  }
  if (need_db) db = grad.sum({0, 2, 3});
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, w.options()); };
  return {or_empty(dx), or_empty(dw), or_empty(db)};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("masked_conv2d", &cuda::masked_conv2d_cuda);
  m.impl("masked_conv2d_backward", &cuda::masked_conv2d_backward_cuda);
}

}  // namespace sparseops
