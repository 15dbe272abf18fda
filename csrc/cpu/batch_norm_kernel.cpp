#include "batch_norm_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../batch_norm_common.h"
#include "fused_bn/batch_norm_math.h"
#include "fused_bn/welford.h"

namespace fused_bn::cpu {
namespace {

// Elements a parallel task should at least cover for threading to pay off.
constexpr int64_t kParallelGrainElements = 32768;
// Rows per chunk on the row path: a chunk of about this many elements stays
// in L1/L2 between its two passes.
constexpr int64_t kChunkElements = 16384;

int64_t channel_grain(const ChannelView& v) {
  return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, v.count()));
}

int64_t rows_per_chunk(const ChannelView& v) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, v.channels));
}

int64_t num_chunks(const ChannelView& v) {
  const int64_t rows = rows_per_chunk(v);
  return (v.outer + rows - 1) / rows;
}

template <typename T>
const T* cdata(const at::Tensor& t) {
  return t.const_data_ptr<T>();
}

template <typename T>
T* mdata(at::Tensor& t) {
  return t.mutable_data_ptr<T>();
}

// Per-channel inputs of the elementwise passes, read once per call.
template <typename acc_t>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  const acc_t* bias;

  ChannelAffine<acc_t> affine(int64_t c) const {
    return ChannelAffine<acc_t>::fold(mean[c], invstd[c], weight[c], bias[c]);
  }
};

template <typename acc_t>
ChannelParams<acc_t> channel_params(const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& weight, const at::Tensor& bias) {
  return {cdata<acc_t>(mean), cdata<acc_t>(invstd), cdata<acc_t>(weight), cdata<acc_t>(bias)};
}

template <typename acc_t>
ChannelGradInput<acc_t> grad_input_coefficients(const ChannelParams<acc_t>& p, int64_t c,
                                                bool training, acc_t sum_dy, acc_t sum_dy_xmu,
                                                acc_t count) {
  if (!training) return ChannelGradInput<acc_t>::eval(p.invstd[c], p.weight[c]);
  return ChannelGradInput<acc_t>::training(p.mean[c], p.invstd[c], p.weight[c], sum_dy / count,
                                           sum_dy_xmu / count);
}

// ---- channel-first path (inner > 1): one channel's slab at a time --------

// Statistics are accumulated on x - shift, with shift = the channel's first
// value: for data far from zero (x = 1e4 + noise) the shifted values are
// small, so float32 sums and the Welford merges keep their precision.
template <typename scalar_t, typename acc_t>
Welford<acc_t> slab_stats(const scalar_t* x, const ChannelView& v, int64_t c) {
  Welford<acc_t> stats;
  const acc_t shift = static_cast<acc_t>(x[c * v.inner]);
  for (int64_t n = 0; n < v.outer; ++n) {
    const scalar_t* block = x + (n * v.channels + c) * v.inner;
    acc_t sum = 0;
    for (int64_t i = 0; i < v.inner; ++i) sum += static_cast<acc_t>(block[i]) - shift;
    const acc_t block_mean = sum / static_cast<acc_t>(v.inner);
    acc_t m2 = 0;
    for (int64_t i = 0; i < v.inner; ++i) {
      const acc_t d = (static_cast<acc_t>(block[i]) - shift) - block_mean;
      m2 += d * d;
    }
    stats.merge_block(static_cast<acc_t>(v.inner), block_mean, m2);
  }
  stats.mean += shift;
  return stats;
}

template <typename scalar_t, typename acc_t>
void slab_apply(const scalar_t* x, scalar_t* y, const ChannelView& v, int64_t c,
                ChannelAffine<acc_t> affine, Activation act) {
  for (int64_t n = 0; n < v.outer; ++n) {
    const int64_t offset = (n * v.channels + c) * v.inner;
    for (int64_t i = 0; i < v.inner; ++i) {
      y[offset + i] =
          static_cast<scalar_t>(activate(act, affine.apply(static_cast<acc_t>(x[offset + i]))));
    }
  }
}

