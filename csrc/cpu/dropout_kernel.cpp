#include "dropout_kernel.h"

#include "cpu_capability.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fused_bn::cpu {
namespace {

// The extension is built without -march flags. The generic loops are compiled
// for AVX-512, AVX2 and baseline x86-64 and the best one is picked at load
// time (GNU ifunc); the hand-written ones below follow cpu_capability().
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define FUSED_BN_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSED_BN_CPU_CLONES
#endif

// Hand-written AVX2/AVX-512 Philox rounds (compilers do not vectorize the
// 32x32->64-bit products of the rounds on their own) and mask application
// (float32, bfloat16, float16).
#if defined(__GNUC__) && defined(__x86_64__)
#define FUSED_BN_X86_SIMD 1
#else
#define FUSED_BN_X86_SIMD 0
#endif

// A chunk's mask bytes and data stay in L1 between generating and applying.
constexpr int64_t kChunkBytes = 256;
// Independent vectors of Philox groups in flight per SIMD step: the ten
// rounds are one dependency chain, so interleaving chains keeps the
// multipliers busy.
constexpr int kSimdChains = 4;
// A SIMD step covers kSimdChains vectors of up to 8 groups (4 mask bytes
// each) and must not straddle chunks.
static_assert(kChunkBytes % (4 * kSimdChains) == 0, "chunks hold whole SIMD steps");
// Mask bytes (x 8 elements) a parallel task should at least cover.
constexpr int64_t kGrainBytes = 2048;

// Moves bit j of a 16-bit value to bit 4 * j.
inline uint64_t spread_bits_by_4(uint64_t x) {
  x &= 0xFFFF;
  x = (x | (x << 24)) & 0x000000FF000000FFull;
  x = (x | (x << 12)) & 0x000F000F000F000Full;
  x = (x | (x << 6)) & 0x0303030303030303ull;
  return (x | (x << 3)) & 0x1111111111111111ull;
}

// The mask bits of up to 16 consecutive Philox groups from per-word keep
// masks (bit g of keep[w]: word w of group g is kept): element 4 * g + w is
// bit 4 * g + w of the result, i.e. little-endian mask bytes.
inline uint64_t interleave_keep_masks(const uint32_t (&keep)[4]) {
  uint64_t bits = 0;
  for (int w = 0; w < 4; ++w) bits |= spread_bits_by_4(keep[w]) << w;
  return bits;
}

#if FUSED_BN_X86_SIMD
// fill_keep_bits for whole steps of kSimdChains vectors of kGroups Philox
// groups: philox_detail::round on vectors that hold one 32-bit word per 64-bit
// lane, in its low half. The 32x32->64-bit multiply then leaves a round's low
// word in place and its high word one shift away, with no shuffles; the high
// halves carry garbage that neither the multiplies nor the keep test read.
// Instantiated for AVX2 (4 groups per vector) and AVX-512 (8) with the
// intrinsics of each; returns the number of bytes written.
#define FUSED_BN_DEFINE_KEEP_BYTES(NAME, TARGET, GROUPS, VEC, IOTA, SET1, ADD, MUL, SRLI, XOR,   \
                                   KEEP_MASK)                                                   \
  __attribute__((target(TARGET))) int64_t NAME(const DropoutStream& stream, uint32_t last_kept, \
                                               int64_t first_byte, int64_t num_bytes,           \
                                               uint8_t* bits) {                                 \
    constexpr int kGroups = GROUPS;                                                             \
    constexpr int64_t kBytesPerVec = kGroups / 2;                                               \
    const VEC last = SET1(last_kept);                                                           \
    const VEC lanes = IOTA;                                                                     \
    const VEC m0 = SET1(philox_detail::kMultiplier0), m1 = SET1(philox_detail::kMultiplier1);   \
    int64_t b = 0;                                                                              \
    for (; b + kSimdChains * kBytesPerVec <= num_bytes; b += kSimdChains * kBytesPerVec) {      \
      /* The first group is a multiple of kSimdChains * kGroups: adding the */                  \
      /* lane to the counter's low word never carries into the high word. */                    \
      const PhiloxWords first = stream.counter(2 * static_cast<uint64_t>(first_byte + b));      \
      VEC c0[kSimdChains], c1[kSimdChains], c2[kSimdChains], c3[kSimdChains];                   \
      for (int k = 0; k < kSimdChains; ++k) {                                                   \
        c0[k] = ADD(SET1(first.x[0] + k * kGroups), lanes);                                     \
        c1[k] = SET1(first.x[1]);                                                               \
        c2[k] = SET1(first.x[2]);                                                               \
        c3[k] = SET1(first.x[3]);                                                               \
      }                                                                                         \
      for (uint32_t r = 0; r < philox_detail::kRounds; ++r) {                                   \
        const PhiloxKey rk = round_key(stream.key(), r);                                        \
        const VEC k0 = SET1(rk.k0), k1 = SET1(rk.k1);                                           \
        for (int k = 0; k < kSimdChains; ++k) {                                                 \
          const VEC product0 = MUL(c0[k], m0), product1 = MUL(c2[k], m1);                       \
          c0[k] = XOR(XOR(SRLI(product1, 32), c1[k]), k0);                                      \
          c1[k] = product1;                                                                     \
          c2[k] = XOR(XOR(SRLI(product0, 32), c3[k]), k1);                                      \
          c3[k] = product0;                                                                     \
        }                                                                                       \
      }                                                                                         \
      for (int k = 0; k < kSimdChains; ++k) {                                                   \
        const uint32_t keep[4] = {KEEP_MASK(c0[k], last), KEEP_MASK(c1[k], last),               \
                                  KEEP_MASK(c2[k], last), KEEP_MASK(c3[k], last)};              \
        const uint64_t packed = interleave_keep_masks(keep);                                    \
        std::memcpy(bits + b + k * kBytesPerVec, &packed, kBytesPerVec);                        \
      }                                                                                         \
    }                                                                                           \
    return b;                                                                                   \
  }

