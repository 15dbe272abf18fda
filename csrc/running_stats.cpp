// The running-statistics update: a general path in ATen ops that serves every
// device and fake tensors (it only touches O(C) tensors, and reads
// num_batches_tracked without a host synchronization), and a direct loop for
// dense CPU tensors. The update_running_stats_ op is registered here as
// CompositeExplicitAutograd; CUDA registers a one-kernel version
// (cuda/running_stats.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "fused_bn/running_stats.h"
#include "running_stats.h"

namespace fused_bn {

namespace {

void check_stat_tensor(const c10::SymInt& channels, c10::Device device, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.sym_numel() == channels, name, " should contain ", channels, " elements not ",
              t.sym_numel());
  TORCH_CHECK(t.device() == device,
              "Expected all tensors to be on the same device, but found at least two devices, ",
              device, " and ", t.device(), "!");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating point tensor, got ",
              t.scalar_type());
}

}  // namespace

bool check_running_stats(const c10::SymInt& channels, c10::Device device, const at::Tensor& running_mean,
                         const at::Tensor& running_var,
                         const c10::optional<at::Tensor>& num_batches_tracked,
                         c10::optional<double> momentum) {
  check_stat_tensor(channels, device, running_mean, "running_mean");
  check_stat_tensor(channels, device, running_var, "running_var");
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (tracked) {
    TORCH_CHECK(num_batches_tracked->sym_numel() == 1,
                "num_batches_tracked should contain 1 element not ", num_batches_tracked->sym_numel());
    TORCH_CHECK(num_batches_tracked->device() == device,
                "Expected all tensors to be on the same device, but found at least two devices, ",
                device, " and ", num_batches_tracked->device(), "!");
  }
  TORCH_CHECK(momentum.has_value() || tracked,
              "momentum=None (cumulative average) needs num_batches_tracked");
  return tracked;
}

void update_running_stats_general(at::Tensor& running_mean, at::Tensor& running_var,
                                  const c10::optional<at::Tensor>& num_batches_tracked,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  c10::optional<double> momentum, double eps, int64_t count) {
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (tracked) num_batches_tracked->add_(1);
  if (count == 0) return;
  // float64 for the variance recovery: 1/invstd^2 - eps cancels when var << eps.
  const at::Tensor unbiased_var = (invstd.to(at::kDouble).pow(-2) - eps) * bessel_factor(count);
  // moving_average() of fused_bn/running_stats.h, in the running statistics'
  // opmath type: double for double, float otherwise.
  const auto opmath = running_mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor weight = momentum.has_value()
                                ? at::scalar_tensor(*momentum, mean.options().dtype(at::kDouble))
                                : num_batches_tracked->to(at::kDouble).reciprocal();
  const at::Tensor w = weight.to(opmath);
  const auto average = [&](at::Tensor& running, const at::Tensor& batch) {
    running.copy_(w * batch.reshape(running.sizes()).to(opmath) + (1 - w) * running.to(opmath));
  };
  average(running_mean, mean);
  average(running_var, unbiased_var);
}

namespace {

// A plain contiguous CPU tensor (not fake, functional or batched), whose data
// can be read and written directly.
bool is_dense_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
         !t.key_set().has_any(c10::python_ks) && !at::functionalization::impl::isFunctionalTensor(t) &&
         !t.requires_grad() && t.is_contiguous();
}

// The update with a momentum as one loop over the channels, for dense CPU
// tensors: the tensor ops of the general path cost more than the update
// itself at the sizes of per-channel statistics.
bool update_with_momentum_on_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& invstd, double momentum,
                                 double eps, int64_t count) {
  const bool eligible = is_dense_cpu(running_mean) && is_dense_cpu(running_var) &&
                        is_dense_cpu(mean) && is_dense_cpu(invstd) &&
                        running_mean.scalar_type() == running_var.scalar_type() &&
                        mean.scalar_type() == invstd.scalar_type() &&
                        (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble);
  if (!eligible) return false;
  const double bessel = bessel_factor(count);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_running_stats_cpu", [&] {
    using stat_t = scalar_t;
    const stat_t* batch_mean = mean.const_data_ptr<stat_t>();
    const stat_t* batch_invstd = invstd.const_data_ptr<stat_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                    "update_running_stats_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const opmath_t weight = static_cast<opmath_t>(momentum);
      scalar_t* rmean = running_mean.mutable_data_ptr<scalar_t>();
      scalar_t* rvar = running_var.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < mean.numel(); ++c) {
        update_channel<scalar_t, opmath_t>(rmean[c], rvar[c], batch_mean[c], batch_invstd[c],
                                           weight, eps, bessel);
      }
    });
  });
  return true;
}

}  // namespace

