#include "cpu_capability.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

#if defined(__unix__)
#include <unistd.h>
#endif

namespace fused_bn::cpu {
namespace {

bool cpu_supports(CpuCapability capability) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  switch (capability) {
    case CpuCapability::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case CpuCapability::AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    default:
      return true;
  }
#else
  return capability == CpuCapability::Default;
#endif
}

bool compiled(CpuCapability capability) {
  const auto all = compiled_cpu_capabilities();
  return std::find(all.begin(), all.end(), capability) != all.end();
}

CpuCapability forced(const std::string& requested) {
  std::string name = requested;
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  for (const auto capability : {CpuCapability::Default, CpuCapability::AVX2, CpuCapability::AVX512}) {
    if (name != cpu_capability_name(capability)) continue;
    TORCH_CHECK(compiled(capability), "FUSED_BN_CPU_CAPABILITY=", requested,
                ": fused_bn was built without the ", name, " kernels");
    TORCH_CHECK(cpu_supports(capability), "FUSED_BN_CPU_CAPABILITY=", requested,
                ": this CPU does not support ", name);
    return capability;
  }
  TORCH_CHECK(false, "FUSED_BN_CPU_CAPABILITY=", requested,
              ": expected one of default, avx2, avx512");
}

// The best compiled copy that torch itself would also use on this machine.
CpuCapability automatic() {
  const std::string torch_choice = at::get_cpu_capability();
  const auto all = compiled_cpu_capabilities();
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const bool torch_allows = *it == CpuCapability::Default ||
                              torch_choice == "AVX512" ||
                              (*it == CpuCapability::AVX2 && torch_choice == "AVX2");
    if (torch_allows && cpu_supports(*it)) return *it;
  }
  return CpuCapability::Default;
}

}  // namespace

std::vector<CpuCapability> compiled_cpu_capabilities() {
  return {
      CpuCapability::Default,
#ifdef FUSED_BN_WITH_AVX2
      CpuCapability::AVX2,
#endif
#ifdef FUSED_BN_WITH_AVX512
      CpuCapability::AVX512,
#endif
  };
}

std::string cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::AVX512:
      return "avx512";
    case CpuCapability::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

CpuCapability cpu_capability() {
  static const CpuCapability chosen = [] {
    const char* requested = std::getenv("FUSED_BN_CPU_CAPABILITY");
    return requested != nullptr && *requested != '\0' ? forced(requested) : automatic();
  }();
  return chosen;
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t reported = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return reported > 0 ? reported : int64_t(1) << 20;
  }();
  return bytes;
}

}  // namespace fused_bn::cpu
