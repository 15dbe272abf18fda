#pragma once
// Host-side pieces shared by the CPU and CUDA Dropout ops: argument checks
// (PyTorch's wording where it has one) and the tensors an op works on.
//
// The kernels walk a tensor in memory order, so every Dropout op works on a
// non-overlapping dense tensor: the input itself, or a copy of it laid out as
// empty_like(input) (which keeps the input's dimension order). Outputs are
// empty_like(input); fused_bn/_ops.py mirrors this in the fake kernels.
#include <ATen/core/Tensor.h>

#include "fused_bn/dropout_mask.h"

namespace fused_bn {

// The input (or gradient) and the output of one elementwise Dropout pass.
struct DropoutPass {
  at::Tensor input;   // non-overlapping and dense
  at::Tensor output;  // empty_like(input)
  DropoutKeepRule rule;
  double scale;
};

// p in [0, 1] and a floating point input.
void check_dropout_args(const at::Tensor& input, double p);

// `seed_offset`: the int64 tensor [seed, offset] on the input's device.
void check_seed_offset(const at::Tensor& input, const at::Tensor& seed_offset);

// A bit mask made by `dropout` for an input of `input`'s size.
void check_dropout_mask(const at::Tensor& input, const at::Tensor& mask);

// `t` itself when non-overlapping and dense, else a copy laid out as empty_like(t).
at::Tensor dense_tensor(const at::Tensor& t);

// Checks input and p; dense input, fresh output.
DropoutPass make_dropout_pass(const at::Tensor& input, double p);

// The uint8 mask returned by `dropout`: dropout_mask_bytes(numel) bytes when
// saved, else empty.
at::Tensor new_dropout_mask(const at::Tensor& input, bool save_mask);

// seed_offset read on the host (a CPU tensor).
DropoutStream host_dropout_stream(const at::Tensor& seed_offset);

// Checked counter ([..., 4]) and key ([2]) of the philox4x32 op.
void check_philox_args(const at::Tensor& counter, const at::Tensor& key);

}  // namespace fused_bn
