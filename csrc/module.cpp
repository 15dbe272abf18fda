// The Python extension module fused_bn._C. Importing it registers the ops
// (ops.cpp and the backend files); it also reports how it was built.
#include <torch/extension.h>

#include "cpu/cpu_capability.h"
#include "kernel_selection.h"

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_bn native extension: registers the torch.ops.fused_bn operators";
  m.def("build_info", &build_info,
        "Version, the torch it was built against, whether CUDA kernels were compiled and for "
        "which architectures, the CPU instruction sets compiled and the one in use, and whether the "
        "CPU kernels run multi-threaded (OpenMP).");
}
