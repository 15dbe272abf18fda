#pragma once
// The activations fused after normalization. The backward pass recomputes the
// pre-activation value y = x * scale + shift (see batch_norm_math.h) to decide
// where the gradient flows, so forward and backward must compute y the same
// way: both go through ChannelAffine::apply.
#include <cstdint>

#include "fused_bn/macros.h"

namespace fused_bn {

enum class Activation : int8_t { Identity = 0, ReLU = 1 };

template <typename acc_t>
FUSED_BN_HOST_DEVICE acc_t activate(Activation act, acc_t y) {
  // `y > 0 ? y : 0` rather than max() so that NaN propagates as in torch.relu.
  return (act == Activation::ReLU && !(y > acc_t(0)) && y == y) ? acc_t(0) : y;
}

// Whether the gradient at pre-activation value y passes through the
// activation. torch's ReLU backward passes it where the output is > 0.
template <typename acc_t>
FUSED_BN_HOST_DEVICE bool activation_passes_grad(Activation act, acc_t y) {
  return act != Activation::ReLU || y > acc_t(0);
}

}  // namespace fused_bn
