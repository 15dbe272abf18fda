// Second derivatives of batch_norm_act: the Autograd kernel of
// batch_norm_act_backward. The usual backward (no create_graph) records
// nothing and runs the backend kernel directly; with create_graph=True the
// gradients record BatchNormActBackwardFunction, whose backward
// differentiates the backward formula written in differentiable ATen ops
// (composite_backward), matching nn.BatchNorm's and the activation modules'
// double backward. Third derivatives raise a clear error.
#include "batch_norm_double_backward.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <string>

#include "autograd_records.h"
#include "batch_norm_common.h"

namespace fused_bn {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

using BackwardSignature = TensorQuad(const Tensor&, const Tensor&, const optional<Tensor>&,
                                     const optional<Tensor>&, const Tensor&, const Tensor&, bool,
                                     c10::string_view, c10::ArrayRef<double>,
                                     const optional<Tensor>&, std::array<bool, 4>);

const c10::TypedOperatorHandle<BackwardSignature>& backward_handle() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_bn::batch_norm_act_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

}  // namespace

TensorQuad batch_norm_act_backward_op(const Tensor& grad_output, const Tensor& input,
                                      const optional<Tensor>& weight, const optional<Tensor>& bias,
                                      const Tensor& mean, const Tensor& invstd, bool training,
                                      c10::string_view activation,
                                      c10::ArrayRef<double> activation_params,
                                      const optional<Tensor>& residual,
                                      std::array<bool, 4> output_mask) {
  return backward_handle().call(grad_output, input, weight, bias, mean, invstd, training,
                                activation, activation_params, residual, output_mask);
}