#define FUSED_BN_AVX2_IOTA _mm256_setr_epi64x(0, 1, 2, 3)
#define FUSED_BN_AVX2_SET1(v) _mm256_set1_epi64x(static_cast<int64_t>(static_cast<uint32_t>(v)))
// Low words with draw <= last (min(draw, last) == draw), moved to the sign
// bit of their 64-bit lane.
#define FUSED_BN_AVX2_KEEP_MASK(d, last)                                                  \
  static_cast<uint32_t>(_mm256_movemask_pd(_mm256_castsi256_pd(                          \
      _mm256_slli_epi64(_mm256_cmpeq_epi32(_mm256_min_epu32(d, last), d), 32))))
FUSED_BN_DEFINE_KEEP_BYTES(keep_bytes_avx2, "avx2", 4, __m256i, FUSED_BN_AVX2_IOTA,
                           FUSED_BN_AVX2_SET1, _mm256_add_epi64, _mm256_mul_epu32,
                           _mm256_srli_epi64, _mm256_xor_si256, FUSED_BN_AVX2_KEEP_MASK)

// GCC 12 takes the deliberately undefined pass-through operand inside
// avx512fintrin.h's _mm512_mul_epu32 for an uninitialized variable.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FUSED_BN_AVX512_IOTA _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)
#define FUSED_BN_AVX512_SET1(v) _mm512_set1_epi64(static_cast<int64_t>(static_cast<uint32_t>(v)))
// Low words with draw <= last.
#define FUSED_BN_AVX512_KEEP_MASK(d, last) \
  static_cast<uint32_t>(                    \
      _mm512_cmple_epu64_mask(_mm512_and_si512(d, _mm512_set1_epi64(0xFFFFFFFF)), last))
FUSED_BN_DEFINE_KEEP_BYTES(keep_bytes_avx512, "avx512f", 8, __m512i, FUSED_BN_AVX512_IOTA,
                           FUSED_BN_AVX512_SET1, _mm512_add_epi64, _mm512_mul_epu32,
                           _mm512_srli_epi64, _mm512_xor_si512, FUSED_BN_AVX512_KEEP_MASK)
#pragma GCC diagnostic pop

using KeepBytesSimd = int64_t (*)(const DropoutStream&, uint32_t, int64_t, int64_t, uint8_t*);

// The variant for the instruction set that cpu_capability() chose, so that
// FUSED_BN_CPU_CAPABILITY selects these loops too (and tests can run each),
// or null for the scalar code.
template <typename Fn>
Fn simd_variant(Fn avx512, Fn avx2) {
  switch (cpu_capability()) {
    case CpuCapability::AVX512:
      return avx512;
    case CpuCapability::AVX2:
      return avx2;
    default:
      return nullptr;
  }
}
#endif

