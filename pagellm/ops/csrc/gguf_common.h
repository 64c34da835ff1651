// Shared by the GGUF kernels (gguf_ops.cpp: 32-value block types, gguf_kquant_ops.cpp: K-quants).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define PAGELLM_X86 1
#include <immintrin.h>
#endif

namespace pagellm_gguf {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
// Activation rows up to this count take the fused path (each weight row read once per 4 rows);
// above it, expanding the weight once and using a float32 GEMM is faster.
constexpr int64_t kFusedMaxRows = 8;

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

inline int64_t supported_isas() {  // bit i set: Isa i runs on this CPU
  int64_t mask = 1 << kScalar;
#if PAGELLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) mask |= 1 << kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    mask |= 1 << kAvx512;
#endif
  return mask;
}

// AVX-512 VNNI (`vpdpbusd`: u8 x s8 dot products of 4 summed into int32), Cascade Lake and later.
inline bool cpu_has_avx512_vnni() {
#if PAGELLM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The best path the CPU has, or the one PAGELLM_CPU_ISA names (read per call, so tests can switch).
inline int64_t active_isa() {
  const int64_t mask = supported_isas();
  const char* env = std::getenv("PAGELLM_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto")
    return (mask >> kAvx512 & 1) ? kAvx512 : (mask >> kAvx2 & 1) ? kAvx2 : kScalar;
  const std::string want(env);
  const int64_t isa = want == "scalar" ? kScalar : want == "avx2" ? kAvx2 : want == "avx512" ? kAvx512 : -1;
  TORCH_CHECK(isa >= 0, "PAGELLM_CPU_ISA=", want, " is not one of auto, scalar, avx2, avx512");
  TORCH_CHECK(mask >> isa & 1, "PAGELLM_CPU_ISA=", want, " but this CPU does not support it");
  return isa;
}

// K-quants (gguf_kquant_ops.cpp): 256-value super-blocks. Bytes per super-block, 0 for other types.
int64_t kquant_block_bytes(int64_t type);
// out (M, N) = x (M, K) float32 contiguous times the (N, K) K-quant weight.
void kquant_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out);
// Rows [0, N) of the weight as float32 into y (N, K).
void kquant_dequantize(const at::Tensor& w, int64_t type, int64_t N, int64_t K, float* y);

// int8 activations (gguf_int8act_ops.cpp): the 32-value block types, decode-sized row counts.
bool int8act_supported(int64_t type);
void int8act_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out);

}  // namespace pagellm_gguf
