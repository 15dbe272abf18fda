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
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "autograd_records.h"
#include "batch_norm_common.h"
#include "batch_norm_double_backward.h"
#include "op_calls.h"

namespace fused_bn {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::variable_list;
using TensorTriple = BatchNormActResult;

TensorTriple batch_norm_act_below_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, bool training, optional<double> momentum,
    double eps, c10::string_view activation, c10::ArrayRef<double> activation_params,
    const optional<Tensor>& residual) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_batch_norm_act(input, weight, bias, running_mean, running_var, num_batches_tracked,
                             training, momentum, eps, activation, activation_params, residual);
}

// PyTorch's error for a running statistic that requires grad where autograd
// records the call (native_batch_norm's, naming this op).
void check_running_stat_not_differentiable(const optional<Tensor>& stat, const char* name) {
  TORCH_CHECK(!requires_grad(stat),
              "The function 'fused_bn::batch_norm_act' is not differentiable with respect to "
              "argument '", name, "'. This input cannot have requires_grad True.");
}

// The backward node, written out as PyTorch's generated nodes are: the
// context of torch::autograd::Function (a string-keyed map, input and output
// metadata copies, a jvp closure) costs more host time per call than a whole
// small BatchNorm. Edges: 0 input, 1 residual, 2 weight, 3 bias (invalid where
// the argument is absent or needs no gradient). Only the output has a
// gradient; mean and invstd are returned without history.
struct BatchNormActBackward : public torch::autograd::Node {
  using SavedVariable = torch::autograd::SavedVariable;

  std::string name() const override { return "BatchNormActBackward"; }

  variable_list apply(variable_list&& grads) override {
    variable_list result(4);
    if (!grads[0].defined()) return result;  // no gradient reached the output
    const Tensor input = input_.unpack(), residual = residual_.unpack();
    const Tensor weight = weight_.unpack(), bias = bias_.unpack();
    // The op's outputs: grad_input, grad_weight, grad_bias, grad_residual.
    const std::array<bool, 4> mask = {should_compute_output(0), should_compute_output(2),
                                      should_compute_output(3), should_compute_output(1)};
    auto [grad_input, grad_weight, grad_bias, grad_residual] = batch_norm_act_backward_op(
        grads[0], input, optional_if_defined(weight), optional_if_defined(bias), mean_.unpack(),
        invstd_.unpack(), training_, activation_, activation_params_,
        optional_if_defined(residual), mask);
    if (mask[0]) result[0] = grad_input;
    if (mask[3]) result[1] = grad_residual;
    if (mask[1]) result[2] = grad_weight;
    if (mask[2]) result[3] = grad_bias;
    return result;
  }

  void release_variables() override {
    for (SavedVariable* saved : {&input_, &residual_, &weight_, &bias_, &mean_, &invstd_}) {
      saved->reset_data();
    }
  }

  SavedVariable input_, residual_, weight_, bias_, mean_, invstd_;
  bool training_ = true;
  std::string activation_;
  std::vector<double> activation_params_;
};

// Forward-mode AD has no formula here: fused_bn's Python layer computes with
// PyTorch's ops when a tangent is present; a direct call raises before
// anything (a running statistic) has changed.
template <typename... Tensors>
void check_no_tangent(const Tensors&... tensors) {
  TORCH_CHECK(!(has_tangent(tensors) || ...),
              "fused_bn::batch_norm_act: forward-mode AD (jvp) is not implemented for the "
              "fused op; fused_bn.functional and the modules compute with PyTorch's ops when "
              "a tangent is present");
}

TensorTriple batch_norm_act_recorded(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, bool training, optional<double> momentum,
    double eps, c10::string_view activation, c10::ArrayRef<double> activation_params,
    const optional<Tensor>& residual) {
  check_no_tangent(input, weight, bias, residual);
  using torch::autograd::SavedVariable;
  const auto node = c10::make_intrusive<BatchNormActBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, residual, weight, bias));
  auto [output, mean, invstd] = batch_norm_act_below_autograd(
      input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
      eps, activation, activation_params, residual);
  node->input_ = SavedVariable(input, /*is_output=*/false);
  node->residual_ = SavedVariable(residual.value_or(Tensor()), false);
  node->weight_ = SavedVariable(weight.value_or(Tensor()), false);
  node->bias_ = SavedVariable(bias.value_or(Tensor()), false);
  node->mean_ = SavedVariable(mean, false);
  node->invstd_ = SavedVariable(invstd, false);
  node->training_ = training;
  node->activation_ = std::string(activation);
  node->activation_params_ = activation_params.vec();
  torch::autograd::set_history(output, c10::intrusive_ptr<torch::autograd::Node>(node));
  return {output, mean, invstd};
}

TensorTriple batch_norm_act_autograd(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, bool training, optional<double> momentum,
    double eps, c10::string_view activation, c10::ArrayRef<double> activation_params,
    const optional<Tensor>& residual) {
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
  if (!autograd_records(input, weight, bias, residual)) {
    return batch_norm_act_below_autograd(input, weight, bias, running_mean, running_var,
                                         num_batches_tracked, training, momentum, eps, activation,
                                         activation_params, residual);
  }
  return batch_norm_act_recorded(input, weight, bias, running_mean, running_var,
                                 num_batches_tracked, training, momentum, eps, activation,
                                 activation_params, residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, Autograd, m) {
  m.impl("batch_norm_act", &batch_norm_act_autograd);
}

}  // namespace fused_bn
