// CUDA registrations of the BatchNorm(+activation) ops declared in ops.cpp:
// the same argument checks, layout canonicalization and empty-batch rules as
// the CPU ops (cpu/batch_norm.cpp), and the launches of batch_norm_kernels.cuh.
//
// Every kernel runs on the current stream under a device guard, and nothing
// here synchronizes with the host: the ops can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../batch_norm_common.h"
#include "../cpu/batch_norm_kernel.h"
#include "batch_norm_kernels.cuh"

namespace fused_bn::cuda {
namespace {

using at::Tensor;
using c10::optional;
using cpu::ChannelView;

// Blocks per SM the reductions aim for: enough to hide memory latency.
constexpr int kReduceBlocksPerSM = 4;
// Blocks per SM of the grid-stride elementwise kernels.
constexpr int kApplyBlocksPerSM = 8;
// Fewest elements a reduction block should cover, so the partials stay few.
constexpr int64_t kMinElementsPerReduceBlock = 8 * kBlockThreads;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// 32-bit indices where every offset fits, 64-bit beyond 2^31 elements.
template <typename F>
void dispatch_index_type(int64_t numel, const F& f) {
  if (numel <= std::numeric_limits<int32_t>::max()) {
    f(uint32_t{});
  } else {
    f(int64_t{});
  }
}

#define FUSED_BN_DISPATCH_CUDA(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename T>
const T* cdata(const Tensor& t) {
  return t.const_data_ptr<T>();
}

template <typename T>
T* mdata(Tensor& t) {
  return t.mutable_data_ptr<T>();
}

// A device buffer of n objects of a trivially copyable type, from the
// caching allocator.
template <typename T>
Tensor scratch(int64_t n, const Tensor& like) {
  return at::empty({n * static_cast<int64_t>(sizeof(T))}, like.options().dtype(at::kByte));
}

template <typename T>
T* scratch_data(Tensor& buffer) {
  return reinterpret_cast<T*>(buffer.mutable_data_ptr());
}

// ---- launches ---------------------------------------------------------------

// Splits of each channel's reduction across blocks: enough blocks to fill the
// GPU, but no split smaller than kMinElementsPerReduceBlock or than one row
// per thread row.
int64_t reduce_splits(int64_t channel_blocks, int64_t rows, int64_t rows_per_block,
                      int64_t elements_per_channel_block) {
  int64_t splits = ceil_div(int64_t(sm_count()) * kReduceBlocksPerSM, channel_blocks);
  splits = std::min(splits, ceil_div(rows, rows_per_block));
  splits = std::min(splits, ceil_div(elements_per_channel_block, kMinElementsPerReduceBlock));
  return std::clamp<int64_t>(splits, 1, kMaxGridY);
}

int planar_lanes_log2(int64_t inner) {
  int log2 = 0;
  while ((int64_t(1) << log2) < inner && (1 << log2) < kBlockThreads) ++log2;
  return log2;
}

// Per-channel partial results of `acc` over the view; returns the buffer of
// splits x C states and sets `splits`.
template <typename Accumulator>
Tensor reduce_partials(const Accumulator& acc, const ChannelView& v, const Tensor& like,
                       int& splits) {
  using State = typename Accumulator::State;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t C = v.channels;
  const bool rows_layout = v.inner == 1;
  const int lanes_log2 = rows_layout ? 0 : planar_lanes_log2(v.inner);
  const int64_t channel_blocks = rows_layout ? ceil_div(C, kTileChannels) : C;
  const int64_t rows_per_block = rows_layout ? kTileRows : (kBlockThreads >> lanes_log2);
  const int64_t channels_per_block = rows_layout ? kTileChannels : 1;
  splits = static_cast<int>(reduce_splits(channel_blocks, v.outer, rows_per_block,
                                          v.count() * channels_per_block));
  Tensor partials = scratch<State>(splits * C, like);
  State* out = scratch_data<State>(partials);
  const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(splits));
  dispatch_index_type(v.count() * C, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    if (rows_layout) {
      rows_partials_kernel<Accumulator, index_t>
          <<<grid, kBlockThreads, 0, stream>>>(acc, index_t(v.outer), index_t(C), out);
    } else {
      planar_partials_kernel<Accumulator, index_t><<<grid, kBlockThreads, 0, stream>>>(
          acc, index_t(v.outer), index_t(C), index_t(v.inner), lanes_log2, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partials;
}

unsigned warp_per_channel_blocks(int64_t channels) {
  return static_cast<unsigned>(ceil_div(channels, kBlockThreads / kWarpThreads));
}

unsigned thread_per_channel_blocks(int64_t channels) {
  return static_cast<unsigned>(ceil_div(channels, kBlockThreads));
}

template <typename acc_t>
void finalize_stats(const Tensor& partials, int splits, int64_t channels,
                    const StatsOutputs<acc_t>& out) {
  finalize_stats_kernel<acc_t>
      <<<warp_per_channel_blocks(channels), kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const Welford<acc_t>*>(partials.const_data_ptr()), splits, channels,
          out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void finalize_grad(const Tensor& partials, int splits, int64_t channels,
                   const GradOutputs<acc_t>& out) {
  finalize_grad_kernel<acc_t>
      <<<warp_per_channel_blocks(channels), kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const GradSums<acc_t>*>(partials.const_data_ptr()), splits, channels,
          out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches `launch(vec_tag, rows_tag, index_tag, channel_of, num_vectors, grid)`
// for the widest access that keeps a vector's elements in predictable
// channels and every pointer 16-byte aligned.
template <typename scalar_t, typename F>
void dispatch_apply(const ChannelView& v, std::initializer_list<const void*> pointers,
                    const F& launch) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  const bool rows_layout = v.inner == 1;
  const int64_t numel = v.count() * v.channels;
  if (numel == 0) return;
  bool wide = (rows_layout ? v.channels : v.inner) % kWide == 0;
  for (const void* p : pointers) wide = wide && aligned_16(p);
  auto with_layout = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    const int64_t num_vectors = numel / kVec;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(
        ceil_div(num_vectors, kBlockThreads), int64_t(sm_count()) * kApplyBlocksPerSM));
    dispatch_index_type(numel, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      auto with_rows = [&](auto rows_tag) {
        constexpr bool kRows = decltype(rows_tag)::value;
        const ChannelOf<index_t, kRows> channel_of{
            at::cuda::detail::IntDivider<index_t>(index_t(v.inner)),
            at::cuda::detail::IntDivider<index_t>(index_t(v.channels))};
        launch(vec_tag, channel_of, index_t(num_vectors), grid);
      };
      if (rows_layout) {
        with_rows(std::true_type{});
      } else {
        with_rows(std::false_type{});
      }
    });
  };
  if (wide) {
    with_layout(std::integral_constant<int, kWide>{});
  } else {
    with_layout(std::integral_constant<int, 1>{});
  }
}

template <typename scalar_t, typename acc_t>
void forward_apply(const Tensor& input, const ChannelView& v, const Tensor& affine,
                   Activation act, Tensor& output) {
  const scalar_t* x = cdata<scalar_t>(input);
  scalar_t* y = mdata<scalar_t>(output);
  const auto* coef = reinterpret_cast<const ChannelAffine<acc_t>*>(affine.const_data_ptr());
  dispatch_apply<scalar_t>(v, {x, y}, [&](auto vec_tag, auto channel_of, auto num_vectors,
                                          unsigned grid) {
    constexpr int kVec = decltype(vec_tag)::value;
    using Of = decltype(channel_of);
    forward_apply_kernel<scalar_t, acc_t, kVec, Of::kRowsLayout>
        <<<grid, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(x, y, coef, channel_of,
                                                                       act, num_vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename acc_t>
void backward_apply(const Tensor& grad_output, const Tensor& input, const ChannelView& v,
                    const Tensor& coefficients, Activation act, Tensor& grad_input) {
  const scalar_t* dy = cdata<scalar_t>(grad_output);
  const scalar_t* x = cdata<scalar_t>(input);
  scalar_t* dx = mdata<scalar_t>(grad_input);
  const auto* coef =
      reinterpret_cast<const BackwardCoefficients<acc_t>*>(coefficients.const_data_ptr());
  dispatch_apply<scalar_t>(v, {dy, x, dx}, [&](auto vec_tag, auto channel_of, auto num_vectors,
                                               unsigned grid) {
    constexpr int kVec = decltype(vec_tag)::value;
    using Of = decltype(channel_of);
    backward_apply_kernel<scalar_t, acc_t, kVec, Of::kRowsLayout>
        <<<grid, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            dy, x, dx, coef, channel_of, act, num_vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename acc_t>
Tensor fold_forward(const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                    const Tensor& bias) {
  const int64_t C = mean.numel();
  Tensor affine = scratch<ChannelAffine<acc_t>>(C, mean);
  if (C == 0) return affine;
  fold_forward_kernel<acc_t>
      <<<thread_per_channel_blocks(C), kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          cdata<acc_t>(mean), cdata<acc_t>(invstd), cdata<acc_t>(weight), cdata<acc_t>(bias), C,
          scratch_data<ChannelAffine<acc_t>>(affine));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return affine;
}

// ---- op implementations -------------------------------------------------------

Tensor channel_stat_like(const Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(accumulate_type(input)));
}

Tensor param_grad(const Tensor& sum, const optional<Tensor>& param) {
  if (param.has_value() && param->defined()) return sum.to(param->scalar_type());
  return sum;
}

void check_cuda_input(const Tensor& input, const char* op) {
  TORCH_CHECK(input.is_cuda(), "fused_bn::", op, ": expected input on a CUDA device, got ",
              input.device());
  TORCH_CHECK(input.layout() == at::kStrided, "fused_bn::", op,
              ": expected a strided (dense) input, got layout ", input.layout());
}

// Inputs of every op, canonicalized once (as in the CPU ops).
struct Prepared {
  Tensor input;  // contiguous in output_memory_format(input)
  ChannelView view;
  Tensor weight;  // accumulation dtype, ones where absent
  Tensor bias;    // accumulation dtype, zeros where absent
};

Prepared prepare(const Tensor& input, const optional<Tensor>& weight,
                 const optional<Tensor>& bias) {
  Prepared p;
  p.view = cpu::make_channel_view(input, p.input);
  p.weight = channel_param_or(weight, input, 1.0);
  p.bias = channel_param_or(bias, input, 0.0);
  return p;
}

Tensor grad_like_input(const Tensor& grad_output, const Prepared& p) {
  return grad_output.contiguous(output_memory_format(p.input));
}

void train_forward(const Prepared& p, double eps, Activation act, Tensor& output, Tensor& mean,
                   Tensor& invstd) {
  FUSED_BN_DISPATCH_CUDA(p.input.scalar_type(), "fused_bn_forward_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int splits = 0;
    const Tensor partials =
        reduce_partials(StatsAccumulator<scalar_t, acc_t>{cdata<scalar_t>(p.input)}, p.view,
                        p.input, splits);
    Tensor affine = scratch<ChannelAffine<acc_t>>(p.view.channels, p.input);
    finalize_stats<acc_t>(partials, splits, p.view.channels,
                          {mdata<acc_t>(mean), nullptr, mdata<acc_t>(invstd),
                           scratch_data<ChannelAffine<acc_t>>(affine), cdata<acc_t>(p.weight),
                           cdata<acc_t>(p.bias), eps});
    forward_apply<scalar_t, acc_t>(p.input, p.view, affine, act, output);
  });
}

void elemt_forward(const Prepared& p, const Tensor& mean, const Tensor& invstd, Activation act,
                   Tensor& output) {
  FUSED_BN_DISPATCH_CUDA(p.input.scalar_type(), "fused_bn_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor affine = fold_forward<acc_t>(mean, invstd, p.weight, p.bias);
    forward_apply<scalar_t, acc_t>(p.input, p.view, affine, act, output);
  });
}

// Per-channel gradient sums; with `grad_input` defined, also grad_input.
void backward(const Tensor& dy, const Prepared& p, const Tensor& mean, const Tensor& invstd,
              bool training, Activation act, Tensor& sum_dy, Tensor& sum_dy_xmu,
              Tensor* grad_input) {
  FUSED_BN_DISPATCH_CUDA(p.input.scalar_type(), "fused_bn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradSumsAccumulator<scalar_t, acc_t> acc{
        cdata<scalar_t>(dy), cdata<scalar_t>(p.input), cdata<acc_t>(mean),
        cdata<acc_t>(invstd), cdata<acc_t>(p.weight), cdata<acc_t>(p.bias), act};
    int splits = 0;
    const Tensor partials = reduce_partials(acc, p.view, p.input, splits);
    Tensor coefficients;
    if (grad_input) coefficients = scratch<BackwardCoefficients<acc_t>>(p.view.channels, p.input);
    finalize_grad<acc_t>(
        partials, splits, p.view.channels,
        {mdata<acc_t>(sum_dy), mdata<acc_t>(sum_dy_xmu),
         grad_input ? scratch_data<BackwardCoefficients<acc_t>>(coefficients) : nullptr,
         cdata<acc_t>(mean), cdata<acc_t>(invstd), cdata<acc_t>(p.weight), cdata<acc_t>(p.bias),
         static_cast<acc_t>(p.view.count()), training});
    if (grad_input) backward_apply<scalar_t, acc_t>(dy, p.input, p.view, coefficients, act,
                                                    *grad_input);
  });
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act(const Tensor& input,
                                                  const optional<Tensor>& weight,
                                                  const optional<Tensor>& bias,
                                                  const optional<Tensor>& running_mean,
                                                  const optional<Tensor>& running_var,
                                                  bool training, double eps,
                                                  c10::string_view activation) {
  check_cuda_input(input, "batch_norm_act");
  check_batch_norm_inputs(input, weight, bias, running_mean, running_var);
  const Activation act = parse_activation(std::string(activation));
  const c10::cuda::CUDAGuard guard(input.device());
  Prepared p = prepare(input, weight, bias);
  Tensor output = at::empty_like(p.input);
  Tensor mean = channel_stat_like(input);
  Tensor invstd = channel_stat_like(input);
  if (training) {
    if (p.view.count() == 0) {  // empty batch: nothing to normalize, no statistics
      mean.zero_();
      invstd.zero_();
      return {output, mean, invstd};
    }
    train_forward(p, eps, act, output, mean, invstd);
    return {output, mean, invstd};
  }
  TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
              "batch_norm_act: running_mean and running_var are required when training=False");
  mean.copy_(*running_mean);
  at::rsqrt_out(invstd, running_var->to(invstd.scalar_type()) + eps);
  elemt_forward(p, mean, invstd, act, output);
  return {output, mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_backward(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, bool training,
    c10::string_view activation) {
  check_cuda_input(input, "batch_norm_act_backward");
  check_batch_norm_inputs(input, weight, bias, c10::nullopt, c10::nullopt);
  check_grad_output(grad_output, input);
  check_channel_stat(input, mean, "mean");
  check_channel_stat(input, invstd, "invstd");
  const Activation act = parse_activation(std::string(activation));
  const c10::cuda::CUDAGuard guard(input.device());
  Prepared p = prepare(input, weight, bias);
  const Tensor dy = grad_like_input(grad_output, p);
  Tensor grad_input = at::empty_like(p.input);
  Tensor sum_dy = channel_stat_like(input);
  Tensor sum_dy_xmu = channel_stat_like(input);
  const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  if (p.view.count() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
  } else {
    backward(dy, p, mean_c, invstd_c, training, act, sum_dy, sum_dy_xmu, &grad_input);
  }
  return {grad_input, param_grad(sum_dy_xmu * invstd_c, weight), param_grad(sum_dy, bias)};
}

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_cuda_input(input, "batch_norm_stats");
  check_batch_norm_inputs(input, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt);
  const c10::cuda::CUDAGuard guard(input.device());
  Tensor contiguous;
  const ChannelView view = cpu::make_channel_view(input, contiguous);
  Tensor mean = channel_stat_like(input);
  Tensor m2 = channel_stat_like(input);
  if (view.count() == 0) return {mean.zero_(), m2.zero_()};
  FUSED_BN_DISPATCH_CUDA(input.scalar_type(), "fused_bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int splits = 0;
    const Tensor partials = reduce_partials(
        StatsAccumulator<scalar_t, acc_t>{cdata<scalar_t>(contiguous)}, view, contiguous, splits);
    finalize_stats<acc_t>(partials, splits, view.channels,
                          {mdata<acc_t>(mean), mdata<acc_t>(m2), nullptr, nullptr, nullptr,
                           nullptr, 0.0});
  });
  return {mean, m2};
}

Tensor batch_norm_act_elemt(const Tensor& input, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, const Tensor& mean,
                            const Tensor& invstd, c10::string_view activation) {
  check_cuda_input(input, "batch_norm_act_elemt");
  check_batch_norm_inputs(input, weight, bias, c10::nullopt, c10::nullopt);
  check_channel_stat(input, mean, "mean");
  check_channel_stat(input, invstd, "invstd");
  const Activation act = parse_activation(std::string(activation));
  const c10::cuda::CUDAGuard guard(input.device());
  Prepared p = prepare(input, weight, bias);
  Tensor output = at::empty_like(p.input);
  elemt_forward(p, mean.contiguous(), invstd.contiguous(), act, output);
  return output;
}

std::tuple<Tensor, Tensor> batch_norm_act_backward_reduce(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd,
    c10::string_view activation) {
  check_cuda_input(input, "batch_norm_act_backward_reduce");
  check_batch_norm_inputs(input, weight, bias, c10::nullopt, c10::nullopt);
  check_grad_output(grad_output, input);
  check_channel_stat(input, mean, "mean");
  check_channel_stat(input, invstd, "invstd");
  const Activation act = parse_activation(std::string(activation));
  const c10::cuda::CUDAGuard guard(input.device());
  Prepared p = prepare(input, weight, bias);
  Tensor sum_dy = channel_stat_like(input);
  Tensor sum_dy_xmu = channel_stat_like(input);
  if (p.view.count() == 0) return {sum_dy.zero_(), sum_dy_xmu.zero_()};
  backward(grad_like_input(grad_output, p), p, mean.contiguous(), invstd.contiguous(),
           /*training=*/true, act, sum_dy, sum_dy_xmu, /*grad_input=*/nullptr);
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_act_backward_elemt(const Tensor& grad_output, const Tensor& input,
                                     const optional<Tensor>& weight, const optional<Tensor>& bias,
                                     const Tensor& mean, const Tensor& invstd,
                                     const Tensor& mean_dy, const Tensor& mean_dy_xmu,
                                     c10::string_view activation) {
  check_cuda_input(input, "batch_norm_act_backward_elemt");
  check_batch_norm_inputs(input, weight, bias, c10::nullopt, c10::nullopt);
  check_grad_output(grad_output, input);
  check_channel_stat(input, mean, "mean");
  check_channel_stat(input, invstd, "invstd");
  check_channel_stat(input, mean_dy, "mean_dy");
  check_channel_stat(input, mean_dy_xmu, "mean_dy_xmu");
  const Activation act = parse_activation(std::string(activation));
  const c10::cuda::CUDAGuard guard(input.device());
  Prepared p = prepare(input, weight, bias);
  const Tensor dy = grad_like_input(grad_output, p);
  Tensor grad_input = at::empty_like(p.input);
  const int64_t C = p.view.channels;
  if (C == 0) return grad_input;
  FUSED_BN_DISPATCH_CUDA(input.scalar_type(), "fused_bn_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor coefficients = scratch<BackwardCoefficients<acc_t>>(C, p.input);
    fold_backward_kernel<acc_t>
        <<<thread_per_channel_blocks(C), kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            cdata<acc_t>(mean.contiguous()), cdata<acc_t>(invstd.contiguous()),
            cdata<acc_t>(p.weight), cdata<acc_t>(p.bias), cdata<acc_t>(mean_dy.contiguous()),
            cdata<acc_t>(mean_dy_xmu.contiguous()), C,
            scratch_data<BackwardCoefficients<acc_t>>(coefficients));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_apply<scalar_t, acc_t>(dy, p.input, p.view, coefficients, act, grad_input);
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CUDA, m) {
  m.impl("batch_norm_act", &batch_norm_act);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_act_elemt", &batch_norm_act_elemt);
  m.impl("batch_norm_act_backward_reduce", &batch_norm_act_backward_reduce);
  m.impl("batch_norm_act_backward_elemt", &batch_norm_act_backward_elemt);
}

}  // namespace fused_bn::cuda
