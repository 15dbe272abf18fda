#pragma once
// CPU Dropout loops over dense tensors in memory order (see dropout_common.h).
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "fused_bn/dropout_mask.h"

namespace fused_bn::cpu {

// output = input * keep(i) * scale, keep(i) drawn from `stream` by `rule`;
// the mask bits are written to `mask_bits` when it is not null. `output` may
// be `input` (in place).
void dropout_kernel(const at::Tensor& input, const at::Tensor& output, uint8_t* mask_bits,
                    const DropoutStream& stream, const DropoutKeepRule& rule, double scale);

// output = input * mask_bit(i) * scale.
void dropout_apply_mask_kernel(const at::Tensor& input, const uint8_t* mask_bits, double scale,
                               const at::Tensor& output);

}  // namespace fused_bn::cpu
