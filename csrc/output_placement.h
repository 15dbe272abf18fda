#pragma once
// Where the ops put their large CPU outputs within a 4 KiB page.
//
// A CPU first matches a load against older, still in-flight stores by the
// address bits within a 4 KiB page. In a streaming loop out[i] = f(in[i])
// whose output starts a few hundred bytes past its input modulo 4 KiB, the
// loads of the input keep matching the stores of the output and wait for
// them ("4K aliasing"): an elementwise pass then runs up to 2x slower, by
// where the allocator happened to put the output. So the ops place such an
// output at a page offset far from that of every input they stream.
#include <ATen/core/Tensor.h>

#include <initializer_list>

namespace fused_bn {

// at::empty_like(like) for a non-overlapping and dense `like` (same sizes,
// strides, dtype and device). On CPU, for outputs of at least 64 KiB, the
// data start at the page offset farthest from those of `inputs`.
at::Tensor empty_like_placed(const at::Tensor& like, std::initializer_list<at::Tensor> inputs);

}  // namespace fused_bn
