// update_running_stats_: backend-independent (it only touches O(C) tensors),
// so one CompositeExplicitAutograd implementation in ATen ops serves every
// device, and reads num_batches_tracked without a host synchronization.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace fused_bn {
namespace {

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var,
                          const c10::optional<at::Tensor>& num_batches_tracked,
                          const at::Tensor& mean, const at::Tensor& invstd,
                          c10::optional<double> momentum, double eps, int64_t count) {
  TORCH_CHECK(count >= 0, "update_running_stats_: count must be >= 0, got ", count);
  TORCH_CHECK(count != 1, "Expected more than 1 value per channel when training, got ", count);
  TORCH_CHECK(running_mean.sym_numel() == mean.sym_numel() && running_var.sym_numel() == invstd.sym_numel(),
              "update_running_stats_: running statistics of ", running_mean.sym_numel(),
              " elements do not match batch statistics of ", mean.sym_numel(), " elements");
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  TORCH_CHECK(momentum.has_value() || tracked,
              "update_running_stats_: momentum=None (cumulative average) needs "
              "num_batches_tracked");
  if (tracked) num_batches_tracked->add_(1);
  if (count == 0) return;
  // float64 for the variance recovery: 1/invstd^2 - eps cancels when var << eps.
  const at::Tensor unbiased_var = (invstd.to(at::kDouble).pow(-2) - eps) *
                                  (static_cast<double>(count) / static_cast<double>(count - 1));
  if (momentum.has_value()) {
    running_mean.lerp_(mean.to(running_mean.scalar_type()), *momentum);
    running_var.lerp_(unbiased_var.to(running_var.scalar_type()), *momentum);
    return;
  }
  const at::Tensor factor = num_batches_tracked->to(at::kDouble).reciprocal();
  running_mean.lerp_(mean.to(running_mean.scalar_type()), factor.to(running_mean.scalar_type()));
  running_var.lerp_(unbiased_var.to(running_var.scalar_type()),
                    factor.to(running_var.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CompositeExplicitAutograd, m) {
  m.impl("update_running_stats_", &update_running_stats);
}

}  // namespace fused_bn
