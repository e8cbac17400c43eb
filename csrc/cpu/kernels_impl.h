// Kernel bodies, compiled once per instruction set: each isa_*.cpp includes this file inside its
// own namespace after a `#pragma GCC target(...)` and defines SPARSEOPS_VBYTES, the width of its
// vector registers: 16 (SSE2 xmm), 32 (AVX2 ymm) or 64 (AVX-512 zmm). Written with GCC vector
// extensions of exactly that width, so every vector is one register (a wider vector than the ISA
// has is split into pieces, and comparisons, selects and shuffles on it are lowered lane by lane),
// and register tiles are sized to the register file (16 registers below AVX-512, 32 with it).
// Transposes use intrinsics below AVX-512, where GCC's generic two-source shuffles lower poorly.
// No OpenMP here: dispatch.cpp owns the parallelism.
// (Included only from isa_*.cpp, after <algorithm>, <cmath>, <cstring>, <immintrin.h>, kernels.h.)
#ifndef SPARSEOPS_VBYTES
#error "define SPARSEOPS_VBYTES (16, 32 or 64) before including kernels_impl.h"
#endif

constexpr Isa kIsa = SPARSEOPS_VBYTES == 64 ? Isa::Avx512 : SPARSEOPS_VBYTES == 32 ? Isa::Avx2 : Isa::Default;
static_assert(isa_vector_bytes(kIsa) == SPARSEOPS_VBYTES, "kernels.h and isa_*.cpp disagree on the width");

template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(SPARSEOPS_VBYTES)));
  typedef int32_t itype __attribute__((vector_size(SPARSEOPS_VBYTES)));
  static constexpr int W = SPARSEOPS_VBYTES / 4;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(SPARSEOPS_VBYTES)));
  typedef int64_t itype __attribute__((vector_size(SPARSEOPS_VBYTES)));
  static constexpr int W = SPARSEOPS_VBYTES / 8;
};

