// The schemas of every fused_bn operator, in one place.
//
// Backends register kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta)
// kernels and the Dropout autograd formulas are registered from Python
// (fused_bn/_ops.py), batch_norm_act's autograd in csrc/batch_norm_autograd.cpp.
//
// Conventions shared by the BatchNorm ops:
//   * `activation` is "identity" or "relu" (see include/fused_bn/activation.h).
//   * mean/invstd/m2 and the gradient sums are per-channel tensors in the
//     accumulation dtype: float64 for float64 input, float32 otherwise.
//   * weight/bias/running statistics may be float32 while the input is
//     float16/bfloat16 (mixed precision), as in torch.nn.functional.batch_norm.
#include <torch/library.h>

TORCH_LIBRARY(fused_bn, m) {
  // Forward. training=True normalizes with batch statistics and returns them
  // (mean, invstd); training=False normalizes with running_mean/running_var
  // and returns those as (mean, invstd). The running statistics are never
  // written here: update_running_stats_ does that, from the returned stats.
  m.def(
      "batch_norm_act(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps, "
      "str activation) -> (Tensor output, Tensor mean, Tensor invstd)");

  // Backward of batch_norm_act. The activation mask is recomputed from input
  // and the saved statistics; the forward output is not needed.
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "bool training, str activation) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // The module's bookkeeping after a training step, in one mutating op:
  // num_batches_tracked += 1 (when given), then
  //   running = (1 - factor) * running + factor * batch
  // with factor = momentum, or 1 / num_batches_tracked when momentum is None
  // (cumulative average), and the unbiased batch variance recovered from
  // invstd: var = (1/invstd^2 - eps) * count / (count - 1). count == 0 (an
  // empty batch) leaves the statistics as they are, as torch does.
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor invstd, "
      "float? momentum, float eps, int count) -> ()");

  // Building blocks for synchronized BatchNorm, where statistics and gradient
  // sums are combined across processes between the passes.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  m.def(
      "batch_norm_act_elemt(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, str activation) -> Tensor");
  // Per-channel sums of g and g*(x - mean), where g = grad_output masked by
  // the activation's derivative.
  m.def(
      "batch_norm_act_backward_reduce(Tensor grad_output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "str activation) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // grad_input from per-channel means (over the global batch) of g and
  // g*(x - mean).
  m.def(
      "batch_norm_act_backward_elemt(Tensor grad_output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor mean_dy, Tensor mean_dy_xmu, str activation) -> Tensor");

  // ---- Dropout ---------------------------------------------------------------
  // Element i (in the dense memory order of empty_like(input)) is kept when its
  // Philox4x32-10 draw under seed_offset = int64 [seed, offset] is below
  // round((1 - p) * 2^32); kept elements are scaled by 1 / (1 - p). The rule
  // is in include/fused_bn/dropout_mask.h; CPU and CUDA give identical masks.
  // seed_offset lives on the input's device (on CUDA it is read by the kernel,
  // so it may be produced by a captured RNG op).
  //
  // Returns the output and, when save_mask, the mask as 1 bit per element
  // (bit i % 8 of byte i / 8; ceil(numel / 8) bytes), else an empty mask.
  m.def(
      "dropout(Tensor input, float p, Tensor seed_offset, bool save_mask) "
      "-> (Tensor output, Tensor mask)");
  // dropout in place, without a mask (for inference or tensors outside autograd).
  m.def("dropout_(Tensor(a!) self, float p, Tensor seed_offset) -> ()");
  // input * mask_bit(i) / (1 - p): the backward of dropout from its saved mask.
  m.def("dropout_apply_mask(Tensor input, Tensor mask, float p) -> Tensor");
  // Philox4x32-10 of each row of `counter` ([..., 4]) under `key` ([2]); words
  // are uint32 values held in int64, low word first. For known-answer tests.
  m.def("philox4x32(Tensor counter, Tensor key) -> Tensor");
}
