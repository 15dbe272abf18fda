#pragma once
// Typed dispatcher handles of the ops that C++ calls by name: the autograd
// kernels below the Autograd key and the direct Python entry points
// (module.cpp). A typed call skips the boxed argument parsing of torch.ops.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace fused_bn {

using BatchNormActResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline BatchNormActResult call_batch_norm_act(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, bool training,
    c10::optional<double> momentum, double eps, c10::string_view activation,
    c10::ArrayRef<double> activation_params, const c10::optional<at::Tensor>& residual) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_bn::batch_norm_act", "")
          .typed<BatchNormActResult(
              const at::Tensor&, const c10::optional<at::Tensor>&,
              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool,
              c10::optional<double>, double, c10::string_view, c10::ArrayRef<double>,
              const c10::optional<at::Tensor>&)>();
  return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                 momentum, eps, activation, activation_params, residual);
}

inline std::tuple<at::Tensor, at::Tensor> call_dropout(const at::Tensor& input, double p,
                                                       const at::Tensor& seed_offset,
                                                       bool save_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_bn::dropout", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double,
                                                    const at::Tensor&, bool)>();
  return op.call(input, p, seed_offset, save_mask);
}

}  // namespace fused_bn
