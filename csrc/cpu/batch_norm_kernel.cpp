// Vectorized, multi-threaded CPU loops of the BatchNorm(+activation) ops.
//
// This file is compiled once per instruction set: setup.py defines
// CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) with the matching -m flags, as ATen
// does for its own kernels, so at::vec::Vectorized has that ISA's width and
// each copy lives in its own namespace. cpu_capability.cpp picks one at run
// time.
//
// Numerics:
//  * Results do not depend on the thread count: a channel's work is cut into
//    blocks whose size depends on the shape only, and block results are
//    merged in block order whichever thread computed them.
//  * Statistics: per block, a shifted two-pass sum (the block mean, then the
//    sums of d = x - block mean and d^2), blocks merged with Chan's formula
//    (welford.h) in double: a float32 mean near 1e4 has a resolution of 1e-3,
//    which the merge would carry into the variance. Accurate to ~1e-7 for
//    x = 1e4 + N(0, 1) in float32.
//  * The pre-activation y = fmadd(x, scale, shift) decides the ReLU mask in
//    backward. Every element, tails included (masked loads and stores), goes
//    through the same vector code in forward and backward, and this file is
//    compiled with -ffp-contract=off, so the recomputed mask always matches
//    the forward output.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "activation_vec.h"
#include "batch_norm_kernel.h"
#include "cpu_capability.h"
#include "fused_bn/batch_norm_math.h"
#include "fused_bn/welford.h"

#ifndef CPU_CAPABILITY
#error "compile batch_norm_kernel.cpp once per ISA with CPU_CAPABILITY defined (see setup.py)"
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define FUSED_BN_STREAMING_STORES 1
#endif

namespace fused_bn::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// A block (a channel's share of the planes, or a chunk of channels-last rows)
// of about this many elements stays in L1/L2 between its two passes.
constexpr int64_t kBlockElements = 8192;
// A chunk of rows also ends in per-channel scalar work (its moments, then
// a merge): with many channels, shallower chunks spend more on that than on
// their rows ([256,1024] and [4096,512] were 5-20% faster at 65536 than at
// 16384). 256 KB of float32 still fits in L2 between the two passes. A
// chunk's float32 sums (of x, and of g in backward) run over at most
// kMaxChunkRows rows: their rounding error grows with the rows (float32
// grad_bias of [32,67,45,45] channels_last left 1e-4 at 978 rows per chunk);
// chunks are merged in double.
constexpr int64_t kRowChunkElements = 65536;
constexpr int64_t kMaxChunkRows = 256;
// Elements a parallel task should at least cover for threading to pay off.
constexpr int64_t kParallelGrainElements = 32768;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- vector helpers -------------------------------------------------------

// Loads/stores of scalar_t elements as vectors of the accumulation type;
// half/bfloat16 are converted to float. `count` < width touches only the
// first `count` elements; the other lanes load as 0.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  static Vec load(const scalar_t* p, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return count == kWidth ? Vec::loadu(p) : Vec::loadu(p, count);
    } else {
      if (count == kWidth) {
        Vec out;
        at::vec::load_to_float(p, out);
        return out;
      }
      // A partial (masked where the ISA has it) load of the reduced type; its
      // first kWidth elements hold the `count` loaded and zeros.
      return std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count)));
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, count);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
    }
  }

  // v rounded to scalar_t and back: a no-op where scalar_t is acc_t.
  static Vec round(const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return v;
    } else {
      return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(v, v)));
    }
  }
};

// Where the pass that writes an output reads its inputs from.
enum class InputSource { kMemory, kL2Slab };

// Outputs much larger than the caches are written with non-temporal stores
// (AVX2/AVX512, whole aligned vectors): their lines are not read into the
// cache before being overwritten, which saves a pass over memory, and they
// do not evict the slabs that a pass re-reads from L2. Such a pass streams
// outputs from kSlabStreamingBytes. A pass that reads its inputs from memory
// streams only once they exceed kInputStreamingBytes: smaller inputs partly
// stay in L3 from the reduction just before, and ordinary stores, written
// back later, cost less there (the [4096,512] float32 elementwise pass took
// 0.13-0.19 ms with them, 0.19-0.33 ms streamed).
constexpr int64_t kSlabStreamingBytes = int64_t(8) << 20;
constexpr int64_t kInputStreamingBytes = int64_t(16) << 20;

#ifdef FUSED_BN_STREAMING_STORES
#ifdef CPU_CAPABILITY_AVX512
using FloatBits = __m512;
#else
using FloatBits = __m256;
#endif

// A whole float vector as the bits to store for scalar_t: the vector itself
// for float; for bfloat16/half, rounded to a half-width integer vector (the
// rounding of at::vec::convert_from_float, on one vector instead of two).
template <typename scalar_t>
inline auto output_bits(const Vectorized<float>& v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return static_cast<FloatBits>(v);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return at::vec::cvtfp32_bf16(v);
  } else {
    return at::vec::cvtfp32_fp16(v);
  }
}

#ifdef CPU_CAPABILITY_AVX512
inline void store_bits(void* p, __m512 v, bool stream) {
  stream ? _mm512_stream_ps(static_cast<float*>(p), v) : _mm512_storeu_ps(p, v);
}
inline void store_bits(void* p, __m256i v, bool stream) {
  stream ? _mm256_stream_si256(static_cast<__m256i*>(p), v)
         : _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}
#else
inline void store_bits(void* p, __m256 v, bool stream) {
  stream ? _mm256_stream_ps(static_cast<float*>(p), v) : _mm256_storeu_ps(static_cast<float*>(p), v);
}
inline void store_bits(void* p, __m128i v, bool stream) {
  stream ? _mm_stream_si128(static_cast<__m128i*>(p), v)
         : _mm_storeu_si128(static_cast<__m128i*>(p), v);
}
#endif
#endif

template <typename scalar_t>
class OutputStore {
 public:
  // `inputs`: how many tensors of the output's size the pass reads.
  OutputStore(const ChannelView& v, int64_t inputs, InputSource source) {
    const int64_t bytes = v.count() * v.channels * static_cast<int64_t>(sizeof(scalar_t));
    stream_ = source == InputSource::kL2Slab ? bytes >= kSlabStreamingBytes
                                             : inputs * bytes >= kInputStreamingBytes;
  }

  template <typename Vec>
  void operator()(scalar_t* p, const Vec& v, int64_t count) const {
#ifdef FUSED_BN_STREAMING_STORES
    if constexpr (std::is_same_v<typename Vec::value_type, float> && !std::is_same_v<scalar_t, double>) {
      if (count == Vec::size()) {
        const auto bits = output_bits<scalar_t>(v);
        store_bits(p, bits, stream_ && reinterpret_cast<uintptr_t>(p) % sizeof(bits) == 0);
        return;
      }
    }
#endif
    VecIO<scalar_t>::store(p, v, count);
  }

 private:
  [[maybe_unused]] bool stream_ = false;
};

// Makes a thread's non-temporal stores visible before its parallel task ends.
inline void fence_streaming_stores() {
#ifdef FUSED_BN_STREAMING_STORES
  _mm_sfence();
#endif
}

// Calls body(i, count) for vectors [i, i + count) covering [0, n).
template <int64_t kWidth, typename Body>
inline void for_each_vec(int64_t n, const Body& body) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) body(i, kWidth);
  if (i < n) body(i, n - i);
}

