// The CPU kernels compiled for the default instruction set (see kernels_impl.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"


namespace sparseops::cpu::isa_default {
#include "kernels_impl.h"
}  // namespace sparseops::cpu::isa_default
