// CUDA kernels for the Continuous Sparsification soft mask (schemas in csrc/ops.cpp). beta and
// scale reach the kernels in the accumulator type (double for float64: no float rounding).
// Elementwise, one pass each, grid-stride loops; fp32/fp64/fp16/bf16 storage, fp32 math for the
// half types. Launched on the current stream; no host synchronisation except soft_mask_l1_backward,
// which reads its scalar gradient on the device instead of on the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../sigmoid_cut.h"

namespace sparseops {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// m = sigmoid(z), dm = m * (1 - m) computed as m * (e * m) with e = exp(-z): no cancellation. Both
// exactly 0 where z < -63 ln 2 (sigmoid < 2^-63; sparseops.reference.SIGMOID_OFF_BELOW says why),
// which includes where exp overflows. A NaN z stays NaN.
template <typename A>
__device__ __forceinline__ void sigmoid_pair(A z, A& m, A& dm) {
  const A e = exp(-z);
  const bool off = z < A(kSigmoidOffBelow);
  m = off ? A(0) : A(1) / (A(1) + e);
  dm = off ? A(0) : m * (e * m);
}

int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

template <typename T>
__global__ void soft_mask_fwd_kernel(const T* __restrict__ w, const T* __restrict__ s, T* __restrict__ out,
                                     int64_t n, typename Acc<T>::type beta,
                                     typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A m, dm;
    sigmoid_pair<A>(A(beta) * A(s[i]), m, dm);
    out[i] = static_cast<T>(A(w[i]) * A(scale) * m);
  }
}

template <typename T>
__global__ void soft_mask_bwd_kernel(const T* __restrict__ g, const T* __restrict__ w, const T* __restrict__ s,
                                     T* __restrict__ dw, T* __restrict__ ds, int64_t n,
                                     typename Acc<T>::type beta, typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A m, dm;
    sigmoid_pair<A>(A(beta) * A(s[i]), m, dm);
    const A gi = A(g[i]);
    dw[i] = static_cast<T>(gi * A(scale) * m);
    // 0 where the mask is flat, also when scale * beta overflows to inf (inf * 0 would be NaN)
    ds[i] = static_cast<T>(dm == A(0) ? A(0) : gi * A(w[i]) * A(scale) * A(beta) * dm);
  }
}

// Block-level sum of sigmoid(beta*s) into one double per block (deterministic second pass on host side
// of the graph: at::sum over the partials).
template <typename T>
__global__ void soft_mask_sum_kernel(const T* __restrict__ s, double* __restrict__ partial, int64_t n,
                                     typename Acc<T>::type beta) {
  using A = typename Acc<T>::type;
  __shared__ double buf[256];
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A m, dm;
    sigmoid_pair<A>(A(beta) * A(s[i]), m, dm);
    acc += double(m);
  }
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = buf[0];
}

template <typename T>
__global__ void soft_mask_l1_bwd_kernel(const typename Acc<T>::type* __restrict__ grad, const T* __restrict__ s,
                                        T* __restrict__ ds, int64_t n, typename Acc<T>::type beta,
                                        typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  const A coef = grad[0] * scale * beta;  // the scalar grad in the accumulator type: no half overflow
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A m, dm;
    sigmoid_pair<A>(A(beta) * A(s[i]), m, dm);
    ds[i] = static_cast<T>(dm == A(0) ? A(0) : coef * dm);
  }
}

constexpr int kThreads = 256;

at::Tensor soft_mask_cuda(const at::Tensor& w, const at::Tensor& s, double beta, double scale) {
  check_soft_mask_args("soft_mask", w, s, beta, scale, true);
  const c10::cuda::CUDAGuard guard(w.device());
  auto wc = w.contiguous(), sc = s.contiguous();
  auto out = at::empty_like(wc);
  const int64_t n = wc.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_mask_cuda", [&] {
    soft_mask_fwd_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, beta, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_mask_backward_cuda(const at::Tensor& grad, const at::Tensor& w,
                                                           const at::Tensor& s, double beta, double scale) {
  check_soft_mask_args("soft_mask_backward", w, s, beta, scale, true);
  check_soft_mask_grad("soft_mask_backward", grad, w, true);
  const c10::cuda::CUDAGuard guard(w.device());
  auto gc = grad.contiguous(), wc = w.contiguous(), sc = s.contiguous();
  auto dw = at::empty_like(wc), ds = at::empty_like(sc);
  const int64_t n = wc.numel();
  if (n == 0) return {dw, ds};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_mask_backward_cuda", [&] {
    soft_mask_bwd_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        gc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
        ds.data_ptr<scalar_t>(), n, beta, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dw, ds};
}

