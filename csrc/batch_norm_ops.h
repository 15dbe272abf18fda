#pragma once
// The BatchNorm(+activation) ops of ops.cpp for any backend: argument checks,
// layout canonicalization, allocation, the empty-batch rules and the running
// statistics' update live here once; a backend supplies the loops as
// `Kernels` (static functions with the signatures of cpu/batch_norm_kernel.h,
// plus its update_running_stats, eval_stats and multiply_channels_) and registers
// BatchNormOps<Kernels>::register_kernels in its TORCH_LIBRARY_IMPL block.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "batch_norm_common.h"
#include "cpu/batch_norm_kernel.h"
#include "output_placement.h"
#include "running_stats.h"

namespace fused_bn {

template <typename Kernels>
struct BatchNormOps {
  using Tensor = at::Tensor;
  template <typename T>
  using optional = c10::optional<T>;
  using ChannelView = cpu::ChannelView;
  using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

  static void register_kernels(torch::Library& m) {
    m.impl("batch_norm_act", &batch_norm_act);
    m.impl("batch_norm_act_backward", &batch_norm_act_backward);
    m.impl("batch_norm_stats", &batch_norm_stats);
    m.impl("batch_norm_act_elemt", &batch_norm_act_elemt);
    m.impl("batch_norm_act_backward_reduce", &batch_norm_act_backward_reduce);
    m.impl("batch_norm_act_backward_elemt", &batch_norm_act_backward_elemt);
  }

  // Inputs of the ops, canonicalized once.
  struct Prepared {
    Tensor input;  // contiguous in output_memory_format(input)
    ChannelView view;
    Tensor weight;  // accumulation dtype, ones where absent
    Tensor bias;    // accumulation dtype, zeros where absent
  };

  static void check_device(const Tensor& input, const char* op) {
    TORCH_CHECK(input.device().type() == Kernels::kDeviceType, "fused_bn::", op,
                ": expected input on a ", c10::DeviceTypeName(Kernels::kDeviceType),
                " device, got ", input.device());
  }

  static Prepared prepare(const Tensor& input, const optional<Tensor>& weight,
                          const optional<Tensor>& bias) {
    Prepared p;
    p.view = cpu::make_channel_view(input, p.input);
    p.weight = channel_param_or(weight, input, 1.0);
    p.bias = channel_param_or(bias, input, 0.0);
    return p;
  }

  // `t` (a residual or a gradient) in the memory layout of the prepared input.
  static Tensor like_prepared(const Tensor& t, const Prepared& p) {
    return t.contiguous(output_memory_format(p.input));
  }

  static Tensor channel_stat_like(const Tensor& input) {
    return at::empty({input.size(1)}, input.options().dtype(accumulate_type(input)));
  }

  static Tensor defined_or_empty(const Tensor& t, const Tensor& like) {
    return t.defined() ? t : at::empty({0}, like.options());
  }

  // The checks of the ops that take saved statistics (and a gradient, when
  // grad_output is given).
  static void check_stats_op(const char* op, const Tensor& input, const optional<Tensor>& weight,
                             const optional<Tensor>& bias, const Tensor& mean,
                             const Tensor& invstd, const Tensor* grad_output = nullptr) {
    check_device(input, op);
    check_batch_norm_inputs(input, weight, bias, c10::nullopt, c10::nullopt);
    if (grad_output != nullptr) check_like_input(*grad_output, input, "grad_output");
    check_channel_stat(input, mean, "mean");
    check_channel_stat(input, invstd, "invstd");
  }

  static Tensor param_grad(const Tensor& sum, const optional<Tensor>& param) {
    if (!param.has_value() || !param->defined()) return sum;
    if (param->scalar_type() == sum.scalar_type() && param->sizes() == sum.sizes()) return sum;
    return sum.to(param->scalar_type()).reshape(param->sizes());
  }