// bits[b] = dropout_keep_byte(stream, rule, first_byte + b) for b < num_bytes.
void fill_keep_bits(const DropoutStream& stream, const DropoutKeepRule& rule, int64_t first_byte,
                    int64_t num_bytes, uint8_t* bits) {
  if (!rule.keeps_any) {
    std::memset(bits, 0, num_bytes);
    return;
  }
  int64_t b = 0;
#if FUSED_BN_X86_SIMD
  static const KeepBytesSimd keep_bytes_simd =
      simd_variant<KeepBytesSimd>(keep_bytes_avx512, keep_bytes_avx2);
  if (keep_bytes_simd != nullptr) {
    b = keep_bytes_simd(stream, rule.last_kept_draw, first_byte, num_bytes, bits);
  }
#endif
  for (; b < num_bytes; ++b) bits[b] = dropout_keep_byte(stream, rule, first_byte + b);
}

// Row `byte` holds bit k of `byte` as 0 or 1 in column k: multiplying eight
// elements by a row applies their mask byte in one vector operation.
template <typename T>
struct BitRows {
  std::array<std::array<T, kDropoutElementsPerByte>, 256> rows;

  BitRows() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int k = 0; k < kDropoutElementsPerByte; ++k) rows[byte][k] = dropout_mask_bit(byte, k);
    }
  }
};

template <typename T>
const BitRows<T>& bit_rows() {
  static const BitRows<T> table;
  return table;
}

// out[j] = x[j] * bit(j) * scale for j < n; x and out may alias exactly.
template <typename scalar_t, typename opmath_t>
inline void apply_bits_impl(const scalar_t* x, const uint8_t* bits, int64_t n, opmath_t scale,
                            scalar_t* out) {
  const auto& rows = bit_rows<opmath_t>().rows;
  const int64_t full_bytes = n / kDropoutElementsPerByte;
  for (int64_t b = 0; b < full_bytes; ++b) {
    const auto& row = rows[bits[b]];
    const int64_t first = b * kDropoutElementsPerByte;
    // All eight loads before any store: valid in place and vectorizable.
    opmath_t values[kDropoutElementsPerByte];
    for (int k = 0; k < kDropoutElementsPerByte; ++k) values[k] = static_cast<opmath_t>(x[first + k]);
    for (int k = 0; k < kDropoutElementsPerByte; ++k) {
      out[first + k] = static_cast<scalar_t>(values[k] * (row[k] * scale));
    }
  }
  for (int64_t j = full_bytes * kDropoutElementsPerByte; j < n; ++j) {
    const opmath_t bit = dropout_mask_bit(bits[j / kDropoutElementsPerByte], j % kDropoutElementsPerByte);
    out[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) * (bit * scale));
  }
}

// Outputs at least this large are written with non-temporal stores (SIMD
// loops): their lines are not read into the cache before being overwritten,
// which saves a pass over memory.
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

// float64 has no hand-written loop: the generic one, multiversioned.
FUSED_BN_CPU_CLONES void apply_bits(const double* x, const uint8_t* bits, int64_t n, double scale,
                                    double* out, bool /*stream*/) {
  apply_bits_impl(x, bits, n, scale, out);
}
#if FUSED_BN_X86_SIMD
// Vectors of float32, bfloat16 and float16 elements as float32 lanes, and
// back: rounded as c10's conversions round (to nearest even; a NaN becomes
// 0x7FC0 in bfloat16 and sign | 0x7E00 in float16), so that these loops write
// exactly what apply_bits_impl writes. `stream`: a non-temporal store (the
// caller checks alignment). cpu_capability() picks AVX512 only with BW and
// VL, and AVX2 only with F16C.
#define FUSED_BN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
// (GCC 12's -Wmaybe-uninitialized on avx512fintrin.h: see keep_bytes_avx512.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FUSED_BN_AVX2 __attribute__((target("avx2,f16c")))

struct Avx512Lanes {
  static constexpr int64_t kLanes = 16;