// Asks for the cache line holding p, into L2 (not L1: a block of the next
// slab would evict the block being read from L1).
template <typename T>
inline void prefetch_to_l2(const T* p) {
  __builtin_prefetch(p, /*rw=*/0, /*locality=*/2);
}

// Where the activation's input comes from besides x: the residual added
// before it (act(bn(x) + residual)), and where backward writes the gradient
// that reaches the residual. Both null without a residual.
template <typename scalar_t>
struct Residual {
  const scalar_t* input = nullptr;
  scalar_t* grad = nullptr;

  Residual at(int64_t offset) const {
    return {input ? input + offset : nullptr, grad ? grad + offset : nullptr};
  }
};

// The activation's input y = x * scale + shift (+ residual). The forward
// output and the backward's activation derivative both come from here (see
// the file comment). For half/bfloat16 input, y is what PyTorch's module pair
// holds at that point: the BatchNorm output rounded to scalar_t, plus the
// residual, rounded again, so that the derivative agrees with the output the
// user saw. kRound = false skips the last rounding where the caller's
// activation commutes with it (Identity and ReLU in forward).
template <typename scalar_t, bool kRound = true>
inline typename VecIO<scalar_t>::Vec pre_activation(const typename VecIO<scalar_t>::Vec& x,
                                                    const typename VecIO<scalar_t>::Vec& scale,
                                                    const typename VecIO<scalar_t>::Vec& shift,
                                                    const scalar_t* residual, int64_t count) {
  using IO = VecIO<scalar_t>;
  auto y = at::vec::fmadd(x, scale, shift);
  if (residual != nullptr) y = IO::round(y) + IO::load(residual, count);
  return kRound ? IO::round(y) : y;
}

// The forward output act(y); only the generic path needs y rounded first.
template <typename scalar_t, ActivationPath kAct>
inline typename VecIO<scalar_t>::Vec activated(const VecActivation<typename VecIO<scalar_t>::Vec>& act,
                                               const typename VecIO<scalar_t>::Vec& x,
                                               const typename VecIO<scalar_t>::Vec& scale,
                                               const typename VecIO<scalar_t>::Vec& shift,
                                               const scalar_t* residual, int64_t count) {
  constexpr bool kRound = kAct == ActivationPath::kAny;
  return act.template forward<kAct>(pre_activation<scalar_t, kRound>(x, scale, shift, residual, count));
}

// g = dy * act'(y): the gradient that reaches the BatchNorm output (and the
// residual). Identity needs no y.
template <typename scalar_t, ActivationPath kAct>
inline typename VecIO<scalar_t>::Vec activation_input_grad(
    const VecActivation<typename VecIO<scalar_t>::Vec>& act, const typename VecIO<scalar_t>::Vec& x,
    const typename VecIO<scalar_t>::Vec& scale, const typename VecIO<scalar_t>::Vec& shift,
    const scalar_t* residual, const typename VecIO<scalar_t>::Vec& dy, int64_t count) {
  if constexpr (kAct == ActivationPath::kIdentity) return dy;
  return act.template grad<kAct>(pre_activation<scalar_t>(x, scale, shift, residual, count), dy);
}

// ChannelGradInput::apply: g * a + x * b + c; in eval b = c = 0 and x is left
// out, so that a NaN or infinite x does not turn a finite gradient into NaN.
template <bool kTraining, typename Vec>
inline Vec grad_input_vec(const Vec& g, const Vec& x, const Vec& a, const Vec& b, const Vec& c) {
  if constexpr (!kTraining) return g * a;
  return at::vec::fmadd(g, a, at::vec::fmadd(x, b, c));
}

// kTerms running sums of vectors with kUnroll independent accumulators per
// term, so that the add latency does not bound the loop. The summation order
// depends only on the lengths added.
template <typename Vec, int kTerms>
class VecSums {
 public:
  using value_t = typename Vec::value_type;
  using Terms = std::array<Vec, kTerms>;

  VecSums() {
    for (auto& acc : acc_) acc.fill(Vec(0));
  }

  // Adds terms(i, count) over [0, n); terms must be 0 in lanes >= count.
  template <typename TermsAt>
  void add(int64_t n, const TermsAt& terms) {
    constexpr int64_t W = Vec::size();
    int64_t i = 0;
    for (; i + kUnroll * W <= n; i += kUnroll * W) {
      for (int u = 0; u < kUnroll; ++u) accumulate(acc_[u], terms(i + u * W, W));
    }
    for (; i + W <= n; i += W) accumulate(acc_[0], terms(i, W));
    if (i < n) accumulate(acc_[1], terms(i, n - i));
  }

// GCC 12's AVX-512 shuffle intrinsics read an undefined vector they do not
// use; not inlined, so that this is where the (false) warning would arise.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
  C10_NOINLINE std::array<value_t, kTerms> total() const {
    std::array<value_t, kTerms> out;
    for (int k = 0; k < kTerms; ++k) {
      const Vec v = (acc_[0][k] + acc_[1][k]) + (acc_[2][k] + acc_[3][k]);
      // In registers (shuffles on AVX2/AVX512 float), not lane after lane
      // through memory: a tiny batch pays this per block of every channel.
      out[k] = at::vec::vec_reduce_all<value_t>([](const Vec& a, const Vec& b) { return a + b; }, v);
    }
    return out;
  }
#pragma GCC diagnostic pop

 private:
  static constexpr int kUnroll = 4;

  static void accumulate(Terms& acc, const Terms& terms) {
    for (int k = 0; k < kTerms; ++k) acc[k] = acc[k] + terms[k];
  }

  std::array<Terms, kUnroll> acc_;
};

// Block statistics are kept and merged in double (see the file comment).
using BlockStats = Welford<double>;

// Statistics of `count` values from the sums of d = x - shift and d^2.
// The caller passes 1 / count, so that a loop over many channels of the same
// count multiplies instead of dividing (and vectorizes).
inline BlockStats shifted_moments(double count, double inv_count, double shift, double sum_d,
                                  double sum_d2) {
  BlockStats stats;
  stats.count = count;
  // An infinite shift (an infinite value in the block) makes every d NaN: the
  // mean is then the shift, sum / count, as PyTorch computes it.
  stats.mean = std::isinf(shift) ? shift : shift + sum_d * inv_count;
  // An overflowing sum of squares is an infinite variance, as in PyTorch
  // (not inf - inf); otherwise >= 0 up to rounding, and NaN stays NaN.
  const double m2 = std::isinf(sum_d2) ? sum_d2 : sum_d2 - sum_d * sum_d * inv_count;
  stats.m2 = m2 < 0 ? 0 : m2;
  return stats;
}

// ---- channel-first path (inner > 1) ---------------------------------------

// A part of one channel: elements [i0, i1) of its planes [n0, n1).
struct Span {
  int64_t n0, n1, i0, i1;

  int64_t count() const { return (n1 - n0) * (i1 - i0); }
};

// A channel cut into blocks of about kBlockElements: whole planes, or pieces
// of one plane where planes are larger. The cut depends on the shape only.
struct ChannelBlocks {
  int64_t planes_per_block;
  int64_t pieces_per_plane;
  int64_t piece;
  int64_t count;

  explicit ChannelBlocks(const ChannelView& v)
      : planes_per_block(std::max<int64_t>(1, kBlockElements / v.inner)),
        pieces_per_plane(ceil_div(v.inner, kBlockElements)),
        piece(ceil_div(v.inner, pieces_per_plane)),
        count(ceil_div(v.outer, planes_per_block) * pieces_per_plane) {}

