// Run-time ISA selection shared by the CPU extensions (cpu_ops.cpp, the GGUF kernels).
//
// The extensions are compiled without -march=native: each SIMD path carries its own
// __attribute__((target(...))) and the caller picks one per call from cpuid, so one cached build
// runs on any x86-64 CPU. PAGELLM_CPU_ISA=auto|scalar|avx2|avx512 forces a path (read on every
// call, so tests can switch paths in one process); asking for one the CPU lacks is an error.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define PAGELLM_X86 1
#include <immintrin.h>
#endif

namespace pagellm_isa {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// cpuid through the compiler's builtins (which also check the OS saves the wide registers).
inline bool cpu_has_avx2_fma() {
#if PAGELLM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The AVX-512 path needs F, BW (16-bit lanes) and VL (the 256-bit forms).
inline bool cpu_has_avx512() {
#if PAGELLM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// VNNI (vpdpbusd: u8 x s8 dot products into int32) on top of the AVX-512 path.
inline bool cpu_has_avx512_vnni() {
#if PAGELLM_X86
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// AVX512-BF16 (vdpbf16ps: bf16 pair dot products into float32) on top of the AVX-512 path.
inline bool cpu_has_avx512_bf16() {
#if PAGELLM_X86
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

inline int64_t supported_isas() {  // bit i set: Isa i runs on this CPU
  int64_t mask = 1 << kScalar;
  if (cpu_has_avx2_fma()) mask |= 1 << kAvx2;
  if (cpu_has_avx512()) mask |= 1 << kAvx512;
  return mask;
}

// The best path the CPU has, or the one PAGELLM_CPU_ISA names.
inline int64_t active_isa() {
  const int64_t mask = supported_isas();
  const char* env = std::getenv("PAGELLM_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto")
    return (mask >> kAvx512 & 1) ? int64_t{kAvx512} : (mask >> kAvx2 & 1) ? int64_t{kAvx2} : int64_t{kScalar};
  const std::string want(env);
  const int64_t isa = want == "scalar" ? kScalar : want == "avx2" ? kAvx2 : want == "avx512" ? kAvx512 : -1;
  TORCH_CHECK(isa >= 0, "PAGELLM_CPU_ISA=", want, " is not one of auto, scalar, avx2, avx512");
  TORCH_CHECK(mask >> isa & 1, "PAGELLM_CPU_ISA=", want, " but this CPU does not support it");
  return isa;
}

}  // namespace pagellm_isa