template <typename scalar_t, typename acc_t>
void slab_grad_sums(const scalar_t* dy, const scalar_t* x, const ChannelView& v, int64_t c,
                    ChannelAffine<acc_t> affine, acc_t mean, Activation act, acc_t& sum_g,
                    acc_t& sum_gx) {
  sum_g = 0;
  sum_gx = 0;
  for (int64_t n = 0; n < v.outer; ++n) {
    const int64_t offset = (n * v.channels + c) * v.inner;
    for (int64_t i = 0; i < v.inner; ++i) {
      const acc_t xv = static_cast<acc_t>(x[offset + i]);
      if (!activation_passes_grad(act, affine.apply(xv))) continue;
      const acc_t g = static_cast<acc_t>(dy[offset + i]);
      sum_g += g;
      sum_gx += g * (xv - mean);
    }
  }
}

template <typename scalar_t, typename acc_t>
void slab_grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const ChannelView& v,
                     int64_t c, ChannelAffine<acc_t> affine, ChannelGradInput<acc_t> coef,
                     Activation act) {
  for (int64_t n = 0; n < v.outer; ++n) {
    const int64_t offset = (n * v.channels + c) * v.inner;
    for (int64_t i = 0; i < v.inner; ++i) {
      const acc_t xv = static_cast<acc_t>(x[offset + i]);
      const acc_t g =
          activation_passes_grad(act, affine.apply(xv)) ? static_cast<acc_t>(dy[offset + i]) : 0;
      dx[offset + i] = static_cast<scalar_t>(coef.apply(g, xv));
    }
  }
}

// ---- row path (inner == 1): chunks of rows of C channels -----------------

template <typename scalar_t, typename acc_t>
void rows_stats(const scalar_t* x, const ChannelView& v, acc_t* mean, acc_t* m2) {
  const int64_t C = v.channels, rows = rows_per_chunk(v), chunks = num_chunks(v);
  // Per-channel shift (the first row), as in slab_stats.
  std::vector<acc_t> shift(x, x + C);
  std::vector<acc_t> part_mean(chunks * C), part_m2(chunks * C), part_count(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows, r1 = std::min(v.outer, r0 + rows);
      acc_t* cm = part_mean.data() + k * C;
      acc_t* cm2 = part_m2.data() + k * C;
      std::fill(cm, cm + C, acc_t(0));
      std::fill(cm2, cm2 + C, acc_t(0));
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; ++c) cm[c] += static_cast<acc_t>(x[r * C + c]) - shift[c];
      const acc_t n = static_cast<acc_t>(r1 - r0);
      for (int64_t c = 0; c < C; ++c) cm[c] /= n;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = (static_cast<acc_t>(x[r * C + c]) - shift[c]) - cm[c];
          cm2[c] += d * d;
        }
      part_count[k] = n;
    }
  });
  at::parallel_for(0, C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Welford<acc_t> stats;
      for (int64_t k = 0; k < chunks; ++k)
        stats.merge_block(part_count[k], part_mean[k * C + c], part_m2[k * C + c]);
      mean[c] = stats.mean + shift[c];
      m2[c] = stats.m2;
    }
  });
}

template <typename acc_t>
std::vector<ChannelAffine<acc_t>> affines(const ChannelParams<acc_t>& p, int64_t channels) {
  std::vector<ChannelAffine<acc_t>> out(channels);
  for (int64_t c = 0; c < channels; ++c) out[c] = p.affine(c);
  return out;
}

template <typename scalar_t, typename acc_t>
void rows_apply(const scalar_t* x, scalar_t* y, const ChannelView& v,
                const ChannelParams<acc_t>& p, Activation act) {
  const int64_t C = v.channels;
  const auto affine = affines(p, C);
  at::parallel_for(0, v.outer, std::max<int64_t>(1, kParallelGrainElements / C),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r)
                       for (int64_t c = 0; c < C; ++c)
                         y[r * C + c] = static_cast<scalar_t>(
                             activate(act, affine[c].apply(static_cast<acc_t>(x[r * C + c]))));
                   });
}

