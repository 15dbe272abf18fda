// Autograd of batch_norm_act, in C++ so that a differentiable call costs no
// Python: the forward and backward redispatch to the backend kernels (CPU,
// CUDA, or the fake kernels under torch.compile) below the Autograd key.
//
// Saved for backward: the input and the per-channel statistics (plus the
// parameters, which are alive anyway). The activation mask is recomputed from
// them, so the output is not kept.
//
// Second derivatives (create_graph=True, then backward through the gradients)
// differentiate the backward formula written in differentiable ATen ops
// (composite_backward below); that path is only taken when the gradients
// themselves are differentiated.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "autograd_records.h"

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
// the gradients record BatchNormActBackwardFunction (second derivatives).
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
    // mean and invstd never get a gradient: do not build zeros for them.
    ctx->set_materialize_grads(false);
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    if (!grads[0].defined()) return variable_list(8);  // no gradient reached the output
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

// The backward of batch_norm_act in differentiable ATen ops, for second
// derivatives: the same formulas as the kernels (batch_norm_math.h), in the
// statistics' dtype. In training the mean and invstd are functions of the
// input whose values are the saved ones: mean(x) - mean(x).detach() + mean,
// and rsqrt(var(x) - var(x).detach() + invstd^-2), which is rsqrt(var + eps)
// without needing eps (the backward op is not given it). The activation mask
// is piecewise constant and taken as it is.
TensorTriple composite_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                                const Tensor& bias, const Tensor& mean, const Tensor& invstd,
                                bool training, c10::string_view activation) {
  const auto acc = invstd.scalar_type();
  std::vector<int64_t> reduce_dims{0}, channel_shape(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);
  channel_shape[1] = input.size(1);
  const auto per_channel = [&](const Tensor& t) { return t.to(acc).view(channel_shape); };
  const Tensor x = input.to(acc), g_out = grad_output.to(acc);
  Tensor mu = per_channel(mean).detach(), inv = per_channel(invstd).detach();
  if (training) {
    const Tensor batch_mean = x.mean(reduce_dims, /*keepdim=*/true);
    const Tensor batch_var = at::var(x, reduce_dims, /*correction=*/at::Scalar(0), /*keepdim=*/true);
    mu = batch_mean - batch_mean.detach() + mu;
    inv = (batch_var - batch_var.detach() + inv.pow(-2)).rsqrt();
  }
  const Tensor w = weight.defined() ? per_channel(weight) : at::ones_like(mu);
  Tensor g = g_out;
  if (activation == "relu") {
    const Tensor scale = (inv * w).detach();
    const Tensor shift = (bias.defined() ? per_channel(bias).detach() : at::zeros_like(mu)) -
                         mu.detach() * scale;
    g = g_out * ((x.detach() * scale + shift) > 0);
  }
  const Tensor x_hat = (x - mu) * inv;
  const Tensor sum_g = g.sum(reduce_dims, /*keepdim=*/true);
  const Tensor sum_g_xhat = (g * x_hat).sum(reduce_dims, /*keepdim=*/true);
  Tensor grad_input = g;
  if (training) {
    const double count = static_cast<double>(input.numel() / input.size(1));
    grad_input = g - sum_g / count - x_hat * (sum_g_xhat / count);
  }
  grad_input = (grad_input * (w * inv)).to(input.scalar_type());
  // The dtypes of batch_norm_act_backward's outputs.
  const auto param_dtype = [&](const Tensor& p) { return p.defined() ? p.scalar_type() : acc; };
  return {grad_input, sum_g_xhat.flatten().to(param_dtype(weight)), sum_g.flatten().to(param_dtype(bias))};
}

// The gradients of batch_norm_act as a graph node, so that they can be
// differentiated again: its backward differentiates composite_backward.
class BatchNormActBackwardFunction
    : public torch::autograd::Function<BatchNormActBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_output,
                               const Tensor& input, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, const Tensor& mean,
                               const Tensor& invstd, bool training, c10::string_view activation) {
    auto [grad_input, grad_weight, grad_bias] = batch_norm_act_backward_below_autograd(
        grad_output, input, weight, bias, mean, invstd, training, activation);
    ctx->save_for_backward({grad_output, input, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    return {grad_input, grad_weight, grad_bias};
  }

  // grads: of grad_input, grad_weight, grad_bias. Returns the partial
  // derivatives of their sum weighted by `grads` with respect to grad_output,
  // input and weight (autograd composes them with the graph of each: the
  // composite is built on detached stand-ins). bias enters only through the
  // piecewise constant mask (a zero gradient); the statistics are the input's
  // batch statistics in training and constants in eval, as nn.BatchNorm's
  // running statistics are. Third derivatives raise a clear error.
  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();
    const Tensor& weight = saved[2];
    const Tensor& bias = saved[3];
    const bool needed[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                            weight.defined() && ctx->needs_input_grad(2)};
    const Tensor originals[3] = {saved[0], saved[1], weight};
    Tensor stand_ins[3];
    for (int k = 0; k < 3; ++k) {
      if (originals[k].defined()) stand_ins[k] = originals[k].detach().requires_grad_(needed[k]);
    }
    variable_list found(3);
    {
      const at::AutoGradMode enable_grad(true);
      const auto outputs = composite_backward(
          stand_ins[0], stand_ins[1], stand_ins[2], bias, saved[4], saved[5],
          ctx->saved_data["training"].toBool(), ctx->saved_data["activation"].toStringRef());
      const Tensor composite[3] = {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs)};
      variable_list wanted, outputs_used, grads_used;
      for (int k = 0; k < 3; ++k) {
        if (needed[k]) wanted.push_back(stand_ins[k]);
        if (grads[k].defined() && composite[k].requires_grad()) {
          outputs_used.push_back(composite[k]);
          grads_used.push_back(grads[k].detach());
        }
      }
      if (!wanted.empty() && !outputs_used.empty()) {
        const variable_list partials = torch::autograd::grad(
            outputs_used, wanted, grads_used, /*retain_graph=*/false, /*create_graph=*/false,
            /*allow_unused=*/true);
        size_t next = 0;
        for (int k = 0; k < 3; ++k) {
          if (needed[k]) found[k] = partials[next++];
        }
      }
    }
    // As nn.BatchNorm's double backward: a zero, not a missing, gradient where
    // one is needed and nothing flows (bias, for one).
    variable_list result(8);  // grad_output, input, weight, bias, mean, invstd, training, activation
    for (int k = 0; k < 3; ++k) {
      if (needed[k]) result[k] = found[k].defined() ? found[k] : at::zeros_like(originals[k]);
    }
    if (bias.defined() && ctx->needs_input_grad(weight.defined() ? 3 : 2)) {
      result[3] = at::zeros_like(bias);
    }
    return create_graph ? refuse_third_derivative(std::move(result)) : result;
  }

 private:
  // The gradients as tensors whose own gradient raises (a third derivative),
  // as Python's @once_differentiable makes them.
  static variable_list refuse_third_derivative(variable_list grads) {
    for (Tensor& g : grads) {
      if (g.defined()) g = g.detach().requires_grad_();
    }
    torch::autograd::DelayedError error(
        "fused_bn::batch_norm_act: third derivatives are not supported", grads.size());
    return error.apply(std::move(grads));
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
