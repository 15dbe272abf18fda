#pragma once
// Device code of the CUDA BatchNorm(+activation) ops; batch_norm.cu launches it.
//
// Like the CPU kernels, every input is seen as a contiguous [outer, C, inner]
// array (see cpu/batch_norm_kernel.h):
//   planar (inner > 1, NCHW):       grid (C, splits); a block reduces a share
//                                   of one channel's rows, inner along threads.
//   rows (inner == 1, channels_last and (N, C)):
//                                   grid (ceil(C / 32), splits); a block is a
//                                   tile of 32 channels x 8 rows sliding down.
// Each block leaves one partial result per channel; a finalize kernel merges
// a channel's partials (one warp per channel, fixed order: deterministic) and
// folds the per-channel coefficients of the elementwise pass.
//
// Per-channel math is shared with the CPU kernels: Welford (welford.h),
// activate/activation_passes_grad (activation.h), ChannelAffine and
// ChannelGradInput (batch_norm_math.h).
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include <cstdint>

#include "fused_bn/activation.h"
#include "fused_bn/batch_norm_math.h"
#include "fused_bn/welford.h"

namespace fused_bn::cuda {

constexpr int kBlockThreads = 256;
constexpr int kWarpThreads = 32;
// Tile of the rows kernels: consecutive threads read consecutive channels.
constexpr int kTileChannels = 32;
constexpr int kTileRows = kBlockThreads / kTileChannels;

// ---- per-channel reduction states ------------------------------------------

// Sums of g and g * (x - mean), g = dy masked by the activation's derivative.
template <typename acc_t>
struct GradSums {
  acc_t g = 0;
  acc_t gx = 0;

  __device__ __forceinline__ void merge(const GradSums& other) {
    g += other.g;
    gx += other.gx;
  }
};

struct Merge {
  template <typename State>
  __device__ __forceinline__ State operator()(State a, const State& b) const {
    a.merge(b);
    return a;
  }
};

// Accumulators: what one element adds to its channel's state. channel(c)
// reads the per-channel inputs once per thread.
template <typename scalar_t, typename acc_t>
struct StatsAccumulator {
  using State = Welford<acc_t>;
  struct Channel {};

  const scalar_t* __restrict__ x;

  __device__ __forceinline__ Channel channel(int64_t) const { return {}; }

  template <typename index_t>
  __device__ __forceinline__ void add(State& s, Channel, index_t i) const {
    s.add(static_cast<acc_t>(x[i]));
  }
};

// The activation's input y at element i: the BatchNorm output (plus the
// residual) as PyTorch's module pair holds it, i.e. rounded to scalar_t (a
// no-op for float and double), as the CPU kernels compute it.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t pre_activation(const ChannelAffine<acc_t>& affine, acc_t x,
                                                const scalar_t* __restrict__ residual,
                                                index_t i) {
  acc_t y = affine.apply(x);
  if (residual != nullptr) {
    y = static_cast<acc_t>(static_cast<scalar_t>(y)) + static_cast<acc_t>(residual[i]);
  }
  return static_cast<acc_t>(static_cast<scalar_t>(y));
}

template <typename scalar_t, typename acc_t>
struct GradSumsAccumulator {
  using State = GradSums<acc_t>;
  struct Channel {
    ChannelAffine<acc_t> affine;  // recomputes the activation's input
    acc_t mean;
  };

  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ residual;  // or nullptr
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ invstd;
  const acc_t* __restrict__ weight;
  const acc_t* __restrict__ bias;
  ActivationSpec act;

  __device__ __forceinline__ Channel channel(int64_t c) const {
    return {ChannelAffine<acc_t>::fold(mean[c], invstd[c], weight[c], bias[c]), mean[c]};
  }

  template <typename index_t>
  __device__ __forceinline__ void add(State& s, const Channel& ch, index_t i) const {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t g = activation_grad(act, pre_activation(ch.affine, xv, residual, i),
                                    static_cast<acc_t>(dy[i]));
    s.g += g;
    s.gx += g * (xv - ch.mean);
  }
};

