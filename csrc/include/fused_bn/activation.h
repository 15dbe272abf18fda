#pragma once
// The activations fused after normalization, shared by the CPU and CUDA
// kernels (the CPU's vector versions in cpu/activation_vec.h follow these
// element by element).
//
// Each one is PyTorch's module of that name, in value and in gradient: the
// backward pass recomputes the activation's input y (see batch_norm_math.h)
// and passes grad * act'(y) with the derivative PyTorch's backward uses,
// including its choices at the kinks and for NaN:
//   relu       max(y, 0); grad where !(y <= 0)           (threshold_backward)
//   hardtanh   clamp(y, lo, hi); grad where !(y <= lo || y >= hi)
//              (ReLU6 is hardtanh(0, 6), as in torch)
//   leaky_relu y > 0 ? y : y * slope; grad * (y > 0 ? 1 : slope)
//   silu       y * sigmoid(y); grad * s * (1 + y * (1 - s)), s = sigmoid(y)
//   hardswish  y * clamp(y + 3, 0, 6) / 6; grad * (y < -3 ? 0 : y <= 3 ? y / 3 + 0.5 : 1)
//   elu        y > 0 ? y : alpha * expm1(y); grad * (y <= 0 ? alpha * exp(y) : 1)
// NaN propagates through every forward as in torch.
#include <cmath>
#include <cstdint>

#include "fused_bn/macros.h"

namespace fused_bn {

enum class Activation : int8_t {
  Identity = 0,
  ReLU = 1,
  Hardtanh = 2,
  LeakyReLU = 3,
  SiLU = 4,
  Hardswish = 5,
  ELU = 6,
};

// An activation and its parameters: Hardtanh (alpha, beta) = (min_val,
// max_val); LeakyReLU alpha = negative_slope; ELU alpha = alpha.
struct ActivationSpec {
  Activation kind = Activation::Identity;
  double alpha = 0;
  double beta = 0;
};

template <typename acc_t>
FUSED_BN_HOST_DEVICE acc_t sigmoid(acc_t y) {
  return acc_t(1) / (acc_t(1) + std::exp(-y));
}

template <typename acc_t>
FUSED_BN_HOST_DEVICE acc_t activate(const ActivationSpec& act, acc_t y) {
  const acc_t alpha = static_cast<acc_t>(act.alpha), beta = static_cast<acc_t>(act.beta);
  switch (act.kind) {
    case Activation::Identity:
      return y;
    case Activation::ReLU:  // `y < 0 ? 0 : y` rather than max() so that NaN propagates
      return y < acc_t(0) ? acc_t(0) : y;
    case Activation::Hardtanh:
      return y < alpha ? alpha : (y > beta ? beta : y);
    case Activation::LeakyReLU:
      return y > acc_t(0) ? y : y * alpha;
    case Activation::SiLU:
      return y / (acc_t(1) + std::exp(-y));
    case Activation::Hardswish: {
      const acc_t shifted = y + acc_t(3);
      const acc_t gate = shifted < acc_t(0) ? acc_t(0) : (shifted > acc_t(6) ? acc_t(6) : shifted);
      return y * gate / acc_t(6);
    }
    case Activation::ELU:
      return y > acc_t(0) ? y : alpha * std::expm1(y);
  }
  return y;
}

// grad * act'(y), with PyTorch's derivative (see the file comment).
template <typename acc_t>
FUSED_BN_HOST_DEVICE acc_t activation_grad(const ActivationSpec& act, acc_t y, acc_t grad) {
  const acc_t alpha = static_cast<acc_t>(act.alpha), beta = static_cast<acc_t>(act.beta);
  switch (act.kind) {
    case Activation::Identity:
      return grad;
    case Activation::ReLU:
      return y <= acc_t(0) ? acc_t(0) : grad;
    case Activation::Hardtanh:
      return (y <= alpha || y >= beta) ? acc_t(0) : grad;
    case Activation::LeakyReLU:
      return y > acc_t(0) ? grad : grad * alpha;
    case Activation::SiLU: {
      const acc_t s = sigmoid(y);
      return grad * s * (acc_t(1) + y * (acc_t(1) - s));
    }
    case Activation::Hardswish:
      if (y < acc_t(-3)) return acc_t(0);
      return y <= acc_t(3) ? grad * (y / acc_t(3) + acc_t(0.5)) : grad;
    case Activation::ELU:
      return y <= acc_t(0) ? grad * alpha * std::exp(y) : grad;
  }
  return grad;
}

}  // namespace fused_bn
