#pragma once
// CPU BatchNorm(+activation) kernels over a canonical channel view.
//
// Every input is seen as a contiguous [outer, C, inner] array:
//   NCHW-contiguous (N, C, *S):  outer = N,        inner = prod(S)
//   channels_last / (N, C):      outer = N*prod(S), inner = 1
// inner > 1 is processed channel by channel (a channel's slab stays in cache
// between the statistics and the normalization); inner == 1 is processed in
// chunks of rows with per-chunk partial results merged per channel.
//
// The loops (batch_norm_kernel.cpp) are compiled once per instruction set;
// the functions below forward to the copy that cpu_capability() selected.
//
// Per-channel tensors (mean, invstd, weight, bias, sums) are contiguous and of
// the accumulation dtype (see batch_norm_common.h).
#include <ATen/core/Tensor.h>

#include "fused_bn/activation.h"

namespace fused_bn::cpu {

struct ChannelView {
  int64_t outer;
  int64_t channels;
  int64_t inner;

  int64_t count() const { return outer * inner; }
};

// The view of `input`, and the tensor it describes: `input` made contiguous
// in output_memory_format(input) (a copy only for non-dense input).
ChannelView make_channel_view(const at::Tensor& input, at::Tensor& contiguous_input);

// mean and m2 (sum of squared deviations) of each channel.
void batch_norm_stats_kernel(const at::Tensor& input, const ChannelView& view, at::Tensor& mean,
                             at::Tensor& m2);

// A `residual`, where defined, has the input's shape, dtype and layout (the
// same canonical view) and is added before the activation:
// output = act(x * scale + shift + residual).

// Training forward: batch statistics, then output = act(x * scale + shift (+ residual)).
void batch_norm_act_train_kernel(const at::Tensor& input, const ChannelView& view,
                                 const at::Tensor& weight, const at::Tensor& bias, double eps,
                                 const ActivationSpec& act, const at::Tensor& residual,
                                 at::Tensor& output, at::Tensor& mean, at::Tensor& invstd);

// output = act((x - mean) * invstd * weight + bias (+ residual)).
void batch_norm_act_elemt_kernel(const at::Tensor& input, const ChannelView& view,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight, const at::Tensor& bias,
                                 const ActivationSpec& act, const at::Tensor& residual,
                                 at::Tensor& output);

// Per-channel sums of g and g * (x - mean), g = grad_output * act'(y).
void batch_norm_act_backward_reduce_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                           const ChannelView& view, const at::Tensor& mean,
                                           const at::Tensor& invstd, const at::Tensor& weight,
                                           const at::Tensor& bias, const ActivationSpec& act,
                                           at::Tensor& sum_dy, at::Tensor& sum_dy_xmu);

// grad_input = g * a + x * b + c (see batch_norm_math.h). With training =
// false, mean_dy/mean_dy_xmu are ignored (eval-mode gradient: g * a).
void batch_norm_act_backward_elemt_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                          const ChannelView& view, const at::Tensor& mean,
                                          const at::Tensor& invstd, const at::Tensor& weight,
                                          const at::Tensor& bias, const at::Tensor& mean_dy,
                                          const at::Tensor& mean_dy_xmu, bool training,
                                          const ActivationSpec& act, at::Tensor& grad_input);

// Fused backward: the sums, then grad_input where it is defined and the
// residual's gradient g where grad_residual is, per channel while its slab
// is in cache where the layout allows.
void batch_norm_act_backward_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                    const ChannelView& view, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& weight,
                                    const at::Tensor& bias, bool training,
                                    const ActivationSpec& act, const at::Tensor& residual,
                                    at::Tensor& grad_input, at::Tensor& grad_residual,
                                    at::Tensor& sum_dy, at::Tensor& sum_dy_xmu);

// values[c] *= factors[c]: two contiguous per-channel tensors of one dtype
// (a loop: TensorIterator's setup costs more than a small batch's backward).
void multiply_channels_(at::Tensor& values, const at::Tensor& factors);

// One instruction set's copy of the kernels above.
struct BatchNormKernels {
  decltype(&batch_norm_stats_kernel) stats;
  decltype(&batch_norm_act_train_kernel) act_train;
  decltype(&batch_norm_act_elemt_kernel) act_elemt;
  decltype(&batch_norm_act_backward_reduce_kernel) act_backward_reduce;
  decltype(&batch_norm_act_backward_elemt_kernel) act_backward_elemt;
  decltype(&batch_norm_act_backward_kernel) act_backward;
};

}  // namespace fused_bn::cpu
