#pragma once
// Per-channel arithmetic of update_running_stats_, shared by the CPU loop
// (running_stats.cpp) and the CUDA kernel (cuda/running_stats.cu). It is the
// arithmetic of the op's general path in ATen tensor ops, element by element:
// the CPU loop gives that path's bits; CUDA may differ by one rounding step
// where nvcc fuses a multiply-add.
#include <cstdint>

#include "fused_bn/macros.h"

namespace fused_bn {

// at::lerp's formula, in the opmath type of the running statistics.
template <typename opmath_t>
FUSED_BN_HOST_DEVICE opmath_t lerp(opmath_t self, opmath_t end, opmath_t weight) {
  const opmath_t magnitude = weight < opmath_t(0) ? -weight : weight;
  return magnitude < opmath_t(0.5) ? self + weight * (end - self)
                                   : end - (end - self) * (opmath_t(1) - weight);
}

// Bessel's correction of `count` values, as a factor on the biased variance.
FUSED_BN_HOST_DEVICE double bessel_factor(int64_t count) {
  return static_cast<double>(count) / static_cast<double>(count - 1);
}

// One channel's update: the batch mean and the unbiased batch variance,
// recovered in double from invstd (1/invstd^2 - eps cancels when var << eps),
// are each rounded to the running statistics' type and lerped in by `weight`.
template <typename running_t, typename opmath_t, typename stat_t>
FUSED_BN_HOST_DEVICE void update_channel(running_t& running_mean, running_t& running_var,
                                         stat_t batch_mean, stat_t batch_invstd, opmath_t weight,
                                         double eps, double bessel) {
  const double inv = static_cast<double>(batch_invstd);
  const running_t unbiased_var = static_cast<running_t>((1.0 / (inv * inv) - eps) * bessel);
  running_mean = static_cast<running_t>(lerp<opmath_t>(
      static_cast<opmath_t>(running_mean), static_cast<running_t>(batch_mean), weight));
  running_var = static_cast<running_t>(
      lerp<opmath_t>(static_cast<opmath_t>(running_var), unbiased_var, weight));
}

// The weight of a cumulative average (momentum=None) after `batches` batches,
// as the general path computes it: 1 / batches, rounded to the running type.
template <typename running_t, typename opmath_t>
FUSED_BN_HOST_DEVICE opmath_t cumulative_weight(int64_t batches) {
  return static_cast<opmath_t>(static_cast<running_t>(1.0 / static_cast<double>(batches)));
}

}  // namespace fused_bn