template <typename V, typename T>
static inline __attribute__((always_inline)) V loadu(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
static inline __attribute__((always_inline)) void storeu(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
// Shuffle masks as compile-time constants (a mask built in a loop is assembled lane by lane at
// run time). xor: lane k takes lane k ^ S; lo/hi: the two halves of a transpose butterfly stage.
template <typename T, int S, int... K>
static constexpr typename Vec<T>::itype xor_mask(std::integer_sequence<int, K...>) {
  return typename Vec<T>::itype{(K ^ S)...};
}
template <typename T, int S, int... K>
static constexpr typename Vec<T>::itype lo_mask(std::integer_sequence<int, K...>) {
  return typename Vec<T>::itype{((K & S) ? Vec<T>::W + K - S : K)...};
}
template <typename T, int S, int... K>
static constexpr typename Vec<T>::itype hi_mask(std::integer_sequence<int, K...>) {
  return typename Vec<T>::itype{((K & S) ? Vec<T>::W + K : K + S)...};
}
template <typename T>
using Lanes = std::make_integer_sequence<int, Vec<T>::W>;

// Horizontal sum by log2(W) shuffle-and-add steps (lane k meets lane k ^ S).
template <typename T, int S = Vec<T>::W / 2>
static inline T hsum(typename Vec<T>::type v) {
  v += __builtin_shuffle(v, xor_mask<T, S>(Lanes<T>{}));
  if constexpr (S > 1) {
    return hsum<T, S / 2>(v);
  } else {
    return v[0];
  }
}

// v + its lanes k ^ S, k ^ S/2, ..., k ^ 1: lane 0 of each group of 2S lanes holds the group's sum.
template <typename T, int S>
static inline __attribute__((always_inline)) typename Vec<T>::type fold_lanes(typename Vec<T>::type v) {
  if constexpr (S >= 1) {
    v += __builtin_shuffle(v, xor_mask<T, S>(Lanes<T>{}));
    return fold_lanes<T, S / 2>(v);
  } else {
    return v;
  }
}

// The horizontal sums of four vectors at once, by butterflies that fold two vectors into one:
// a vector whose quarters (W / 4 lanes each) hold partial sums of a, c, b, d in that order,
// then each quarter is folded onto its lane 0, which holds the total.
// 4 shuffle+add steps for four sums instead of 4 * log2(W) (needs W >= 4).
template <typename T>
static inline __attribute__((always_inline)) typename Vec<T>::type hsum4_quarters(
    typename Vec<T>::type a, typename Vec<T>::type b, typename Vec<T>::type c, typename Vec<T>::type d) {
  constexpr int H = Vec<T>::W / 2, Q = Vec<T>::W / 4;
  constexpr auto lo1 = lo_mask<T, H>(Lanes<T>{}), hi1 = hi_mask<T, H>(Lanes<T>{});
  constexpr auto lo2 = lo_mask<T, Q>(Lanes<T>{}), hi2 = hi_mask<T, Q>(Lanes<T>{});
  const auto ab = __builtin_shuffle(a, b, lo1) + __builtin_shuffle(a, b, hi1);  // halves: a, b
  const auto cd = __builtin_shuffle(c, d, lo1) + __builtin_shuffle(c, d, hi1);  // halves: c, d
  auto v = __builtin_shuffle(ab, cd, lo2) + __builtin_shuffle(ab, cd, hi2);     // quarters: a, c, b, d
  return fold_lanes<T, Q / 2>(v);  // each quarter onto its lane 0
}

// The four dot sums of dot4 added to out0..out3 (hsum4_quarters where W >= 4, else hsum each).
template <typename T>
static inline __attribute__((always_inline)) void add_sums4(typename Vec<T>::type c0, typename Vec<T>::type c1,
                                                            typename Vec<T>::type c2, typename Vec<T>::type c3,
                                                            T& out0, T& out1, T& out2, T& out3) {
  constexpr int W = Vec<T>::W;
  if constexpr (W >= 4) {
    const auto v = hsum4_quarters<T>(c0, c1, c2, c3);
    out0 += v[0];
    out2 += v[W / 4];
    out1 += v[W / 2];
    out3 += v[3 * W / 4];
  } else {
    out0 += hsum<T>(c0);
    out1 += hsum<T>(c1);
    out2 += hsum<T>(c2);
    out3 += hsum<T>(c3);
  }
}

// In-register transpose of a W x W block held as W vectors (row i in a[i]).
// AVX-512: log2(W) butterfly stages of two-source shuffles (one vpermt2ps/pd each).
template <typename T, int S = Vec<T>::W / 2>
static inline __attribute__((always_inline)) void transpose_butterfly(typename Vec<T>::type (&a)[Vec<T>::W]) {
  using V = typename Vec<T>::type;
  constexpr auto lo = lo_mask<T, S>(Lanes<T>{});
  constexpr auto hi = hi_mask<T, S>(Lanes<T>{});
#pragma GCC unroll 16
  for (int i = 0; i < Vec<T>::W; ++i) {
    if (i & S) continue;
    const V ai = a[i], aj = a[i + S];
    a[i] = __builtin_shuffle(ai, aj, lo);
    a[i + S] = __builtin_shuffle(ai, aj, hi);
  }
  if constexpr (S > 1) transpose_butterfly<T, S / 2>(a);
}

// AVX2: the classic 8x8 (unpack, shufps, vperm2f128: 24 shuffles) and 4x4 double transposes;
// SSE2: 4x4 float (unpck, movlhps/movhlps) and 2x2 double.
template <typename T>
static inline __attribute__((always_inline)) void transpose_block(typename Vec<T>::type (&a)[Vec<T>::W]) {
#if SPARSEOPS_VBYTES == 32
  if constexpr (std::is_same_v<T, float>) {
    const __m256 t0 = _mm256_unpacklo_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_unpackhi_ps((__m256)a[0], (__m256)a[1]);
    const __m256 t2 = _mm256_unpacklo_ps((__m256)a[2], (__m256)a[3]), t3 = _mm256_unpackhi_ps((__m256)a[2], (__m256)a[3]);
    const __m256 t4 = _mm256_unpacklo_ps((__m256)a[4], (__m256)a[5]), t5 = _mm256_unpackhi_ps((__m256)a[4], (__m256)a[5]);
    const __m256 t6 = _mm256_unpacklo_ps((__m256)a[6], (__m256)a[7]), t7 = _mm256_unpackhi_ps((__m256)a[6], (__m256)a[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    a[0] = (Vec<float>::type)_mm256_permute2f128_ps(u0, u4, 0x20);
    a[1] = (Vec<float>::type)_mm256_permute2f128_ps(u1, u5, 0x20);
    a[2] = (Vec<float>::type)_mm256_permute2f128_ps(u2, u6, 0x20);
    a[3] = (Vec<float>::type)_mm256_permute2f128_ps(u3, u7, 0x20);
    a[4] = (Vec<float>::type)_mm256_permute2f128_ps(u0, u4, 0x31);
    a[5] = (Vec<float>::type)_mm256_permute2f128_ps(u1, u5, 0x31);
    a[6] = (Vec<float>::type)_mm256_permute2f128_ps(u2, u6, 0x31);
    a[7] = (Vec<float>::type)_mm256_permute2f128_ps(u3, u7, 0x31);
  } else {
    const __m256d t0 = _mm256_unpacklo_pd((__m256d)a[0], (__m256d)a[1]), t1 = _mm256_unpackhi_pd((__m256d)a[0], (__m256d)a[1]);
    const __m256d t2 = _mm256_unpacklo_pd((__m256d)a[2], (__m256d)a[3]), t3 = _mm256_unpackhi_pd((__m256d)a[2], (__m256d)a[3]);
    a[0] = (Vec<double>::type)_mm256_permute2f128_pd(t0, t2, 0x20);
    a[1] = (Vec<double>::type)_mm256_permute2f128_pd(t1, t3, 0x20);
    a[2] = (Vec<double>::type)_mm256_permute2f128_pd(t0, t2, 0x31);
    a[3] = (Vec<double>::type)_mm256_permute2f128_pd(t1, t3, 0x31);
  }
#elif SPARSEOPS_VBYTES == 16
  if constexpr (std::is_same_v<T, float>) {
    const __m128 t0 = _mm_unpacklo_ps((__m128)a[0], (__m128)a[1]), t1 = _mm_unpacklo_ps((__m128)a[2], (__m128)a[3]);
    const __m128 t2 = _mm_unpackhi_ps((__m128)a[0], (__m128)a[1]), t3 = _mm_unpackhi_ps((__m128)a[2], (__m128)a[3]);
    a[0] = (Vec<float>::type)_mm_movelh_ps(t0, t1);
    a[1] = (Vec<float>::type)_mm_movehl_ps(t1, t0);
    a[2] = (Vec<float>::type)_mm_movelh_ps(t2, t3);
    a[3] = (Vec<float>::type)_mm_movehl_ps(t3, t2);
  } else {
    const __m128d t0 = _mm_unpacklo_pd((__m128d)a[0], (__m128d)a[1]), t1 = _mm_unpackhi_pd((__m128d)a[0], (__m128d)a[1]);
    a[0] = (Vec<double>::type)t0;
    a[1] = (Vec<double>::type)t1;
  }
#else
  transpose_butterfly<T>(a);
#endif
}

// ---------------------------------------------------------------------------------------------
// CSR SpMM, one tile: rows [r0, r1) of the sparse operand times columns [m0, m0 + MB) of B.
// NOTE: the vectorised dimension is M (the batch), contiguous in bt, so each kept entry costs
// MB/W = 4 vector FMAs on one broadcast value; two kept entries per step give 8 independent
// accumulator chains, enough to hide FMA latency, in 8 of the 16 (AVX2, SSE2) or 32 (AVX-512)
// vector registers, the loads folded into the FMAs: no spills (a 64-byte tile under AVX2 took
// 16 ymm for the accumulators alone). The tile is written out transposed so Y keeps
// torch's row-major [M, rows] layout without a separate transpose pass.
// Where kept entry j of a row reads B^T: col[j] * ld, or the convolution's eoff[j] (kernels.h).
template <bool Conv, typename I>
static inline __attribute__((always_inline)) int64_t entry_offset(const I* col, const int64_t* eoff, int64_t j,
                                                                  int64_t ld) {
  if constexpr (Conv) {
    return eoff[j];
  } else {
    return static_cast<int64_t>(col[j]) * ld;
  }
}

// Kept entries [j, end) of one sparse row into the 8 accumulators (bt: B^T at this tile's columns
// and, for a convolution, at its position).
template <bool Conv, typename T, typename I>
static inline __attribute__((always_inline)) void spmm_entries(const SpmmArgs<T, I>& a, const T* bt, int64_t j,
                                                               int64_t end, typename Vec<T>::type (&p)[4],
                                                               typename Vec<T>::type (&q)[4]) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  for (; j + 1 < end; j += 2) {
    const T u = a.vals[j], v = a.vals[j + 1];
    const T* bu = bt + entry_offset<Conv>(a.col, a.eoff, j, a.ldb);
    const T* bv = bt + entry_offset<Conv>(a.col, a.eoff, j + 1, a.ldb);
    p[0] += u * loadu<V>(bu);
    p[1] += u * loadu<V>(bu + W);
    p[2] += u * loadu<V>(bu + 2 * W);
    p[3] += u * loadu<V>(bu + 3 * W);
    q[0] += v * loadu<V>(bv);
    q[1] += v * loadu<V>(bv + W);
    q[2] += v * loadu<V>(bv + 2 * W);
    q[3] += v * loadu<V>(bv + 3 * W);
  }
  if (j < end) {
    const T u = a.vals[j];
    const T* bu = bt + entry_offset<Conv>(a.col, a.eoff, j, a.ldb);
    p[0] += u * loadu<V>(bu);
    p[1] += u * loadu<V>(bu + W);
    p[2] += u * loadu<V>(bu + 2 * W);
    p[3] += u * loadu<V>(bu + 3 * W);
  }
}

// A finished tile (rows [r0, r1) of the sparse operand, MB columns from m0) written into Y
// transposed, plus the bias.
template <bool Conv, typename T, typename I>
static void spmm_write_tile(const SpmmArgs<T, I>& a, const T (*tile)[spmm_m_block<T>(kIsa)], int64_t r0,
                            int64_t r1, int64_t m0) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  constexpr int64_t MB = spmm_m_block<T>(kIsa);
  const int64_t m1 = std::min(a.M, m0 + MB);
  const int64_t nr = r1 - r0;
  int64_t rdone = 0;  // rows written by the vector path (full W x W blocks)
  if (m1 - m0 == MB) {
    for (; rdone + W <= nr; rdone += W) {
      // (a convolution's tile is one output channel's positions: its bias is that channel's)
      const V bias = !a.bias ? V{} : Conv ? V{} + a.bias[r0 / a.plane] : loadu<V>(a.bias + r0 + rdone);
      for (int64_t mb = 0; mb < MB; mb += W) {
        V blk[W];
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i) blk[i] = loadu<V>(&tile[rdone + i][mb]);
        transpose_block<T>(blk);
#pragma GCC unroll 16
        for (int j = 0; j < W; ++j) storeu(a.y + (m0 + mb + j) * a.ldy + r0 + rdone, blk[j] + bias);
      }
    }
  }
  if (rdone == nr) return;
  for (int64_t m = m0; m < m1; ++m) {
    T* yrow = a.y + m * a.ldy + r0;
    const int64_t mm = m - m0;
    if (a.bias && Conv) {
      const T b = a.bias[r0 / a.plane];
      for (int64_t r = rdone; r < nr; ++r) yrow[r] = tile[r][mm] + b;
    } else if (a.bias) {
      for (int64_t r = rdone; r < nr; ++r) yrow[r] = tile[r][mm] + a.bias[r0 + r];
    } else {
      for (int64_t r = rdone; r < nr; ++r) yrow[r] = tile[r][mm];
    }
  }
}

template <bool Conv, typename T, typename I>
static void spmm_tile_impl(const SpmmArgs<T, I>& a, int64_t r0, int64_t r1, int64_t m0) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  constexpr int64_t MB = spmm_m_block<T>(kIsa);
  static_assert(MB == 4 * W, "the tile holds 4 vectors per row");
  alignas(64) T tile[kSpmmRowBlock][MB];
  for (int64_t r = r0; r < r1; ++r) {
    V p[4] = {}, q[4] = {};
    const int64_t row = Conv ? r / a.plane : r;  // rows (CSR row, position): NCHW order
    const T* bt = a.bt + m0 + (Conv ? a.poff[r - row * a.plane] : 0);
    spmm_entries<Conv>(a, bt, a.row_ptr[row], a.row_ptr[row + 1], p, q);
    T* t = tile[r - r0];
    for (int i = 0; i < 4; ++i) storeu(t + i * W, p[i] + q[i]);
  }
  spmm_write_tile<Conv>(a, tile, r0, r1, m0);
}

