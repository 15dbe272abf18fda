#include "batch_norm_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "running_stats.h"

#include <charconv>
#include <initializer_list>
#include <sstream>
#include <string>

namespace fused_bn {

namespace {

struct ActivationName {
  const char* name;
  Activation kind;
  size_t params;
};

constexpr ActivationName kActivations[] = {
    {"identity", Activation::Identity, 0}, {"relu", Activation::ReLU, 0},
    {"relu6", Activation::Hardtanh, 0},    {"hardtanh", Activation::Hardtanh, 2},
    {"leaky_relu", Activation::LeakyReLU, 1}, {"silu", Activation::SiLU, 0},
    {"hardswish", Activation::Hardswish, 0}, {"elu", Activation::ELU, 1},
};

bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

ActivationSpec parse_activation(c10::string_view name, c10::ArrayRef<double> params) {
  for (const ActivationName& known : kActivations) {
    if (name != known.name) continue;
    TORCH_CHECK(params.size() == known.params, "fused_bn: activation '", known.name, "' takes ",
                known.params, " parameter(s), got ", params.size());
    ActivationSpec spec{known.kind, 0, 0};
    if (name == "relu6") spec = {Activation::Hardtanh, 0, 6};
    if (params.size() > 0) spec.alpha = params[0];
    if (params.size() > 1) spec.beta = params[1];
    return spec;
  }
  TORCH_CHECK(false, "fused_bn: unknown activation '", name,
              "'; expected identity, relu, relu6, hardtanh, leaky_relu, silu, hardswish or elu");
}

at::ScalarType accumulate_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

static void check_channel_tensor(const at::Tensor& input, const c10::optional<at::Tensor>& t,
                                 const char* name) {
  if (!defined(t)) return;
  const int64_t channels = input.size(1);
  TORCH_CHECK(t->numel() == channels, name, " should contain ", channels, " elements not ",
              t->numel());
  TORCH_CHECK(t->device() == input.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", t->device(), "!");
}

// PyTorch's rule: the first parameter given decides. Of the input's dtype,
// every parameter must be; otherwise (mixed precision) every parameter must
// be float32 and the input float16/bfloat16.
static void check_parameter_dtypes(const at::Tensor& input,
                                   std::initializer_list<const c10::optional<at::Tensor>*> params) {
  const c10::optional<at::Tensor>* first = nullptr;
  for (const auto* p : params) {
    if (defined(*p)) {
      first = p;
      break;
    }
  }
  if (first == nullptr) return;
  const at::ScalarType dtype = input.scalar_type();
  if ((*first)->scalar_type() == dtype) {
    for (const auto* p : params) {
      TORCH_CHECK(!defined(*p) || (*p)->scalar_type() == dtype, "expected scalar type ", dtype,
                  " but found ", (*p)->scalar_type());
    }
    return;
  }
  for (const auto* p : params) {
    TORCH_CHECK(!defined(*p) || (*p)->scalar_type() == at::kFloat,
                "mixed dtype (CPU): expect parameter to have scalar type of Float");
  }
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "mixed dtype (CPU): all inputs must share same datatype.");
}

void check_batch_norm_shapes(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var) {
  TORCH_CHECK_INDEX(input.dim() >= 2, "Dimension out of range (expected to be in range of [",
                    -std::max<int64_t>(input.dim(), 1), ", ", std::max<int64_t>(input.dim(), 1) - 1,
                    "], but got 1)");
  if (input.numel() == 0) return;  // PyTorch returns an empty batch before looking further
  check_channel_tensor(input, running_mean, "running_mean");
  check_channel_tensor(input, running_var, "running_var");
  check_channel_tensor(input, weight, "weight");
  check_channel_tensor(input, bias, "bias");
}

void check_batch_norm_inputs(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var) {
  check_batch_norm_shapes(input, weight, bias, running_mean, running_var);
  if (input.numel() == 0) return;
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(input.scalar_type()),
                              "\"batch_norm\" not implemented for '", input.scalar_type(), "'");
  check_parameter_dtypes(input, {&weight, &bias, &running_mean, &running_var});
}

namespace {

// `value` as Python's repr() writes a float (shortest round trip, ".0" on
// integral values), so that messages read as PyTorch's Python checks write them.
std::string python_float(double value) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  std::string text(buffer, result.ptr);
  if (text.find_first_of(".eEn") == std::string::npos) text += ".0";  // not nan/inf/1e+16
  return text;
}

}  // namespace