void update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                              const c10::optional<at::Tensor>& num_batches_tracked,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              c10::optional<double> momentum, double eps, int64_t count) {
  if (momentum.has_value() && count > 0 &&
      update_with_momentum_on_cpu(running_mean, running_var, mean, invstd, *momentum, eps, count)) {
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      num_batches_tracked->add_(1);
    }
    return;
  }
  update_running_stats_general(running_mean, running_var, num_batches_tracked, mean, invstd,
                               momentum, eps, count);
}

void eval_stats_general(const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                        at::Tensor& mean, at::Tensor& invstd) {
  mean.copy_(running_mean.reshape({mean.numel()}));
  // 1 / sqrt, each correctly rounded, as PyTorch's kernels (rsqrt may differ in the last bit).
  at::reciprocal_out(invstd, at::sqrt(running_var.reshape({invstd.numel()}).to(invstd.scalar_type()) + eps));
}

void eval_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                    at::Tensor& mean, at::Tensor& invstd) {
  const bool eligible = is_dense_cpu(running_mean) && is_dense_cpu(running_var) &&
                        running_mean.scalar_type() == running_var.scalar_type();
  if (!eligible) return eval_stats_general(running_mean, running_var, eps, mean, invstd);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "eval_stats_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_out = invstd.mutable_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                    "eval_stats_cpu", [&] {
      const scalar_t* rmean = running_mean.const_data_ptr<scalar_t>();
      const scalar_t* rvar = running_var.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < mean.numel(); ++c) {
        mean_out[c] = static_cast<acc_t>(rmean[c]);
        invstd_out[c] = acc_t(1) / std::sqrt(static_cast<acc_t>(rvar[c]) + static_cast<acc_t>(eps));
      }
    });
  });
}

void check_update_running_stats_op(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const c10::optional<at::Tensor>& num_batches_tracked,
                                   const at::Tensor& mean, const at::Tensor& invstd,
                                   c10::optional<double> momentum, int64_t count) {
  TORCH_CHECK(count >= 0, "update_running_stats_: count must be >= 0, got ", count);
  TORCH_CHECK_VALUE(count != 1, "Expected more than 1 value per channel when training, got ",
                    count);
  const c10::SymInt channels = mean.sym_numel();
  check_running_stats(channels, mean.device(), running_mean, running_var, num_batches_tracked,
                      momentum);
  TORCH_CHECK(invstd.sym_numel() == channels, "invstd should contain ", channels,
              " elements not ", invstd.sym_numel());
  TORCH_CHECK(invstd.device() == mean.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              mean.device(), " and ", invstd.device(), "!");
  TORCH_CHECK(at::isFloatingType(mean.scalar_type()) && invstd.scalar_type() == mean.scalar_type(),
              "update_running_stats_: mean and invstd must share one floating dtype, got ",
              mean.scalar_type(), " and ", invstd.scalar_type());
}

namespace {

// The op for every device but CUDA (which registers its own), and for fake
// tensors: every argument checked before anything is written.
void update_running_stats_op(at::Tensor& running_mean, at::Tensor& running_var,
                             const c10::optional<at::Tensor>& num_batches_tracked,
                             const at::Tensor& mean, const at::Tensor& invstd,
                             c10::optional<double> momentum, double eps, int64_t count) {
  check_update_running_stats_op(running_mean, running_var, num_batches_tracked, mean, invstd,
                                momentum, count);
  update_running_stats_cpu(running_mean, running_var, num_batches_tracked, mean, invstd, momentum,
                           eps, count);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CompositeExplicitAutograd, m) {
  m.impl("update_running_stats_", &update_running_stats_op);
}

}  // namespace fused_bn