// NOTE: a convolution whose input window outgrows L2. Output channels [row0, row1) at positions
// [p0, p1): all their kept entries of column block 0 (a range of input channels), then of block 1,
// ..., summed in acc (one tile per channel), so the part of the input one block reads stays in L2
// while every channel of the group uses it. In one pass over all columns, each channel's tile read
// the whole window (3.8 MB at 256 channels @8x8, 64 images) from L3. splits: the first entry of each
// block in each CSR row (blocks + 1 per row).
template <typename T, typename I>
void spmm_conv_blocked(const SpmmArgs<T, I>& a, int64_t row0, int64_t row1, int64_t p0, int64_t p1, int64_t m0,
                       const int64_t* splits, int64_t blocks, T* acc) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  constexpr int64_t MB = spmm_m_block<T>(kIsa);
  using Tile = T[kSpmmRowBlock][MB];
  Tile* tiles = reinterpret_cast<Tile*>(acc);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t row = row0; row < row1; ++row) {
      const int64_t jb = splits[row * (blocks + 1) + b], je = splits[row * (blocks + 1) + b + 1];
      if (jb == je && b > 0) continue;
      Tile& tile = tiles[row - row0];
      for (int64_t pos = p0; pos < p1; ++pos) {
        V p[4] = {}, q[4] = {};
        T* t = tile[pos - p0];
        if (b > 0)
          for (int i = 0; i < 4; ++i) p[i] = loadu<V>(t + i * W);
        spmm_entries<true>(a, a.bt + m0 + a.poff[pos], jb, je, p, q);
        for (int i = 0; i < 4; ++i) storeu(t + i * W, p[i] + q[i]);
      }
    }
  }
  for (int64_t row = row0; row < row1; ++row)
    spmm_write_tile<true>(a, tiles[row - row0], row * a.plane + p0, row * a.plane + p1, m0);
}

