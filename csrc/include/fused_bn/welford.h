#pragma once
// Welford running statistics and Chan's parallel merge. Both backends build
// per-channel statistics from partial results with these, so that large
// offsets (x = 1e4 + noise) do not cancel catastrophically as sum/sum-of-
// squares formulas would.
#include "fused_bn/macros.h"

namespace fused_bn {

// Chan's merge of a block of statistics (other_count, other_mean, other_m2)
// into (count, mean, m2), both counts > 0.
template <typename T, typename count_t>
FUSED_BN_HOST_DEVICE void chan_merge(T& mean, T& m2, count_t count, count_t other_count,
                                     const T& other_mean, const T& other_m2) {
  const T other_share(other_count / (count + other_count));
  const T delta = other_mean - mean;
  m2 = m2 + (other_m2 + delta * delta * T(count) * other_share);
  // An infinite mean (an infinite value in a block) makes delta infinite and
  // the update below inf - inf; the weighted average gives PyTorch's mean
  // (sum / count): inf, or NaN for inf - inf.
  const bool finite_delta = delta - delta == T(0);
  mean = finite_delta ? mean + delta * other_share
                      : (mean * T(count) + other_mean * T(other_count)) / T(count + other_count);
}

template <typename acc_t>
struct Welford {
  acc_t mean = 0;
  acc_t m2 = 0;  // sum of squared deviations from mean
  acc_t count = 0;

  FUSED_BN_HOST_DEVICE void add(acc_t x) {
    count += 1;
    const acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  FUSED_BN_HOST_DEVICE void merge(const Welford& other) {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    chan_merge(mean, m2, count, other.count, other.mean, other.m2);
    count += other.count;
  }

  FUSED_BN_HOST_DEVICE acc_t biased_var() const {
    return count > 0 ? m2 / count : acc_t(0);
  }
};

}  // namespace fused_bn