  Span operator[](int64_t b) const {
    const int64_t n0 = b / pieces_per_plane * planes_per_block;
    const int64_t i0 = b % pieces_per_plane * piece;
    return {n0, n0 + planes_per_block, i0, i0 + piece};
  }

  // operator[] clipped to the view.
  Span at(int64_t b, const ChannelView& v) const {
    Span s = (*this)[b];
    return {s.n0, std::min(s.n1, v.outer), s.i0, std::min(s.i1, v.inner)};
  }
};

inline int64_t plane_offset(const ChannelView& v, int64_t n, int64_t c) {
  return (n * v.channels + c) * v.inner;
}

// body(offset, length) for each plane's part of `span` in channel c.
template <typename Body>
inline void for_each_run(const ChannelView& v, int64_t c, const Span& span, const Body& body) {
  for (int64_t n = span.n0; n < span.n1; ++n) body(plane_offset(v, n, c) + span.i0, span.i1 - span.i0);
}

// Planes shorter than this (a 4 KiB page of float32) make a channel's slab a
// scatter of short runs, which the per-channel passes read and write far
// slower than the memory-order elementwise pass does.
constexpr int64_t kMinSlabPlane = 1024;

// How a channel-first reduce-then-apply is spread over the threads.
enum class SlabSchedule {
  // Blocks of every channel over the threads, then the elementwise pass in
  // memory order: few channels or short planes.
  kMemoryOrder,
  // Each thread owns whole channels and pipelines them (pipeline_slabs).
  kChannelsPerThread,
  // Every thread takes its share of the blocks of every channel, pipelined
  // the same way in lockstep (a barrier per channel): where two slabs would
  // not fit in one core's L2, a share of them does.
  kSharedChannels,
};

// `slab_bytes`: what the elementwise pass re-reads of one channel.
SlabSchedule slab_schedule(const ChannelView& v, const ChannelBlocks& blocks, int64_t slab_bytes) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const bool enough_channels = v.channels % threads == 0 || v.channels >= 8 * threads;
  if (!enough_channels || v.inner < kMinSlabPlane) return SlabSchedule::kMemoryOrder;
#ifdef _OPENMP
  const bool pipeline_fits = 2 * slab_bytes <= l2_cache_bytes();
  if (!pipeline_fits && threads > 1 && blocks.count >= threads) return SlabSchedule::kSharedChannels;
#endif
  return SlabSchedule::kChannelsPerThread;
}

InputSource input_source(SlabSchedule schedule) {
  return schedule == SlabSchedule::kMemoryOrder ? InputSource::kMemory : InputSource::kL2Slab;
}

// For every channel c: part[b] = reduce(c, span) over its blocks, then
// finish(c, part) once all blocks of c are reduced, then apply(c, span,
// lookahead) over the channel. finish merges part in block order, so the
// result is the same for any thread count and schedule.
//
// Channels [c0, c1), blocks [b0, b1) of each, pipelined: block b of channel c
// is applied (from cache), then block b of channel c + 1 is reduced, and
// apply prefetches that block `lookahead` elements ahead of what it reads.
// The reads of the next slab from memory then overlap the streaming writes
// of this one, as in a copy, instead of alternating with them.
// Where several threads share the channels (`sync` a barrier), the
// `finisher` alone calls finish, between two barriers.
template <typename Partial, typename Sync, typename Reduce, typename Finish, typename Apply>
void pipeline_slabs(const ChannelView& v, const ChannelBlocks& blocks, int64_t c0, int64_t c1,
                    int64_t b0, int64_t b1, Partial* part, bool finisher, const Sync& sync,
                    const Reduce& reduce, const Finish& finish, const Apply& apply) {
  const auto reduced = [&](int64_t c) {
    sync();
    if (finisher) finish(c, part);
    sync();
  };
  for (int64_t b = b0; b < b1; ++b) part[b] = reduce(c0, blocks.at(b, v));
  reduced(c0);
  for (int64_t c = c0; c < c1; ++c) {
    const bool next = c + 1 < c1;
    for (int64_t b = b0; b < b1; ++b) {
      const Span span = blocks.at(b, v);
      apply(c, span, next ? v.inner : 0);
      if (next) part[b] = reduce(c + 1, span);
    }
    if (next) reduced(c + 1);
  }
  fence_streaming_stores();
}

// part[c * blocks.count + b] = reduce(c, span of block b) for every block of
// every channel, over the threads (reduce may also write, streaming).
template <typename Partial, typename Reduce>
std::vector<Partial> reduce_blocks(const ChannelView& v, const ChannelBlocks& blocks,
                                   const Reduce& reduce) {
  const int64_t tasks = v.channels * blocks.count;
  std::vector<Partial> part(tasks);
  // Enough blocks per task to be worth a thread (small inputs run inline).
  const int64_t block_elements = std::max<int64_t>(1, v.count() * v.channels / tasks);
  const int64_t blocks_grain = std::max<int64_t>(1, kParallelGrainElements / block_elements);
  at::parallel_for(0, tasks, blocks_grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / blocks.count, b = t % blocks.count;
      part[t] = reduce(c, blocks.at(b, v));
    }
    fence_streaming_stores();
  });
  return part;
}

template <typename Partial, typename Reduce, typename Finish, typename Apply>
void reduce_then_apply_per_channel(const ChannelView& v, const ChannelBlocks& blocks,
                                   SlabSchedule schedule, const Reduce& reduce,
                                   const Finish& finish, const Apply& apply) {
  switch (schedule) {
    case SlabSchedule::kChannelsPerThread: {
      const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / v.count());
      at::parallel_for(0, v.channels, grain, [&](int64_t begin, int64_t end) {
        std::vector<Partial> part(blocks.count);
        pipeline_slabs(v, blocks, begin, end, 0, blocks.count, part.data(), true, [] {}, reduce,
                       finish, apply);
      });
      return;
    }
    case SlabSchedule::kSharedChannels: {
#ifdef _OPENMP
      // A parallel region of its own: at::parallel_for has no barrier.
      std::vector<Partial> part(blocks.count);
#pragma omp parallel num_threads(static_cast<int>(at::get_num_threads()))
      {
        const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
        pipeline_slabs(v, blocks, 0, v.channels, blocks.count * thread / threads,
                       blocks.count * (thread + 1) / threads, part.data(), thread == 0,
                       [] { _Pragma("omp barrier") }, reduce, finish, apply);
      }
      return;
#endif
    }  // (not chosen without OpenMP)
    case SlabSchedule::kMemoryOrder:
      break;
  }
  const std::vector<Partial> part = reduce_blocks<Partial>(v, blocks, reduce);
  for (int64_t c = 0; c < v.channels; ++c) finish(c, part.data() + c * blocks.count);
  // In memory order: the data are no longer in cache, let the prefetchers stream them.
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / v.inner);
  at::parallel_for(0, v.outer * v.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / v.channels;
      apply(p % v.channels, Span{n, n + 1, 0, v.inner}, 0);
    }
    fence_streaming_stores();
  });
}

// body(c, offset) for every plane, in parallel.
template <typename Body>
void for_each_plane(const ChannelView& v, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / v.inner);
  at::parallel_for(0, v.outer * v.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) body(p % v.channels, p * v.inner);
    fence_streaming_stores();
  });
}

