// The schemas of every fused_bn operator, in one place.
//
// Backends register kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta)
// kernels from Python (fused_bn/_ops.py); autograd in C++
// (csrc/batch_norm_autograd.cpp, csrc/dropout_autograd.cpp).
//
// Conventions shared by the BatchNorm ops:
//   * `activation` names the activation applied after normalization, with
//     its parameters in `activation_params` (include/fused_bn/activation.h):
//     "identity", "relu", "relu6", "hardtanh" [min_val, max_val],
//     "leaky_relu" [negative_slope], "silu", "hardswish", "elu" [alpha].
//   * `residual`, where given, has the input's shape and dtype and is added
//     before the activation: output = act(batch_norm(input) + residual).
//   * mean/invstd/m2 and the gradient sums are per-channel tensors in the
//     accumulation dtype: float64 for float64 input, float32 otherwise.
//   * weight/bias/running statistics may be float32 while the input is
//     float16/bfloat16 (mixed precision), as in torch.nn.functional.batch_norm.
//   * Every argument is checked before anything is written: a call that
//     raises changes nothing.
#include <torch/library.h>

TORCH_LIBRARY(fused_bn, m) {
  // Forward, with the running statistics' update of a training step.
  // training=True normalizes with batch statistics and returns them (mean,
  // invstd); when running_mean/running_var are given it also updates them as
  // nn.BatchNorm does: num_batches_tracked += 1 (when given), then
  //   running = (1 - factor) * running + factor * batch
  // with factor = momentum, or 1 / num_batches_tracked when momentum is None
  // (cumulative average), and the unbiased batch variance; an empty batch
  // leaves them as they are. training=False normalizes with
  // running_mean/running_var (required), returned as (mean, invstd), and
  // writes nothing.
  m.def(
      "batch_norm_act(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "bool training, float? momentum, float eps, str activation=\"identity\", "
      "float[] activation_params=[], Tensor? residual=None) "
      "-> (Tensor output, Tensor mean, Tensor invstd)");

  // Backward of batch_norm_act. The activation's derivative is recomputed
  // from input (and residual) and the saved statistics; the forward output is
  // not needed. output_mask says which of (grad_input, grad_weight,
  // grad_bias, grad_residual) are needed; the others come back as empty
  // tensors (grad_residual always does without a residual).
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "bool training, str activation=\"identity\", float[] activation_params=[], "
      "Tensor? residual=None, bool[4] output_mask=[True, True, True, True]) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");

  // The running statistics' update on its own (synchronized BatchNorm, whose
  // statistics come from every rank), as batch_norm_act does it, from batch
  // statistics (mean, invstd) over `count` values per channel; the unbiased
  // batch variance is recovered from invstd: (1/invstd^2 - eps) * count / (count - 1).
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor invstd, "
      "float? momentum, float eps, int count) -> ()");

  // Building blocks for synchronized BatchNorm, where statistics and gradient
  // sums are combined across processes between the passes.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  m.def(
      "batch_norm_act_elemt(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, str activation=\"identity\", "
      "float[] activation_params=[]) -> Tensor");
  // Per-channel sums of g and g*(x - mean), where g = grad_output times the
  // activation's derivative.
  m.def(
      "batch_norm_act_backward_reduce(Tensor grad_output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "str activation=\"identity\", float[] activation_params=[]) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // grad_input from per-channel means (over the global batch) of g and
  // g*(x - mean).
  m.def(
      "batch_norm_act_backward_elemt(Tensor grad_output, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor mean_dy, Tensor mean_dy_xmu, str activation=\"identity\", "
      "float[] activation_params=[]) -> Tensor");

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
