// The CPU kernels compiled for the avx512 instruction set (see kernels_impl.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define SPARSEOPS_VBYTES 64  // vector width in bytes of this variant
namespace sparseops::cpu::isa_avx512 {
#include "kernels_impl.h"
}  // namespace sparseops::cpu::isa_avx512
#undef SPARSEOPS_VBYTES