template <typename T, typename I>
void spmm_tile(const SpmmArgs<T, I>& a, int64_t r0, int64_t r1, int64_t m0) {
  if (a.eoff) {
    spmm_tile_impl<true>(a, r0, r1, m0);
  } else {
    spmm_tile_impl<false>(a, r0, r1, m0);
  }
}

// Four dot products sharing the loads of a (1.25 loads per FMA instead of 2), over ld (a multiple
// of 2 * W), into c0..c3; and one dot product with four accumulator chains (ld a multiple of 4 * W).
template <typename T>
static inline __attribute__((always_inline)) void dot4(const T* a, const T* b0, const T* b1, const T* b2,
                                                       const T* b3, int64_t ld, typename Vec<T>::type& c0,
                                                       typename Vec<T>::type& c1, typename Vec<T>::type& c2,
                                                       typename Vec<T>::type& c3) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V d0 = {}, d1 = {}, d2 = {}, d3 = {};
  for (int64_t m = 0; m < ld; m += 2 * W) {
    const V x0 = loadu<V>(a + m), x1 = loadu<V>(a + m + W);
    c0 += x0 * loadu<V>(b0 + m);
    d0 += x1 * loadu<V>(b0 + m + W);
    c1 += x0 * loadu<V>(b1 + m);
    d1 += x1 * loadu<V>(b1 + m + W);
    c2 += x0 * loadu<V>(b2 + m);
    d2 += x1 * loadu<V>(b2 + m + W);
    c3 += x0 * loadu<V>(b3 + m);
    d3 += x1 * loadu<V>(b3 + m + W);
  }
  c0 += d0;
  c1 += d1;
  c2 += d2;
  c3 += d3;
}

