#pragma once
// Per-channel arithmetic of the running statistics' update, shared by the
// CPU loop (running_stats.cpp) and the CUDA kernel (cuda/running_stats.cu).
// It is the arithmetic of the general path in ATen tensor ops, element by
// element: the CPU loop gives that path's bits; CUDA may differ by one
// rounding step where nvcc fuses a multiply-add.
#include <cstdint>

#include "fused_bn/macros.h"

namespace fused_bn {

// Bessel's correction of `count` values, as a factor on the biased variance.
FUSED_BN_HOST_DEVICE double bessel_factor(int64_t count) {
  return static_cast<double>(count) / static_cast<double>(count - 1);
}

// PyTorch's update of one running statistic, in the opmath type of the
// running statistics: weight * batch + (1 - weight) * running. (Not a lerp:
// with an infinite batch value and weight 1 that gives inf - inf.)
template <typename opmath_t>
FUSED_BN_HOST_DEVICE opmath_t moving_average(opmath_t running, opmath_t batch, opmath_t weight) {
  return weight * batch + (opmath_t(1) - weight) * running;
}

// One channel's update: the batch mean and the unbiased batch variance,
// recovered in double from invstd (1/invstd^2 - eps cancels when var << eps),
// averaged in with `weight` in opmath_t (float for half/bfloat16 statistics,
// as PyTorch: a variance beyond their range must not overflow first).
template <typename running_t, typename opmath_t, typename stat_t>
FUSED_BN_HOST_DEVICE void update_channel(running_t& running_mean, running_t& running_var,
                                         stat_t batch_mean, stat_t batch_invstd, opmath_t weight,
                                         double eps, double bessel) {
  const double inv = static_cast<double>(batch_invstd);
  const opmath_t unbiased_var = static_cast<opmath_t>((1.0 / (inv * inv) - eps) * bessel);
  running_mean = static_cast<running_t>(moving_average(
      static_cast<opmath_t>(running_mean), static_cast<opmath_t>(batch_mean), weight));
  running_var = static_cast<running_t>(
      moving_average(static_cast<opmath_t>(running_var), unbiased_var, weight));
}

// The weight of a cumulative average (momentum=None) after `batches`
// batches: 1 / batches, as nn.BatchNorm computes it in Python (double).
template <typename opmath_t>
FUSED_BN_HOST_DEVICE opmath_t cumulative_weight(int64_t batches) {
  return static_cast<opmath_t>(1.0 / static_cast<double>(batches));
}

}  // namespace fused_bn