// ---- partial reductions ----------------------------------------------------
// partials[split * channels + c] holds block `split`'s result for channel c.

// Planar layout. The block's threads form rows of 2^lanes_log2 lanes (the
// smallest power of two covering inner, at most the block): a lane walks
// inner, a row walks the batch.
template <typename Accumulator, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    planar_partials_kernel(Accumulator acc, index_t outer, index_t channels, index_t inner,
                           int lanes_log2, typename Accumulator::State* __restrict__ partials) {
  using State = typename Accumulator::State;
  using BlockReduce = cub::BlockReduce<State, kBlockThreads>;
  __shared__ typename BlockReduce::TempStorage temp;

  const index_t c = blockIdx.x;
  const index_t lanes = index_t(1) << lanes_log2;
  const index_t rows_per_block = kBlockThreads >> lanes_log2;
  const index_t lane = threadIdx.x & (lanes - 1);
  const auto ch = acc.channel(c);
  State s;
  for (index_t n = blockIdx.y * rows_per_block + (threadIdx.x >> lanes_log2); n < outer;
       n += gridDim.y * rows_per_block) {
    const index_t base = (n * channels + c) * inner;
    for (index_t i = lane; i < inner; i += lanes) acc.add(s, ch, base + i);
  }
  s = BlockReduce(temp).Reduce(s, Merge{});
  if (threadIdx.x == 0) partials[blockIdx.y * channels + c] = s;
}

// Rows layout: a kTileRows x kTileChannels tile of threads slides down the
// rows; the tile's columns are then reduced, one logical warp of kTileRows
// lanes per channel.
template <typename Accumulator, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    rows_partials_kernel(Accumulator acc, index_t rows, index_t channels,
                         typename Accumulator::State* __restrict__ partials) {
  using State = typename Accumulator::State;
  using ColumnReduce = cub::WarpReduce<State, kTileRows>;
  __shared__ typename ColumnReduce::TempStorage temp[kTileChannels];
  // Raw storage: __shared__ variables cannot have constructors.
  __shared__ alignas(State) unsigned char tile_storage[sizeof(State) * kBlockThreads];
  State* tile = reinterpret_cast<State*>(tile_storage);

  const index_t first_channel = index_t(blockIdx.x) * kTileChannels;
  const int column = threadIdx.x % kTileChannels;
  const index_t c = first_channel + column;
  State s;
  if (c < channels) {
    const auto ch = acc.channel(c);
    for (index_t r = blockIdx.y * kTileRows + threadIdx.x / kTileChannels; r < rows;
         r += gridDim.y * kTileRows)
      acc.add(s, ch, r * channels + c);
  }
  tile[threadIdx.x] = s;
  __syncthreads();

  const int reduced_column = threadIdx.x / kTileRows;
  const int member = threadIdx.x % kTileRows;
  State t = tile[member * kTileChannels + reduced_column];
  t = ColumnReduce(temp[reduced_column]).Reduce(t, Merge{});
  const index_t out_c = first_channel + reduced_column;
  if (member == 0 && out_c < channels) partials[blockIdx.y * channels + out_c] = t;
}

// ---- finalize: merge partials, fold coefficients ---------------------------

// One warp per channel merges the channel's `splits` partials.
template <typename State>
__device__ __forceinline__ State merge_partials(const State* __restrict__ partials, int splits,
                                                int64_t channels, int64_t c, int lane) {
  using WarpReduce = cub::WarpReduce<State>;
  __shared__ typename WarpReduce::TempStorage temp[kBlockThreads / kWarpThreads];
  State s;
  for (int k = lane; k < splits; k += kWarpThreads) s.merge(partials[k * channels + c]);
  return WarpReduce(temp[threadIdx.x / kWarpThreads]).Reduce(s, Merge{});
}

