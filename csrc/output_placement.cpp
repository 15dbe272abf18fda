#include "output_placement.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <c10/core/TensorImpl.h>

#include <algorithm>
#include <memory>
#include <vector>

namespace fused_bn {
namespace {

constexpr int64_t kPageBytes = 4096;
// c10's CPU allocations are 64-byte aligned; placed data keep that alignment
// (whole-vector loads, streaming stores).
constexpr int64_t kAlignment = 64;
// Below this the extra page of an allocation would be a noticeable share.
constexpr int64_t kMinPlacedBytes = int64_t(64) << 10;

int64_t page_offset(const void* p) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % kPageBytes);
}

int64_t circular_distance(int64_t a, int64_t b) {
  const int64_t d = (a - b + kPageBytes) % kPageBytes;
  return std::min(d, kPageBytes - d);
}

void delete_block(void* block) { delete static_cast<c10::DataPtr*>(block); }

// The page offset (a multiple of kAlignment) farthest, around the 4 KiB
// circle, from every offset in `taken`.
int64_t farthest_page_offset(const std::vector<int64_t>& taken) {
  int64_t best = 0, best_distance = -1;
  for (int64_t offset = 0; offset < kPageBytes; offset += kAlignment) {
    int64_t distance = kPageBytes;
    for (const int64_t t : taken) distance = std::min(distance, circular_distance(offset, t));
    if (distance > best_distance) {
      best = offset;
      best_distance = distance;
    }
  }
  return best;
}

}  // namespace

at::Tensor empty_like_placed(const at::Tensor& like, std::initializer_list<at::Tensor> inputs) {
  TORCH_INTERNAL_ASSERT(like.is_non_overlapping_and_dense());
  const int64_t nbytes = static_cast<int64_t>(like.nbytes());
  if (!like.device().is_cpu() || nbytes < kMinPlacedBytes) return at::empty_like(like);
  std::vector<int64_t> taken;
  for (const at::Tensor& t : inputs) taken.push_back(page_offset(t.const_data_ptr()));
  const int64_t target = farthest_page_offset(taken);
  c10::Allocator* allocator = c10::GetCPUAllocator();
  // One extra page, less the alignment: room to shift the data to `target`.
  auto block = std::make_unique<c10::DataPtr>(allocator->allocate(nbytes + kPageBytes - kAlignment));
  char* base = static_cast<char*>(block->get());
  char* data = base + (target - page_offset(base) + kPageBytes) % kPageBytes;
  const c10::Device device = block->device();
  c10::DataPtr placed(data, block.release(), &delete_block, device);
  // The allocator stays with the storage, so that resize_ works as on any tensor.
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(placed), allocator,
                       /*resizable=*/true);
  at::Tensor out = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), like.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides());
  return out;
}

}  // namespace fused_bn
