// where(mask, w, 0) in one pass on the CPU (csrc/cpu/where_mask.cpp), for the C++ dense paths.
#pragma once
#include <ATen/ATen.h>

namespace sparseops::cpu {

at::Tensor where_mask(const at::Tensor& w, const at::Tensor& mask);

}  // namespace sparseops::cpu