template <typename T>
static inline __attribute__((always_inline)) typename Vec<T>::type dot1(const T* a, const T* b, int64_t ld) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V c0 = {}, c1 = {}, c2 = {}, c3 = {};
  for (int64_t m = 0; m < ld; m += 4 * W) {
    c0 += loadu<V>(a + m) * loadu<V>(b + m);
    c1 += loadu<V>(a + m + W) * loadu<V>(b + m + W);
    c2 += loadu<V>(a + m + 2 * W) * loadu<V>(b + m + 2 * W);
    c3 += loadu<V>(a + m + 3 * W) * loadu<V>(b + m + 3 * W);
  }
  return (c0 + c1) + (c2 + c3);
}

// ---------------------------------------------------------------------------------------------
// SDDMM over rows [r0, r1): out[r, c] = dot(a[r], b[c]) for kept (r, c); the rest of the row is 0.
// NOTE: four kept entries share each load of a[r] (1.25 loads per FMA instead of 2).
template <typename T, typename I>
void sddmm_rows(const SddmmArgs<T, I>& s, int64_t r0, int64_t r1) {
  using V = typename Vec<T>::type;
  const int64_t ld = s.ld;  // a multiple of 4 * W
  for (int64_t r = r0; r < r1; ++r) {
    const T* ar = s.a + r * ld;
    const int64_t start = s.row_ptr[r], end = s.row_ptr[r + 1];
    T* sums = s.sums;
    if (s.first) std::fill(sums + start, sums + end, T(0));
    int64_t j = start;
    for (; j + 3 < end; j += 4) {
      const T* b0 = s.b + static_cast<int64_t>(s.col[j]) * ld;
      const T* b1 = s.b + static_cast<int64_t>(s.col[j + 1]) * ld;
      const T* b2 = s.b + static_cast<int64_t>(s.col[j + 2]) * ld;
      const T* b3 = s.b + static_cast<int64_t>(s.col[j + 3]) * ld;
      V c0 = {}, c1 = {}, c2 = {}, c3 = {};
      dot4<T>(ar, b0, b1, b2, b3, ld, c0, c1, c2, c3);
      add_sums4<T>(c0, c1, c2, c3, sums[j], sums[j + 1], sums[j + 2], sums[j + 3]);
    }
    for (; j < end; ++j) sums[j] += hsum<T>(dot1<T>(ar, s.b + static_cast<int64_t>(s.col[j]) * ld, ld));
    if (s.last) {
      T* orow = s.out + r * s.cols;
      std::fill(orow, orow + s.cols, T(0));
      for (j = start; j < end; ++j) orow[s.col[j]] = sums[j];
    }
  }
}