  FUSED_BN_AVX512 static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  FUSED_BN_AVX512 static __m512 load(const c10::BFloat16* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  FUSED_BN_AVX512 static __m512 load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  FUSED_BN_AVX512 static void store(float* p, __m512 v, bool stream) {
    stream ? _mm512_stream_ps(p, v) : _mm512_storeu_ps(p, v);
  }
  FUSED_BN_AVX512 static void store(c10::BFloat16* p, __m512 v, bool stream) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                    _mm512_set1_epi32(0x7FC0));
    store_16_bit(p, _mm512_cvtepi32_epi16(rounded), stream);
  }
  FUSED_BN_AVX512 static void store(c10::Half* p, __m512 v, bool stream) {
    __m256i half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (nan != 0) {
      const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16),
                                            _mm512_set1_epi32(0x8000));
      const __m512i canonical = _mm512_or_si512(sign, _mm512_set1_epi32(0x7E00));
      half = _mm256_mask_mov_epi16(half, nan, _mm512_cvtepi32_epi16(canonical));
    }
    store_16_bit(p, half, stream);
  }

 private:
  FUSED_BN_AVX512 static void store_16_bit(void* p, __m256i v, bool stream) {
    stream ? _mm256_stream_si256(static_cast<__m256i*>(p), v)
           : _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  }
};

struct Avx2Lanes {
  static constexpr int64_t kLanes = 8;

  FUSED_BN_AVX2 static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  FUSED_BN_AVX2 static __m256 load(const c10::BFloat16* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  FUSED_BN_AVX2 static __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  FUSED_BN_AVX2 static void store(float* p, __m256 v, bool stream) {
    stream ? _mm256_stream_ps(p, v) : _mm256_storeu_ps(p, v);
  }
  FUSED_BN_AVX2 static void store(c10::BFloat16* p, __m256 v, bool stream) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i result = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    store_16_bit(p, narrow_to_16_bit(result), stream);
  }
  FUSED_BN_AVX2 static void store(c10::Half* p, __m256 v, bool stream) {
    __m128i half = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    if (!_mm256_testz_si256(nan, nan)) {
      const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16),
                                            _mm256_set1_epi32(0x8000));
      const __m256i canonical = _mm256_or_si256(sign, _mm256_set1_epi32(0x7E00));
      half = _mm_blendv_epi8(half, narrow_to_16_bit(canonical),
                             narrow_to_16_bit(_mm256_srli_epi32(nan, 16)));
    }
    store_16_bit(p, half, stream);
  }

 private:
  FUSED_BN_AVX2 static void store_16_bit(void* p, __m128i v, bool stream) {
    stream ? _mm_stream_si128(static_cast<__m128i*>(p), v)
           : _mm_storeu_si128(static_cast<__m128i*>(p), v);
  }
  // Eight 32-bit lanes of values below 2^16 as eight 16-bit values.
  FUSED_BN_AVX2 static __m128i narrow_to_16_bit(__m256i v) {
    return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  }
};

// apply_bits for a vector of elements per step: the mask bits pick scale or 0
// per lane and x is multiplied by it, as in apply_bits_impl (so NaN stays NaN
// and a dropped -x gives -0). Returns the elements done.
template <typename scalar_t>
FUSED_BN_AVX512 int64_t apply_bits_avx512(const scalar_t* x, const uint8_t* bits, int64_t n,
                                          float scale, scalar_t* out, bool stream) {
  using Lanes = Avx512Lanes;
  const __m512 scale_vec = _mm512_set1_ps(scale);
  stream = stream && reinterpret_cast<uintptr_t>(out) % (Lanes::kLanes * sizeof(scalar_t)) == 0;
  int64_t i = 0;
  for (; i + Lanes::kLanes <= n; i += Lanes::kLanes) {
    uint16_t keep;  // bit k: element i + k
    std::memcpy(&keep, bits + i / kDropoutElementsPerByte, sizeof(keep));
    const __m512 factor = _mm512_maskz_mov_ps(keep, scale_vec);
    Lanes::store(out + i, _mm512_mul_ps(Lanes::load(x + i), factor), stream);
  }
  return i;
}

template <typename scalar_t>
FUSED_BN_AVX2 int64_t apply_bits_avx2(const scalar_t* x, const uint8_t* bits, int64_t n,
                                      float scale, scalar_t* out, bool stream) {
  using Lanes = Avx2Lanes;
  const __m256 scale_vec = _mm256_set1_ps(scale);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  stream = stream && reinterpret_cast<uintptr_t>(out) % (Lanes::kLanes * sizeof(scalar_t)) == 0;
  int64_t i = 0;
  for (; i + Lanes::kLanes <= n; i += Lanes::kLanes) {
    const __m256i byte = _mm256_set1_epi32(bits[i / kDropoutElementsPerByte]);
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
    const __m256 factor = _mm256_and_ps(_mm256_castsi256_ps(keep), scale_vec);
    Lanes::store(out + i, _mm256_mul_ps(Lanes::load(x + i), factor), stream);
  }
  return i;
}
#pragma GCC diagnostic pop
#endif