  // An empty batch, as PyTorch returns it before looking at the parameters:
  // an empty output and zero statistics; the running statistics stay as they
  // are (num_batches_tracked still counts the step, as in nn.BatchNorm).
  static TensorTriple empty_batch(const Tensor& input, const optional<Tensor>& weight,
                                  const optional<Tensor>& bias,
                                  const optional<Tensor>& num_batches_tracked) {
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      num_batches_tracked->add_(1);
    }
    const auto stat_options = input.options().dtype(accumulate_type(input));
    // PyTorch returns input.clone() * weight[0] + bias[0]: the input's strides
    // (an empty channels-last tensor is also "contiguous", so
    // output_memory_format cannot tell), the dtype those ops promote to.
    at::ScalarType dtype = input.scalar_type();
    for (const optional<Tensor>* param : {&weight, &bias}) {
      if (param->has_value() && (*param)->defined() && (*param)->numel() > 0) {
        dtype = at::result_type(at::empty({0}, input.options().dtype(dtype)),
                                (*param)->reshape({-1})[0]);
      }
    }
    return {at::empty_like(input, input.options().dtype(dtype)),
            at::zeros({input.size(1)}, stat_options), at::zeros({input.size(1)}, stat_options)};
  }

  static TensorTriple batch_norm_act(const Tensor& input, const optional<Tensor>& weight,
                                     const optional<Tensor>& bias,
                                     const optional<Tensor>& running_mean,
                                     const optional<Tensor>& running_var,
                                     const optional<Tensor>& num_batches_tracked, bool training,
                                     optional<double> momentum, double eps,
                                     c10::string_view activation,
                                     c10::ArrayRef<double> activation_params,
                                     const optional<Tensor>& residual) {
    check_device(input, "batch_norm_act");
    // Every check first: a call that raises changes nothing.
    const ActivationSpec act =
        check_batch_norm_act_args(input, weight, bias, running_mean, running_var,
                                  num_batches_tracked, training, momentum, eps, activation,
                                  activation_params, residual);
    if (input.numel() == 0) {
      return empty_batch(input, weight, bias, training ? num_batches_tracked : c10::nullopt);
    }
    const bool has_residual = residual.has_value() && residual->defined();
    const bool has_running = running_mean.has_value() && running_mean->defined() &&
                             running_var.has_value() && running_var->defined();
    const c10::DeviceGuard guard(input.device());
    Prepared p = prepare(input, weight, bias);
    const Tensor res = has_residual ? like_prepared(*residual, p) : Tensor();
    Tensor output = has_residual ? empty_like_placed(p.input, {p.input, res})
                                 : empty_like_placed(p.input, {p.input});
    Tensor mean = channel_stat_like(input);
    Tensor invstd = channel_stat_like(input);
    const int64_t count = p.view.count();  // > 0: empty inputs returned above
    if (!training) {
      Kernels::eval_stats(*running_mean, *running_var, eps, mean, invstd);
      Kernels::batch_norm_act_elemt_kernel(p.input, p.view, mean, invstd, p.weight, p.bias, act,
                                           res, output);
      return {output, mean, invstd};
    }
    Kernels::batch_norm_act_train_kernel(p.input, p.view, p.weight, p.bias, eps, act, res, output,
                                         mean, invstd);
    if (has_running) {
      Tensor rm = *running_mean, rv = *running_var;
      Kernels::update_running_stats(rm, rv, num_batches_tracked, mean, invstd, momentum, eps,
                                    count);
    } else if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      num_batches_tracked->add_(1);
    }
    return {output, mean, invstd};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward(
      const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
      const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, bool training,
      c10::string_view activation, c10::ArrayRef<double> activation_params,
      const optional<Tensor>& residual, std::array<bool, 4> output_mask) {
    check_stats_op("batch_norm_act_backward", input, weight, bias, mean, invstd, &grad_output);
    const ActivationSpec act = parse_activation(activation, activation_params);
    const bool has_residual = residual.has_value() && residual->defined();
    if (has_residual) check_like_input(*residual, input, "residual");
    const c10::DeviceGuard guard(input.device());
    Prepared p = prepare(input, weight, bias);
    const Tensor dy = like_prepared(grad_output, p);
    const Tensor res = has_residual ? like_prepared(*residual, p) : Tensor();
    Tensor grad_input, grad_residual;
    if (output_mask[0]) grad_input = empty_like_placed(p.input, {p.input, dy});
    if (output_mask[3] && has_residual) grad_residual = empty_like_placed(p.input, {p.input, dy});
    Tensor sum_dy = channel_stat_like(input);
    Tensor sum_dy_xmu = channel_stat_like(input);
    const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
    if (p.view.count() == 0) {  // empty batch: the sums are empty sums
      sum_dy.zero_();
      sum_dy_xmu.zero_();
    } else {
      Kernels::batch_norm_act_backward_kernel(dy, p.input, p.view, mean_c, invstd_c, p.weight,
                                              p.bias, training, act, res, grad_input,
                                              grad_residual, sum_dy, sum_dy_xmu);
    }
    // In place: sum_dy_xmu is this call's own (one allocation less per backward).
    if (output_mask[1]) Kernels::multiply_channels_(sum_dy_xmu, invstd_c);
    const Tensor grad_weight = output_mask[1] ? param_grad(sum_dy_xmu, weight) : Tensor();
    const Tensor grad_bias = output_mask[2] ? param_grad(sum_dy, bias) : Tensor();
    return {defined_or_empty(grad_input, input), defined_or_empty(grad_weight, mean),
            defined_or_empty(grad_bias, mean), defined_or_empty(grad_residual, input)};
  }