// Weight gradient of the implicit-im2col convolution for output positions [p0, p1) (kernels.h,
// ConvDwArgs): acc[j] += sum over p of dot(g[p * rows + r], b + eoff[j] + poff[p]) for the kept
// entries j of every CSR row r. Positions outermost, so the input vectors around p are read from
// cache by the kept entries of all rows.
template <typename T, typename I>
void conv_dw_positions(const SddmmArgs<T, I>& s, int64_t p0, int64_t p1, T* acc) {
  using V = typename Vec<T>::type;
  const int64_t ld = s.ld;
  for (int64_t p = p0; p < p1; ++p) {
    const T* bp = s.b + s.poff[p];
    const T* ap = s.a + (s.a_off ? s.a_off[p] : p * s.rows * ld);
    for (int64_t r = 0; r < s.rows; ++r) {
      const T* ar = ap + r * ld;
      int64_t j = s.row_ptr[r];
      const int64_t end = s.row_ptr[r + 1];
      for (; j + 3 < end; j += 4) {
        V c0 = {}, c1 = {}, c2 = {}, c3 = {};
        dot4<T>(ar, bp + s.eoff[j], bp + s.eoff[j + 1], bp + s.eoff[j + 2], bp + s.eoff[j + 3], ld, c0, c1, c2, c3);
        add_sums4<T>(c0, c1, c2, c3, acc[j], acc[j + 1], acc[j + 2], acc[j + 3]);
      }
      for (; j < end; ++j) acc[j] += hsum<T>(dot1<T>(ar, bp + s.eoff[j], ld));
    }
  }
}

template <typename T, typename I>
void gather_rows(const GatherArgs<T, I>& g, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = g.w + r * g.ldr;
    for (int64_t j = g.row_ptr[r], end = g.row_ptr[r + 1]; j < end; ++j)
      g.vals[j] = wr[static_cast<int64_t>(g.col[j]) * g.ldc];
  }
}

// xt[k, m] = x[m, k] for k in [k0, k1), m < M; xt[k, m] = 0 for M <= m < ldt (the SpMM padding).
// Whole W x W blocks by register transposes (the columns in groups of W; a task's 64 bytes of
// columns of x stay in L1 between its groups), the ragged edges element by element.
template <typename T>
void transpose_pad(const T* x, int64_t M, int64_t K, int64_t ldx, T* xt, int64_t ldt, int64_t k0,
                   int64_t k1, const int64_t* rowmap, T* colsum) {
  (void)K;
  auto row = [&](int64_t k) { return xt + (rowmap ? rowmap[k] : k) * ldt; };
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  constexpr int64_t B = 16;
  const int64_t kfull = k0 + (k1 - k0) / W * W;  // columns [k0, kfull) in whole groups of W
  const int64_t mfull = kfull > k0 ? M / W * W : 0;  // rows done by the register transposes
  if (colsum) std::fill(colsum + k0, colsum + k1, T(0));
  for (int64_t kb = k0; kb < kfull; kb += W) {
    V sum = {};
    for (int64_t m = 0; m < mfull; m += W) {
      V blk[W];
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) blk[i] = loadu<V>(x + (m + i) * ldx + kb);
      if (colsum) {
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i) sum += blk[i];
      }
      transpose_block<T>(blk);
#pragma GCC unroll 16
      for (int j = 0; j < W; ++j) storeu(row(kb + j) + m, blk[j]);
    }
    if (colsum) storeu(colsum + kb, sum);
  }
  auto scalar = [&](int64_t m0, int64_t ka, int64_t kb) {
    for (int64_t mb = m0; mb < M; mb += B) {
      const int64_t me = std::min(M, mb + B);
      for (int64_t k = ka; k < kb; ++k) {
        T* dst = row(k);
        T s = 0;
        for (int64_t m = mb; m < me; ++m) s += dst[m] = x[m * ldx + k];
        if (colsum) colsum[k] += s;
      }
    }
  };
  scalar(mfull, k0, kfull);  // the last M % W rows of the whole groups
  scalar(0, kfull, k1);      // the last (k1 - k0) % W columns
  for (int64_t k = k0; k < k1; ++k) std::fill(row(k) + M, row(k) + ldt, T(0));
}