template <typename scalar_t, typename acc_t>
void rows_grad_sums(const scalar_t* dy, const scalar_t* x, const ChannelView& v,
                    const ChannelParams<acc_t>& p, Activation act, acc_t* sum_g, acc_t* sum_gx) {
  const int64_t C = v.channels, rows = rows_per_chunk(v), chunks = num_chunks(v);
  const auto affine = affines(p, C);
  std::vector<acc_t> part_g(chunks * C), part_gx(chunks * C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows, r1 = std::min(v.outer, r0 + rows);
      acc_t* cg = part_g.data() + k * C;
      acc_t* cgx = part_gx.data() + k * C;
      std::fill(cg, cg + C, acc_t(0));
      std::fill(cgx, cgx + C, acc_t(0));
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(x[r * C + c]);
          if (!activation_passes_grad(act, affine[c].apply(xv))) continue;
          const acc_t g = static_cast<acc_t>(dy[r * C + c]);
          cg[c] += g;
          cgx[c] += g * (xv - p.mean[c]);
        }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t g = 0, gx = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      g += part_g[k * C + c];
      gx += part_gx[k * C + c];
    }
    sum_g[c] = g;
    sum_gx[c] = gx;
  }
}

template <typename scalar_t, typename acc_t>
void rows_grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const ChannelView& v,
                     const ChannelParams<acc_t>& p, const std::vector<ChannelGradInput<acc_t>>& coef,
                     Activation act) {
  const int64_t C = v.channels;
  const auto affine = affines(p, C);
  at::parallel_for(0, v.outer, std::max<int64_t>(1, kParallelGrainElements / C),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r)
                       for (int64_t c = 0; c < C; ++c) {
                         const acc_t xv = static_cast<acc_t>(x[r * C + c]);
                         const acc_t g = activation_passes_grad(act, affine[c].apply(xv))
                                             ? static_cast<acc_t>(dy[r * C + c])
                                             : acc_t(0);
                         dx[r * C + c] = static_cast<scalar_t>(coef[c].apply(g, xv));
                       }
                   });
}

template <typename acc_t>
std::vector<ChannelGradInput<acc_t>> rows_coefficients(const ChannelParams<acc_t>& p,
                                                       int64_t channels, bool training,
                                                       const acc_t* sum_dy,
                                                       const acc_t* sum_dy_xmu, acc_t count) {
  std::vector<ChannelGradInput<acc_t>> coef(channels);
  for (int64_t c = 0; c < channels; ++c)
    coef[c] = grad_input_coefficients(p, c, training, training ? sum_dy[c] : acc_t(0),
                                      training ? sum_dy_xmu[c] : acc_t(0), count);
  return coef;
}

#define FUSED_BN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

ChannelView make_channel_view(const at::Tensor& input, at::Tensor& contiguous_input) {
  const auto format = output_memory_format(input);
  contiguous_input = input.contiguous(format);
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t spatial = C == 0 || N == 0 ? 0 : input.numel() / (N * C);
  if (format != at::MemoryFormat::Contiguous || spatial == 1) return {N * spatial, C, 1};
  return {N, C, spatial};
}

void batch_norm_stats_kernel(const at::Tensor& input, const ChannelView& v, at::Tensor& mean,
                             at::Tensor& m2) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = cdata<scalar_t>(input);
    acc_t* mean_p = mdata<acc_t>(mean);
    acc_t* m2_p = mdata<acc_t>(m2);
    if (v.inner == 1) return rows_stats(x, v, mean_p, m2_p);
    at::parallel_for(0, v.channels, channel_grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const auto stats = slab_stats<scalar_t, acc_t>(x, v, c);
        mean_p[c] = stats.mean;
        m2_p[c] = stats.m2;
      }
    });
  });
}

void batch_norm_act_train_kernel(const at::Tensor& input, const ChannelView& v,
                                 const at::Tensor& weight, const at::Tensor& bias, double eps,
                                 Activation act, at::Tensor& output, at::Tensor& mean,
                                 at::Tensor& invstd) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_forward_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = cdata<scalar_t>(input);
    scalar_t* y = mdata<scalar_t>(output);
    acc_t* mean_p = mdata<acc_t>(mean);
    acc_t* invstd_p = mdata<acc_t>(invstd);
    const auto p = channel_params<acc_t>(mean, invstd, weight, bias);
    if (v.inner == 1) {
      at::Tensor m2 = at::empty_like(mean);
      acc_t* m2_p = mdata<acc_t>(m2);
      rows_stats(x, v, mean_p, m2_p);
      for (int64_t c = 0; c < v.channels; ++c)
        invstd_p[c] = inverse_std(m2_p[c] / static_cast<acc_t>(v.count()), eps);
      return rows_apply(x, y, v, p, act);
    }
    at::parallel_for(0, v.channels, channel_grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const auto stats = slab_stats<scalar_t, acc_t>(x, v, c);
        mean_p[c] = stats.mean;
        invstd_p[c] = inverse_std(stats.biased_var(), eps);
        slab_apply(x, y, v, c, p.affine(c), act);
      }
    });
  });
}

