#pragma once
// Which elements dropout keeps: a pure function of (seed, offset, i), shared
// by the CPU and CUDA kernels so that both produce bit-identical masks
// whatever their thread count or launch configuration.
//
// Element i of the input (in its dense memory order) draws the 32-bit number
//
//   draw(i) = philox4x32_10(counter = (lo(i / 4), hi(i / 4), lo(offset), hi(offset)),
//                           key     = (lo(seed), hi(seed))).x[i % 4]
//
// (lo/hi: the low/high 32-bit word of a 64-bit value), so one Philox call
// serves four consecutive elements, and is kept when
//
//   draw(i) < threshold,   threshold = round((1 - p) * 2^32)   (ties away from 0)
//
// which keeps everything for p = 0 (threshold 2^32) and nothing for p = 1
// (threshold 0). A kept element is scaled by 1 / (1 - p).
//
// The 1-bit mask stores keep(i) in bit i % 8 of byte i / 8; one byte covers
// two Philox calls.
#include <cmath>
#include <cstdint>

#include "fused_bn/macros.h"
#include "fused_bn/philox.h"

namespace fused_bn {

constexpr int kDropoutElementsPerByte = 8;
constexpr int kPhiloxDrawsPerCall = 4;

FUSED_BN_HOST_DEVICE int64_t dropout_mask_bytes(int64_t numel) {
  return (numel + kDropoutElementsPerByte - 1) / kDropoutElementsPerByte;
}

// keep iff draw < threshold, with threshold in [0, 2^32] held as a flag and a
// 32-bit bound so that the comparison stays in 32-bit lanes.
struct DropoutKeepRule {
  bool keeps_any;           // threshold > 0
  uint32_t last_kept_draw;  // threshold - 1 when keeps_any

  FUSED_BN_HOST_DEVICE bool keeps(uint32_t draw) const {
    return keeps_any && draw <= last_kept_draw;
  }
};

inline DropoutKeepRule dropout_keep_rule(double p) {
  const long long threshold = std::llround((1.0 - p) * 4294967296.0);
  if (threshold <= 0) return {false, 0};
  return {true, static_cast<uint32_t>(threshold - 1)};
}

// The factor applied to kept elements: 1 / (1 - p); 0 for p = 1, where
// nothing is kept and the output is input * 0, as in PyTorch.
inline double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

struct DropoutStream {
  uint64_t seed;
  uint64_t offset;

  FUSED_BN_HOST_DEVICE PhiloxKey key() const {
    return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  }

  // The counter of elements 4 * group .. 4 * group + 3.
  FUSED_BN_HOST_DEVICE PhiloxWords counter(uint64_t group) const {
    return {{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
             static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  }
};

// The mask byte of the 8 elements drawn by two consecutive Philox groups.
FUSED_BN_HOST_DEVICE uint8_t dropout_pack_byte(const DropoutKeepRule& rule, const PhiloxWords& low,
                                              const PhiloxWords& high) {
  uint32_t bits = 0;
  for (int lane = 0; lane < kPhiloxDrawsPerCall; ++lane) {
    bits |= static_cast<uint32_t>(rule.keeps(low.x[lane])) << lane;
    bits |= static_cast<uint32_t>(rule.keeps(high.x[lane])) << (kPhiloxDrawsPerCall + lane);
  }
  return static_cast<uint8_t>(bits);
}

// The mask byte of elements 8 * byte .. 8 * byte + 7.
FUSED_BN_HOST_DEVICE uint8_t dropout_keep_byte(const DropoutStream& stream,
                                              const DropoutKeepRule& rule, uint64_t byte) {
  return dropout_pack_byte(rule, philox4x32_10(stream.counter(2 * byte), stream.key()),
                           philox4x32_10(stream.counter(2 * byte + 1), stream.key()));
}

// Bit k of a mask byte, as 0/1.
FUSED_BN_HOST_DEVICE bool dropout_mask_bit(uint8_t byte, int k) { return (byte >> k) & 1; }

}  // namespace fused_bn
