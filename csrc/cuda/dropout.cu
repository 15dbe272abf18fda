// CUDA registrations and kernels of the Dropout ops declared in ops.cpp. The
// keep rule is the one of the CPU kernels (include/fused_bn/dropout_mask.h),
// so both produce bit-identical masks.
//
// Randomness and CUDA graphs: seed_offset is a device tensor that the kernel
// reads through a pointer, never on the host. fused_bn.functional.dropout
// draws it with torch.randint on the device's default generator, whose Philox
// state is captured the PyTorch way (seed and offset read through pointers at
// replay), so a captured graph draws a new mask on every replay and the
// dropout op itself stays a pure function of its arguments.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../dropout_common.h"

namespace fused_bn::cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;
constexpr int kVectorBytes = 16;

// kVectorBytes worth of scalars, for one 16-byte load or store.
template <typename scalar_t>
struct alignas(kVectorBytes) Vector {
  static constexpr int kSize = kVectorBytes / sizeof(scalar_t);
  scalar_t v[kSize];
};

// The 8 elements of mask byte `byte`: out = x * bit * scale.
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ void apply_byte(const scalar_t* x, scalar_t* out, int64_t byte,
                                           uint8_t bits, opmath_t scale, int64_t numel,
                                           bool vectorized) {
  const int64_t first = byte * kDropoutElementsPerByte;
  const auto factor = [&](int k) {
    return static_cast<opmath_t>(dropout_mask_bit(bits, k)) * scale;
  };
  if (vectorized && first + kDropoutElementsPerByte <= numel) {
    using V = Vector<scalar_t>;
    static_assert(kDropoutElementsPerByte % V::kSize == 0, "a mask byte spans whole vectors");
    constexpr int kVectors = kDropoutElementsPerByte / V::kSize;
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      V values = reinterpret_cast<const V*>(x + first)[v];
#pragma unroll
      for (int k = 0; k < V::kSize; ++k) {
        values.v[k] = static_cast<scalar_t>(static_cast<opmath_t>(values.v[k]) * factor(v * V::kSize + k));
      }
      reinterpret_cast<V*>(out + first)[v] = values;
    }
    return;
  }
  const int count = static_cast<int>(std::min<int64_t>(kDropoutElementsPerByte, numel - first));
  for (int k = 0; k < count; ++k) {
    out[first + k] = static_cast<scalar_t>(static_cast<opmath_t>(x[first + k]) * factor(k));
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void dropout_kernel(const scalar_t* x, scalar_t* out, uint8_t* mask_bits,
                               const int64_t* seed_offset, DropoutKeepRule rule, opmath_t scale,
                               int64_t numel, bool vectorized) {
  const DropoutStream stream = {static_cast<uint64_t>(seed_offset[0]),
                                static_cast<uint64_t>(seed_offset[1])};
  const int64_t num_bytes = dropout_mask_bytes(numel);
  for (int64_t byte = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       byte < num_bytes; byte += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t bits = dropout_keep_byte(stream, rule, byte);
    if (mask_bits != nullptr) mask_bits[byte] = bits;
    apply_byte(x, out, byte, bits, scale, numel, vectorized);
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void apply_mask_kernel(const scalar_t* x, scalar_t* out, const uint8_t* mask_bits,
                                  opmath_t scale, int64_t numel, bool vectorized) {
  const int64_t num_bytes = dropout_mask_bytes(numel);
  for (int64_t byte = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       byte < num_bytes; byte += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    apply_byte(x, out, byte, mask_bits[byte], scale, numel, vectorized);
  }
}

__global__ void philox4x32_kernel(const int64_t* counter, const int64_t* key, int64_t* out,
                                  int64_t rows) {
  const PhiloxKey philox_key = {static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1])};
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    PhiloxWords words;
    for (int w = 0; w < 4; ++w) words.x[w] = static_cast<uint32_t>(counter[4 * row + w]);
    words = philox4x32_10(words, philox_key);
    for (int w = 0; w < 4; ++w) out[4 * row + w] = words.x[w];
  }
}

// Grid of a grid-stride loop over `items`.
unsigned int grid_size(int64_t items) {
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  const int64_t resident =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * kBlocksPerSM;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, resident)));
}

bool vector_aligned(const Tensor& a, const Tensor& b) {
  const auto aligned = [](const Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kVectorBytes == 0;
  };
  return aligned(a) && aligned(b);
}

// Launches dropout_kernel on dense `input` into `output` (possibly the same).
void launch_dropout(const Tensor& input, const Tensor& output, uint8_t* mask_bits,
                    const Tensor& seed_offset, const DropoutKeepRule& rule, double scale) {
  const int64_t numel = input.numel();
  if (numel == 0) return;
  const Tensor seed_offset_values = seed_offset.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dropout_kernel<scalar_t, opmath_t>
        <<<grid_size(dropout_mask_bytes(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), mask_bits,
            seed_offset_values.const_data_ptr<int64_t>(), rule, static_cast<opmath_t>(scale), numel,
            vector_aligned(input, output));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor> dropout(const Tensor& input, double p, const Tensor& seed_offset,
                                   bool save_mask) {
  check_seed_offset(input, seed_offset);
  const c10::cuda::CUDAGuard guard(input.device());
  const DropoutPass pass = make_dropout_pass(input, p);
  Tensor mask = new_dropout_mask(input, save_mask);
  launch_dropout(pass.input, pass.output, save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr,
                 seed_offset, pass.rule, pass.scale);
  return {pass.output, mask};
}

void dropout_(Tensor& self, double p, const Tensor& seed_offset) {
  check_dropout_args(self, p);
  check_seed_offset(self, seed_offset);
  const c10::cuda::CUDAGuard guard(self.device());
  const Tensor dense = dense_tensor(self);
  launch_dropout(dense, dense, nullptr, seed_offset, dropout_keep_rule(p), dropout_scale(p));
  if (!dense.is_same(self)) self.copy_(dense);
}

Tensor dropout_apply_mask(const Tensor& input, const Tensor& mask, double p) {
  check_dropout_mask(input, mask);
  const c10::cuda::CUDAGuard guard(input.device());
  const DropoutPass pass = make_dropout_pass(input, p);
  const int64_t numel = input.numel();
  if (numel == 0) return pass.output;
  const Tensor mask_bits = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    apply_mask_kernel<scalar_t, opmath_t>
        <<<grid_size(dropout_mask_bytes(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            pass.input.const_data_ptr<scalar_t>(), pass.output.mutable_data_ptr<scalar_t>(),
            mask_bits.const_data_ptr<uint8_t>(), static_cast<opmath_t>(pass.scale), numel,
            vector_aligned(pass.input, pass.output));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return pass.output;
}

Tensor philox4x32(const Tensor& counter, const Tensor& key) {
  check_philox_args(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const Tensor counters = counter.contiguous();
  const Tensor key_values = key.contiguous();
  Tensor result = at::empty_like(counters);
  const int64_t rows = counters.numel() / 4;
  if (rows == 0) return result;
  philox4x32_kernel<<<grid_size(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      counters.const_data_ptr<int64_t>(), key_values.const_data_ptr<int64_t>(),
      result.mutable_data_ptr<int64_t>(), rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CUDA, m) {
  m.impl("dropout", &dropout);
  m.impl("dropout_", &dropout_);
  m.impl("dropout_apply_mask", &dropout_apply_mask);
  m.impl("philox4x32", &philox4x32);
}

}  // namespace fused_bn::cuda