void check_eps(double eps, bool training) {
  // F.batch_norm's comparisons: a NaN eps passes, as there.
  if (training) {
    TORCH_CHECK_VALUE(!(eps <= 0), "batch_norm eps must be positive during training, but got ",
                      python_float(eps));
  } else {
    TORCH_CHECK_VALUE(!(eps < 0), "batch_norm eps must be non-negative, but got ",
                      python_float(eps));
  }
}

void check_batch_size(const at::Tensor& input) {
  if (input.dim() == 0) return;  // check_batch_norm_inputs raises
  int64_t values_per_channel = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) values_per_channel *= input.size(d);
  if (values_per_channel != 1) return;
  std::ostringstream size;
  size << "torch.Size([";
  for (int64_t d = 0; d < input.dim(); ++d) size << (d ? ", " : "") << input.size(d);
  size << "])";
  TORCH_CHECK_VALUE(false, "Expected more than 1 value per channel when training, got input size ",
                    size.str());
}

void check_channel_stat(const at::Tensor& input, const at::Tensor& stat, const char* name) {
  TORCH_CHECK(stat.numel() == input.size(1), name, " should contain ", input.size(1),
              " elements not ", stat.numel());
  TORCH_CHECK(stat.device() == input.device(), "Expected ", name,
              " on the input's device ", input.device(), ", got ", stat.device());
  TORCH_CHECK(stat.scalar_type() == accumulate_type(input), "expected ", name, " of dtype ",
              accumulate_type(input), " for ", input.scalar_type(), " input, got ",
              stat.scalar_type());
}

void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.sizes() == input.sizes(), name, " of shape ", t.sizes(),
              " does not match input of shape ", input.sizes());
  TORCH_CHECK(t.device() == input.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", t.device(), "!");
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
              input.scalar_type(), ", got ", t.scalar_type());
}

ActivationSpec check_batch_norm_act_args(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, bool training,
    c10::optional<double> momentum, double eps, c10::string_view activation,
    c10::ArrayRef<double> activation_params, const c10::optional<at::Tensor>& residual,
    bool check_values_per_channel) {
  if (training && check_values_per_channel) check_batch_size(input);
  check_eps(eps, training);
  check_batch_norm_inputs(input, weight, bias, running_mean, running_var);
  const ActivationSpec act = parse_activation(activation, activation_params);
  if (input.numel() == 0) return act;  // PyTorch returns an empty batch as it is
  if (defined(residual)) check_like_input(*residual, input, "residual");
  const bool has_running = defined(running_mean) && defined(running_var);
  if (training) {
    if (has_running) {
      check_running_stats(input.size(1), input.device(), *running_mean, *running_var,
                          num_batches_tracked, momentum);
    }
  } else {
    TORCH_CHECK(defined(running_mean), "running_mean must be defined in evaluation mode");
    TORCH_CHECK(defined(running_var), "running_var must be defined in evaluation mode");
  }
  return act;
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
  if (!defined(param)) return at::full({input.size(1)}, fill, options);
  // The usual case, a module's own parameter, as it is: each of reshape and
  // to() costs a dispatch, on every call.
  if (param->dim() == 1 && param->scalar_type() == options.dtype() && param->is_contiguous())
    return *param;
  return param->reshape({input.size(1)}).to(options).contiguous();
}

}  // namespace fused_bn