template <typename scalar_t>
BlockStats block_stats(const scalar_t* x, const ChannelView& v, int64_t c, const Span& span) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  VecSums<Vec, 1> sum_x;
  for_each_run(v, c, span, [&](int64_t offset, int64_t length) {
    sum_x.add(length, [&](int64_t i, int64_t count) {
      return std::array<Vec, 1>{IO::load(x + offset + i, count)};
    });
  });
  const acc_t shift = sum_x.total()[0] / static_cast<acc_t>(span.count());
  const Vec shift_vec(shift);
  VecSums<Vec, 2> sum_d;
  for_each_run(v, c, span, [&](int64_t offset, int64_t length) {
    sum_d.add(length, [&](int64_t i, int64_t count) {
      Vec d = IO::load(x + offset + i, count) - shift_vec;
      if (count < Vec::size()) d = Vec::set(Vec(0), d, count);
      return std::array<Vec, 2>{d, d * d};
    });
  });
  const auto sums = sum_d.total();
  return shifted_moments(span.count(), 1.0 / span.count(), shift, sums[0], sums[1]);
}

// lookahead != 0: also prefetches x[i + lookahead] (the next slab).
template <typename scalar_t, ActivationPath kAct>
void normalize_span(const scalar_t* x, scalar_t* y, int64_t n,
                    ChannelAffine<at::opmath_type<scalar_t>> affine,
                    const VecActivation<typename VecIO<scalar_t>::Vec>& act,
                    const Residual<scalar_t>& res, const OutputStore<scalar_t>& store,
                    int64_t lookahead) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec scale(affine.scale), shift(affine.shift);
  for_each_vec<Vec::size()>(n, [&](int64_t i, int64_t count) {
    if (lookahead != 0) prefetch_to_l2(x + i + lookahead);
    const scalar_t* r = res.input ? res.input + i : nullptr;
    store(y + i, activated<scalar_t, kAct>(act, IO::load(x + i, count), scale, shift, r, count),
          count);
  });
}

// Where an eval-mode backward writes its gradients while it sums (grad_input
// = g * a there, independent of the sums): grad_input where dx is given, the
// residual's gradient g where res.grad is.
template <typename scalar_t>
struct EvalGradOut {
  scalar_t* dx = nullptr;
  at::opmath_type<scalar_t> a = 0;
  const OutputStore<scalar_t>* store = nullptr;
};

// Sums of g and g * (x - mean) over n elements, g = dy * act'(y); with `out`,
// the eval gradients too.
template <typename scalar_t, ActivationPath kAct>
void add_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t n,
                   ChannelAffine<at::opmath_type<scalar_t>> affine, at::opmath_type<scalar_t> mean,
                   const VecActivation<typename VecIO<scalar_t>::Vec>& act,
                   const Residual<scalar_t>& res, VecSums<typename VecIO<scalar_t>::Vec, 2>& sums,
                   const EvalGradOut<scalar_t>* out = nullptr) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec scale(affine.scale), shift(affine.shift), mean_vec(mean);
  const Vec a(out ? out->a : 0);
  sums.add(n, [&](int64_t i, int64_t count) {
    const Vec xv = IO::load(x + i, count);
    const scalar_t* r = res.input ? res.input + i : nullptr;
    const Vec g = activation_input_grad<scalar_t, kAct>(act, xv, scale, shift, r,
                                                        IO::load(dy + i, count), count);
    if (out) {
      if (res.grad) (*out->store)(res.grad + i, g, count);
      if (out->dx) (*out->store)(out->dx + i, grad_input_vec<false>(g, xv, a, a, a), count);
    }
    return std::array<Vec, 2>{g, g * (xv - mean_vec)};
  });
}

template <typename scalar_t, ActivationPath kAct>
std::array<at::opmath_type<scalar_t>, 2> block_grad_sums(
    const scalar_t* dy, const scalar_t* x, const ChannelView& v, int64_t c, const Span& span,
    ChannelAffine<at::opmath_type<scalar_t>> affine, at::opmath_type<scalar_t> mean,
    const VecActivation<typename VecIO<scalar_t>::Vec>& act, const Residual<scalar_t>& res,
    const EvalGradOut<scalar_t>* out = nullptr) {
  VecSums<typename VecIO<scalar_t>::Vec, 2> sums;
  for_each_run(v, c, span, [&](int64_t offset, int64_t length) {
    EvalGradOut<scalar_t> at_offset;
    if (out) at_offset = {out->dx ? out->dx + offset : nullptr, out->a, out->store};
    add_grad_sums<scalar_t, kAct>(dy + offset, x + offset, length, affine, mean, act,
                                  res.at(offset), sums, out ? &at_offset : nullptr);
  });
  return sums.total();
}

// The blocks' partial results of a channel, merged in block order.
inline BlockStats merge_blocks(const BlockStats* part, int64_t blocks) {
  BlockStats stats;
  for (int64_t b = 0; b < blocks; ++b) stats.merge(part[b]);
  return stats;
}

template <typename acc_t>
std::array<acc_t, 2> merge_blocks(const std::array<acc_t, 2>* part, int64_t blocks) {
  std::array<acc_t, 2> sums{0, 0};
  for (int64_t b = 0; b < blocks; ++b) {
    sums[0] += part[b][0];
    sums[1] += part[b][1];
  }
  return sums;
}

// grad_input (and, with a residual, its gradient g) over n elements.
template <typename scalar_t, ActivationPath kAct, bool kTraining>
void grad_input_span(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n,
                     ChannelAffine<at::opmath_type<scalar_t>> affine,
                     ChannelGradInput<at::opmath_type<scalar_t>> coef,
                     const VecActivation<typename VecIO<scalar_t>::Vec>& act,
                     const Residual<scalar_t>& res, const OutputStore<scalar_t>& store,
                     int64_t lookahead) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec scale(affine.scale), shift(affine.shift), a(coef.a), b(coef.b), c(coef.c);
  for_each_vec<Vec::size()>(n, [&](int64_t i, int64_t count) {
    if (lookahead != 0) {
      prefetch_to_l2(x + i + lookahead);
      prefetch_to_l2(dy + i + lookahead);
      if (res.input) prefetch_to_l2(res.input + i + lookahead);
    }
    const Vec xv = IO::load(x + i, count);
    const scalar_t* r = res.input ? res.input + i : nullptr;
    const Vec g = activation_input_grad<scalar_t, kAct>(act, xv, scale, shift, r,
                                                        IO::load(dy + i, count), count);
    if (res.grad) store(res.grad + i, g, count);
    if (dx) store(dx + i, grad_input_vec<kTraining>(g, xv, a, b, c), count);
  });
}

// ---- channels-last path (inner == 1): chunks of rows of C channels -------
//
// Per-channel arrays are padded to a whole number of vectors (zeros), so that
// only the loads and stores of the input rows need a tail.

struct RowChunks {
  int64_t rows;         // per chunk
  int64_t count;        // chunks
  int64_t padded_channels;
  int64_t grain;        // chunks per parallel task: small inputs run inline

