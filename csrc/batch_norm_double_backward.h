#pragma once
// batch_norm_act_backward as a differentiable op (second derivatives), and
// the helpers the autograd kernels of batch_norm_act share with it.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <initializer_list>
#include <tuple>
#include <vector>

namespace fused_bn {

using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// batch_norm_act_backward through the dispatcher from the Autograd key, so
// that with create_graph=True the gradients record their own node.
TensorQuad batch_norm_act_backward_op(const at::Tensor& grad_output, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      bool training, c10::string_view activation,
                                      c10::ArrayRef<double> activation_params,
                                      const c10::optional<at::Tensor>& residual,
                                      std::array<bool, 4> output_mask);

inline c10::optional<at::Tensor> optional_if_defined(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// A custom Function has a graph edge for each tensor argument that is
// defined, in argument order: the edge of argument k is the number of
// defined ones before it.
class GradEdges {
 public:
  explicit GradEdges(std::initializer_list<bool> defined) : defined_(defined) {}

  bool needed(torch::autograd::AutogradContext* ctx, size_t argument) const {
    if (!defined_[argument]) return false;
    size_t edge = 0;
    for (size_t k = 0; k < argument; ++k) edge += defined_[k];
    return ctx->needs_input_grad(edge);
  }

 private:
  std::vector<bool> defined_;
};

}  // namespace fused_bn
