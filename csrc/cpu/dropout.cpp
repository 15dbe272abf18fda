// CPU registrations of the Dropout ops declared in ops.cpp; the loops live in
// dropout_kernel.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../dropout_common.h"
#include "dropout_kernel.h"

namespace fused_bn::cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> dropout(const Tensor& input, double p, const Tensor& seed_offset,
                                   bool save_mask) {
  check_seed_offset(input, seed_offset);
  const DropoutPass pass = make_dropout_pass(input, p);
  Tensor mask = new_dropout_mask(input, save_mask);
  dropout_kernel(pass.input, pass.output, save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr,
                 host_dropout_stream(seed_offset), pass.rule, pass.scale);
  return {pass.output, mask};
}

void dropout_(Tensor& self, double p, const Tensor& seed_offset) {
  check_dropout_args(self, p);
  check_seed_offset(self, seed_offset);
  const Tensor dense = dense_tensor(self);
  dropout_kernel(dense, dense, nullptr, host_dropout_stream(seed_offset), dropout_keep_rule(p),
                 dropout_scale(p));
  if (!dense.is_same(self)) self.copy_(dense);
}

Tensor dropout_apply_mask(const Tensor& input, const Tensor& mask, double p) {
  check_dropout_mask(input, mask);
  const DropoutPass pass = make_dropout_pass(input, p);
  dropout_apply_mask_kernel(pass.input, mask.contiguous().const_data_ptr<uint8_t>(), pass.scale,
                            pass.output);
  return pass.output;
}

Tensor philox4x32(const Tensor& counter, const Tensor& key) {
  check_philox_args(counter, key);
  const Tensor counters = counter.contiguous();
  Tensor result = at::empty_like(counters);
  const int64_t* in = counters.const_data_ptr<int64_t>();
  int64_t* out = result.mutable_data_ptr<int64_t>();
  const Tensor key_values = key.contiguous();
  const int64_t* k = key_values.const_data_ptr<int64_t>();
  const PhiloxKey philox_key = {static_cast<uint32_t>(k[0]), static_cast<uint32_t>(k[1])};
  for (int64_t row = 0; row < counters.numel() / 4; ++row) {
    PhiloxWords words;
    for (int w = 0; w < 4; ++w) words.x[w] = static_cast<uint32_t>(in[4 * row + w]);
    words = philox4x32_10(words, philox_key);
    for (int w = 0; w < 4; ++w) out[4 * row + w] = words.x[w];
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CPU, m) {
  m.impl("dropout", &dropout);
  m.impl("dropout_", &dropout_);
  m.impl("dropout_apply_mask", &dropout_apply_mask);
  m.impl("philox4x32", &philox4x32);
}

}  // namespace fused_bn::cpu
