#include "dispatch.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#include <unistd.h>

namespace sparseops::cpu {

// ---- instruction-set selection ---------------------------------------------------------------

static bool cpu_has(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::Default, Isa::Avx2, Isa::Avx512})
    if (cpu_has(isa)) out.push_back(isa);
  return out;
}

static Isa best_isa() { return supported_isas().back(); }

static Isa parse_isa(const std::string& name) {
  if (name.empty() || name == "auto") return best_isa();
  for (Isa isa : {Isa::Default, Isa::Avx2, Isa::Avx512}) {
    if (name == isa_name(isa)) {
      TORCH_CHECK_VALUE(cpu_has(isa), "sparseops: this CPU does not support the '", name, "' kernels");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, "sparseops: unknown CPU instruction set '", name,
                    "' (expected auto, default, avx2 or avx512)");
}

static std::atomic<int>& isa_slot() {
  // SPARSEOPS_CPU_ISA caps the variant (like ATEN_CPU_CAPABILITY does for torch's own kernels).
  static std::atomic<int> slot{[] {
    const char* env = std::getenv("SPARSEOPS_CPU_ISA");
    return static_cast<int>(parse_isa(env ? env : ""));
  }()};
  return slot;
}

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }
void set_active_isa(const std::string& name) { isa_slot().store(static_cast<int>(parse_isa(name))); }

#define SPARSEOPS_ISA_CALL_ON(isa, fn, ...)                             \
  switch (isa) {                                                        \
    case Isa::Avx512: return isa_avx512::fn(__VA_ARGS__);               \
    case Isa::Avx2: return isa_avx2::fn(__VA_ARGS__);                   \
    default: return isa_default::fn(__VA_ARGS__);                       \
  }
#define SPARSEOPS_ISA_CALL(fn, ...) SPARSEOPS_ISA_CALL_ON(active_isa(), fn, __VA_ARGS__)

// The variant for an SpMM/SDDMM whose operands the caller padded to ld: the active one, or, if the
// ISA was switched to a wider one since the padding was chosen (spmm_m_block<T>()), the widest
// narrower one whose register block divides ld (4 vectors of 16, 32, 64 bytes: each divides the next).
template <typename T>
static Isa isa_for_ld(int64_t ld) {
  Isa isa = active_isa();
  while (isa != Isa::Default && ld % spmm_m_block<T>(isa) != 0) isa = static_cast<Isa>(static_cast<int>(isa) - 1);
  TORCH_CHECK(ld % spmm_m_block<T>(isa) == 0, "sparseops: internal error: the kernels' operands are padded to ", ld,
              " columns, not a multiple of ", spmm_m_block<T>(isa));
  return isa;
}

// ---- parallel execution ----------------------------------------------------------------------

// Runs f(t) for t in [0, n) on torch's pool, handing out runs of consecutive tasks: rows of a
// pruned matrix differ in length, so a static split would leave threads idle. About 8 runs per
// worker, not one task at a time: the shared counter's cache line moves between cores on every
// claim, and one claim per task (~1 us of work at high sparsity) was 20% of an SpMM's time here.
template <class F>
static void parallel_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  if (workers == 1) {
    for (int64_t t = 0; t < n; ++t) f(t);
    return;
  }
  const int64_t run = std::max<int64_t>(1, n / (8 * workers));
  struct alignas(64) Counter {  // a cache line of its own: nothing else the workers read sits beside it
    std::atomic<int64_t> next{0};
  } counter;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t0; (t0 = counter.next.fetch_add(run, std::memory_order_relaxed)) < n;)
      for (int64_t t = t0, t1 = std::min(n, t0 + run); t < t1; ++t) f(t);
  });
}

// Elementwise work is uniform: a static split in contiguous chunks.
template <class F>
static void parallel_range(int64_t n, const F& f) {
  at::parallel_for(0, n, 32768, f);
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE  // (glibc; not every C library has it)
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long b = 0;
#endif
    return b > 0 ? static_cast<int64_t>(b) : int64_t(1) << 20;
  }();
  return bytes;
}

template <typename I>
bool column_block_starts(const I* row_ptr, const I* col, int64_t rows, int64_t col_block, int64_t blocks,
                         int64_t* starts) {
  std::atomic<bool> sorted{true};
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const I *begin = col + row_ptr[r], *end = col + row_ptr[r + 1];
      if (!std::is_sorted(begin, end)) sorted = false;
      for (int64_t b = 0; b < blocks; ++b)
        starts[r * (blocks + 1) + b] = std::lower_bound(begin, end, static_cast<I>(b * col_block)) - col;
      starts[r * (blocks + 1) + blocks] = row_ptr[r + 1];
    }
  });
  return sorted.load();
}
template bool column_block_starts<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t*);
template bool column_block_starts<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t*);