  RowChunks(const ChannelView& v, int64_t width)
      : rows(std::clamp<int64_t>(kRowChunkElements / std::max<int64_t>(1, v.channels), 1,
                                 kMaxChunkRows)),
        count(ceil_div(v.outer, rows)),
        padded_channels(ceil_div(v.channels, width) * width),
        grain(std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, rows * v.channels))) {}

  int64_t begin(int64_t k) const { return k * rows; }
  int64_t end(int64_t k, const ChannelView& v) const { return std::min(v.outer, (k + 1) * rows); }
};

template <typename acc_t>
struct PaddedChannels {
  std::vector<acc_t> scale, shift;  // ChannelAffine
  std::vector<acc_t> a, b, c;       // ChannelGradInput (backward only)
};

template <typename acc_t>
PaddedChannels<acc_t> padded_affine(const ChannelAffine<acc_t>* affine, int64_t channels,
                                    int64_t padded) {
  PaddedChannels<acc_t> p;
  p.scale.assign(padded, acc_t(0));
  p.shift.assign(padded, acc_t(0));
  for (int64_t c = 0; c < channels; ++c) {
    p.scale[c] = affine[c].scale;
    p.shift[c] = affine[c].shift;
  }
  return p;
}

// body(row pointer offset, c, count) over the channel vectors of rows
// [r0, r1), channel vectors innermost.
//
// The vector stores (may_alias types) could overwrite anything the loop reads
// through memory, so the loop works on a local copy of `body`: a body that
// captures its pointers by value then keeps them in registers instead of
// reloading them after every store.
template <int64_t kWidth, typename Body>
inline void for_each_row_vec(const ChannelView& v, int64_t r0, int64_t r1, const Body& body) {
  const Body local_body = body;
  const int64_t channels = v.channels;
  for (int64_t r = r0; r < r1; ++r) {
    for_each_vec<kWidth>(channels, [&](int64_t c, int64_t count) { local_body(r * channels, c, count); });
  }
}

// for_each_row_vec over all rows, in parallel.
template <int64_t kWidth, typename Body>
void parallel_over_row_vecs(const ChannelView& v, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / v.channels);
  at::parallel_for(0, v.outer, grain, [&](int64_t begin, int64_t end) {
    for_each_row_vec<kWidth>(v, begin, end, body);
    fence_streaming_stores();
  });
}

// Channel vectors summed over rows in registers: the channels-last
// counterpart of VecSums. Accumulating into per-channel arrays instead would
// put a store and a reload of the same address on every row (and, with rows
// a multiple of 4 KiB apart, loads that falsely alias those stores).
constexpr int kRowBlockVecs = 4;

template <typename Vec, int kTerms>
using RowBlockSums = std::array<std::array<Vec, kTerms>, kRowBlockVecs>;

// For the channel vectors j < kRowBlockVecs starting at channel c0 (the block
// may end early, its last vector may be partial): the sums over rows [r0, r1)
// of terms(row offset, j, c, count), which must be 0 in lanes >= count. Rows
// are added in order, so the sums do not depend on the thread count.
template <typename Vec, int kTerms, typename TermsAt>
RowBlockSums<Vec, kTerms> sum_over_rows(const ChannelView& v, int64_t r0, int64_t r1, int64_t c0,
                                        const TermsAt& terms) {
  constexpr int64_t W = Vec::size();
  RowBlockSums<Vec, kTerms> acc;
  for (auto& sums : acc) sums.fill(Vec(0));
  const auto add = [&](int64_t r, int j, int64_t count) {
    const auto t = terms(r * v.channels, j, c0 + j * W, count);
    for (int k = 0; k < kTerms; ++k) acc[j][k] = acc[j][k] + t[k];
  };
  if (c0 + kRowBlockVecs * W <= v.channels) {  // whole vectors: the loop the compiler unrolls
    for (int64_t r = r0; r < r1; ++r) {
      for (int j = 0; j < kRowBlockVecs; ++j) add(r, j, W);
    }
    return acc;
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int j = 0; j < kRowBlockVecs && c0 + j * W < v.channels; ++j) {
      add(r, j, std::min(W, v.channels - c0 - j * W));
    }
  }
  return acc;
}

// v[j] = load(p + c0 + j * W) for the vectors of the block at c0 that lie in
// the padded per-channel array p of `padded` elements, 0 beyond.
template <typename Vec>
std::array<Vec, kRowBlockVecs> load_block(const typename Vec::value_type* p, int64_t c0,
                                          int64_t padded) {
  std::array<Vec, kRowBlockVecs> out;
  for (int j = 0; j < kRowBlockVecs; ++j) {
    const int64_t c = c0 + j * Vec::size();
    out[j] = c < padded ? Vec::loadu(p + c) : Vec(0);
  }
  return out;
}

// vec_at(j) stored at p + c0 + j * W where that lies in the padded array.
template <typename Vec, typename VecAt>
void store_block(typename Vec::value_type* p, int64_t c0, int64_t padded, const VecAt& vec_at) {
  for (int j = 0; j < kRowBlockVecs && c0 + j * Vec::size() < padded; ++j) {
    vec_at(j).store(p + c0 + j * Vec::size());
  }
}

// Per-channel mean and m2 (written to C elements).
template <typename scalar_t>
void rows_stats(const scalar_t* x, const ChannelView& v, at::opmath_type<scalar_t>* mean,
                at::opmath_type<scalar_t>* m2) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = Vec::size();
  const RowChunks chunks(v, W);
  const int64_t C = v.channels, Cp = chunks.padded_channels;
  std::vector<double> part_mean(chunks.count * C), part_m2(chunks.count * C);
  at::parallel_for(0, chunks.count, chunks.grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(Cp), sum_d(Cp), sum_d2(Cp);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = chunks.begin(k), r1 = chunks.end(k, v);
      const Vec rows(static_cast<acc_t>(r1 - r0));
      for (int64_t c0 = 0; c0 < C; c0 += kRowBlockVecs * W) {
        const auto sums = sum_over_rows<Vec, 1>(
            v, r0, r1, c0, [&](int64_t row, int, int64_t c, int64_t count) {
              return std::array<Vec, 1>{IO::load(x + row + c, count)};
            });
        std::array<Vec, kRowBlockVecs> block_shift;
        for (int j = 0; j < kRowBlockVecs; ++j) block_shift[j] = sums[j][0] / rows;
        const auto dev = sum_over_rows<Vec, 2>(
            v, r0, r1, c0, [&](int64_t row, int j, int64_t c, int64_t count) {
              // lanes >= count: x loads as 0 and their shift is 0, so d = 0
              const Vec d = IO::load(x + row + c, count) - block_shift[j];
              return std::array<Vec, 2>{d, d * d};
            });
        store_block<Vec>(shift.data(), c0, Cp, [&](int j) { return block_shift[j]; });
        store_block<Vec>(sum_d.data(), c0, Cp, [&](int j) { return dev[j][0]; });
        store_block<Vec>(sum_d2.data(), c0, Cp, [&](int j) { return dev[j][1]; });
      }
      const double rows_count = static_cast<double>(r1 - r0), inv_rows = 1.0 / rows_count;
      for (int64_t c = 0; c < C; ++c) {
        const auto stats = shifted_moments(rows_count, inv_rows, shift[c], sum_d[c], sum_d2[c]);
        part_mean[k * C + c] = stats.mean;
        part_m2[k * C + c] = stats.m2;
      }
    }
  });
  // Chunks merged in chunk order, all channels at once.
  std::vector<double> merged_mean(part_mean.begin(), part_mean.begin() + C);
  std::vector<double> merged_m2(part_m2.begin(), part_m2.begin() + C);
  double merged_count = chunks.end(0, v);
  for (int64_t k = 1; k < chunks.count; ++k) {
    const double chunk_count = chunks.end(k, v) - chunks.begin(k);
    for (int64_t c = 0; c < C; ++c) {
      chan_merge(merged_mean[c], merged_m2[c], merged_count, chunk_count, part_mean[k * C + c],
                 part_m2[k * C + c]);
    }
    merged_count += chunk_count;
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<acc_t>(merged_mean[c]);
    m2[c] = static_cast<acc_t>(merged_m2[c]);
  }
}