at::Tensor soft_mask_l1_cuda(const at::Tensor& s, double beta, double scale) {
  check_scores("soft_mask_l1", s, beta, scale, true);
  const c10::cuda::CUDAGuard guard(s.device());
  auto sc = s.contiguous();
  const int64_t n = sc.numel();
  const int blocks = std::min(blocks_for(n, kThreads), 1024);
  auto partial = at::zeros({blocks}, s.options().dtype(at::kDouble));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "soft_mask_l1_cuda", [&] {
      soft_mask_sum_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(sc.data_ptr<scalar_t>(),
                                                                       partial.data_ptr<double>(), n, beta);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return (partial.sum() * scale).to(s.scalar_type());
}

at::Tensor soft_mask_l1_backward_cuda(const at::Tensor& grad, const at::Tensor& s, double beta, double scale) {
  check_scores("soft_mask_l1_backward", s, beta, scale, true);
  check_floating("soft_mask_l1_backward", grad, "grad", true);
  check_same_device("soft_mask_l1_backward", s, "s", grad, "grad");
  TORCH_CHECK_VALUE(grad.numel() == 1, "sparseops.soft_mask_l1_backward: grad must be a scalar");
  const c10::cuda::CUDAGuard guard(s.device());
  auto sc = s.contiguous();
  auto gc = grad.reshape({1}).to(s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  auto ds = at::empty_like(sc);
  const int64_t n = sc.numel();
  if (n == 0) return ds;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "soft_mask_l1_backward_cuda", [&] {
    soft_mask_l1_bwd_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        gc.data_ptr<typename Acc<scalar_t>::type>(), sc.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), n, beta, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ds;
}

}  // namespace

#ifndef SPARSEOPS_CUDA_ARCHS
#define SPARSEOPS_CUDA_ARCHS "unknown"
#endif
// The GPU targets this library was compiled for, for `python -m sparseops info`.
TORCH_LIBRARY_FRAGMENT(sparseops, m) {
  m.def("_cuda_arch_list() -> str", [] { return std::string(SPARSEOPS_CUDA_ARCHS); });
}

// The fused pair (one pass each way on the CPU) is composed of the kernels above on GPUs: two
// passes forward, two and an add backward, the cost of calling soft_mask and soft_mask_l1.
std::tuple<at::Tensor, at::Tensor> soft_mask_with_l1_cuda(const at::Tensor& w, const at::Tensor& s, double beta,
                                                           double scale) {
  return {soft_mask_cuda(w, s, beta, scale), soft_mask_l1_cuda(s, beta, scale)};
}

std::tuple<at::Tensor, at::Tensor> soft_mask_with_l1_backward_cuda(const at::Tensor& grad,
                                                                    const at::Tensor& grad_l1, const at::Tensor& w,
                                                                    const at::Tensor& s, double beta, double scale) {
  auto [dw, ds] = soft_mask_backward_cuda(grad, w, s, beta, scale);
  if (grad_l1.defined()) ds.add_(soft_mask_l1_backward_cuda(grad_l1, s, beta, scale));
  return {dw, ds};
}

TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("soft_mask_with_l1", &soft_mask_with_l1_cuda);
  m.impl("soft_mask_with_l1_backward", &soft_mask_with_l1_backward_cuda);
  m.impl("soft_mask", &soft_mask_cuda);
  m.impl("soft_mask_backward", &soft_mask_backward_cuda);
  m.impl("soft_mask_l1", &soft_mask_l1_cuda);
  m.impl("soft_mask_l1_backward", &soft_mask_l1_backward_cuda);
}

}  // namespace sparseops

// `import sparseops._cuda` loads this library; its static initialisers register the kernels above.
#include <Python.h>
extern "C" PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
