#include "dropout_common.h"

#include <ATen/ATen.h>

#include "output_placement.h"

namespace fused_bn {

void check_dropout_args(const at::Tensor& input, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "dropout: expected a floating point input, got ", input.scalar_type());
}

void check_seed_offset(const at::Tensor& input, const at::Tensor& seed_offset) {
  TORCH_CHECK(seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2,
              "dropout: seed_offset must be an int64 tensor of 2 elements (seed, offset), got ",
              seed_offset.scalar_type(), " of shape ", seed_offset.sizes());
  TORCH_CHECK(seed_offset.device() == input.device(),
              "dropout: seed_offset must be on the input's device (", input.device(), "), got ",
              seed_offset.device());
}

void check_dropout_mask(const at::Tensor& input, const at::Tensor& mask) {
  const int64_t bytes = dropout_mask_bytes(input.numel());
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == bytes,
              "dropout: expected a uint8 mask of ", bytes, " bytes for an input of ",
              input.numel(), " elements, got ", mask.scalar_type(), " of shape ", mask.sizes());
  TORCH_CHECK(mask.device() == input.device(), "dropout: mask must be on the input's device (",
              input.device(), "), got ", mask.device());
}

at::Tensor dense_tensor(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(t).copy_(t);
}

DropoutPass make_dropout_pass(const at::Tensor& input, double p) {
  check_dropout_args(input, p);
  DropoutPass pass;
  pass.input = dense_tensor(input);
  pass.output = empty_like_placed(pass.input, {pass.input});
  pass.rule = dropout_keep_rule(p);
  pass.scale = dropout_scale(p);
  return pass;
}

at::Tensor new_dropout_mask(const at::Tensor& input, bool save_mask) {
  return at::empty({save_mask ? dropout_mask_bytes(input.numel()) : 0},
                   input.options().dtype(at::kByte));
}

DropoutStream host_dropout_stream(const at::Tensor& seed_offset) {
  const at::Tensor values = seed_offset.contiguous();
  const int64_t* v = values.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
}

void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.dim() >= 1 && counter.size(-1) == 4,
              "philox4x32: counter must be an int64 tensor of shape [..., 4], got ",
              counter.scalar_type(), " of shape ", counter.sizes());
  TORCH_CHECK(key.scalar_type() == at::kLong && key.numel() == 2,
              "philox4x32: key must be an int64 tensor of 2 elements, got ", key.scalar_type(),
              " of shape ", key.sizes());
  TORCH_CHECK(key.device() == counter.device(), "philox4x32: key must be on the counter's device");
}

}  // namespace fused_bn
