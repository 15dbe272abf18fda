#pragma once
// The activations of include/fused_bn/activation.h on at::vec vectors, for the
// CPU kernels (included by the per-ISA batch_norm_kernel.cpp, so everything
// here lives in that ISA's namespace). Each follows the scalar version lane
// by lane: the same comparisons (NaN goes the same way), at::vec's
// exp/expm1 in place of std's.
//
// A kernel is instantiated for Identity and ReLU, the common cases, and once
// for all the others (ActivationPath::kAny), which switch on the kind per
// vector: the branch is the same for every vector of a call, and these
// activations' exp or extra compares cost more than it. Seven instantiations
// of every kernel, for every dtype and ISA, would triple the build time.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#ifdef CPU_CAPABILITY_AVX512
#include <immintrin.h>
#endif

#include <type_traits>

#include "fused_bn/activation.h"

#ifndef CPU_CAPABILITY
#error "include activation_vec.h from a file compiled once per ISA (see setup.py)"
#endif

namespace fused_bn::cpu::CPU_CAPABILITY {

enum class ActivationPath { kIdentity, kReLU, kAny };

inline ActivationPath activation_path(Activation kind) {
  if (kind == Activation::Identity) return ActivationPath::kIdentity;
  if (kind == Activation::ReLU) return ActivationPath::kReLU;
  return ActivationPath::kAny;
}

template <typename Vec>
class VecActivation {
 public:
  using value_t = typename Vec::value_type;

  explicit VecActivation(const ActivationSpec& spec)
      : kind_(spec.kind),
        alpha_(static_cast<value_t>(spec.alpha)),
        beta_(static_cast<value_t>(spec.beta)) {}

  template <ActivationPath kPath>
  Vec forward(const Vec& y) const {
    if constexpr (kPath == ActivationPath::kIdentity) return y;
    if constexpr (kPath == ActivationPath::kReLU) return relu(y);
    if constexpr (kPath == ActivationPath::kAny) return any_forward(y);
  }

  // g * act'(y).
  template <ActivationPath kPath>
  Vec grad(const Vec& y, const Vec& g) const {
    if constexpr (kPath == ActivationPath::kIdentity) return g;
    if constexpr (kPath == ActivationPath::kReLU) return relu_grad(y, g);
    if constexpr (kPath == ActivationPath::kAny) return any_grad(y, g);
  }

 private:
  // max_ps returns its second operand where one is NaN: NaN propagates.
  static Vec relu(const Vec& y) { return at::vec::clamp_min(y, Vec(0)); }

  static Vec relu_grad(const Vec& y, const Vec& g) {
#ifdef CPU_CAPABILITY_AVX512
    if constexpr (std::is_same_v<Vec, at::vec::Vectorized<float>>) {
      // A compare into a mask register and a zero-masking move; at::vec's
      // compare and blend go through an all-ones vector and back. NaN <= 0
      // is false (ordered compare): the gradient passes, as in torch.
      return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NLE_UQ), g);
    }
#endif
    return Vec::blendv(g, Vec(0), y <= Vec(0));
  }

  Vec any_forward(const Vec& y) const {
    switch (kind_) {
      case Activation::Identity:
        return y;
      case Activation::ReLU:
        return relu(y);
      case Activation::Hardtanh:
        return at::vec::clamp(y, Vec(alpha_), Vec(beta_));
      case Activation::LeakyReLU:
        return Vec::blendv(y * Vec(alpha_), y, y > Vec(0));
      case Activation::SiLU:
        return y / (Vec(1) + y.neg().exp());
      case Activation::Hardswish:
        return y * at::vec::minimum(at::vec::maximum(y + Vec(3), Vec(0)), Vec(6)) / Vec(6);
      case Activation::ELU:
        return Vec::blendv(y.expm1() * Vec(alpha_), y, y > Vec(0));
    }
    return y;
  }

  Vec any_grad(const Vec& y, const Vec& g) const {
    switch (kind_) {
      case Activation::Identity:
        return g;
      case Activation::ReLU:
        return relu_grad(y, g);
      case Activation::Hardtanh:
        return Vec::blendv(g, Vec(0), (y <= Vec(alpha_)) | (y >= Vec(beta_)));
      case Activation::LeakyReLU:
        return Vec::blendv(g * Vec(alpha_), g, y > Vec(0));
      case Activation::SiLU: {
        const Vec s = Vec(1) / (Vec(1) + y.neg().exp());
        return g * s * (Vec(1) + y * (Vec(1) - s));
      }
      case Activation::Hardswish: {
        const Vec middle = Vec::blendv(g, g * (y / Vec(3) + Vec(0.5)), y <= Vec(3));
        return Vec::blendv(middle, Vec(0), y < Vec(-3));
      }
      case Activation::ELU:
        return Vec::blendv(g, g * Vec(alpha_) * y.exp(), y <= Vec(0));
    }
    return g;
  }

  Activation kind_;
  value_t alpha_;
  value_t beta_;
};

}  // namespace fused_bn::cpu::CPU_CAPABILITY