namespace {

TensorQuad batch_norm_act_backward_below_autograd(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, bool training,
    c10::string_view activation, c10::ArrayRef<double> activation_params,
    const optional<Tensor>& residual, std::array<bool, 4> output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return batch_norm_act_backward_op(grad_output, input, weight, bias, mean, invstd, training,
                                    activation, activation_params, residual, output_mask);
}

// g * act'(y) in differentiable ATen ops: the derivative is a function of y
// for the smooth activations, and piecewise constant (taken as it is) for
// the others, with the kernels' choices at the kinks (activation.h).
Tensor composite_activation_grad(const ActivationSpec& act, const Tensor& y, const Tensor& g) {
  const Tensor y_const = y.detach();
  switch (act.kind) {
    case Activation::Identity:
      return g;
    case Activation::ReLU:
      return g * (y_const <= 0).logical_not();
    case Activation::Hardtanh:
      return g * ((y_const <= act.alpha) | (y_const >= act.beta)).logical_not();
    case Activation::LeakyReLU:
      return at::where(y_const > 0, g, g * act.alpha);
    case Activation::SiLU: {
      const Tensor s = at::sigmoid(y);
      return g * s * (1 + y * (1 - s));
    }
    case Activation::Hardswish:
      return at::where(y_const < -3, at::zeros_like(g), at::where(y_const <= 3, g * (y / 3 + 0.5), g));
    case Activation::ELU:
      return at::where(y_const <= 0, g * act.alpha * at::exp(y), g);
  }
  return g;
}

// The backward of batch_norm_act in differentiable ATen ops, for second
// derivatives: the same formulas as the kernels (batch_norm_math.h), in the
// statistics' dtype. In training the mean and invstd are functions of the
// input whose values are the saved ones: mean(x) - mean(x).detach() + mean,
// and rsqrt(var(x) - var(x).detach() + invstd^-2), which is rsqrt(var + eps)
// without needing eps (the backward op is not given it). Returns the
// gradients of input, weight, bias and residual.
TensorQuad composite_backward(const Tensor& grad_output, const Tensor& input, const Tensor& weight,
                              const Tensor& bias, const Tensor& residual, const Tensor& mean,
                              const Tensor& invstd, bool training, const ActivationSpec& act) {
  const auto acc = invstd.scalar_type();
  std::vector<int64_t> reduce_dims{0}, channel_shape(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);
  channel_shape[1] = input.size(1);
  const auto per_channel = [&](const Tensor& t) { return t.to(acc).reshape(channel_shape); };
  const Tensor x = input.to(acc), g_out = grad_output.to(acc);
  Tensor mu = per_channel(mean).detach(), inv = per_channel(invstd).detach();
  if (training) {
    const Tensor batch_mean = x.mean(reduce_dims, /*keepdim=*/true);
    const Tensor batch_var = at::var(x, reduce_dims, /*correction=*/at::Scalar(0), /*keepdim=*/true);
    mu = batch_mean - batch_mean.detach() + mu;
    inv = (batch_var - batch_var.detach() + inv.pow(-2)).rsqrt();
  }
  const Tensor w = weight.defined() ? per_channel(weight) : at::ones_like(mu);
  const Tensor x_hat = (x - mu) * inv;
  Tensor y = x_hat * w;
  if (bias.defined()) y = y + per_channel(bias);
  if (residual.defined()) y = y + residual.to(acc);
  const Tensor g = composite_activation_grad(act, y, g_out);
  const Tensor sum_g = g.sum(reduce_dims, /*keepdim=*/true);
  const Tensor sum_g_xhat = (g * x_hat).sum(reduce_dims, /*keepdim=*/true);
  Tensor grad_input = g;
  if (training) {
    const double count = static_cast<double>(input.numel() / input.size(1));
    grad_input = g - sum_g / count - x_hat * (sum_g_xhat / count);
  }
  grad_input = (grad_input * (w * inv)).to(input.scalar_type());
  // The dtypes of batch_norm_act_backward's outputs.
  const auto param_grad = [&](const Tensor& sum, const Tensor& p) {
    return p.defined() ? sum.flatten().to(p.scalar_type()).reshape(p.sizes()) : sum.flatten();
  };
  const Tensor grad_residual = residual.defined() ? g.to(residual.scalar_type()) : Tensor();
  return {grad_input, param_grad(sum_g_xhat, weight), param_grad(sum_g, bias), grad_residual};
}

// The gradients of batch_norm_act as a graph node, so that they can be
// differentiated again: its backward differentiates composite_backward.
class BatchNormActBackwardFunction
    : public torch::autograd::Function<BatchNormActBackwardFunction> {
 public:
  // The differentiable tensors first (grad_output, input, weight, bias,
  // residual), then the statistics: see GradEdges.
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_output,
                               const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& residual,
                               const Tensor& mean, const Tensor& invstd, bool training,
                               c10::string_view activation,
                               c10::ArrayRef<double> activation_params,
                               std::array<bool, 4> output_mask) {
    auto [grad_input, grad_weight, grad_bias, grad_residual] =
        batch_norm_act_backward_below_autograd(grad_output, input, weight, bias, mean, invstd,
                                               training, activation, activation_params, residual,
                                               output_mask);
    ctx->save_for_backward({grad_output, input, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            residual.value_or(Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["activation_params"] = activation_params.vec();
    ctx->saved_data["output_mask"] = std::vector<bool>(output_mask.begin(), output_mask.end());
    // The outputs left out by output_mask are empty: build no zeros for them.
    ctx->set_materialize_grads(false);
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }

  // grads: of grad_input, grad_weight, grad_bias, grad_residual. Returns the
  // partial derivatives of their sum weighted by `grads` with respect to
  // grad_output, input, weight, bias and residual (autograd composes them
  // with the graph of each: the composite is built on detached stand-ins).
  // The statistics are the input's batch statistics in training and
  // constants in eval, as nn.BatchNorm's running statistics are.
  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    constexpr int kDifferentiable = 5;  // grad_output, input, weight, bias, residual
    const variable_list saved = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();
    const GradEdges edges({true, true, saved[2].defined(), saved[3].defined(), saved[4].defined()});
    bool needed[kDifferentiable];
    Tensor stand_ins[kDifferentiable];
    for (int k = 0; k < kDifferentiable; ++k) {
      needed[k] = edges.needed(ctx, k);
      if (saved[k].defined()) stand_ins[k] = saved[k].detach().requires_grad_(needed[k]);
    }
    variable_list found(kDifferentiable);
    {
      const at::AutoGradMode enable_grad(true);
      const ActivationSpec act =
          parse_activation(ctx->saved_data["activation"].toStringRef(),
                           ctx->saved_data["activation_params"].toDoubleVector());
      const auto outputs =
          composite_backward(stand_ins[0], stand_ins[1], stand_ins[2], stand_ins[3], stand_ins[4],
                             saved[5], saved[6], ctx->saved_data["training"].toBool(), act);
      const Tensor composite[4] = {std::get<0>(outputs), std::get<1>(outputs),
                                   std::get<2>(outputs), std::get<3>(outputs)};
      variable_list wanted, outputs_used, grads_used;
      for (int k = 0; k < kDifferentiable; ++k) {
        if (needed[k]) wanted.push_back(stand_ins[k]);
      }
      const auto computed = ctx->saved_data["output_mask"].toBoolList();
      for (int k = 0; k < 4; ++k) {
        // Not detached: under vmap (batched gradients) detach has no batching rule.
        if (computed.get(k) && grads[k].defined() && composite[k].defined() &&
            composite[k].requires_grad()) {
          outputs_used.push_back(composite[k]);
          grads_used.push_back(grads[k]);
        }
      }
      if (!wanted.empty() && !outputs_used.empty()) {
        const variable_list partials = torch::autograd::grad(
            outputs_used, wanted, grads_used, /*retain_graph=*/false, /*create_graph=*/false,
            /*allow_unused=*/true);
        size_t next = 0;
        for (int k = 0; k < kDifferentiable; ++k) {
          if (needed[k]) found[k] = partials[next++];
        }
      }
    }
    // As nn.BatchNorm's double backward: a zero, not a missing, gradient where
    // one is needed and nothing flows.
    variable_list result(11);  // the forward's arguments
    for (int k = 0; k < kDifferentiable; ++k) {
      if (needed[k]) result[k] = found[k].defined() ? found[k] : at::zeros_like(saved[k]);
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

TensorQuad batch_norm_act_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, bool training,
    c10::string_view activation, c10::ArrayRef<double> activation_params,
    const optional<Tensor>& residual, std::array<bool, 4> output_mask) {
  // The usual backward (no create_graph) records nothing: skip building a node.
  if (!autograd_records(grad_output, input, weight, bias, residual, mean, invstd)) {
    return batch_norm_act_backward_below_autograd(grad_output, input, weight, bias, mean, invstd,
                                                  training, activation, activation_params,
                                                  residual, output_mask);
  }
  variable_list out = BatchNormActBackwardFunction::apply(
      grad_output, input, weight, bias, residual, mean, invstd, training, activation,
      activation_params, output_mask);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, Autograd, m) {
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_autograd);
}

}  // namespace fused_bn
