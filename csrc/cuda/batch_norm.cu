// CUDA registrations of the BatchNorm(+activation) ops declared in ops.cpp:
// the ops (checks, layouts, allocation) are BatchNormOps (batch_norm_ops.h),
// shared with the CPU; here are their kernels, launching batch_norm_kernels.cuh.
//
// Every kernel runs on the current stream (the ops hold a device guard), is
// checked after launch, and nothing here synchronizes with the host: the ops
// can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../batch_norm_ops.h"
#include "../running_stats.h"
#include "batch_norm_kernels.cuh"
#include "../kernel_selection.h"

namespace fused_bn::cuda {
namespace {

using at::Tensor;
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
  for (const void* p : pointers) wide = wide && (p == nullptr || aligned_16(p));
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

template <typename T>
const T* cdata_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mdata_or_null(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <typename scalar_t, typename acc_t>
void forward_apply(const Tensor& input, const Tensor& residual, const ChannelView& v,
                   const Tensor& affine, const ActivationSpec& act, Tensor& output) {
  const scalar_t* x = cdata<scalar_t>(input);
  const scalar_t* r = cdata_or_null<scalar_t>(residual);
  scalar_t* y = mdata<scalar_t>(output);
  const auto* coef = reinterpret_cast<const ChannelAffine<acc_t>*>(affine.const_data_ptr());
  dispatch_apply<scalar_t>(v, {x, r, y}, [&](auto vec_tag, auto channel_of, auto num_vectors,
                                             unsigned grid) {
    constexpr int kVec = decltype(vec_tag)::value;
    using Of = decltype(channel_of);
    forward_apply_kernel<scalar_t, acc_t, kVec, Of::kRowsLayout>
        <<<grid, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(x, r, y, coef, channel_of,
                                                                       act, num_vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename acc_t>
void backward_apply(const Tensor& grad_output, const Tensor& input, const Tensor& residual,
                    const ChannelView& v, const Tensor& coefficients, const ActivationSpec& act,
                    bool training, Tensor& grad_input, Tensor& grad_residual) {
  const scalar_t* dy = cdata<scalar_t>(grad_output);
  const scalar_t* x = cdata<scalar_t>(input);
  const scalar_t* r = cdata_or_null<scalar_t>(residual);
  scalar_t* dx = mdata_or_null<scalar_t>(grad_input);
  scalar_t* dr = mdata_or_null<scalar_t>(grad_residual);
  if (dx == nullptr && dr == nullptr) return;
  const auto* coef =
      reinterpret_cast<const BackwardCoefficients<acc_t>*>(coefficients.const_data_ptr());
  dispatch_apply<scalar_t>(v, {dy, x, r, dx, dr}, [&](auto vec_tag, auto channel_of,
                                                      auto num_vectors, unsigned grid) {
    constexpr int kVec = decltype(vec_tag)::value;
    using Of = decltype(channel_of);
    backward_apply_kernel<scalar_t, acc_t, kVec, Of::kRowsLayout>
        <<<grid, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            dy, x, r, dx, dr, coef, channel_of, act, training, num_vectors);
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

// ---- the kernels of BatchNormOps (signatures of cpu/batch_norm_kernel.h) --------

// The activations other than identity and ReLU, and the residual add, are
// compiled but have not run on a GPU: they need FUSED_BN_CUDA_KERNELS=next
// (fused_bn's modules compute such calls with PyTorch's ops meanwhile).
void check_verified(const ActivationSpec& act, const Tensor& residual) {
  const bool verified = (act.kind == Activation::Identity || act.kind == Activation::ReLU) &&
                        !residual.defined();
  TORCH_CHECK(verified || cuda_next_kernels(),
              "fused_bn: on CUDA, activations other than identity and relu and the residual add "
              "have not been verified on a GPU yet; set FUSED_BN_CUDA_KERNELS=next to use their "
              "kernels (fused_bn's modules and functional API compute these calls with "
              "PyTorch's ops)");
}

struct CudaKernels {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  static constexpr auto update_running_stats = &update_running_stats_cuda;
  static constexpr auto eval_stats = &eval_stats_general;
  static void multiply_channels_(Tensor& values, const Tensor& factors) { values.mul_(factors); }

  static void batch_norm_stats_kernel(const Tensor& input, const ChannelView& v, Tensor& mean,
                                      Tensor& m2) {
    FUSED_BN_DISPATCH_CUDA(input.scalar_type(), "fused_bn_stats_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      int splits = 0;
      const Tensor partials = reduce_partials(
          StatsAccumulator<scalar_t, acc_t>{cdata<scalar_t>(input)}, v, input, splits);
      finalize_stats<acc_t>(partials, splits, v.channels,
                            {mdata<acc_t>(mean), mdata<acc_t>(m2), nullptr, nullptr, nullptr,
                             nullptr, 0.0});
    });
  }

  static void batch_norm_act_train_kernel(const Tensor& input, const ChannelView& v,
                                          const Tensor& weight, const Tensor& bias, double eps,
                                          const ActivationSpec& act, const Tensor& residual,
                                          Tensor& output, Tensor& mean, Tensor& invstd) {
    check_verified(act, residual);
    FUSED_BN_DISPATCH_CUDA(input.scalar_type(), "fused_bn_forward_train_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      int splits = 0;
      const Tensor partials = reduce_partials(
          StatsAccumulator<scalar_t, acc_t>{cdata<scalar_t>(input)}, v, input, splits);
      Tensor affine = scratch<ChannelAffine<acc_t>>(v.channels, input);
      finalize_stats<acc_t>(partials, splits, v.channels,
                            {mdata<acc_t>(mean), nullptr, mdata<acc_t>(invstd),
                             scratch_data<ChannelAffine<acc_t>>(affine), cdata<acc_t>(weight),
                             cdata<acc_t>(bias), eps});
      forward_apply<scalar_t, acc_t>(input, residual, v, affine, act, output);
    });
  }

  static void batch_norm_act_elemt_kernel(const Tensor& input, const ChannelView& v,
                                          const Tensor& mean, const Tensor& invstd,
                                          const Tensor& weight, const Tensor& bias,
                                          const ActivationSpec& act, const Tensor& residual,
                                          Tensor& output) {
    check_verified(act, residual);
    if (v.count() * v.channels == 0) return;
    FUSED_BN_DISPATCH_CUDA(input.scalar_type(), "fused_bn_elemt_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Tensor affine = fold_forward<acc_t>(mean, invstd, weight, bias);
      forward_apply<scalar_t, acc_t>(input, residual, v, affine, act, output);
    });
  }

  static void batch_norm_act_backward_reduce_kernel(const Tensor& grad_output,
                                                    const Tensor& input, const ChannelView& v,
                                                    const Tensor& mean, const Tensor& invstd,
                                                    const Tensor& weight, const Tensor& bias,
                                                    const ActivationSpec& act, Tensor& sum_dy,
                                                    Tensor& sum_dy_xmu) {
    Tensor none;
    grad_sums(grad_output, input, Tensor(), v, mean, invstd, weight, bias, /*training=*/true, act,
              sum_dy, sum_dy_xmu, none, none);
  }

  static void batch_norm_act_backward_elemt_kernel(
      const Tensor& grad_output, const Tensor& input, const ChannelView& v, const Tensor& mean,
      const Tensor& invstd, const Tensor& weight, const Tensor& bias, const Tensor& mean_dy,
      const Tensor& mean_dy_xmu, bool training, const ActivationSpec& act, Tensor& grad_input) {
    check_verified(act, Tensor());
    const int64_t C = v.channels;
    if (v.count() * C == 0) return;
    FUSED_BN_DISPATCH_CUDA(input.scalar_type(), "fused_bn_backward_elemt_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Tensor coefficients = scratch<BackwardCoefficients<acc_t>>(C, input);
      fold_backward_kernel<acc_t>
          <<<thread_per_channel_blocks(C), kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              cdata<acc_t>(mean), cdata<acc_t>(invstd), cdata<acc_t>(weight), cdata<acc_t>(bias),
              cdata<acc_t>(mean_dy), cdata<acc_t>(mean_dy_xmu), training, C,
              scratch_data<BackwardCoefficients<acc_t>>(coefficients));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Tensor none;
      backward_apply<scalar_t, acc_t>(grad_output, input, Tensor(), v, coefficients, act,
                                      training, grad_input, none);
    });
  }

  static void batch_norm_act_backward_kernel(const Tensor& grad_output, const Tensor& input,
                                             const ChannelView& v, const Tensor& mean,
                                             const Tensor& invstd, const Tensor& weight,
                                             const Tensor& bias, bool training,
                                             const ActivationSpec& act, const Tensor& residual,
                                             Tensor& grad_input, Tensor& grad_residual,
                                             Tensor& sum_dy, Tensor& sum_dy_xmu) {
    grad_sums(grad_output, input, residual, v, mean, invstd, weight, bias, training, act, sum_dy,
              sum_dy_xmu, grad_input, grad_residual);
  }

  // Per-channel gradient sums; then grad_input and grad_residual where defined.
  static void grad_sums(const Tensor& dy, const Tensor& input, const Tensor& residual,
                        const ChannelView& v, const Tensor& mean, const Tensor& invstd,
                        const Tensor& weight, const Tensor& bias, bool training,
                        const ActivationSpec& act, Tensor& sum_dy, Tensor& sum_dy_xmu,
                        Tensor& grad_input, Tensor& grad_residual) {
    check_verified(act, residual);
    const bool writes = grad_input.defined() || grad_residual.defined();
    FUSED_BN_DISPATCH_CUDA(input.scalar_type(), "fused_bn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const GradSumsAccumulator<scalar_t, acc_t> acc{
          cdata<scalar_t>(dy),  cdata<scalar_t>(input), cdata_or_null<scalar_t>(residual),
          cdata<acc_t>(mean),   cdata<acc_t>(invstd),   cdata<acc_t>(weight),
          cdata<acc_t>(bias),   act};
      int splits = 0;
      const Tensor partials = reduce_partials(acc, v, input, splits);
      Tensor coefficients;
      if (writes) coefficients = scratch<BackwardCoefficients<acc_t>>(v.channels, input);
      finalize_grad<acc_t>(
          partials, splits, v.channels,
          {mdata<acc_t>(sum_dy), mdata<acc_t>(sum_dy_xmu),
           writes ? scratch_data<BackwardCoefficients<acc_t>>(coefficients) : nullptr,
           cdata<acc_t>(mean), cdata<acc_t>(invstd), cdata<acc_t>(weight), cdata<acc_t>(bias),
           static_cast<acc_t>(v.count()), training});
      if (writes) {
        backward_apply<scalar_t, acc_t>(dy, input, residual, v, coefficients, act, training,
                                        grad_input, grad_residual);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CUDA, m) { BatchNormOps<CudaKernels>::register_kernels(m); }

}  // namespace fused_bn::cuda
