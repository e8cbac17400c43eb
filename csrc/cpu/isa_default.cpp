// The CPU kernels compiled for the default instruction set (see kernels_impl.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include <immintrin.h>

#include "kernels.h"


#define SPARSEOPS_VBYTES 16  // vector width in bytes of this variant
namespace sparseops::cpu::isa_default {
#include "kernels_impl.h"
}  // namespace sparseops::cpu::isa_default
#undef SPARSEOPS_VBYTES
