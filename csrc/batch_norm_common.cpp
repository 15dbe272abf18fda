#include "batch_norm_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fused_bn {

Activation parse_activation(const std::string& name) {
  if (name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::ReLU;
  TORCH_CHECK(false, "fused_bn: unknown activation '", name,
              "'; expected 'identity' or 'relu'");
}

at::ScalarType accumulate_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

static void check_channel_tensor(const at::Tensor& input, const c10::optional<at::Tensor>& t,
                                 const char* name) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t channels = input.size(1);
  TORCH_CHECK(t->dim() == 1 && t->numel() == channels, name, " should contain ", channels,
              " elements not ", t->numel());
  TORCH_CHECK(t->device() == input.device(),
              "Expected all tensors to be on the same device, but found input on ",
              input.device(), " and ", name, " on ", t->device());
  const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  // PyTorch's wording (its CPU kernel's), plus which tensor is off.
  if (reduced_input) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type() || t->scalar_type() == at::kFloat,
                "mixed dtype: expect parameter to have scalar type of Float (input is ",
                input.scalar_type(), ", ", name, " is ", t->scalar_type(), ")");
  } else {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(),
                "mixed dtype: all inputs must share same datatype (input is ", input.scalar_type(),
                ", ", name, " is ", t->scalar_type(), ")");
  }
}

void check_batch_norm_inputs(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var) {
  TORCH_CHECK(input.dim() >= 2, "batch_norm: expected input with at least 2 dims (N, C, ...), got ",
              input.dim(), "D input");
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(input.scalar_type()),
                              "\"batch_norm\" not implemented for '",
              input.scalar_type(), "'");
  check_channel_tensor(input, running_mean, "running_mean");
  check_channel_tensor(input, running_var, "running_var");
  check_channel_tensor(input, weight, "weight");
  check_channel_tensor(input, bias, "bias");
}

void check_channel_stat(const at::Tensor& input, const at::Tensor& stat, const char* name) {
  TORCH_CHECK(stat.dim() == 1 && stat.numel() == input.size(1), name, " should contain ",
              input.size(1), " elements not ", stat.numel());
  TORCH_CHECK(stat.device() == input.device(), "Expected ", name,
              " on the input's device ", input.device(), ", got ", stat.device());
  TORCH_CHECK(stat.scalar_type() == accumulate_type(input), "expected ", name, " of dtype ",
              accumulate_type(input), " for ", input.scalar_type(), " input, got ",
              stat.scalar_type());
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output of shape ", grad_output.sizes(),
              " does not match input of shape ", input.sizes());
  TORCH_CHECK(grad_output.device() == input.device() &&
                  grad_output.scalar_type() == input.scalar_type(),
              "grad_output must have the input's device and dtype");
}

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

at::Tensor channel_param_or(const c10::optional<at::Tensor>& param, const at::Tensor& input,
                            double fill) {
  const auto options = input.options().dtype(accumulate_type(input));
  if (param.has_value() && param->defined()) return param->to(options).contiguous();
  return at::full({input.size(1)}, fill, options);
}

}  // namespace fused_bn
