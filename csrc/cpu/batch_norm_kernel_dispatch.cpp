// The public kernel entry points of batch_norm_kernel.h: each forwards to
// the instruction-set copy of batch_norm_kernel.cpp that cpu_capability()
// selected.
#include "batch_norm_kernel.h"

#include <ATen/Dispatch.h>

#include "../batch_norm_common.h"
#include "cpu_capability.h"

namespace fused_bn::cpu {

namespace DEFAULT {
extern const BatchNormKernels kBatchNormKernels;
}
#ifdef FUSED_BN_WITH_AVX2
namespace AVX2 {
extern const BatchNormKernels kBatchNormKernels;
}
#endif
#ifdef FUSED_BN_WITH_AVX512
namespace AVX512 {
extern const BatchNormKernels kBatchNormKernels;
}
#endif

namespace {

const BatchNormKernels& kernels() {
  static const BatchNormKernels& selected = []() -> const BatchNormKernels& {
    switch (cpu_capability()) {
#ifdef FUSED_BN_WITH_AVX512
      case CpuCapability::AVX512:
        return AVX512::kBatchNormKernels;
#endif
#ifdef FUSED_BN_WITH_AVX2
      case CpuCapability::AVX2:
        return AVX2::kBatchNormKernels;
#endif
      default:
        return DEFAULT::kBatchNormKernels;
    }
  }();
  return selected;
}

}  // namespace

ChannelView make_channel_view(const at::Tensor& input, at::Tensor& contiguous_input) {
  const auto format = output_memory_format(input);
  contiguous_input = input.contiguous(format);
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t spatial = C == 0 || N == 0 ? 0 : input.numel() / (N * C);
  if (format != at::MemoryFormat::Contiguous || spatial == 1) return {N * spatial, C, 1};
  return {N, C, spatial};
}

void batch_norm_stats_kernel(const at::Tensor& input, const ChannelView& view, at::Tensor& mean,
                             at::Tensor& m2) {
  kernels().stats(input, view, mean, m2);
}

void batch_norm_act_train_kernel(const at::Tensor& input, const ChannelView& view,
                                 const at::Tensor& weight, const at::Tensor& bias, double eps,
                                 const ActivationSpec& act, const at::Tensor& residual,
                                 at::Tensor& output, at::Tensor& mean, at::Tensor& invstd) {
  kernels().act_train(input, view, weight, bias, eps, act, residual, output, mean, invstd);
}

void batch_norm_act_elemt_kernel(const at::Tensor& input, const ChannelView& view,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight, const at::Tensor& bias,
                                 const ActivationSpec& act, const at::Tensor& residual,
                                 at::Tensor& output) {
  kernels().act_elemt(input, view, mean, invstd, weight, bias, act, residual, output);
}

void batch_norm_act_backward_reduce_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                           const ChannelView& view, const at::Tensor& mean,
                                           const at::Tensor& invstd, const at::Tensor& weight,
                                           const at::Tensor& bias, const ActivationSpec& act,
                                           at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  kernels().act_backward_reduce(grad_output, input, view, mean, invstd, weight, bias, act, sum_dy,
                                sum_dy_xmu);
}

void batch_norm_act_backward_elemt_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                          const ChannelView& view, const at::Tensor& mean,
                                          const at::Tensor& invstd, const at::Tensor& weight,
                                          const at::Tensor& bias, const at::Tensor& mean_dy,
                                          const at::Tensor& mean_dy_xmu, bool training,
                                          const ActivationSpec& act, at::Tensor& grad_input) {
  kernels().act_backward_elemt(grad_output, input, view, mean, invstd, weight, bias, mean_dy,
                               mean_dy_xmu, training, act, grad_input);
}

void batch_norm_act_backward_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                    const ChannelView& view, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& weight,
                                    const at::Tensor& bias, bool training,
                                    const ActivationSpec& act, const at::Tensor& residual,
                                    at::Tensor& grad_input, at::Tensor& grad_residual,
                                    at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  kernels().act_backward(grad_output, input, view, mean, invstd, weight, bias, training, act,
                         residual, grad_input, grad_residual, sum_dy, sum_dy_xmu);
}

void multiply_channels_(at::Tensor& values, const at::Tensor& factors) {
  TORCH_INTERNAL_ASSERT(values.is_contiguous() && factors.is_contiguous() &&
                        values.numel() == factors.numel() &&
                        values.scalar_type() == factors.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "multiply_channels_", [&] {
    scalar_t* out = values.mutable_data_ptr<scalar_t>();
    const scalar_t* by = factors.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < values.numel(); ++c) out[c] *= by[c];
  });
}

}  // namespace fused_bn::cpu
