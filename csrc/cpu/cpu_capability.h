#pragma once
// Which instruction-set copy of the CPU kernels runs. setup.py compiles the
// kernel sources once per ISA (namespaces DEFAULT, AVX2, AVX512, as ATen's
// CPU_CAPABILITY; FUSED_BN_WITH_AVX2/AVX512 say which copies exist); the
// choice is made once per process:
//   FUSED_BN_CPU_CAPABILITY=default|avx2|avx512  forces one (an error if it
//       was not compiled or the CPU lacks it);
//   otherwise the best compiled one not above torch's own choice
//   (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
#include <cstdint>
#include <string>
#include <vector>

namespace fused_bn::cpu {

enum class CpuCapability { Default, AVX2, AVX512 };

CpuCapability cpu_capability();

// "default", "avx2" or "avx512".
std::string cpu_capability_name(CpuCapability capability);

// The copies compiled into this build, lowest first.
std::vector<CpuCapability> compiled_cpu_capabilities();

// One core's L2 cache, as the OS reports it (1 MiB where it does not).
int64_t l2_cache_bytes();

}  // namespace fused_bn::cpu