template <typename scalar_t, ActivationPath kAct>
void rows_normalize(const scalar_t* x, scalar_t* y, const ChannelView& v,
                    const PaddedChannels<at::opmath_type<scalar_t>>& p,
                    const VecActivation<typename VecIO<scalar_t>::Vec>& act,
                    const Residual<scalar_t>& res) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const OutputStore<scalar_t> store(v, res.input ? 2 : 1, InputSource::kMemory);
  const auto* scale = p.scale.data();
  const auto* shift = p.shift.data();
  const scalar_t* r = res.input;
  // Captures by value (see for_each_row_vec).
  parallel_over_row_vecs<Vec::size()>(v, [=](int64_t row, int64_t c, int64_t count) {
    store(y + row + c,
          activated<scalar_t, kAct>(act, IO::load(x + row + c, count), Vec::loadu(scale + c),
                                    Vec::loadu(shift + c), r ? r + row + c : nullptr, count),
          count);
  });
}

// Per-channel sums of g and g * (x - mean) (written to C elements). With
// `eval_writes`, in the same pass, eval mode's gradients (independent of the
// sums): grad_input = g * p.a where dx is given, g where res.grad is.
template <typename scalar_t, ActivationPath kAct>
void rows_grad_sums(const scalar_t* dy, const scalar_t* x, const ChannelView& v,
                    const at::opmath_type<scalar_t>* mean,
                    const PaddedChannels<at::opmath_type<scalar_t>>& p,
                    const VecActivation<typename VecIO<scalar_t>::Vec>& act,
                    const Residual<scalar_t>& res, at::opmath_type<scalar_t>* sum_g,
                    at::opmath_type<scalar_t>* sum_gx, bool eval_writes = false,
                    scalar_t* dx = nullptr) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = Vec::size();
  const RowChunks chunks(v, W);
  const OutputStore<scalar_t> store(v, res.input ? 3 : 2, InputSource::kMemory);
  const int64_t Cp = chunks.padded_channels;
  std::vector<acc_t> mean_padded(Cp, acc_t(0));
  std::copy_n(mean, v.channels, mean_padded.begin());
  std::vector<acc_t> part_g(chunks.count * Cp, acc_t(0)), part_gx(chunks.count * Cp, acc_t(0));
  at::parallel_for(0, chunks.count, chunks.grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t c0 = 0; c0 < v.channels; c0 += kRowBlockVecs * W) {
        const auto scale = load_block<Vec>(p.scale.data(), c0, Cp);
        const auto shift = load_block<Vec>(p.shift.data(), c0, Cp);
        const auto mean_block = load_block<Vec>(mean_padded.data(), c0, Cp);
        const auto sums = sum_over_rows<Vec, 2>(
            v, chunks.begin(k), chunks.end(k, v), c0,
            [&](int64_t row, int j, int64_t c, int64_t count) {
              const Vec xv = IO::load(x + row + c, count);
              const Vec g = activation_input_grad<scalar_t, kAct>(
                  act, xv, scale[j], shift[j], res.input ? res.input + row + c : nullptr,
                  IO::load(dy + row + c, count), count);
              if (eval_writes) {
                if (res.grad) store(res.grad + row + c, g, count);
                if (dx) {
                  const Vec a = Vec::loadu(p.a.data() + c);
                  store(dx + row + c, grad_input_vec<false>(g, xv, a, a, a), count);
                }
              }
              return std::array<Vec, 2>{g, g * (xv - mean_block[j])};
            });
        store_block<Vec>(part_g.data() + k * Cp, c0, Cp, [&](int j) { return sums[j][0]; });
        store_block<Vec>(part_gx.data() + k * Cp, c0, Cp, [&](int j) { return sums[j][1]; });
      }
    }
    fence_streaming_stores();
  });
  for_each_vec<W>(v.channels, [&](int64_t c, int64_t count) {
    Vec g(0), gx(0);
    for (int64_t k = 0; k < chunks.count; ++k) {
      g = g + Vec::loadu(part_g.data() + k * Cp + c);
      gx = gx + Vec::loadu(part_gx.data() + k * Cp + c);
    }
    g.store(sum_g + c, count);
    gx.store(sum_gx + c, count);
  });
}

// grad_input (where dx is given) and the residual's gradient (where res.grad is).
template <typename scalar_t, ActivationPath kAct, bool kTraining>
void rows_grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const ChannelView& v,
                     const PaddedChannels<at::opmath_type<scalar_t>>& p,
                     const VecActivation<typename VecIO<scalar_t>::Vec>& act,
                     const Residual<scalar_t>& res) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const OutputStore<scalar_t> store(v, res.input ? 3 : 2, InputSource::kMemory);
  const auto *scale = p.scale.data(), *shift = p.shift.data();
  const auto *a = p.a.data(), *b = p.b.data(), *c_term = p.c.data();
  const scalar_t* r = res.input;
  scalar_t* dr = res.grad;
  // Captures by value (see for_each_row_vec).
  parallel_over_row_vecs<Vec::size()>(v, [=](int64_t row, int64_t c, int64_t count) {
    const Vec xv = IO::load(x + row + c, count);
    const Vec g = activation_input_grad<scalar_t, kAct>(
        act, xv, Vec::loadu(scale + c), Vec::loadu(shift + c), r ? r + row + c : nullptr,
        IO::load(dy + row + c, count), count);
    if (dr) store(dr + row + c, g, count);
    if (dx) {
      store(dx + row + c,
            grad_input_vec<kTraining>(g, xv, Vec::loadu(a + c), Vec::loadu(b + c),
                                      Vec::loadu(c_term + c)),
            count);
    }
  });
}

// ---- per-channel parameters -------------------------------------------------

template <typename acc_t>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  const acc_t* bias;

  ChannelAffine<acc_t> affine(int64_t c) const {
    return ChannelAffine<acc_t>::fold(mean[c], invstd[c], weight[c], bias[c]);
  }

  // From the sums of g and g * (x - mean) over `count` elements.
  ChannelGradInput<acc_t> grad_input(int64_t c, bool training, acc_t sum_g, acc_t sum_gx,
                                     acc_t count) const {
    if (!training) return ChannelGradInput<acc_t>::eval(invstd[c], weight[c]);
    return ChannelGradInput<acc_t>::training(mean[c], invstd[c], weight[c], sum_g / count,
                                             sum_gx / count);
  }
};

template <typename acc_t>
ChannelParams<acc_t> channel_params(const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& weight, const at::Tensor& bias) {
  return {mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
          weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>()};
}

template <typename acc_t>
std::vector<ChannelAffine<acc_t>> channel_affines(const ChannelParams<acc_t>& p, int64_t channels) {
  std::vector<ChannelAffine<acc_t>> out(channels);
  for (int64_t c = 0; c < channels; ++c) out[c] = p.affine(c);
  return out;
}

