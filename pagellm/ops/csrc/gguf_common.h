// Shared by the GGUF kernels (gguf_ops.cpp: 32-value block types, gguf_kquant_ops.cpp: K-quants).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"  // PAGELLM_X86, <immintrin.h>, the ISA enum and its run-time choice

namespace pagellm_gguf {

using pagellm_isa::active_isa;
using pagellm_isa::cpu_has_avx2_fma;
using pagellm_isa::cpu_has_avx512;
using pagellm_isa::cpu_has_avx512_bf16;
using pagellm_isa::cpu_has_avx512_vnni;
using pagellm_isa::Isa;
using pagellm_isa::kAvx2;
using pagellm_isa::kAvx512;
using pagellm_isa::kScalar;
using pagellm_isa::supported_isas;

// Activation rows up to this count take the fused path (each weight row read once per 4 rows);
// above it, expanding the weight once and using a float32 GEMM is faster. Measured on SmolLM2 Q4_1
// decode (AVX-512, 2 threads): batch 16 72.2 -> 62.8 ms/step with 16 instead of 8; 32 lost
// (111.6 -> 119.2 ms/step at batch 32).
constexpr int64_t kFusedMaxRows = 16;

// The fused (decode) paths stream every weight row once per step, faster than the hardware
// prefetcher hides DRAM latency: each block asks for the bytes this far ahead. Measured on SmolLM2
// Q4_1 batch-1 decode (AVX-512, 2 threads): 25.3 -> 14.2 ms/token. Prefetches never fault, so
// reading past a weight's end is harmless.
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_block(const uint8_t* block, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(block + kPrefetchBytes + off, 0, 3);
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// K-quants (gguf_kquant_ops.cpp): 256-value super-blocks. Bytes per super-block, 0 for other types.
int64_t kquant_block_bytes(int64_t type);
// out (M, N) = x (M, K) float32 contiguous times the (N, K) K-quant weight.
void kquant_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out);
// Rows [0, N) of the weight as float32 into y (N, K).
void kquant_dequantize(const at::Tensor& w, int64_t type, int64_t N, int64_t K, float* y);

// Activation rows quantized per 32-value block (gguf_int8act_ops.cpp): codes (M, K) int8, scale d
// (M, nb) = amax / 127, and ds (M, nb) = d * the block's sum of codes.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, ds;
};
QuantizedRows quantize_rows(int64_t isa, const float* x, int64_t M, int64_t K);

// int8 activations (gguf_int8act_ops.cpp): the 32-value block types, decode-sized row counts.
bool int8act_supported(int64_t type);
void int8act_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out);

}  // namespace pagellm_gguf
