#pragma once
// update_running_stats_ for any backend: the argument checks, and the general
// path in ATen tensor ops (running_stats.cpp). A backend may register a
// faster kernel that checks the same way and falls back to the general path
// for tensors it does not handle (cuda/running_stats.cu).
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fused_bn {

// Whether num_batches_tracked is given; raises on bad arguments.
bool check_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                              const c10::optional<at::Tensor>& num_batches_tracked,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              c10::optional<double> momentum, int64_t count);

// The update in ATen ops, for tensors of any device, type and layout
// (arguments already checked).
void update_running_stats_general(at::Tensor& running_mean, at::Tensor& running_var,
                                  const c10::optional<at::Tensor>& num_batches_tracked,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  c10::optional<double> momentum, double eps, int64_t count);

}  // namespace fused_bn