  static std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
    check_device(input, "batch_norm_stats");
    check_batch_norm_inputs(input, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt);
    const c10::DeviceGuard guard(input.device());
    Tensor contiguous;
    const ChannelView view = cpu::make_channel_view(input, contiguous);
    Tensor mean = channel_stat_like(input);
    Tensor m2 = channel_stat_like(input);
    if (view.count() == 0) return {mean.zero_(), m2.zero_()};
    Kernels::batch_norm_stats_kernel(contiguous, view, mean, m2);
    return {mean, m2};
  }

  static Tensor batch_norm_act_elemt(const Tensor& input, const optional<Tensor>& weight,
                                     const optional<Tensor>& bias, const Tensor& mean,
                                     const Tensor& invstd, c10::string_view activation,
                                     c10::ArrayRef<double> activation_params) {
    check_stats_op("batch_norm_act_elemt", input, weight, bias, mean, invstd);
    const ActivationSpec act = parse_activation(activation, activation_params);
    const c10::DeviceGuard guard(input.device());
    Prepared p = prepare(input, weight, bias);
    Tensor output = empty_like_placed(p.input, {p.input});
    if (p.view.count() == 0) return output;
    Kernels::batch_norm_act_elemt_kernel(p.input, p.view, mean.contiguous(), invstd.contiguous(),
                                         p.weight, p.bias, act, Tensor(), output);
    return output;
  }

  static std::tuple<Tensor, Tensor> batch_norm_act_backward_reduce(
      const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
      const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd,
      c10::string_view activation, c10::ArrayRef<double> activation_params) {
    check_stats_op("batch_norm_act_backward_reduce", input, weight, bias, mean, invstd,
                   &grad_output);
    const ActivationSpec act = parse_activation(activation, activation_params);
    const c10::DeviceGuard guard(input.device());
    Prepared p = prepare(input, weight, bias);
    Tensor sum_dy = channel_stat_like(input);
    Tensor sum_dy_xmu = channel_stat_like(input);
    if (p.view.count() == 0) return {sum_dy.zero_(), sum_dy_xmu.zero_()};
    Kernels::batch_norm_act_backward_reduce_kernel(like_prepared(grad_output, p), p.input, p.view,
                                                   mean.contiguous(), invstd.contiguous(),
                                                   p.weight, p.bias, act, sum_dy, sum_dy_xmu);
    return {sum_dy, sum_dy_xmu};
  }

  static Tensor batch_norm_act_backward_elemt(
      const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
      const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd,
      const Tensor& mean_dy, const Tensor& mean_dy_xmu, c10::string_view activation,
      c10::ArrayRef<double> activation_params) {
    check_stats_op("batch_norm_act_backward_elemt", input, weight, bias, mean, invstd, &grad_output);
    check_channel_stat(input, mean_dy, "mean_dy");
    check_channel_stat(input, mean_dy_xmu, "mean_dy_xmu");
    const ActivationSpec act = parse_activation(activation, activation_params);
    const c10::DeviceGuard guard(input.device());
    Prepared p = prepare(input, weight, bias);
    const Tensor dy = like_prepared(grad_output, p);
    Tensor grad_input = empty_like_placed(p.input, {p.input, dy});
    if (p.view.count() == 0) return grad_input;
    Kernels::batch_norm_act_backward_elemt_kernel(
        dy, p.input, p.view, mean.contiguous(), invstd.contiguous(), p.weight, p.bias,
        mean_dy.contiguous(), mean_dy_xmu.contiguous(), /*training=*/true, act, grad_input);
    return grad_input;
  }
};

}  // namespace fused_bn