// Channels-last arrays of affine and grad-input coefficients.
template <typename acc_t>
PaddedChannels<acc_t> padded_grad_input(const ChannelParams<acc_t>& p, const ChannelView& v,
                                        bool training, const acc_t* sum_g, const acc_t* sum_gx,
                                        acc_t count, int64_t width) {
  const int64_t padded = ceil_div(v.channels, width) * width;
  const auto affine = channel_affines(p, v.channels);
  PaddedChannels<acc_t> out = padded_affine(affine.data(), v.channels, padded);
  out.a.assign(padded, acc_t(0));
  out.b.assign(padded, acc_t(0));
  out.c.assign(padded, acc_t(0));
  for (int64_t c = 0; c < v.channels; ++c) {
    const auto coef = p.grad_input(c, training, training ? sum_g[c] : acc_t(0),
                                   training ? sum_gx[c] : acc_t(0), count);
    out.a[c] = coef.a;
    out.b[c] = coef.b;
    out.c[c] = coef.c;
  }
  return out;
}

// f(integral_constant<ActivationPath, ...>) for the instantiation that serves `kind`.
template <typename F>
void dispatch_activation(Activation kind, const F& f) {
  switch (activation_path(kind)) {
    case ActivationPath::kIdentity:
      return f(std::integral_constant<ActivationPath, ActivationPath::kIdentity>{});
    case ActivationPath::kReLU:
      return f(std::integral_constant<ActivationPath, ActivationPath::kReLU>{});
    case ActivationPath::kAny:
      return f(std::integral_constant<ActivationPath, ActivationPath::kAny>{});
  }
}

// f(bool_constant<training>).
template <typename F>
void dispatch_training(bool training, const F& f) {
  if (training) return f(std::true_type{});
  return f(std::false_type{});
}

#define FUSED_BN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The per-channel sums of g and g * (x - mean), then grad_input where dx is
// given and the residual's gradient where res.grad is (per channel while its
// slab is in cache where the layout allows).
template <typename scalar_t, ActivationPath kAct>
void backward(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Residual<scalar_t>& res,
              const ChannelView& v, const ChannelParams<at::opmath_type<scalar_t>>& p,
              bool training, const ActivationSpec& spec, at::opmath_type<scalar_t>* sum_g,
              at::opmath_type<scalar_t>* sum_gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const VecActivation<typename VecIO<scalar_t>::Vec> act(spec);
  const acc_t count = static_cast<acc_t>(v.count());
  const auto affine = channel_affines(p, v.channels);
  const bool writes = dx != nullptr || res.grad != nullptr;
  // The tensors of x's size the elementwise pass reads: x, dy and the residual.
  const int64_t reads = res.input ? 3 : 2;
  if (v.inner == 1) {
    const int64_t W = VecIO<scalar_t>::kWidth;
    if (!training) {  // one pass: see the eval branch below
      const auto coef = padded_grad_input(p, v, false, sum_g, sum_gx, count, W);
      rows_grad_sums<scalar_t, kAct>(dy, x, v, p.mean, coef, act, res, sum_g, sum_gx, writes, dx);
      return;
    }
    const auto padded = padded_affine(affine.data(), v.channels, ceil_div(v.channels, W) * W);
    rows_grad_sums<scalar_t, kAct>(dy, x, v, p.mean, padded, act, res, sum_g, sum_gx);
    if (!writes) return;
    const auto coef = padded_grad_input(p, v, training, sum_g, sum_gx, count, W);
    rows_grad_input<scalar_t, kAct, /*kTraining=*/true>(dy, x, dx, v, coef, act, res);
    return;
  }
  const ChannelBlocks blocks(v);
  if (!training) {
    // grad_input does not depend on the sums in eval: one pass over dy and x
    // writes it while summing (the sums as the two-pass schedules give them).
    const OutputStore<scalar_t> store(v, reads, InputSource::kMemory);
    const auto part = reduce_blocks<std::array<acc_t, 2>>(v, blocks, [&](int64_t c,
                                                                         const Span& span) {
      const EvalGradOut<scalar_t> out{dx, p.grad_input(c, false, 0, 0, count).a, &store};
      return block_grad_sums<scalar_t, kAct>(dy, x, v, c, span, affine[c], p.mean[c], act, res,
                                             writes ? &out : nullptr);
    });
    for (int64_t c = 0; c < v.channels; ++c) {
      const auto sums = merge_blocks(part.data() + c * blocks.count, blocks.count);
      sum_g[c] = sums[0];
      sum_gx[c] = sums[1];
    }
    return;
  }
  std::vector<ChannelGradInput<acc_t>> coef(v.channels);
  const int64_t slab_bytes = writes ? reads * v.count() * int64_t(sizeof(scalar_t)) : 0;
  const SlabSchedule schedule = slab_schedule(v, blocks, slab_bytes);
  const OutputStore<scalar_t> store(v, reads, input_source(schedule));
  reduce_then_apply_per_channel<std::array<acc_t, 2>>(
      v, blocks, schedule,
      [&](int64_t c, const Span& span) {
        return block_grad_sums<scalar_t, kAct>(dy, x, v, c, span, affine[c], p.mean[c], act, res);
      },
      [&](int64_t c, const std::array<acc_t, 2>* part) {
        const auto sums = merge_blocks(part, blocks.count);
        sum_g[c] = sums[0];
        sum_gx[c] = sums[1];
        coef[c] = p.grad_input(c, /*training=*/true, sums[0], sums[1], count);
      },
      [&](int64_t c, const Span& span, int64_t lookahead) {
        if (!writes) return;
        for_each_run(v, c, span, [&](int64_t offset, int64_t length) {
          grad_input_span<scalar_t, kAct, /*kTraining=*/true>(
              dy + offset, x + offset, dx ? dx + offset : nullptr, length, affine[c], coef[c],
              act, res.at(offset), store, lookahead);
        });
      });
}

// ---- the kernels ------------------------------------------------------------

void stats_kernel(const at::Tensor& input, const ChannelView& v, at::Tensor& mean,
                  at::Tensor& m2) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
    acc_t* m2_p = m2.mutable_data_ptr<acc_t>();
    if (v.inner == 1) return rows_stats(x, v, mean_p, m2_p);
    const ChannelBlocks blocks(v);
    reduce_then_apply_per_channel<BlockStats>(
        v, blocks, slab_schedule(v, blocks, /*slab_bytes=*/0),
        [&](int64_t c, const Span& span) { return block_stats(x, v, c, span); },
        [&](int64_t c, const BlockStats* part) {
          const auto stats = merge_blocks(part, blocks.count);
          mean_p[c] = stats.mean;
          m2_p[c] = stats.m2;
        },
        [](int64_t, const Span&, int64_t) {});
  });
}

template <typename scalar_t>
Residual<scalar_t> residual_of(const at::Tensor& residual, at::Tensor* grad_residual = nullptr) {
  Residual<scalar_t> res;
  if (residual.defined()) res.input = residual.const_data_ptr<scalar_t>();
  if (grad_residual != nullptr && grad_residual->defined())
    res.grad = grad_residual->mutable_data_ptr<scalar_t>();
  return res;
}

