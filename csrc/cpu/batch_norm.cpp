// CPU registrations of the BatchNorm(+activation) ops declared in ops.cpp:
// the ops (checks, layouts, allocation) are BatchNormOps (batch_norm_ops.h),
// shared with CUDA; the loops live in batch_norm_kernel.cpp.
#include <torch/library.h>

#include "../batch_norm_ops.h"
#include "batch_norm_kernel.h"

namespace fused_bn::cpu {
namespace {

struct CpuKernels {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  static constexpr auto batch_norm_stats_kernel = &cpu::batch_norm_stats_kernel;
  static constexpr auto batch_norm_act_train_kernel = &cpu::batch_norm_act_train_kernel;
  static constexpr auto batch_norm_act_elemt_kernel = &cpu::batch_norm_act_elemt_kernel;
  static constexpr auto batch_norm_act_backward_reduce_kernel =
      &cpu::batch_norm_act_backward_reduce_kernel;
  static constexpr auto batch_norm_act_backward_elemt_kernel =
      &cpu::batch_norm_act_backward_elemt_kernel;
  static constexpr auto batch_norm_act_backward_kernel = &cpu::batch_norm_act_backward_kernel;
  static constexpr auto update_running_stats = &update_running_stats_cpu;
  static constexpr auto eval_stats = &eval_stats_cpu;
  static constexpr auto multiply_channels_ = &cpu::multiply_channels_;
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CPU, m) { BatchNormOps<CpuKernels>::register_kernels(m); }

}  // namespace fused_bn::cpu