// What the training backward multiplies through per channel: the affine
// recomputing the activation's input (for the mask) and dx's coefficients.
template <typename acc_t>
struct BackwardCoefficients {
  ChannelAffine<acc_t> affine;
  ChannelGradInput<acc_t> grad;
};

// As grad_input_coefficients() in the CPU kernels: sums over `count` values.
template <typename acc_t>
__device__ __forceinline__ BackwardCoefficients<acc_t> backward_coefficients(
    acc_t mean, acc_t invstd, acc_t weight, acc_t bias, bool training, acc_t sum_dy,
    acc_t sum_dy_xmu, acc_t count) {
  const auto affine = ChannelAffine<acc_t>::fold(mean, invstd, weight, bias);
  if (!training) return {affine, ChannelGradInput<acc_t>::eval(invstd, weight)};
  return {affine, ChannelGradInput<acc_t>::training(mean, invstd, weight, sum_dy / count,
                                                    sum_dy_xmu / count)};
}

template <typename acc_t>
struct StatsOutputs {
  acc_t* mean;
  acc_t* m2;      // or nullptr
  acc_t* invstd;  // or nullptr
  // With invstd: the forward's affine from weight and bias, or nullptr.
  ChannelAffine<acc_t>* affine;
  const acc_t* weight;
  const acc_t* bias;
  double eps;
};

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    finalize_stats_kernel(const Welford<acc_t>* __restrict__ partials, int splits,
                          int64_t channels, StatsOutputs<acc_t> out) {
  const int lane = threadIdx.x % kWarpThreads;
  const int64_t c = int64_t(blockIdx.x) * (kBlockThreads / kWarpThreads) + threadIdx.x / kWarpThreads;
  if (c >= channels) return;  // whole warps leave together
  const Welford<acc_t> stats = merge_partials(partials, splits, channels, c, lane);
  if (lane != 0) return;
  out.mean[c] = stats.mean;
  if (out.m2 != nullptr) out.m2[c] = stats.m2;
  if (out.invstd == nullptr) return;
  const acc_t invstd = inverse_std(stats.biased_var(), out.eps);
  out.invstd[c] = invstd;
  if (out.affine != nullptr)
    out.affine[c] = ChannelAffine<acc_t>::fold(stats.mean, invstd, out.weight[c], out.bias[c]);
}

template <typename acc_t>
struct GradOutputs {
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  BackwardCoefficients<acc_t>* coefficients;  // or nullptr
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  const acc_t* bias;
  acc_t count;
  bool training;
};

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    finalize_grad_kernel(const GradSums<acc_t>* __restrict__ partials, int splits,
                         int64_t channels, GradOutputs<acc_t> out) {
  const int lane = threadIdx.x % kWarpThreads;
  const int64_t c = int64_t(blockIdx.x) * (kBlockThreads / kWarpThreads) + threadIdx.x / kWarpThreads;
  if (c >= channels) return;
  const GradSums<acc_t> sums = merge_partials(partials, splits, channels, c, lane);
  if (lane != 0) return;
  out.sum_dy[c] = sums.g;
  out.sum_dy_xmu[c] = sums.gx;
  if (out.coefficients != nullptr)
    out.coefficients[c] = backward_coefficients(out.mean[c], out.invstd[c], out.weight[c],
                                                out.bias[c], out.training, sums.g, sums.gx,
                                                out.count);
}

// Coefficients from given statistics (the elemt ops and eval mode).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    fold_forward_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                        const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                        int64_t channels, ChannelAffine<acc_t>* __restrict__ affine) {
  const int64_t c = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x;
  if (c < channels) affine[c] = ChannelAffine<acc_t>::fold(mean[c], invstd[c], weight[c], bias[c]);
}

// mean_dy and mean_dy_xmu are means already: a count of 1. Unused (eval
// gradient) with training = false.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    fold_backward_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                         const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                         const acc_t* __restrict__ mean_dy, const acc_t* __restrict__ mean_dy_xmu,
                         bool training, int64_t channels,
                         BackwardCoefficients<acc_t>* __restrict__ coefficients) {
  const int64_t c = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x;
  if (c >= channels) return;
  coefficients[c] = backward_coefficients(mean[c], invstd[c], weight[c], bias[c], training,
                                          training ? mean_dy[c] : acc_t(0),
                                          training ? mean_dy_xmu[c] : acc_t(0), acc_t(1));
}