// The convolution's SpMM in column blocks (kernels_impl.h, spmm_conv_blocked): groups of output
// channels whose tiles fill at most a quarter of L2, each task one group at one position block of one
// register block of images.
template <typename T, typename I>
static void spmm_conv_in_blocks(const SpmmArgs<T, I>& a, Isa isa) {
  const int64_t MB = spmm_m_block<T>(isa);
  const int64_t csr_rows = a.rows / a.plane;
  const int64_t tile_bytes = kSpmmRowBlock * MB * static_cast<int64_t>(sizeof(T));
  const int64_t pos_blocks = (a.plane + kSpmmRowBlock - 1) / kSpmmRowBlock;
  const int64_t m_blocks = (a.M + MB - 1) / MB;
  // (and small enough for 4 tasks per thread: a many-core machine's threads all get work)
  const int64_t spread = csr_rows * pos_blocks * m_blocks / (4 * static_cast<int64_t>(at::get_num_threads()));
  const int64_t group = std::clamp<int64_t>(std::min(l2_cache_bytes() / 4 / tile_bytes, spread), 1, csr_rows);
  const int64_t groups = (csr_rows + group - 1) / group;
  parallel_tasks(groups * pos_blocks * m_blocks, [&](int64_t t) {
    const int64_t gi = t % groups, pb = (t / groups) % pos_blocks, mb = t / (groups * pos_blocks);
    const int64_t row0 = gi * group, row1 = std::min(csr_rows, row0 + group);
    const int64_t p0 = pb * kSpmmRowBlock, p1 = std::min(a.plane, p0 + kSpmmRowBlock);
    thread_local std::vector<T> acc;
    acc.resize(group * kSpmmRowBlock * MB);
    SPARSEOPS_ISA_CALL_ON(isa, spmm_conv_blocked, a, row0, row1, p0, p1, mb * MB, a.block_starts, a.col_blocks,
                          acc.data());
  });
}

template <typename T, typename I>
void spmm(const SpmmArgs<T, I>& a) {
  const Isa isa = isa_for_ld<T>(a.ldb);
  const int64_t MB = spmm_m_block<T>(isa);
  if (a.eoff && a.block_starts) {
    spmm_conv_in_blocks(a, isa);
    return;
  }
  if (a.eoff) {
    // Convolution: tiles of up to kSpmmRowBlock positions of one CSR row (an output channel).
    // Consecutive tasks take the same positions for the next channels, so the input around those
    // positions (all channels, position-major in bt) is read from cache, not memory, by every channel.
    const int64_t csr_rows = a.rows / a.plane;
    const int64_t pos_blocks = (a.plane + kSpmmRowBlock - 1) / kSpmmRowBlock;
    const int64_t m_blocks = (a.M + MB - 1) / MB;
    parallel_tasks(csr_rows * pos_blocks * m_blocks, [&](int64_t t) {
      const int64_t row = t % csr_rows, pb = (t / csr_rows) % pos_blocks, mb = t / (csr_rows * pos_blocks);
      const int64_t r0 = row * a.plane + pb * kSpmmRowBlock;
      const int64_t r1 = std::min(row * a.plane + a.plane, r0 + kSpmmRowBlock);
      SPARSEOPS_ISA_CALL_ON(isa, spmm_tile, a, r0, r1, mb * MB);
    });
    return;
  }
  const int64_t row_blocks = (a.rows + kSpmmRowBlock - 1) / kSpmmRowBlock;
  const int64_t m_blocks = (a.M + MB - 1) / MB;
  // Row blocks innermost: consecutive tasks share the same columns of B^T (reuse in L2).
  parallel_tasks(row_blocks * m_blocks, [&](int64_t t) {
    const int64_t rb = t % row_blocks, mb = t / row_blocks;
    const int64_t r0 = rb * kSpmmRowBlock, r1 = std::min(a.rows, r0 + kSpmmRowBlock);
    SPARSEOPS_ISA_CALL_ON(isa, spmm_tile, a, r0, r1, mb * MB);
  });
}

template <typename T, typename I>
void sddmm(const SddmmArgs<T, I>& a) {
  constexpr int64_t R = 4;
  const Isa isa = isa_for_ld<T>(a.ld);
  parallel_tasks((a.rows + R - 1) / R, [&](int64_t t) {
    SPARSEOPS_ISA_CALL_ON(isa, sddmm_rows, a, t * R, std::min(a.rows, (t + 1) * R));
  });
}

template <typename T, typename I>
void conv_dw(const SddmmArgs<T, I>& a, int64_t nnz, T* out, bool accumulate) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(a.plane, at::get_num_threads()));
  std::vector<T> acc(static_cast<size_t>(workers * nnz), T(0));
  const Isa isa = isa_for_ld<T>(a.ld);
  // A fixed split of the positions (one range per worker), so the sums' order is reproducible.
  auto run = [&](int64_t w) {
    const int64_t p0 = a.plane * w / workers, p1 = a.plane * (w + 1) / workers;
    SPARSEOPS_ISA_CALL_ON(isa, conv_dw_positions, a, p0, p1, acc.data() + w * nnz);
  };
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) run(w);
  });
  for (int64_t j = 0; j < nnz; ++j) {
    T total = 0;
    for (int64_t w = 0; w < workers; ++w) total += acc[w * nnz + j];
    out[j] = accumulate ? out[j] + total : total;
  }
}

