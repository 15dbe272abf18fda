#pragma once
// Which CUDA kernels run: the ones verified on a GPU ("verified", the
// default) or also those compiled but not yet run on one ("next"), chosen by
// the environment variable FUSED_BN_CUDA_KERNELS, read once at first use.
// fused_bn/functional.py reads the same variable to route unverified calls
// to PyTorch's ops; build_info() reports it.
#include <string>

namespace fused_bn {

std::string cuda_kernels_selection();

inline bool cuda_next_kernels() { return cuda_kernels_selection() == "next"; }

}  // namespace fused_bn
