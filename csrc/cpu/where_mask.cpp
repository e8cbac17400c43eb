// where_mask (schemas in csrc/ops.cpp): `where(mask, w, 0)` in one pass, what the dense paths of every
// masked op compute on the CPU. torch.where is several times slower there, and the multiply by a 0/1
// mask that torch.nn.utils.prune uses is wrong where a pruned weight is inf or NaN (0 * inf = NaN)
// unless a finiteness pass over w runs first. Here a kept value's bits are ANDed with all ones and a
// pruned one's with zero: exactly where's result (+0.0), reading the bool mask's one byte per entry.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../checks.h"
#include "where_mask.h"

namespace sparseops {
namespace {

template <typename Bits>
void select_bits(const Bits* w, const bool* mask, Bits* out, int64_t n) {
  const auto* m = reinterpret_cast<const uint8_t*>(mask);
  // 64 KiB of w per task: both cores share a large weight, a small one stays on one thread.
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = w[i] & static_cast<Bits>(Bits(0) - static_cast<Bits>(m[i] != 0));
  });
}

void check_where_mask(const char* op, const at::Tensor& w, const at::Tensor& mask) {
  check_floating(op, w, "w", true);
  check_defined(op, mask, "mask");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "sparseops.", op, ": mask must be bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == w.sizes(), "sparseops.", op, ": mask must have the shape of w ", w.sizes(),
                    ", got ", mask.sizes());
  check_same_device(op, w, "w", mask, "mask");
}

// Into `out` (contiguous, w's shape and dtype; may be w itself).
void where_mask_into(const at::Tensor& w, const at::Tensor& mask, at::Tensor& out) {
  auto wc = w.contiguous(), mc = mask.contiguous();
  const bool* m = mc.const_data_ptr<bool>();
  const int64_t n = wc.numel();
  switch (wc.element_size()) {
    case 8: select_bits(static_cast<const uint64_t*>(wc.const_data_ptr()), m, static_cast<uint64_t*>(out.data_ptr()), n); break;
    case 4: select_bits(static_cast<const uint32_t*>(wc.const_data_ptr()), m, static_cast<uint32_t*>(out.data_ptr()), n); break;
    default: select_bits(static_cast<const uint16_t*>(wc.const_data_ptr()), m, static_cast<uint16_t*>(out.data_ptr()), n);
  }
}

}  // namespace

at::Tensor cpu::where_mask(const at::Tensor& w, const at::Tensor& mask) {
  check_where_mask("where_mask", w, mask);
  auto out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  where_mask_into(w, mask, out);
  return out;
}

namespace {

void where_mask_inplace_cpu(at::Tensor& w, const at::Tensor& mask) {
  check_where_mask("where_mask_", w, mask);
  if (w.is_contiguous()) {
    where_mask_into(w, mask, w);
  } else {
    auto out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
    where_mask_into(w, mask, out);
    w.copy_(out);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("where_mask", &cpu::where_mask);
  m.impl("where_mask_", &where_mask_inplace_cpu);
}

namespace {

// Its autograd formula in C++ (the gradient is the same select of the incoming one): torch.library's
// Python autograd cost more than the select itself on small layers, run on every dense forward.
at::Tensor where_mask_call(const at::Tensor& w, const at::Tensor& mask) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sparseops::where_mask", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(w, mask);
}

struct WhereMaskFunction : public torch::autograd::Function<WhereMaskFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& w, const at::Tensor& mask) {
    ctx->save_for_backward({mask});
    at::AutoDispatchBelowADInplaceOrView guard;
    return where_mask_call(w, mask);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto mask = ctx->get_saved_variables()[0];
    return {where_mask_call(grads[0], mask), at::Tensor()};  // (through autograd: double backward)
  }
};

at::Tensor where_mask_autograd(const at::Tensor& w, const at::Tensor& mask) {
  return WhereMaskFunction::apply(w, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, Autograd, m) { m.impl("where_mask", &where_mask_autograd); }

}  // namespace sparseops