void batch_norm_act_elemt_kernel(const at::Tensor& input, const ChannelView& v,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight, const at::Tensor& bias, Activation act,
                                 at::Tensor& output) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = cdata<scalar_t>(input);
    scalar_t* y = mdata<scalar_t>(output);
    const auto p = channel_params<acc_t>(mean, invstd, weight, bias);
    if (v.inner == 1) return rows_apply(x, y, v, p, act);
    at::parallel_for(0, v.channels, channel_grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) slab_apply(x, y, v, c, p.affine(c), act);
    });
  });
}

void batch_norm_act_backward_reduce_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                           const ChannelView& v, const at::Tensor& mean,
                                           const at::Tensor& invstd, const at::Tensor& weight,
                                           const at::Tensor& bias, Activation act,
                                           at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = cdata<scalar_t>(input);
    const scalar_t* dy = cdata<scalar_t>(grad_output);
    acc_t* sg = mdata<acc_t>(sum_dy);
    acc_t* sgx = mdata<acc_t>(sum_dy_xmu);
    const auto p = channel_params<acc_t>(mean, invstd, weight, bias);
    if (v.inner == 1) return rows_grad_sums(dy, x, v, p, act, sg, sgx);
    at::parallel_for(0, v.channels, channel_grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        slab_grad_sums(dy, x, v, c, p.affine(c), p.mean[c], act, sg[c], sgx[c]);
    });
  });
}

void batch_norm_act_backward_elemt_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                          const ChannelView& v, const at::Tensor& mean,
                                          const at::Tensor& invstd, const at::Tensor& weight,
                                          const at::Tensor& bias, const at::Tensor& mean_dy,
                                          const at::Tensor& mean_dy_xmu, bool training,
                                          Activation act, at::Tensor& grad_input) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = cdata<scalar_t>(input);
    const scalar_t* dy = cdata<scalar_t>(grad_output);
    scalar_t* dx = mdata<scalar_t>(grad_input);
    const auto p = channel_params<acc_t>(mean, invstd, weight, bias);
    // mean_dy/mean_dy_xmu are means already: count 1 turns them into sums.
    const auto coef = rows_coefficients(p, v.channels, training,
                                        training ? cdata<acc_t>(mean_dy) : nullptr,
                                        training ? cdata<acc_t>(mean_dy_xmu) : nullptr, acc_t(1));
    if (v.inner == 1) return rows_grad_input(dy, x, dx, v, p, coef, act);
    at::parallel_for(0, v.channels, channel_grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        slab_grad_input(dy, x, dx, v, c, p.affine(c), coef[c], act);
    });
  });
}

void batch_norm_act_backward_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                    const ChannelView& v, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& weight,
                                    const at::Tensor& bias, bool training, Activation act,
                                    at::Tensor& grad_input, at::Tensor& sum_dy,
                                    at::Tensor& sum_dy_xmu) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = cdata<scalar_t>(input);
    const scalar_t* dy = cdata<scalar_t>(grad_output);
    scalar_t* dx = mdata<scalar_t>(grad_input);
    acc_t* sg = mdata<acc_t>(sum_dy);
    acc_t* sgx = mdata<acc_t>(sum_dy_xmu);
    const auto p = channel_params<acc_t>(mean, invstd, weight, bias);
    const acc_t count = static_cast<acc_t>(v.count());
    if (v.inner == 1) {
      rows_grad_sums(dy, x, v, p, act, sg, sgx);
      const auto coef = rows_coefficients(p, v.channels, training, sg, sgx, count);
      return rows_grad_input(dy, x, dx, v, p, coef, act);
    }
    at::parallel_for(0, v.channels, channel_grain(v), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const auto affine = p.affine(c);
        slab_grad_sums(dy, x, v, c, affine, p.mean[c], act, sg[c], sgx[c]);
        const auto coef = grad_input_coefficients(p, c, training, sg[c], sgx[c], count);
        slab_grad_input(dy, x, dx, v, c, affine, coef, act);
      }
    });
  });
}

}  // namespace fused_bn::cpu
