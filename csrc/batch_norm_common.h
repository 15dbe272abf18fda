#pragma once
// Host-side pieces shared by the CPU and CUDA BatchNorm ops: argument checks
// (in PyTorch's wording where PyTorch has one, so that fused_bn is a drop-in),
// the accumulation dtype and the output layout rule.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

#include "fused_bn/activation.h"

namespace fused_bn {

Activation parse_activation(const std::string& name);

// Input of at least 2 dims, floating dtype; per-channel tensors of C
// elements on the input's device, of the input's dtype (or float32 when the
// input is float16/bfloat16).
void check_batch_norm_inputs(const at::Tensor& input,
                             const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var);

// A per-channel statistics tensor (mean, invstd, gradient sums) as the ops
// produce them: C elements of the accumulation dtype on the input's device.
void check_channel_stat(const at::Tensor& input, const at::Tensor& stat, const char* name);

// A gradient must match its input's shape, device and dtype.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input);

// Accumulation dtype: float64 for float64 input, float32 otherwise.
at::ScalarType accumulate_type(const at::Tensor& input);

// weight/bias as a contiguous accumulation-dtype tensor; `fill` where absent.
// The memory format of every tensor a BatchNorm op returns in the input's
// shape: channels_last(_3d) when the input is densely channels-last, else
// contiguous. fused_bn/_ops.py mirrors this rule in the fake kernels.
at::MemoryFormat output_memory_format(const at::Tensor& input);

at::Tensor channel_param_or(const c10::optional<at::Tensor>& param, const at::Tensor& input,
                            double fill);

}  // namespace fused_bn