// apply_bits for float32, bfloat16 and float16: the SIMD loop of the chosen
// instruction set, then apply_bits_impl for the rest. `stream`: non-temporal
// stores where the SIMD loop's stores are aligned.
template <typename scalar_t>
void apply_bits_vectorized(const scalar_t* x, const uint8_t* bits, int64_t n, float scale,
                           scalar_t* out, bool stream) {
  int64_t done = 0;  // a multiple of kDropoutElementsPerByte
#if FUSED_BN_X86_SIMD
  using ApplyBitsSimd = int64_t (*)(const scalar_t*, const uint8_t*, int64_t, float, scalar_t*, bool);
  static const ApplyBitsSimd apply_bits_simd =
      simd_variant<ApplyBitsSimd>(apply_bits_avx512<scalar_t>, apply_bits_avx2<scalar_t>);
  if (apply_bits_simd != nullptr) done = apply_bits_simd(x, bits, n, scale, out, stream);
#endif
  apply_bits_impl(x + done, bits + done / kDropoutElementsPerByte, n - done, scale, out + done);
}

void apply_bits(const float* x, const uint8_t* bits, int64_t n, float scale, float* out,
                bool stream) {
  apply_bits_vectorized(x, bits, n, scale, out, stream);
}
void apply_bits(const c10::Half* x, const uint8_t* bits, int64_t n, float scale, c10::Half* out,
                bool stream) {
  apply_bits_vectorized(x, bits, n, scale, out, stream);
}
void apply_bits(const c10::BFloat16* x, const uint8_t* bits, int64_t n, float scale,
                c10::BFloat16* out, bool stream) {
  apply_bits_vectorized(x, bits, n, scale, out, stream);
}

// Runs body(first_byte, num_bytes, first_element, num_elements) over chunks of
// kChunkBytes mask bytes, in parallel. Chunks start at multiples of
// kChunkBytes * 8 elements, so each mask byte and each SIMD block of Philox
// groups belongs to one thread, whatever the thread count. Each task ends
// with a store fence, which makes its non-temporal stores visible.
template <typename Body>
void for_each_chunk(int64_t numel, const Body& body) {
  const int64_t num_bytes = dropout_mask_bytes(numel);
  const int64_t num_chunks = (num_bytes + kChunkBytes - 1) / kChunkBytes;
  at::parallel_for(0, num_chunks, kGrainBytes / kChunkBytes, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t byte = chunk * kChunkBytes;
      const int64_t first = byte * kDropoutElementsPerByte;
      const int64_t chunk_bytes = std::min(kChunkBytes, num_bytes - byte);
      body(byte, chunk_bytes, first, std::min(chunk_bytes * kDropoutElementsPerByte, numel - first));
    }
#if FUSED_BN_X86_SIMD
    _mm_sfence();
#endif
  });
}

}  // namespace

void dropout_kernel(const at::Tensor& input, const at::Tensor& output, uint8_t* mask_bits,
                    const DropoutStream& stream, const DropoutKeepRule& rule, double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const bool streaming_stores = output.nbytes() >= kStreamingBytes;
    for_each_chunk(input.numel(), [&](int64_t byte, int64_t num_bytes, int64_t first, int64_t n) {
      uint8_t chunk_bits[kChunkBytes];
      uint8_t* bits = mask_bits != nullptr ? mask_bits + byte : chunk_bits;
      fill_keep_bits(stream, rule, byte, num_bytes, bits);
      apply_bits(x + first, bits, n, static_cast<opmath_t>(scale), out + first, streaming_stores);
    });
  });
}

void dropout_apply_mask_kernel(const at::Tensor& input, const uint8_t* mask_bits, double scale,
                               const at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const bool streaming_stores = output.nbytes() >= kStreamingBytes;
    for_each_chunk(input.numel(), [&](int64_t byte, int64_t, int64_t first, int64_t n) {
      apply_bits(x + first, mask_bits + byte, n, static_cast<opmath_t>(scale), out + first,
                 streaming_stores);
    });
  });
}

}  // namespace fused_bn::cpu
