// CPU helpers of the channel ops (sparseops/ops/channel_masked_linear.py; schemas in csrc/ops.cpp):
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

// Rows (or columns) of `out` per parallel task: about 16K elements, so small problems stay on one thread.
int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// out (2-D, `size` along `dim`): out.select(dim, idx[j]) = src.select(dim, j), and fill[c] (or 0)
// along every other channel c.
at::Tensor scatter_channels_cpu(const at::Tensor& src, const at::Tensor& idx, const std::optional<at::Tensor>& fill,
                                int64_t size, int64_t dim) {
  check_floating(kScatter, src, "src", true);
  TORCH_CHECK_VALUE(src.dim() == 2 && (dim == 0 || dim == 1), "sparseops.", kScatter,
                    ": src must be 2-D and dim 0 or 1, got shape ", src.sizes(), " and dim ", dim);
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
  const int64_t rows = dim == 0 ? size : s.size(0), cols = dim == 1 ? size : s.size(1), kept = ix.numel();
  auto out = at::empty({rows, cols}, s.options());
  const int64_t* ip = ix.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), kScatter, [&] {
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.defined() ? f.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    if (dim == 1) {  // per row: the fill (in cache), then the kept columns over it
      at::parallel_for(0, rows, grain(cols), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          scalar_t* row = op + i * cols;
          const scalar_t* kr = sp + i * kept;
          if (fp)
            std::memcpy(row, fp, cols * sizeof(scalar_t));
          else
            std::fill(row, row + cols, scalar_t(0));
          for (int64_t j = 0; j < kept; ++j) row[ip[j]] = kr[j];
        }
      });
      return;
    }
    std::vector<int64_t> from(rows, -1);  // the src row of each output row
    for (int64_t j = 0; j < kept; ++j) from[ip[j]] = j;
    at::parallel_for(0, rows, grain(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* row = op + r * cols;
        if (from[r] >= 0)
          std::memcpy(row, sp + from[r] * cols, cols * sizeof(scalar_t));
        else
          std::fill(row, row + cols, fp ? fp[r] : scalar_t(0));
      }
    });
  });
  return out;
}

// (grad[:, idx], grad.sum(0)) of a 2-D grad, one pass over it: each task sums its rows into a
// partial sum in the accumulation type (float for half types), added up at the end.
std::tuple<at::Tensor, at::Tensor> gather_channels_sum_cpu(const at::Tensor& grad, const at::Tensor& idx) {
  check_floating(kGather, grad, "grad", true);
  TORCH_CHECK_VALUE(grad.dim() == 2, "sparseops.", kGather, ": grad must be 2-D, got shape ", grad.sizes());
  auto ix = idx.contiguous();
  check_index(kGather, ix, grad.size(1));
  auto g = grad.contiguous();
  const int64_t m = g.size(0), n = g.size(1), kept = ix.numel();
  auto gk = at::empty({m, kept}, g.options());
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / 16));
  at::Tensor part;
  const int64_t* ip = ix.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), kGather, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    part = at::zeros({tasks, n}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* kp = gk.data_ptr<scalar_t>();
    acc_t* pp = part.data_ptr<acc_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        acc_t* acc = pp + t * n;
        for (int64_t i = t * m / tasks; i < (t + 1) * m / tasks; ++i) {
          const scalar_t* row = gp + i * n;
          for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<acc_t>(row[c]);
          scalar_t* kr = kp + i * kept;
          for (int64_t j = 0; j < kept; ++j) kr[j] = row[ip[j]];
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
