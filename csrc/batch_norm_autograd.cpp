// Autograd of batch_norm_act, in C++ so that a differentiable call costs no
// Python: the forward and backward redispatch to the backend kernels (CPU,
// CUDA, or the fake kernels under torch.compile) below the Autograd key.
//
// Saved for backward: the input, the residual and the per-channel statistics
// (plus the parameters, which are alive anyway). The activation's derivative
// is recomputed from them, so the output is not kept. The running statistics
// are written by the forward (training) and are not differentiable, as in
// PyTorch. Second derivatives: batch_norm_double_backward.cpp.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "autograd_records.h"
#include "batch_norm_common.h"
#include "batch_norm_double_backward.h"

namespace fused_bn {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

TensorTriple batch_norm_act_below_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, bool training, optional<double> momentum,
    double eps, c10::string_view activation, c10::ArrayRef<double> activation_params,
    const optional<Tensor>& residual) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_bn::batch_norm_act", "")
          .typed<TensorTriple(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                              const optional<Tensor>&, const optional<Tensor>&,
                              const optional<Tensor>&, bool, optional<double>, double,
                              c10::string_view, c10::ArrayRef<double>,
                              const optional<Tensor>&)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                 momentum, eps, activation, activation_params, residual);
}

// PyTorch's error for a running statistic that requires grad where autograd
// records the call (native_batch_norm's, naming this op).
void check_running_stat_not_differentiable(const optional<Tensor>& stat, const char* name) {
  TORCH_CHECK(!(stat.has_value() && stat->defined() && stat->requires_grad()),
              "The function 'fused_bn::batch_norm_act' is not differentiable with respect to "
              "argument '", name, "'. This input cannot have requires_grad True.");
}

class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  // Tensor arguments first, so that the graph edges (one per defined tensor,
  // in argument order) are input, then residual, weight and bias where given.
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& residual, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var,
                               const optional<Tensor>& num_batches_tracked, bool training,
                               optional<double> momentum, double eps,
                               c10::string_view activation,
                               c10::ArrayRef<double> activation_params) {
    auto [output, mean, invstd] = batch_norm_act_below_autograd(
        input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
        eps, activation, activation_params, residual);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean,
                            invstd, residual.value_or(Tensor())});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["activation_params"] = activation_params.vec();
    ctx->mark_non_differentiable({mean, invstd});
    // mean and invstd never get a gradient: do not build zeros for them.
    ctx->set_materialize_grads(false);
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    constexpr size_t kArguments = 12;
    if (!grads[0].defined()) return variable_list(kArguments);  // no gradient reached the output
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &residual = saved[5];
    const GradEdges edges({true, residual.defined(), weight.defined(), bias.defined()});
    // Arguments: input 0, residual 1, weight 2, bias 3; the op's outputs are
    // grad_input, grad_weight, grad_bias, grad_residual.
    const std::array<bool, 4> mask = {edges.needed(ctx, 0), edges.needed(ctx, 2),
                                      edges.needed(ctx, 3), edges.needed(ctx, 1)};
    auto [grad_input, grad_weight, grad_bias, grad_residual] = batch_norm_act_backward_op(
        grads[0], input, optional_if_defined(weight), optional_if_defined(bias), saved[3],
        saved[4], ctx->saved_data["training"].toBool(),
        ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["activation_params"].toDoubleVector(), optional_if_defined(residual),
        mask);
    variable_list result(kArguments);
    if (mask[0]) result[0] = grad_input;
    if (mask[3]) result[1] = grad_residual;
    if (mask[1]) result[2] = grad_weight;
    if (mask[2]) result[3] = grad_bias;
    return result;
  }
};

TensorTriple batch_norm_act_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, bool training, optional<double> momentum,
    double eps, c10::string_view activation, c10::ArrayRef<double> activation_params,
    const optional<Tensor>& residual) {
  const auto requires_grad = [](const optional<Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  if (c10::GradMode::is_enabled() && (requires_grad(running_mean) || requires_grad(running_var))) {
    // PyTorch checks these first (and returns an empty batch as it is), the
    // dtypes only after.
    if (training) check_batch_size(input);
    check_eps(eps, training);
    check_batch_norm_shapes(input, weight, bias, running_mean, running_var);
    if (input.numel() > 0) {
      check_running_stat_not_differentiable(running_mean, "running_mean");
      check_running_stat_not_differentiable(running_var, "running_var");
    }
  }
  // Nothing to record (inference, or no tensor requires grad): no node.
  if (!autograd_records({input, weight, bias, residual})) {
    return batch_norm_act_below_autograd(input, weight, bias, running_mean, running_var,
                                         num_batches_tracked, training, momentum, eps, activation,
                                         activation_params, residual);
  }
  variable_list out = BatchNormActFunction::apply(
      input, residual, weight, bias, running_mean, running_var, num_batches_tracked, training,
      momentum, eps, activation, activation_params);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, Autograd, m) {
  m.impl("batch_norm_act", &batch_norm_act_autograd);
}

}  // namespace fused_bn
