#pragma once
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy
// as 1, 2, 3", SC'11), the counter-based generator of Random123 and of
// PyTorch's CUDA generator. One call maps a 128-bit counter and a 64-bit key
// to four independent 32-bit draws; there is no state, so any element can
// draw its number directly, on any device, in any order.
//
// Words are listed low word first, as in Random123's known-answer tests
// (checked by tests/test_dropout.py through torch.ops.fused_bn.philox4x32).
#include <cstdint>

#include "fused_bn/macros.h"

namespace fused_bn {

struct PhiloxWords {
  uint32_t x[4];
};

struct PhiloxKey {
  uint32_t k0, k1;
};

namespace philox_detail {

// Also used by the SIMD rounds of csrc/cpu/dropout_kernel.cpp.
constexpr uint32_t kMultiplier0 = 0xD2511F53u;
constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr uint32_t kRounds = 10;

FUSED_BN_HOST_DEVICE PhiloxWords round(const PhiloxWords& c, PhiloxKey key) {
  const uint64_t product0 = static_cast<uint64_t>(kMultiplier0) * c.x[0];
  const uint64_t product1 = static_cast<uint64_t>(kMultiplier1) * c.x[2];
  return {{static_cast<uint32_t>(product1 >> 32) ^ c.x[1] ^ key.k0,
           static_cast<uint32_t>(product1),
           static_cast<uint32_t>(product0 >> 32) ^ c.x[3] ^ key.k1,
           static_cast<uint32_t>(product0)}};
}

}  // namespace philox_detail

// The key of round r (0-based): bumped by the Weyl constants each round.
FUSED_BN_HOST_DEVICE PhiloxKey round_key(PhiloxKey key, uint32_t r) {
  return {key.k0 + r * philox_detail::kWeyl0, key.k1 + r * philox_detail::kWeyl1};
}

// Philox4x32 with 10 rounds of `counter` under `key`.
FUSED_BN_HOST_DEVICE PhiloxWords philox4x32_10(PhiloxWords counter, PhiloxKey key) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#pragma unroll
#endif
  for (uint32_t r = 0; r < philox_detail::kRounds; ++r) {
    counter = philox_detail::round(counter, round_key(key, r));
  }
  return counter;
}


}  // namespace fused_bn
