#pragma once
// Host-side pieces shared by the CPU and CUDA BatchNorm ops: argument checks
// (in PyTorch's wording where PyTorch has one, so that fused_bn is a drop-in),
// the activation's parsing, the accumulation dtype and the output layout rule.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "fused_bn/activation.h"

namespace fused_bn {

// The activation named `name` with `params` (see ops.cpp); raises on an
// unknown name or a wrong number of parameters.
ActivationSpec parse_activation(c10::string_view name, c10::ArrayRef<double> params);

// Input of at least 2 dims; per-channel tensors of C elements (any shape) on
// the input's device. PyTorch checks these before anything else.
void check_batch_norm_shapes(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var);

// check_batch_norm_shapes, then a floating input dtype; per-channel tensors of C
// elements (any shape) on the input's device, with PyTorch's dtype rules: all
// of the input's dtype, or all float32 for float16/bfloat16 input (mixed
// precision). Nothing but the dimensions is checked for an empty input, which
// PyTorch returns without looking at the parameters.
void check_batch_norm_inputs(const at::Tensor& input,
                             const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var);

// Every check batch_norm_act makes before it computes anything (in
// F.batch_norm's order: batch size, eps, then the tensors); returns the
// activation. Also used before a synchronized step's first collective.
ActivationSpec check_batch_norm_act_args(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, bool training,
    c10::optional<double> momentum, double eps, c10::string_view activation,
    c10::ArrayRef<double> activation_params, const c10::optional<at::Tensor>& residual,
    bool check_values_per_channel = true);

// eps as F.batch_norm accepts it: positive in training, non-negative otherwise.
void check_eps(double eps, bool training);

// In training, more than one value per channel (F.batch_norm's check and message).
void check_batch_size(const at::Tensor& input);

// A per-channel statistics tensor (mean, invstd, gradient sums) as the ops
// produce them: C elements of the accumulation dtype on the input's device.
void check_channel_stat(const at::Tensor& input, const at::Tensor& stat, const char* name);

// A tensor that must match the input's shape, device and dtype (grad_output, residual).
void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name);

// Accumulation dtype: float64 for float64 input, float32 otherwise.
at::ScalarType accumulate_type(const at::Tensor& input);

// The memory format of every tensor a BatchNorm op returns in the input's
// shape: channels_last(_3d) when the input is densely channels-last, else
// contiguous. fused_bn/_ops.py mirrors this rule in the fake kernels.
at::MemoryFormat output_memory_format(const at::Tensor& input);

// weight/bias as a contiguous accumulation-dtype vector of C elements; `fill` where absent.
at::Tensor channel_param_or(const c10::optional<at::Tensor>& param, const at::Tensor& input,
                            double fill);

}  // namespace fused_bn
