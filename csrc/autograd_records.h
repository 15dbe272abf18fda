#pragma once
// Shared by the C++ autograd kernels (batch_norm_autograd.cpp,
// dropout_autograd.cpp): whether a call must go through its autograd node.
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/Optional.h>

namespace fused_bn {

inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}
inline bool has_tangent(const c10::optional<at::Tensor>& t) {
  return t.has_value() && has_tangent(*t);
}

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const c10::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}

// Whether autograd has anything to record for a call on these tensors
// (Tensor or optional<Tensor>): a gradient (grad mode on and one of them
// requires it) or a forward-mode tangent. Calls with nothing to record skip
// building a node. Variadic rather than a list of optionals, which would copy
// every tensor (two atomic reference counts each) on every call.
template <typename... Tensors>
bool autograd_records(const Tensors&... tensors) {
  const bool grad_mode = c10::GradMode::is_enabled();
  return ((grad_mode && requires_grad(tensors)) || ...) || (has_tangent(tensors) || ...);
}

}  // namespace fused_bn
