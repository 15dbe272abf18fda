#pragma once
// The running-statistics update of a training step, for any backend: the
// argument checks, the general path in ATen tensor ops, and each backend's
// direct version (running_stats.cpp for CPU, cuda/running_stats.cu), which
// falls back to the general path for tensors it does not handle. Used by the
// batch_norm_act op after its forward and by the update_running_stats_ op.
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Optional.h>

namespace fused_bn {

// The running statistics of a BatchNorm over `channels` channels on
// `device`: both C elements of one floating dtype (any layout);
// num_batches_tracked one element; a momentum or num_batches_tracked.
// Returns whether num_batches_tracked is given; raises on bad arguments.
bool check_running_stats(const c10::SymInt& channels, c10::Device device, const at::Tensor& running_mean,
                         const at::Tensor& running_var,
                         const c10::optional<at::Tensor>& num_batches_tracked,
                         c10::optional<double> momentum);

// The checks of the update_running_stats_ op (mean/invstd: the batch statistics).
void check_update_running_stats_op(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const c10::optional<at::Tensor>& num_batches_tracked,
                                   const at::Tensor& mean, const at::Tensor& invstd,
                                   c10::optional<double> momentum, int64_t count);

// The update in ATen ops, for tensors of any device, type and layout
// (arguments already checked; mean/invstd as batch_norm_act returns them).
void update_running_stats_general(at::Tensor& running_mean, at::Tensor& running_var,
                                  const c10::optional<at::Tensor>& num_batches_tracked,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  c10::optional<double> momentum, double eps, int64_t count);

// The backends' updates (arguments already checked).
void update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                              const c10::optional<at::Tensor>& num_batches_tracked,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              c10::optional<double> momentum, double eps, int64_t count);
// Eval mode's statistics from the running ones: mean = running_mean and
// invstd = 1 / sqrt(running_var + eps), as PyTorch computes them, into the C
// elements of `mean` and `invstd` (the input's accumulation dtype). The
// general version in ATen ops; the CPU one a loop over the channels (the
// tensor ops cost more host time than the whole eval forward of a small batch).
void eval_stats_general(const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                        at::Tensor& mean, at::Tensor& invstd);
void eval_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                    at::Tensor& mean, at::Tensor& invstd);

#ifdef FUSED_BN_WITH_CUDA
void update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                               const c10::optional<at::Tensor>& num_batches_tracked,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               c10::optional<double> momentum, double eps, int64_t count);
#endif

}  // namespace fused_bn
