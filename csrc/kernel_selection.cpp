#include "kernel_selection.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace fused_bn {

std::string cuda_kernels_selection() {
  static const std::string selection = [] {
    const char* value = std::getenv("FUSED_BN_CUDA_KERNELS");
    const std::string chosen = value == nullptr || *value == '\0' ? "verified" : value;
    TORCH_CHECK(chosen == "verified" || chosen == "next",
                "FUSED_BN_CUDA_KERNELS must be 'verified' or 'next', got '", chosen, "'");
    return chosen;
  }();
  return selection;
}

}  // namespace fused_bn
