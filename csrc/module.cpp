// The Python extension module fused_bn._C. Importing it registers the ops
// (ops.cpp and the backend files); it also reports how it was built.
#include <torch/extension.h>

#include "batch_norm_common.h"
#include "cpu/cpu_capability.h"
#include "kernel_selection.h"
#include "op_calls.h"

#ifndef FUSED_BN_VERSION
#define FUSED_BN_VERSION "unknown"
#endif
#ifndef FUSED_BN_CUDA_ARCHS
#define FUSED_BN_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FUSED_BN_VERSION;
  info["torch_version"] = TORCH_VERSION;
#ifdef FUSED_BN_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(FUSED_BN_CUDA_ARCHS);
  info["cuda_kernels"] = fused_bn::cuda_kernels_selection();
  pybind11::list compiled;
  for (const auto capability : fused_bn::cpu::compiled_cpu_capabilities())
    compiled.append(fused_bn::cpu::cpu_capability_name(capability));
  info["cpu_capabilities"] = compiled;
  info["cpu_capability"] = fused_bn::cpu::cpu_capability_name(fused_bn::cpu::cpu_capability());
  // Without OpenMP, at::parallel_for runs every CPU kernel on one thread.
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

// check_batch_norm_act_args for Python: a synchronized step checks its call
// before the first collective, without computing anything.
void check_batch_norm_call(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& running_mean,
                           const c10::optional<at::Tensor>& running_var,
                           const c10::optional<at::Tensor>& num_batches_tracked, bool training,
                           c10::optional<double> momentum, double eps,
                           const std::string& activation,
                           const std::vector<double>& activation_params,
                           bool local_values_per_channel) {
  fused_bn::check_batch_norm_act_args(input, weight, bias, running_mean, running_var,
                                      num_batches_tracked, training, momentum, eps, activation,
                                      activation_params, c10::nullopt, local_values_per_channel);
}

// Direct entry points for fused_bn/functional.py's fast path (plain tensors,
// no torch function mode, not under torch.compile): the same ops through the
// dispatcher, without torch.ops' boxed argument parsing, which costs more host
// time than a whole small BatchNorm.
fused_bn::BatchNormActResult batch_norm_act(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& running_mean,
                                 const c10::optional<at::Tensor>& running_var,
                                 const c10::optional<at::Tensor>& num_batches_tracked,
                                 bool training, c10::optional<double> momentum, double eps,
                                 const std::string& activation,
                                 const std::vector<double>& activation_params,
                                 const c10::optional<at::Tensor>& residual) {
  return fused_bn::call_batch_norm_act(input, weight, bias, running_mean, running_var,
                                       num_batches_tracked, training, momentum, eps, activation,
                                       activation_params, residual);
}

// Dropout's output, with its (seed, offset) drawn as fused_bn.functional draws
// them (torch.randint on the input's device), so both paths give one stream.
at::Tensor dropout_output(const at::Tensor& input, double p, bool save_mask) {
  const at::Tensor seed_offset =
      at::randint(int64_t(1) << 62, {2}, input.options().dtype(at::kLong));
  return std::get<0>(fused_bn::call_dropout(input, p, seed_offset, save_mask));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_bn native extension: registers the torch.ops.fused_bn operators";
  m.def("build_info", &build_info,
        "Version, the torch it was built against, whether CUDA kernels were compiled and for "
        "which architectures, the CPU instruction sets compiled and the one in use, and whether the "
        "CPU kernels run multi-threaded (OpenMP).");
  m.def("check_batch_norm_call", &check_batch_norm_call, pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("running_mean"),
        pybind11::arg("running_var"), pybind11::arg("num_batches_tracked"),
        pybind11::arg("training"), pybind11::arg("momentum"), pybind11::arg("eps"),
        pybind11::arg("activation"), pybind11::arg("activation_params"),
        pybind11::arg("local_values_per_channel") = true,
        "Raises what fused_bn::batch_norm_act would raise for these arguments (residual aside), "
        "without computing anything; local_values_per_channel=False leaves out the check of "
        "values per channel (a synchronized step checks the global batch's).");
  m.def("batch_norm_act", &batch_norm_act,
        "fused_bn::batch_norm_act (output, mean, invstd), called directly (see "
        "fused_bn/functional.py).");
  m.def("dropout_output", &dropout_output,
        "fused_bn::dropout's output with a freshly drawn (seed, offset), called directly.");
}
