// CPU helpers of the channel ops (sparseops/ops/_common.py; schemas in csrc/ops.cpp):
// writing a kept-size result into the full-size output and reading the kept outputs' gradient, each
// one pass over the full-size tensor. Through torch's index ops a column scatter or gather costs
// ~2 ns an element (TensorIterator's index arithmetic) and a fill or sum is one more pass; these
// run at memory speed, which is most of what a channel layer costs beyond its kept-size GEMMs.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../checks.h"

namespace sparseops {
namespace {

constexpr const char* kScatter = "_scatter_channels";
constexpr const char* kGather = "_gather_channels_sum";

void check_index(const char* op, const at::Tensor& idx, int64_t size) {
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.device().is_cpu(), "sparseops.", op,
                    ": idx must be a 1-D int64 CPU tensor, got ", idx.scalar_type(), " of shape ", idx.sizes());
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j)
    TORCH_CHECK_VALUE(ip[j] >= 0 && ip[j] < size && (j == 0 || ip[j] > ip[j - 1]), "sparseops.", op,
                      ": idx must hold sorted, distinct indices in [0, ", size, ")");
}

// Elements per parallel task: about 16K, so small problems stay on one thread.
int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// A contiguous tensor as [outer, channels along dim, inner].
void outer_inner(at::IntArrayRef shape, int64_t dim, int64_t& outer, int64_t& inner) {
  outer = inner = 1;
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    if (d < dim) outer *= shape[d];
    if (d > dim) inner *= shape[d];
  }
}

void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(dim >= 0 && dim < t.dim(), "sparseops.", op, ": dim must be in [0, ", name, ".dim()) = [0, ",
                    t.dim(), "), got ", dim);
}

// out (src's shape with `size` channels along `dim`): out.select(dim, idx[j]) = src.select(dim, j),
// and fill[c] (or 0) along every other channel c.
at::Tensor scatter_channels_cpu(const at::Tensor& src, const at::Tensor& idx, const std::optional<at::Tensor>& fill,
                                int64_t size, int64_t dim) {
  check_floating(kScatter, src, "src", true);
  check_dim(kScatter, src, "src", dim);
  auto ix = idx.contiguous();
  check_index(kScatter, ix, size);
  TORCH_CHECK_VALUE(ix.numel() == src.size(dim), "sparseops.", kScatter, ": idx must have src.shape[dim] = ",
                    src.size(dim), " entries, got ", ix.numel());
  at::Tensor f;
  if (fill.has_value() && fill->defined()) {
    check_same_dtype(kScatter, src, "src", *fill, "fill");
    TORCH_CHECK_VALUE(fill->dim() == 1 && fill->size(0) == size && fill->device().is_cpu(), "sparseops.", kScatter,
                      ": fill must be a CPU tensor of shape [", size, "], got ", fill->sizes());
    f = fill->contiguous();
  }
  auto s = src.contiguous();
  auto shape = s.sizes().vec();
  shape[dim] = size;
  auto out = at::empty(shape, s.options());
  int64_t outer, inner;
  outer_inner(shape, dim, outer, inner);
  const int64_t kept = ix.numel();
  const int64_t* ip = ix.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), kScatter, [&] {
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.defined() ? f.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    if (inner == 1) {  // channels are columns: per row the fill (in cache), then the kept columns over it
      at::parallel_for(0, outer, grain(size), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          scalar_t* row = op + i * size;
          const scalar_t* kr = sp + i * kept;
          if (fp)
            std::memcpy(row, fp, size * sizeof(scalar_t));
          else
            std::fill(row, row + size, scalar_t(0));
          for (int64_t j = 0; j < kept; ++j) row[ip[j]] = kr[j];
        }
      });
      return;
    }
    std::vector<int64_t> from(size, -1);  // the src channel of each output channel
    for (int64_t j = 0; j < kept; ++j) from[ip[j]] = j;
    at::parallel_for(0, outer * size, grain(inner), [&](int64_t b, int64_t e) {  // one task: whole planes
      for (int64_t p = b; p < e; ++p) {
        const int64_t o = p / size, c = p % size;
        scalar_t* plane = op + p * inner;
        if (from[c] >= 0)
          std::memcpy(plane, sp + (o * kept + from[c]) * inner, inner * sizeof(scalar_t));
        else
          std::fill(plane, plane + inner, fp ? fp[c] : scalar_t(0));
      }
    });
  });
  return out;
}

// The sum of a plane in 16 independent partial sums: a single running sum is one dependent add per
// element (no vectorising it without reordering, which the compiler may not do for floats).
template <typename acc_t, typename scalar_t>
acc_t plane_sum(const scalar_t* p, int64_t len) {
  constexpr int64_t kLanes = 16;
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += static_cast<acc_t>(p[i + j]);
  acc_t sum = 0;
  for (; i < len; ++i) sum += static_cast<acc_t>(p[i]);
  for (int64_t j = 0; j < kLanes; ++j) sum += lane[j];
  return sum;
}

// (grad.index_select(dim, idx), grad summed over every dim but `dim`), one pass over grad: each
// task sums its share of grad into a partial sum in the accumulation type (float for half types),
// added up at the end.
std::tuple<at::Tensor, at::Tensor> gather_channels_sum_cpu(const at::Tensor& grad, const at::Tensor& idx,
                                                           int64_t dim) {
  check_floating(kGather, grad, "grad", true);
  check_dim(kGather, grad, "grad", dim);
  auto ix = idx.contiguous();
  check_index(kGather, ix, grad.size(dim));
  auto g = grad.contiguous();
  const int64_t n = g.size(dim), kept = ix.numel();
  int64_t outer, inner;
  outer_inner(g.sizes(), dim, outer, inner);
  auto shape = g.sizes().vec();
  shape[dim] = kept;
  auto gk = at::empty(shape, g.options());
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), outer * n * inner / 16384));
  at::Tensor part;
  const int64_t* ip = ix.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), kGather, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    part = at::zeros({tasks, n}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* kp = gk.data_ptr<scalar_t>();
    acc_t* pp = part.data_ptr<acc_t>();
    std::vector<int64_t> from(n, -1);
    for (int64_t j = 0; j < kept; ++j) from[ip[j]] = j;
    at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        acc_t* acc = pp + t * n;
        for (int64_t o = t * outer / tasks; o < (t + 1) * outer / tasks; ++o) {
          const scalar_t* block = gp + o * n * inner;
          scalar_t* kb = kp + o * kept * inner;
          if (inner == 1) {  // a row: sum it, then pick the kept columns
            for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<acc_t>(block[c]);
            for (int64_t j = 0; j < kept; ++j) kb[j] = block[ip[j]];
            continue;
          }
          for (int64_t c = 0; c < n; ++c) {  // planes
            const scalar_t* plane = block + c * inner;
            acc[c] += plane_sum<acc_t>(plane, inner);
            if (from[c] >= 0) std::memcpy(kb + from[c] * inner, plane, inner * sizeof(scalar_t));
          }
        }
      }
    });
  });
  return {gk, (tasks == 1 ? part[0] : part.sum(0)).to(g.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("_scatter_channels", &scatter_channels_cpu);
  m.impl("_gather_channels_sum", &gather_channels_sum_cpu);
}

}  // namespace sparseops
