// update_running_stats_: backend-independent (it only touches O(C) tensors),
// so one CompositeExplicitAutograd implementation in ATen ops serves every
// device, and reads num_batches_tracked without a host synchronization.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace fused_bn {
namespace {

// at::lerp's formula, in the opmath type of the running statistics.
template <typename opmath_t>
opmath_t lerp(opmath_t self, opmath_t end, opmath_t weight) {
  return weight < opmath_t(0.5) ? self + weight * (end - self)
                                : end - (end - self) * (opmath_t(1) - weight);
}

// A plain contiguous CPU tensor (not fake, functional or batched), whose data
// can be read and written directly.
bool is_dense_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
         !t.key_set().has_any(c10::python_ks) && !at::functionalization::impl::isFunctionalTensor(t) &&
         !t.requires_grad() && t.is_contiguous();
}

// The update with a momentum as one loop over the channels, for dense CPU
// tensors: the tensor ops of the general path cost more than the update
// itself at the sizes of per-channel statistics. Same arithmetic as that path.
bool update_with_momentum_on_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& invstd, double momentum,
                                 double eps, int64_t count) {
  const bool eligible = is_dense_cpu(running_mean) && is_dense_cpu(running_var) &&
                        is_dense_cpu(mean) && is_dense_cpu(invstd) &&
                        running_mean.scalar_type() == running_var.scalar_type() &&
                        mean.scalar_type() == invstd.scalar_type() &&
                        (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble);
  if (!eligible) return false;
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
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
        const double inv = static_cast<double>(batch_invstd[c]);
        const scalar_t unbiased_var = static_cast<scalar_t>((1.0 / (inv * inv) - eps) * bessel);
        rmean[c] = static_cast<scalar_t>(
            lerp<opmath_t>(rmean[c], static_cast<scalar_t>(batch_mean[c]), weight));
        rvar[c] = static_cast<scalar_t>(lerp<opmath_t>(rvar[c], unbiased_var, weight));
      }
    });
  });
  return true;
}

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
  if (momentum.has_value() &&
      update_with_momentum_on_cpu(running_mean, running_var, mean, invstd, *momentum, eps, count)) {
    return;
  }
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
