// _pack_mask / _same_as_packed (schemas in csrc/ops.cpp): the copy of a CPU bool mask that
// sparseops/layout.py's refresh compares the mask with on every call (writes through mask.data or
// numpy bypass the version counter), one bit per entry. The check then reads the mask and an eighth
// of its size, not the mask and a full copy: torch.equal's two streams, not memcmp-fast, cost more
// than the select of the layer's dense path. Exact: a byte that is not 0 or 1 never compares equal.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "../checks.h"

namespace sparseops {
namespace {

constexpr uint64_t kOnes = 0x0101010101010101ULL;

// Eight 0/1 bytes to eight bits (byte i to its own bit: the multiply gathers the bytes' low bits).
inline uint8_t pack8(uint64_t word) { return static_cast<uint8_t>((word * 0x0102040810204080ULL) >> 56); }

// The inverse: eight bits to the eight 0/1 bytes they pack, as one table lookup (2 KiB, stays in L1).
struct Unpack {
  uint64_t word[256];
  constexpr Unpack() : word() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) word[b] |= static_cast<uint64_t>((b >> j) & 1) << (8 * j);
  }
};
constexpr Unpack kUnpack;

inline uint64_t load_word(const uint8_t* p, int64_t i, int64_t nbytes) {
  uint64_t word = 0;
  std::memcpy(&word, p + 8 * i, static_cast<size_t>(std::min<int64_t>(8, nbytes - 8 * i)));
  return word;
}

const uint8_t* mask_bytes(const char* op, const at::Tensor& mask) {
  check_defined(op, mask, "mask");
  TORCH_CHECK_VALUE(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous(),
                    "sparseops.", op, ": mask must be a contiguous CPU bool tensor, got ", mask.scalar_type(),
                    " on ", mask.device());
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

at::Tensor pack_mask(const at::Tensor& mask) {
  const uint8_t* m = mask_bytes("_pack_mask", mask);
  const int64_t nbytes = mask.numel(), words = (nbytes + 7) / 8;
  auto out = at::empty({words}, mask.options().dtype(at::kByte));
  uint8_t* bits = out.data_ptr<uint8_t>();
  at::parallel_for(0, words, 32768, [&](int64_t w0, int64_t w1) {
    for (int64_t i = w0; i < w1; ++i) {
      const uint64_t word = load_word(m, i, nbytes);
      // A byte other than 0/1 gets the complement of its packed bit pattern, so it never compares equal.
      bits[i] = (word & ~kOnes) ? static_cast<uint8_t>(~pack8(word & kOnes)) : pack8(word);
    }
  });
  return out;
}

bool same_as_packed(const at::Tensor& mask, const at::Tensor& packed) {
  const uint8_t* m = mask_bytes("_same_as_packed", mask);
  const int64_t nbytes = mask.numel(), words = (nbytes + 7) / 8;
  TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                        packed.numel() == words,
                    "sparseops._same_as_packed: packed must be the contiguous uint8 [", words,
                    "] that _pack_mask returns for this mask");
  const uint8_t* bits = packed.const_data_ptr<uint8_t>();
  std::atomic<bool> same{true};
  at::parallel_for(0, words, 32768, [&](int64_t w0, int64_t w1) {
    const int64_t full = std::min(w1, nbytes / 8);  // whole words: no bounds work in the hot loop
    uint64_t differ = 0;
    for (int64_t i = w0; i < full; ++i) {
      uint64_t word;
      std::memcpy(&word, m + 8 * i, 8);
      differ |= word ^ kUnpack.word[bits[i]];  // (a byte other than 0/1 differs from every expansion)
    }
    for (int64_t i = std::max(w0, full); i < w1; ++i) differ |= load_word(m, i, nbytes) ^ kUnpack.word[bits[i]];
    if (differ) same.store(false, std::memory_order_relaxed);
  });
  return same.load();
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("_pack_mask", &pack_mask);
  m.impl("_same_as_packed", &same_as_packed);
}

}  // namespace sparseops