// ---------------------------------------------------------------------------------------------
// Sigmoid. float: vectorised e^x (Cephes-style: x = n ln2 + r, degree-6 polynomial, ~1 ulp).
// The derivative m * (1 - m) = m * (e * m) is computed without cancellation. m and dm are exactly 0
// where z < kSigmoidOffBelow (csrc/sigmoid_cut.h; sparseops.reference.SIGMOID_OFF_BELOW says why):
// e^-z overflowing to +inf (z < -88.37) is inside that cut. A NaN z stays NaN.
typedef Vec<float>::type VF;
typedef Vec<float>::itype VI;

static inline VF vexp(VF x) {
  const VF hi = VF{} + 88.3762626647949f, lo = VF{} - 87.3365478515625f;
  const VF inf = VF{} + __builtin_inff();
  const VF xc = x > hi ? hi : (x < lo ? lo : x);
  const VF magic = VF{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VF nf = (xc * 1.44269504088896341f + magic) - magic;
  const VF r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF y = p * (r * r) + r + 1.0f;
  const VI n = __builtin_convertvector(nf, VI);
  const VI bits = (n + 127) << 23;
  VF e = y * (VF)bits;  // a cast between vector types of one size is a bit cast
  e = x > hi ? inf : e;
  return x < lo ? VF{} : e;
}

static inline void vsigmoid(VF z, VF& m, VF& dm) {
  const VF e = vexp(-z);
  const auto off = z < static_cast<float>(kSigmoidOffBelow);
  m = off ? VF{} : 1.0f / (1.0f + e);
  dm = off ? VF{} : m * (e * m);
}

static inline void ssigmoid(double z, double& m, double& dm) {
  const double e = std::exp(-z);
  const bool off = z < kSigmoidOffBelow;
  m = off ? 0.0 : 1.0 / (1.0 + e);
  dm = off ? 0.0 : m * (e * m);
}

// ds = (...) * beta * dm is exactly 0 where dm is, also when beta (or scale * beta) overflows the
// float range to inf (inf * 0 would be NaN): the mask is flat there, whatever beta is.
static inline VF nz(VF dm, VF v) { return dm != 0 ? v : VF{}; }

// Loads n < W floats into a zero-padded vector (the tail of an elementwise loop).
static inline VF load_tail(const float* p, int64_t n) {
  VF v = {};
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}
static inline void store_tail(float* p, VF v, int64_t n) {
  for (int64_t l = 0; l < n; ++l) p[l] = v[l];
}

// Also sums the mask over [i0, i1) into *total (CS's L1 penalty in the same pass).
template <typename T>
int64_t soft_mask_fwd(const SoftMaskArgs<T>& a, int64_t i0, int64_t i1, double* total) {
  int64_t bad = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = Vec<float>::W;
    VI nan = {};
    VF acc = {};
    double sum = 0;
    int64_t i = i0;
    for (int64_t blk = 0; i + W <= i1; i += W) {
      const VF s = loadu<VF>(a.s + i);
      VF m, dm;
      vsigmoid(s * a.beta, m, dm);
      storeu(a.out + i, loadu<VF>(a.w + i) * a.scale * m);
      acc += m;
      nan |= s != s;
      if (++blk == 1024) {  // spill to double now and then: a float sum of millions drifts
        sum += hsum<float>(acc);
        acc = VF{};
        blk = 0;
      }
    }
    if (i < i1) {
      const int64_t n = i1 - i;
      const VF s = load_tail(a.s + i, n);
      VF m, dm;
      vsigmoid(s * a.beta, m, dm);
      store_tail(a.out + i, load_tail(a.w + i, n) * a.scale * m, n);
      for (int64_t l = 0; l < n; ++l) acc[l] += m[l];
      nan |= s != s;
    }
    for (int l = 0; l < W; ++l) bad -= nan[l];  // true lanes are -1
    *total = sum + hsum<float>(acc);
  } else {
    double sum = 0;
    for (int64_t i = i0; i < i1; ++i) {
      double m, dm;
      ssigmoid(a.beta * a.s[i], m, dm);
      a.out[i] = a.w[i] * a.scale * m;
      sum += m;
      bad += std::isnan(a.s[i]);
    }
    *total = sum;
  }
  return bad;
}

