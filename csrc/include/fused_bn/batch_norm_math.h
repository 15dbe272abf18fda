#pragma once
// Per-channel coefficient folding shared by the CPU and CUDA kernels.
//
// Forward:  y = (x - mean) * invstd * w + b  ==  x * scale + shift
// Backward: with g = dy masked by the activation,
//   training: dx = w * invstd * (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean)))
//   eval:     dx = w * invstd * g
// Both are  dx = g * a + x * b + c  with per-channel a, b, c.
#include <cmath>

#include "fused_bn/macros.h"

namespace fused_bn {

template <typename acc_t>
struct ChannelAffine {
  acc_t scale;
  acc_t shift;

  FUSED_BN_HOST_DEVICE static ChannelAffine fold(acc_t mean, acc_t invstd,
                                                 acc_t weight, acc_t bias) {
    const acc_t scale = invstd * weight;
    return {scale, bias - mean * scale};
  }

  FUSED_BN_HOST_DEVICE acc_t apply(acc_t x) const { return x * scale + shift; }
};

template <typename acc_t>
struct ChannelGradInput {
  acc_t a;  // coefficient of g
  acc_t b;  // coefficient of x
  acc_t c;  // constant

  FUSED_BN_HOST_DEVICE static ChannelGradInput training(acc_t mean, acc_t invstd,
                                                        acc_t weight, acc_t mean_dy,
                                                        acc_t mean_dy_xmu) {
    const acc_t a = weight * invstd;
    const acc_t b = -a * invstd * invstd * mean_dy_xmu;
    return {a, b, -a * mean_dy - b * mean};
  }

  FUSED_BN_HOST_DEVICE static ChannelGradInput eval(acc_t invstd, acc_t weight) {
    return {weight * invstd, acc_t(0), acc_t(0)};
  }

  FUSED_BN_HOST_DEVICE acc_t apply(acc_t g, acc_t x) const { return g * a + x * b + c; }
};

// 1 / sqrt(var + eps), as both backends compute it.
template <typename acc_t>
FUSED_BN_HOST_DEVICE acc_t inverse_std(acc_t biased_var, double eps) {
  return acc_t(1) / std::sqrt(biased_var + static_cast<acc_t>(eps));
}

}  // namespace fused_bn
