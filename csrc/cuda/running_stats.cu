// CUDA registration of update_running_stats_: one kernel launch in place of
// the general path's ATen ops (about eight launches, whose host cost exceeds
// a training step's BatchNorm kernels at common sizes). The arithmetic is the
// general path's, element by element (include/fused_bn/running_stats.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../running_stats.h"
#include "fused_bn/running_stats.h"

namespace fused_bn {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kMaxThreads = 512;

// One block: every thread reads num_batches_tracked before thread 0 writes it
// back incremented, so the cumulative-average weight (without a momentum)
// needs no second launch.
template <typename running_t, typename stat_t>
__global__ void __launch_bounds__(kMaxThreads)
    update_running_stats_kernel(running_t* __restrict__ running_mean,
                                running_t* __restrict__ running_var,
                                int64_t* __restrict__ num_batches_tracked,
                                const stat_t* __restrict__ mean, const stat_t* __restrict__ invstd,
                                int64_t channels, bool cumulative, double momentum, double eps,
                                int64_t count) {
  using opmath_t = at::opmath_type<running_t>;
  const int64_t batches = num_batches_tracked != nullptr ? *num_batches_tracked + 1 : 0;
  if (count > 0) {
    const opmath_t weight = cumulative ? cumulative_weight<opmath_t>(batches)
                                       : static_cast<opmath_t>(momentum);
    const double bessel = bessel_factor(count);
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
      update_channel<running_t, opmath_t>(running_mean[c], running_var[c], mean[c], invstd[c],
                                          weight, eps, bessel);
    }
  }
  if (num_batches_tracked == nullptr) return;
  __syncthreads();
  if (threadIdx.x == 0) *num_batches_tracked = batches;
}

// Contiguous tensors of one CUDA device, in the types the kernel is built for.
bool kernel_handles(const Tensor& running_mean, const Tensor& running_var,
                    const Tensor* num_batches_tracked, const Tensor& mean, const Tensor& invstd) {
  const auto device = running_mean.device();
  for (const Tensor* t : {&running_mean, &running_var, &mean, &invstd, num_batches_tracked}) {
    if (t != nullptr && (t->device() != device || !t->is_contiguous() || t->requires_grad()))
      return false;
  }
  const bool stats_type = (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble) &&
                          invstd.scalar_type() == mean.scalar_type();
  return stats_type && running_var.scalar_type() == running_mean.scalar_type() &&
         (num_batches_tracked == nullptr || num_batches_tracked->scalar_type() == at::kLong);
}

}  // namespace
}  // namespace cuda

void update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                               const c10::optional<at::Tensor>& num_batches_tracked,
                               const at::Tensor& mean, const at::Tensor& invstd, c10::optional<double> momentum, double eps,
                               int64_t count) {
  using namespace cuda;
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  const at::Tensor* batches = tracked ? &*num_batches_tracked : nullptr;
  if (!kernel_handles(running_mean, running_var, batches, mean, invstd)) {
    update_running_stats_general(running_mean, running_var, num_batches_tracked, mean, invstd,
                                 momentum, eps, count);
    return;
  }
  const int64_t channels = running_mean.numel();
  if (channels == 0 && !tracked) return;
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int threads = static_cast<int>(std::clamp<int64_t>(
      (channels + 31) / 32 * 32, 32, kMaxThreads));
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_running_stats_cuda", [&] {
    using stat_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                    "update_running_stats_cuda", [&] {
      update_running_stats_kernel<scalar_t, stat_t>
          <<<1, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
              running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
              tracked ? num_batches_tracked->mutable_data_ptr<int64_t>() : nullptr,
              mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(), channels,
              !momentum.has_value(), momentum.value_or(0.0), eps, count);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

namespace cuda {
namespace {

void update_running_stats_op(Tensor& running_mean, Tensor& running_var,
                             const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                             const Tensor& invstd, c10::optional<double> momentum, double eps,
                             int64_t count) {
  check_update_running_stats_op(running_mean, running_var, num_batches_tracked, mean, invstd,
                                momentum, count);
  update_running_stats_cuda(running_mean, running_var, num_batches_tracked, mean, invstd,
                            momentum, eps, count);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CUDA, m) { m.impl("update_running_stats_", &update_running_stats_op); }

}  // namespace cuda
}  // namespace fused_bn