// ---- elementwise passes ----------------------------------------------------

// kVec consecutive elements, loaded and stored as one access (16 bytes when
// the launcher picks the widest width).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// Channel of element i. A vector lies in one channel in the planar layout
// (inner % kVec == 0) and spans kVec consecutive channels in the rows layout
// (channels % kVec == 0).
template <typename index_t, bool kRows>
struct ChannelOf {
  static constexpr bool kRowsLayout = kRows;

  at::cuda::detail::IntDivider<index_t> inner;
  at::cuda::detail::IntDivider<index_t> channels;

  __device__ __forceinline__ index_t first(index_t i) const {
    return kRows ? channels.mod(i) : channels.mod(inner.div(i));
  }
  __device__ __forceinline__ static index_t lane(index_t first, int k) {
    return kRows ? first + k : first;
  }
};

template <typename scalar_t, typename acc_t, int kVec, bool kRows, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    forward_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                         scalar_t* __restrict__ y, const ChannelAffine<acc_t>* __restrict__ affine,
                         ChannelOf<index_t, kRows> channel_of, ActivationSpec act,
                         index_t num_vectors) {
  using V = Vec<scalar_t, kVec>;
  const index_t stride = index_t(gridDim.x) * kBlockThreads;
  for (index_t v = index_t(blockIdx.x) * kBlockThreads + threadIdx.x; v < num_vectors;
       v += stride) {
    const V in = reinterpret_cast<const V*>(x)[v];
    const index_t c = channel_of.first(v * kVec);
    V out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const ChannelAffine<acc_t> a = affine[channel_of.lane(c, k)];
      const acc_t pre = pre_activation(a, static_cast<acc_t>(in.v[k]), residual, v * kVec + k);
      out.v[k] = static_cast<scalar_t>(activate(act, pre));
    }
    reinterpret_cast<V*>(y)[v] = out;
  }
}

// grad_input where dx is given, the residual's gradient g where dr is.
template <typename scalar_t, typename acc_t, int kVec, bool kRows, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    backward_apply_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ residual, scalar_t* __restrict__ dx,
                          scalar_t* __restrict__ dr,
                          const BackwardCoefficients<acc_t>* __restrict__ coefficients,
                          ChannelOf<index_t, kRows> channel_of, ActivationSpec act, bool training,
                          index_t num_vectors) {
  using V = Vec<scalar_t, kVec>;
  const index_t stride = index_t(gridDim.x) * kBlockThreads;
  for (index_t v = index_t(blockIdx.x) * kBlockThreads + threadIdx.x; v < num_vectors;
       v += stride) {
    const V x_in = reinterpret_cast<const V*>(x)[v];
    const V dy_in = reinterpret_cast<const V*>(dy)[v];
    const index_t c = channel_of.first(v * kVec);
    V dx_out, dr_out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const BackwardCoefficients<acc_t> coef = coefficients[channel_of.lane(c, k)];
      const acc_t xv = static_cast<acc_t>(x_in.v[k]);
      const acc_t g = activation_grad(act, pre_activation(coef.affine, xv, residual, v * kVec + k),
                                      static_cast<acc_t>(dy_in.v[k]));
      dr_out.v[k] = static_cast<scalar_t>(g);
      // In eval x is left out (b = c = 0): a NaN x must not spoil a finite gradient.
      dx_out.v[k] = static_cast<scalar_t>(training ? coef.grad.apply(g, xv) : g * coef.grad.a);
    }
    if (dx != nullptr) reinterpret_cast<V*>(dx)[v] = dx_out;
    if (dr != nullptr) reinterpret_cast<V*>(dr)[v] = dr_out;
  }
}

}  // namespace fused_bn::cuda