template <typename T, typename I>
void gather(const GatherArgs<T, I>& a, int64_t rows) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) { SPARSEOPS_ISA_CALL(gather_rows, a, r0, r1); });
}

template <typename I>
int64_t count_invalid_csr(const I* row_ptr, const I* col, int64_t rows, int64_t cols, int64_t nnz) {
  if (row_ptr[0] != 0 || row_ptr[rows] != nnz) return 1;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    int64_t local = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = row_ptr[r], e = row_ptr[r + 1];
      if (b < 0 || e < b || e > nnz) {
        ++local;
        continue;
      }
      for (int64_t j = b; j < e; ++j) local += (col[j] < 0) | (col[j] >= cols);
    }
    bad += local;
  });
  return bad.load();
}
template int64_t count_invalid_csr<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t, int64_t);
template int64_t count_invalid_csr<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t, int64_t);

template <typename T>
void transpose_pad(const T* x, int64_t M, int64_t K, int64_t ldx, T* xt, int64_t ldt, const int64_t* rowmap,
                   T* colsum) {
  constexpr int64_t KB = 64 / sizeof(T);  // 64 bytes: whole W x W register transposes for every ISA
  parallel_tasks((K + KB - 1) / KB, [&](int64_t t) {
    SPARSEOPS_ISA_CALL(transpose_pad, x, M, K, ldx, xt, ldt, t * KB, std::min(K, (t + 1) * KB), rowmap, colsum);
  });
}

// Fixed chunks (not one per thread) so that sums do not depend on the thread count.
constexpr int64_t kSumChunk = 32768;

template <typename T>
int64_t soft_mask_fwd(const SoftMaskArgs<T>& a, double* total) {
  const int64_t chunks = (a.n + kSumChunk - 1) / kSumChunk;
  std::vector<double> partial(chunks, 0.0);
  std::vector<int64_t> nan(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kSumChunk, i1 = std::min(a.n, i0 + kSumChunk);
      switch (active_isa()) {
        case Isa::Avx512: nan[c] = isa_avx512::soft_mask_fwd(a, i0, i1, &partial[c]); break;
        case Isa::Avx2: nan[c] = isa_avx2::soft_mask_fwd(a, i0, i1, &partial[c]); break;
        default: nan[c] = isa_default::soft_mask_fwd(a, i0, i1, &partial[c]);
      }
    }
  });
  int64_t bad = 0;
  *total = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    *total += partial[c];
    bad += nan[c];
  }
  return bad;
}

template <typename T>
void soft_mask_bwd(const SoftMaskArgs<T>& a) {
  parallel_range(a.n, [&](int64_t i0, int64_t i1) { SPARSEOPS_ISA_CALL(soft_mask_bwd, a, i0, i1); });
}

template <typename T>
double soft_mask_sum(const T* s, T beta, int64_t n, int64_t* nan_count) {
  constexpr int64_t C = kSumChunk;
  const int64_t chunks = (n + C - 1) / C;
  std::vector<double> partial(chunks, 0.0);
  std::vector<int64_t> nan(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * C, i1 = std::min(n, i0 + C);
      switch (active_isa()) {
        case Isa::Avx512: partial[c] = isa_avx512::soft_mask_sum(s, beta, i0, i1, &nan[c]); break;
        case Isa::Avx2: partial[c] = isa_avx2::soft_mask_sum(s, beta, i0, i1, &nan[c]); break;
        default: partial[c] = isa_default::soft_mask_sum(s, beta, i0, i1, &nan[c]);
      }
    }
  });
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    total += partial[c];
    *nan_count += nan[c];
  }
  return total;
}

template <typename T>
void soft_mask_l1_bwd(const T* s, T coef, T beta, T* ds, int64_t n) {
  parallel_range(n, [&](int64_t i0, int64_t i1) { SPARSEOPS_ISA_CALL(soft_mask_l1_bwd, s, coef, beta, ds, i0, i1); });
}

#define SPARSEOPS_DISPATCH_TI(T, I)                                  \
  template void spmm<T, I>(const SpmmArgs<T, I>&);                   \
  template void sddmm<T, I>(const SddmmArgs<T, I>&);                 \
  template void conv_dw<T, I>(const SddmmArgs<T, I>&, int64_t, T*, bool);  \
  template void gather<T, I>(const GatherArgs<T, I>&, int64_t);
#define SPARSEOPS_DISPATCH_T(T)                                                           \
  SPARSEOPS_DISPATCH_TI(T, int32_t)                                                       \
  SPARSEOPS_DISPATCH_TI(T, int64_t)                                                       \
  template void transpose_pad<T>(const T*, int64_t, int64_t, int64_t, T*, int64_t, const int64_t*, T*); \
  template int64_t soft_mask_fwd<T>(const SoftMaskArgs<T>&, double*);                              \
  template void soft_mask_bwd<T>(const SoftMaskArgs<T>&);                                 \
  template double soft_mask_sum<T>(const T*, T, int64_t, int64_t*);                       \
  template void soft_mask_l1_bwd<T>(const T*, T, T, T*, int64_t);
SPARSEOPS_DISPATCH_T(float)
SPARSEOPS_DISPATCH_T(double)

}  // namespace sparseops::cpu
