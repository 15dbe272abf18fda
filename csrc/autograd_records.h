#pragma once
// Shared by the C++ autograd kernels (batch_norm_autograd.cpp,
// dropout_autograd.cpp): whether a call must go through its autograd node.
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/Optional.h>

#include <initializer_list>

namespace fused_bn {

// Whether autograd has anything to record for a call on these tensors: a
// gradient (grad mode on and one of them requires it) or a forward-mode
// tangent. Calls with nothing to record skip building a node.
inline bool autograd_records(std::initializer_list<c10::optional<at::Tensor>> tensors) {
  const bool grad_mode = c10::GradMode::is_enabled();
  for (const c10::optional<at::Tensor>& t : tensors) {
    if (!t.has_value() || !t->defined()) continue;
    if ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

}  // namespace fused_bn
