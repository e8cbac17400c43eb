// The CPU kernels compiled for the avx2 instruction set (see kernels_impl.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx2,fma")
#define SPARSEOPS_VBYTES 32  // vector width in bytes of this variant
namespace sparseops::cpu::isa_avx2 {
#include "kernels_impl.h"
}  // namespace sparseops::cpu::isa_avx2
#undef SPARSEOPS_VBYTES
