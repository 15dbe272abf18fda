// Autograd of the Dropout ops, in C++ for the reason batch_norm_autograd.cpp
// gives: a differentiable call costs no Python. Both ops are linear in their
// input, so each backward is the same mask applied to the gradient:
//   dropout             saves the 1-bit mask (save_mask) or just the 2-element
//                       seed_offset, from which backward draws the mask again;
//   dropout_apply_mask  saves the mask it was given.
// The mask follows the dense memory order of the forward output, so the
// gradient is first laid out with the output's strides. Backward calls the
// ops through the dispatcher, so with create_graph=True the gradients record
// these same nodes (any order of derivatives).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "autograd_records.h"
#include "op_calls.h"

namespace fused_bn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor dropout_apply_mask_op(const Tensor& input, const Tensor& mask, double p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_bn::dropout_apply_mask", "")
                             .typed<Tensor(const Tensor&, const Tensor&, double)>();
  return op.call(input, mask, p);
}

// `grad` laid out with the forward output's strides, so that element i of its
// memory order meets bit i of the mask.
Tensor with_strides(const Tensor& grad, const std::vector<int64_t>& strides) {
  if (grad.strides() == c10::IntArrayRef(strides)) return grad;
  return at::empty_strided(grad.sizes(), strides, grad.options()).copy_(grad);
}

class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, double p,
                               const Tensor& seed_offset, bool save_mask) {
    auto [output, mask] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return call_dropout(input, p, seed_offset, save_mask);
    }();
    ctx->save_for_backward({save_mask ? mask : seed_offset});
    ctx->saved_data["p"] = p;
    ctx->saved_data["save_mask"] = save_mask;
    ctx->saved_data["strides"] = output.strides().vec();
    ctx->mark_non_differentiable({mask});
    ctx->set_materialize_grads(false);  // the mask never gets a gradient: build no zeros
    return {output, mask};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list result(4);  // input, p, seed_offset, save_mask
    if (!grads[0].defined()) return result;
    const Tensor saved = ctx->get_saved_variables()[0];
    const double p = ctx->saved_data["p"].toDouble();
    const Tensor grad = with_strides(grads[0], ctx->saved_data["strides"].toIntVector());
    result[0] = ctx->saved_data["save_mask"].toBool()
                    ? dropout_apply_mask_op(grad, saved, p)
                    : std::get<0>(call_dropout(grad, p, saved, /*save_mask=*/false));
    return result;
  }
};

class DropoutApplyMaskFunction : public torch::autograd::Function<DropoutApplyMaskFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mask,
                               double p) {
    Tensor output = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return dropout_apply_mask_op(input, mask, p);
    }();
    ctx->save_for_backward({mask});
    ctx->saved_data["p"] = p;
    ctx->saved_data["strides"] = output.strides().vec();
    ctx->set_materialize_grads(false);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list result(3);  // input, mask, p
    if (!grads[0].defined()) return result;
    const Tensor grad = with_strides(grads[0], ctx->saved_data["strides"].toIntVector());
    result[0] = dropout_apply_mask_op(grad, ctx->get_saved_variables()[0],
                                      ctx->saved_data["p"].toDouble());
    return result;
  }
};

std::tuple<Tensor, Tensor> dropout_autograd(const Tensor& input, double p,
                                            const Tensor& seed_offset, bool save_mask) {
  if (!autograd_records(input)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_dropout(input, p, seed_offset, save_mask);
  }
  variable_list out = DropoutFunction::apply(input, p, seed_offset, save_mask);
  return {out[0], out[1]};
}

Tensor dropout_apply_mask_autograd(const Tensor& input, const Tensor& mask, double p) {
  if (!autograd_records(input)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dropout_apply_mask_op(input, mask, p);
  }
  return DropoutApplyMaskFunction::apply(input, mask, p)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, Autograd, m) {
  m.impl("dropout", &dropout_autograd);
  m.impl("dropout_apply_mask", &dropout_apply_mask_autograd);
}

}  // namespace fused_bn
