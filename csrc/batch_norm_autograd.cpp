// Autograd of batch_norm_act, in C++ so that a differentiable call costs no
// Python: the forward and backward redispatch to the backend kernels (CPU,
// CUDA, or the fake kernels under torch.compile) below the Autograd key.
//
// Saved for backward: the input and the per-channel statistics (plus the
// parameters, which are alive anyway). The activation mask is recomputed from
// them, so the output is not kept.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>

namespace fused_bn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

TensorTriple batch_norm_act_below_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                                           const c10::optional<Tensor>& bias,
                                           const c10::optional<Tensor>& running_mean,
                                           const c10::optional<Tensor>& running_var, bool training,
                                           double eps, c10::string_view activation) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_bn::batch_norm_act", "")
          .typed<TensorTriple(const Tensor&, const c10::optional<Tensor>&,
                              const c10::optional<Tensor>&, const c10::optional<Tensor>&,
                              const c10::optional<Tensor>&, bool, double, c10::string_view)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weight, bias, running_mean, running_var, training, eps, activation);
}

// Through the dispatcher from the Autograd key, so that with create_graph=True
// the gradients record BatchNormActBackwardFunction (which refuses a second
// derivative) instead of silently having none.
TensorTriple batch_norm_act_backward_op(const Tensor& grad_output, const Tensor& input,
                                        const c10::optional<Tensor>& weight,
                                        const c10::optional<Tensor>& bias, const Tensor& mean,
                                        const Tensor& invstd, bool training,
                                        c10::string_view activation) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_bn::batch_norm_act_backward", "")
          .typed<TensorTriple(const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                              const c10::optional<Tensor>&, const Tensor&, const Tensor&, bool,
                              c10::string_view)>();
  return op.call(grad_output, input, weight, bias, mean, invstd, training, activation);
}

TensorTriple batch_norm_act_backward_below_autograd(
    const Tensor& grad_output, const Tensor& input, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, bool training,
    c10::string_view activation) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return batch_norm_act_backward_op(grad_output, input, weight, bias, mean, invstd, training,
                                    activation);
}

c10::optional<Tensor> optional_if_defined(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias,
                               const c10::optional<Tensor>& running_mean,
                               const c10::optional<Tensor>& running_var, bool training, double eps,
                               c10::string_view activation) {
    auto [output, mean, invstd] = batch_norm_act_below_autograd(
        input, weight, bias, running_mean, running_var, training, eps, activation);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean,
                            invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({mean, invstd});
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2];
    auto [grad_input, grad_weight, grad_bias] = batch_norm_act_backward_op(
        grads[0], input, optional_if_defined(weight), optional_if_defined(bias), saved[3],
        saved[4], ctx->saved_data["training"].toBool(),
        ctx->saved_data["activation"].toStringRef());
    // Graph edges exist only for the tensors that were given: input, then
    // weight and bias when present.
    const size_t weight_edge = 1;
    const size_t bias_edge = weight.defined() ? 2 : 1;
    const bool input_needed = ctx->needs_input_grad(0);
    const bool weight_needed = weight.defined() && ctx->needs_input_grad(weight_edge);
    const bool bias_needed = bias.defined() && ctx->needs_input_grad(bias_edge);
    return {input_needed ? grad_input : Tensor(),
            weight_needed ? grad_weight : Tensor(),
            bias_needed ? grad_bias : Tensor(),
            Tensor(),  // running_mean
            Tensor(),  // running_var
            Tensor(),  // training
            Tensor(),  // eps
            Tensor()};  // activation
  }
};

// The gradients of batch_norm_act as a graph node that refuses to be
// differentiated again: second derivatives are not implemented.
class BatchNormActBackwardFunction
    : public torch::autograd::Function<BatchNormActBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Tensor& grad_output,
                               const Tensor& input, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, const Tensor& mean,
                               const Tensor& invstd, bool training, c10::string_view activation) {
    auto [grad_input, grad_weight, grad_bias] = batch_norm_act_backward_below_autograd(
        grad_output, input, weight, bias, mean, invstd, training, activation);
    return {grad_input, grad_weight, grad_bias};
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK(false,
                "fused_bn::batch_norm_act: double backward (the gradient of its gradient) is not "
                "supported");
  }
};

TensorTriple batch_norm_act_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                                     const c10::optional<Tensor>& bias,
                                     const c10::optional<Tensor>& running_mean,
                                     const c10::optional<Tensor>& running_var, bool training,
                                     double eps, c10::string_view activation) {
  variable_list out = BatchNormActFunction::apply(input, weight, bias, running_mean, running_var,
                                                  training, eps, activation);
  return {out[0], out[1], out[2]};
}

// Whether autograd has anything to record for a call on these tensors: a
// gradient (grad mode on and one of them requires it) or a forward-mode tangent.
bool autograd_records(std::initializer_list<c10::optional<Tensor>> tensors) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const c10::optional<Tensor>& t : tensors) {
    if (!t.has_value() || !t->defined()) continue;
    if ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

TensorTriple batch_norm_act_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                              const c10::optional<Tensor>& weight,
                                              const c10::optional<Tensor>& bias,
                                              const Tensor& mean, const Tensor& invstd,
                                              bool training, c10::string_view activation) {
  // The usual backward (no create_graph) records nothing: skip building a node.
  if (!autograd_records({grad_output, input, weight, bias, mean, invstd})) {
    return batch_norm_act_backward_below_autograd(grad_output, input, weight, bias, mean, invstd,
                                                  training, activation);
  }
  variable_list out = BatchNormActBackwardFunction::apply(grad_output, input, weight, bias, mean,
                                                          invstd, training, activation);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, Autograd, m) {
  m.impl("batch_norm_act", &batch_norm_act_autograd);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_autograd);
}

}  // namespace fused_bn