void act_train_kernel(const at::Tensor& input, const ChannelView& v, const at::Tensor& weight,
                      const at::Tensor& bias, double eps, const ActivationSpec& spec,
                      const at::Tensor& residual, at::Tensor& output, at::Tensor& mean,
                      at::Tensor& invstd) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_forward_train_cpu", [&] {
    dispatch_activation(spec.kind, [&](auto act_c) {
      constexpr ActivationPath kAct = decltype(act_c)::value;
      using acc_t = at::opmath_type<scalar_t>;
      const VecActivation<typename VecIO<scalar_t>::Vec> act(spec);
      const Residual<scalar_t> res = residual_of<scalar_t>(residual);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* y = output.mutable_data_ptr<scalar_t>();
      acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
      acc_t* invstd_p = invstd.mutable_data_ptr<acc_t>();
      const auto p = channel_params<acc_t>(mean, invstd, weight, bias);
      const acc_t count = static_cast<acc_t>(v.count());
      if (v.inner == 1) {
        std::vector<acc_t> m2(v.channels);
        rows_stats(x, v, mean_p, m2.data());
        for (int64_t c = 0; c < v.channels; ++c) invstd_p[c] = inverse_std(m2[c] / count, eps);
        const auto affine = channel_affines(p, v.channels);
        const int64_t W = VecIO<scalar_t>::kWidth;
        return rows_normalize<scalar_t, kAct>(
            x, y, v, padded_affine(affine.data(), v.channels, ceil_div(v.channels, W) * W), act,
            res);
      }
      const ChannelBlocks blocks(v);
      std::vector<ChannelAffine<acc_t>> affine(v.channels);
      const int64_t reads = res.input ? 2 : 1;  // x (re-read) and the residual
      const int64_t slab_bytes = reads * v.count() * int64_t(sizeof(scalar_t));
      const SlabSchedule schedule = slab_schedule(v, blocks, slab_bytes);
      const OutputStore<scalar_t> store(v, reads, input_source(schedule));
      reduce_then_apply_per_channel<BlockStats>(
          v, blocks, schedule, [&](int64_t c, const Span& span) { return block_stats(x, v, c, span); },
          [&](int64_t c, const BlockStats* part) {
            const auto stats = merge_blocks(part, blocks.count);
            mean_p[c] = stats.mean;
            invstd_p[c] = inverse_std(stats.biased_var(), eps);
            affine[c] = p.affine(c);
          },
          [&](int64_t c, const Span& span, int64_t lookahead) {
            for_each_run(v, c, span, [&](int64_t offset, int64_t length) {
              normalize_span<scalar_t, kAct>(x + offset, y + offset, length, affine[c], act,
                                             res.at(offset), store, lookahead);
            });
          });
    });
  });
}

void act_elemt_kernel(const at::Tensor& input, const ChannelView& v, const at::Tensor& mean,
                      const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                      const ActivationSpec& spec, const at::Tensor& residual, at::Tensor& output) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_elemt_cpu", [&] {
    dispatch_activation(spec.kind, [&](auto act_c) {
      constexpr ActivationPath kAct = decltype(act_c)::value;
      using acc_t = at::opmath_type<scalar_t>;
      const VecActivation<typename VecIO<scalar_t>::Vec> act(spec);
      const Residual<scalar_t> res = residual_of<scalar_t>(residual);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* y = output.mutable_data_ptr<scalar_t>();
      const auto affine = channel_affines(channel_params<acc_t>(mean, invstd, weight, bias), v.channels);
      if (v.inner == 1) {
        const int64_t W = VecIO<scalar_t>::kWidth;
        return rows_normalize<scalar_t, kAct>(
            x, y, v, padded_affine(affine.data(), v.channels, ceil_div(v.channels, W) * W), act,
            res);
      }
      const OutputStore<scalar_t> store(v, res.input ? 2 : 1, InputSource::kMemory);
      for_each_plane(v, [&](int64_t c, int64_t offset) {
        normalize_span<scalar_t, kAct>(x + offset, y + offset, v.inner, affine[c], act,
                                       res.at(offset), store, 0);
      });
    });
  });
}

void act_backward_reduce_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                                const ChannelView& v, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& weight,
                                const at::Tensor& bias, const ActivationSpec& spec,
                                at::Tensor& sum_dy, at::Tensor& sum_dy_xmu) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_backward_reduce_cpu", [&] {
    dispatch_activation(spec.kind, [&](auto act_c) {
      using acc_t = at::opmath_type<scalar_t>;
      backward<scalar_t, decltype(act_c)::value>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), nullptr, {},
          v, channel_params<acc_t>(mean, invstd, weight, bias), /*training=*/true, spec,
          sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>());
    });
  });
}

void act_backward_elemt_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                               const ChannelView& v, const at::Tensor& mean,
                               const at::Tensor& invstd, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& mean_dy,
                               const at::Tensor& mean_dy_xmu, bool training,
                               const ActivationSpec& spec, at::Tensor& grad_input) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_backward_elemt_cpu", [&] {
    dispatch_activation(spec.kind, [&](auto act_c) {
      constexpr ActivationPath kAct = decltype(act_c)::value;
      using acc_t = at::opmath_type<scalar_t>;
      const VecActivation<typename VecIO<scalar_t>::Vec> act(spec);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
      scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
      const auto p = channel_params<acc_t>(mean, invstd, weight, bias);
      // mean_dy/mean_dy_xmu are means already: count 1 takes them as they are.
      const auto coef = padded_grad_input(
          p, v, training, training ? mean_dy.const_data_ptr<acc_t>() : nullptr,
          training ? mean_dy_xmu.const_data_ptr<acc_t>() : nullptr, acc_t(1),
          VecIO<scalar_t>::kWidth);
      dispatch_training(training, [&](auto training_c) {
        constexpr bool kTraining = decltype(training_c)::value;
        if (v.inner == 1) {
          return rows_grad_input<scalar_t, kAct, kTraining>(dy, x, dx, v, coef, act, {});
        }
        const OutputStore<scalar_t> store(v, 2, InputSource::kMemory);
        for_each_plane(v, [&](int64_t c, int64_t offset) {
          grad_input_span<scalar_t, kAct, kTraining>(
              dy + offset, x + offset, dx + offset, v.inner, {coef.scale[c], coef.shift[c]},
              {coef.a[c], coef.b[c], coef.c[c]}, act, {}, store, 0);
        });
      });
    });
  });
}

void act_backward_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                         const ChannelView& v, const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& weight, const at::Tensor& bias, bool training,
                         const ActivationSpec& spec, const at::Tensor& residual,
                         at::Tensor& grad_input, at::Tensor& grad_residual, at::Tensor& sum_dy,
                         at::Tensor& sum_dy_xmu) {
  FUSED_BN_DISPATCH(input.scalar_type(), "fused_bn_backward_cpu", [&] {
    dispatch_activation(spec.kind, [&](auto act_c) {
      using acc_t = at::opmath_type<scalar_t>;
      backward<scalar_t, decltype(act_c)::value>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
          grad_input.defined() ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
          residual_of<scalar_t>(residual, &grad_residual), v,
          channel_params<acc_t>(mean, invstd, weight, bias), training, spec,
          sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>());
    });
  });
}

}  // namespace

extern const BatchNormKernels kBatchNormKernels = {
    &stats_kernel,          &act_train_kernel,          &act_elemt_kernel,
    &act_backward_reduce_kernel, &act_backward_elemt_kernel, &act_backward_kernel,
};

}  // namespace fused_bn::cpu::CPU_CAPABILITY