// ds also takes the L1 penalty's gradient, a.l1 * scale * beta * dm (0 when a.l1 is).
template <typename T>
void soft_mask_bwd(const SoftMaskArgs<T>& a, int64_t i0, int64_t i1) {
  const T sb = a.scale * a.beta, c = a.l1 * sb;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = Vec<float>::W;
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
      VF m, dm;
      vsigmoid(loadu<VF>(a.s + i) * a.beta, m, dm);
      const VF g = loadu<VF>(a.g + i);
      storeu(a.out + i, g * a.scale * m);
      storeu(a.ds + i, nz(dm, (g * loadu<VF>(a.w + i) * sb + c) * dm));
    }
    if (i < i1) {
      const int64_t n = i1 - i;
      VF m, dm;
      vsigmoid(load_tail(a.s + i, n) * a.beta, m, dm);
      const VF g = load_tail(a.g + i, n);
      store_tail(a.out + i, g * a.scale * m, n);
      store_tail(a.ds + i, nz(dm, (g * load_tail(a.w + i, n) * sb + c) * dm), n);
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      double m, dm;
      ssigmoid(a.beta * a.s[i], m, dm);
      a.out[i] = a.g[i] * a.scale * m;
      a.ds[i] = dm == 0 ? 0.0 : (a.g[i] * a.w[i] * sb + c) * dm;
    }
  }
}

template <typename T>
double soft_mask_sum(const T* s, T beta, int64_t i0, int64_t i1, int64_t* bad) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = Vec<float>::W;
    VF acc = {};
    VI nan = {};
    double total = 0;
    int64_t i = i0;
    for (int64_t blk = 0; i + W <= i1; i += W) {
      const VF x = loadu<VF>(s + i);
      VF m, dm;
      vsigmoid(x * beta, m, dm);
      acc += m;
      nan |= x != x;
      if (++blk == 1024) {  // spill to double now and then: a float sum of millions drifts
        total += hsum<float>(acc);
        acc = VF{};
        blk = 0;
      }
    }
    if (i < i1) {
      const int64_t n = i1 - i;
      const VF x = load_tail(s + i, n);
      VF m, dm;
      vsigmoid(x * beta, m, dm);
      for (int64_t l = 0; l < n; ++l) acc[l] += m[l];
      nan |= x != x;
    }
    for (int l = 0; l < W; ++l) *bad -= nan[l];
    return total + hsum<float>(acc);
  } else {
    double total = 0;
    for (int64_t i = i0; i < i1; ++i) {
      double m, dm;
      ssigmoid(beta * s[i], m, dm);
      total += m;
      *bad += std::isnan(s[i]);
    }
    return total;
  }
}

template <typename T>
void soft_mask_l1_bwd(const T* s, T coef, T beta, T* ds, int64_t i0, int64_t i1) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = Vec<float>::W;
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
      VF m, dm;
      vsigmoid(loadu<VF>(s + i) * beta, m, dm);
      storeu(ds + i, nz(dm, dm * coef));
    }
    if (i < i1) {
      VF m, dm;
      vsigmoid(load_tail(s + i, i1 - i) * beta, m, dm);
      store_tail(ds + i, nz(dm, dm * coef), i1 - i);
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      double m, dm;
      ssigmoid(beta * s[i], m, dm);
      ds[i] = dm == 0 ? 0.0 : coef * dm;
    }
  }
}

// Explicit instantiations for float/double and int32/int64 indices.
#define SPARSEOPS_INSTANTIATE_TI(T, I)                                                  \
  template void spmm_tile<T, I>(const SpmmArgs<T, I>&, int64_t, int64_t, int64_t);     \
  template void spmm_conv_blocked<T, I>(const SpmmArgs<T, I>&, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                        const int64_t*, int64_t, T*);                   \
  template void sddmm_rows<T, I>(const SddmmArgs<T, I>&, int64_t, int64_t);             \
  template void conv_dw_positions<T, I>(const SddmmArgs<T, I>&, int64_t, int64_t, T*);  \
  template void gather_rows<T, I>(const GatherArgs<T, I>&, int64_t, int64_t);
#define SPARSEOPS_INSTANTIATE_T(T)                                                      \
  SPARSEOPS_INSTANTIATE_TI(T, int32_t)                                                  \
  SPARSEOPS_INSTANTIATE_TI(T, int64_t)                                                  \
  template void transpose_pad<T>(const T*, int64_t, int64_t, int64_t, T*, int64_t,      \
                                 int64_t, int64_t, const int64_t*, T*);                 \
  template int64_t soft_mask_fwd<T>(const SoftMaskArgs<T>&, int64_t, int64_t, double*);         \
  template void soft_mask_bwd<T>(const SoftMaskArgs<T>&, int64_t, int64_t);            \
  template double soft_mask_sum<T>(const T*, T, int64_t, int64_t, int64_t*);           \
  template void soft_mask_l1_bwd<T>(const T*, T, T, T*, int64_t, int64_t);
SPARSEOPS_INSTANTIATE_T(float)
SPARSEOPS_INSTANTIATE_T(double)
