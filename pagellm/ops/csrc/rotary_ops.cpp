// Rotary position embedding applied in place, and the KV cache write by slot, for the CPU.
//
// Per decoder layer the torch rotary expression (`x * cos + rotate_half(x) * sin`, for q and for
// k) is ~20 small aten ops and the cache write two index_copy_ calls; at batch-1 decode these are
// microseconds of dispatch each for a few hundred floats of work. Here each is one call.
//
// Built with cpu_ops.cpp into the same extension (pagellm/ops/cpu.py) and registered as
// torch.ops.pagellm_cpu.rotary_embedding / write_kv_cache. The rotation has a scalar reference and
// AVX2 / AVX-512 bodies (rotary_simd.h), one picked per call by cpu_isa.h's active_isa().

// No FMA contraction in this file: the torch reference rounds each product before adding.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_isa.h"
#include "cpu_vec.h"

namespace {

using pagellm_isa::kAvx2;
using pagellm_isa::kAvx512;

// Elements [begin, half) of one head: the scalar reference, and the SIMD paths' remainder.
// Kept out of line so it is compiled for the baseline ISA (no FMA to contract into).
__attribute__((noinline)) void rotate_tail(float* x, const float* cos, const float* sin, int64_t half,
                                           int64_t begin) {
  for (int64_t i = begin; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    const float a = x1 * cos[i], b = x2 * sin[i];
    const float c = x2 * cos[i + half], d = x1 * sin[i + half];
    x[i] = a - b;
    x[i + half] = c + d;
  }
}

namespace scalar_path {
void rotate_heads(float* x, int64_t heads, int64_t head_stride, const float* cos, const float* sin, int64_t half) {
  for (int64_t h = 0; h < heads; ++h) rotate_tail(x + h * head_stride, cos, sin, half, 0);
}
}  // namespace scalar_path

#if PAGELLM_X86
namespace avx2_path {
using Vec = pagellm_vec::Avx2;
#define SIMD_FN PAGELLM_AVX2_FN
#include "rotary_simd.h"
#undef SIMD_FN
}  // namespace avx2_path

namespace avx512_path {
using Vec = pagellm_vec::Avx512;
#define SIMD_FN PAGELLM_AVX512_FN
#include "rotary_simd.h"
#undef SIMD_FN
}  // namespace avx512_path
#endif

void rotate_heads(int64_t isa, float* x, int64_t heads, int64_t head_stride, const float* cos, const float* sin,
                  int64_t half) {
#if PAGELLM_X86
  if (isa == kAvx512) return avx512_path::rotate_heads(x, heads, head_stride, cos, sin, half);
  if (isa == kAvx2) return avx2_path::rotate_heads(x, heads, head_stride, cos, sin, half);
#endif
  scalar_path::rotate_heads(x, heads, head_stride, cos, sin, half);
}

void check_heads(const at::Tensor& x, const char* name, int64_t tokens, int64_t rotary_dim) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3,
                    "rotary_embedding: ", name, " must be a float32 CPU [tokens, heads, head_dim] tensor");
  TORCH_CHECK_VALUE(x.size(0) == tokens, "rotary_embedding: ", name, " has ", x.size(0), " tokens, positions ",
                    tokens);
  TORCH_CHECK_VALUE(x.stride(2) == 1 || x.size(2) <= 1, "rotary_embedding: ", name,
                    "'s head_dim must be contiguous (stride 1)");
  TORCH_CHECK_VALUE(rotary_dim <= x.size(2), "rotary_embedding: rotary_dim ", rotary_dim, " exceeds ", name,
                    "'s head_dim ", x.size(2));
}

// q [T, Hq, D] and k [T, Hkv, D] rotated in place (any token/head strides, head_dim contiguous:
// the views a fused qkv projection splits into) by the table rows of positions [T] (int64).
// cos_cache / sin_cache: [max_position, rotary_dim] float32, neox layout (each half of a row
// pairs with the other); dims past rotary_dim (partial rotary) are left as they are.
void rotary_embedding(const at::Tensor& positions, at::Tensor q, at::Tensor k, const at::Tensor& cos_cache,
                      const at::Tensor& sin_cache) {
  TORCH_CHECK_VALUE(positions.device().is_cpu() && positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                        positions.is_contiguous(),
                    "rotary_embedding: positions must be a contiguous int64 CPU [tokens] tensor");
  TORCH_CHECK_VALUE(cos_cache.scalar_type() == at::kFloat && cos_cache.dim() == 2 && cos_cache.is_contiguous() &&
                        sin_cache.sizes() == cos_cache.sizes() && sin_cache.scalar_type() == at::kFloat &&
                        sin_cache.is_contiguous() && cos_cache.size(1) % 2 == 0,
                    "rotary_embedding: cos_cache/sin_cache must be contiguous float32 [max_position, rotary_dim] "
                    "tensors with an even rotary_dim");
  const int64_t tokens = positions.size(0), rotary_dim = cos_cache.size(1), max_position = cos_cache.size(0);
  check_heads(q, "q", tokens, rotary_dim);
  check_heads(k, "k", tokens, rotary_dim);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)  // the table is read without further checks
    TORCH_CHECK_VALUE(pos[t] >= 0 && pos[t] < max_position, "rotary_embedding: position ", pos[t],
                      " is outside the table's 0..", max_position - 1);
  const int64_t isa = pagellm_isa::active_isa(), half = rotary_dim / 2;
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cos = cos_cache.data_ptr<float>();
  const float* sin = sin_cache.data_ptr<float>();
  const int64_t hq = q.size(1), hkv = k.size(1);
  // A decode step's few hundred floats stay on this thread; long prompts split by token.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (hq + hkv) * rotary_dim));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + pos[t] * rotary_dim;
      const float* s = sin + pos[t] * rotary_dim;
      rotate_heads(isa, qp + t * q.stride(0), hq, q.stride(1), c, s, half);
      rotate_heads(isa, kp + t * k.stride(0), hkv, k.stride(1), c, s, half);
    }
  });
}

// One token's heads copied (converted to the cache dtype) into its cache row.
template <typename cache_t, typename src_t>
void copy_heads(cache_t* dst, const src_t* src, int64_t heads, int64_t head_stride, int64_t head_dim) {
  for (int64_t h = 0; h < heads; ++h, dst += head_dim) {
    const src_t* row = src + h * head_stride;
    if constexpr (std::is_same_v<cache_t, src_t>) {
      std::memcpy(dst, row, head_dim * sizeof(cache_t));
    } else {
      for (int64_t i = 0; i < head_dim; ++i) dst[i] = static_cast<cache_t>(row[i]);  // round to nearest even
    }
  }
}

void check_kv(const at::Tensor& x, const char* name, const at::Tensor& cache, int64_t tokens) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 3 && x.size(0) == tokens && x.size(1) == cache.size(2) &&
                        x.size(2) == cache.size(3),
                    "write_kv_cache: ", name, " must be a CPU [tokens, kv_heads, head_dim] tensor matching the cache "
                    "and slot_mapping");
  TORCH_CHECK_VALUE(x.stride(2) == 1 || x.size(2) <= 1, "write_kv_cache: ", name,
                    "'s head_dim must be contiguous (stride 1)");
  TORCH_CHECK_VALUE(x.scalar_type() == cache.scalar_type() || x.scalar_type() == at::kFloat,
                    "write_kv_cache: ", name, " must have the cache's dtype or float32");
}

// k/v [T, Hkv, D] (head_dim contiguous) into k_cache/v_cache [blocks, block_size, Hkv, D]
// (contiguous, float32/bfloat16/float16) at slot_mapping [T] (int64, block * block_size + offset):
// what two index_copy_ calls do, in one pass.
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                    const at::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong &&
                        slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
                    "write_kv_cache: slot_mapping must be a contiguous int64 CPU [tokens] tensor");
  TORCH_CHECK_VALUE(k_cache.device().is_cpu() && k_cache.dim() == 4 && k_cache.is_contiguous() &&
                        v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                        v_cache.scalar_type() == k_cache.scalar_type(),
                    "write_kv_cache: k_cache/v_cache must be contiguous CPU [blocks, block_size, kv_heads, head_dim] "
                    "tensors of one dtype");
  const int64_t tokens = slot_mapping.size(0);
  check_kv(k, "k", k_cache, tokens);
  check_kv(v, "v", v_cache, tokens);
  TORCH_CHECK_VALUE(k.scalar_type() == v.scalar_type(), "write_kv_cache: k and v must share a dtype");
  const int64_t slots = k_cache.size(0) * k_cache.size(1), heads = k_cache.size(2), head_dim = k_cache.size(3);
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK_VALUE(slot[t] >= 0 && slot[t] < slots, "write_kv_cache: slot ", slot[t], " is outside the cache's 0..",
                      slots - 1);
  const int64_t row = heads * head_dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "write_kv_cache", [&] {
    using cache_t = scalar_t;
    auto write = [&](auto* kp, auto* vp) {
      cache_t* kc = k_cache.data_ptr<cache_t>();
      cache_t* vc = v_cache.data_ptr<cache_t>();
      at::parallel_for(0, tokens, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row)), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          copy_heads(kc + slot[t] * row, kp + t * k.stride(0), heads, k.stride(1), head_dim);
          copy_heads(vc + slot[t] * row, vp + t * v.stride(0), heads, v.stride(1), head_dim);
        }
      });
    };
    if (k.scalar_type() == k_cache.scalar_type()) {
      write(k.data_ptr<cache_t>(), v.data_ptr<cache_t>());
    } else {
      write(k.data_ptr<float>(), v.data_ptr<float>());
    }
  });
}

// The same write into an fp8 (e4m3) cache: each value stored as clamp(x / scale, +-448) in e4m3,
// rounded to nearest even: bit for bit what kv_quant.quantize_fp8 and two index_copy_ calls store.
void write_kv_cache_fp8(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                        const at::Tensor& slot_mapping, double k_scale, double v_scale) {
  TORCH_CHECK_VALUE(k_cache.scalar_type() == at::kFloat8_e4m3fn && v_cache.scalar_type() == at::kFloat8_e4m3fn &&
                        k_cache.device().is_cpu() && k_cache.dim() == 4 && k_cache.is_contiguous() &&
                        v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(),
                    "write_kv_cache_fp8: k_cache/v_cache must be contiguous CPU float8_e4m3fn "
                    "[blocks, block_size, kv_heads, head_dim] tensors");
  TORCH_CHECK_VALUE(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong &&
                        slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
                    "write_kv_cache_fp8: slot_mapping must be a contiguous int64 CPU [tokens] tensor");
  TORCH_CHECK_VALUE(k_scale > 0 && v_scale > 0, "write_kv_cache_fp8: scales must be positive");
  const int64_t tokens = slot_mapping.size(0);
  check_kv(k, "k", k_cache, tokens);
  check_kv(v, "v", v_cache, tokens);
  TORCH_CHECK_VALUE(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                    "write_kv_cache_fp8: k and v must be float32");
  const int64_t slots = k_cache.size(0) * k_cache.size(1), heads = k_cache.size(2), head_dim = k_cache.size(3);
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK_VALUE(slot[t] >= 0 && slot[t] < slots, "write_kv_cache_fp8: slot ", slot[t],
                      " is outside the cache's 0..", slots - 1);
  const int64_t row = heads * head_dim;
  const float ks = static_cast<float>(k_scale), vs = static_cast<float>(v_scale);
  auto* kc = reinterpret_cast<uint8_t*>(k_cache.data_ptr());
  auto* vc = reinterpret_cast<uint8_t*>(v_cache.data_ptr());
  auto store = [&](uint8_t* dst, const float* src, int64_t head_stride, float scale) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < head_dim; ++d) {
        const float x = std::clamp(src[h * head_stride + d] / scale, -448.f, 448.f);
        dst[h * head_dim + d] = c10::Float8_e4m3fn(x).x;
      }
  };
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  at::parallel_for(0, tokens, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      store(kc + slot[t] * row, kp + t * k.stride(0), k.stride(1), ks);
      store(vc + slot[t] * row, vp + t * v.stride(0), v.stride(1), vs);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagellm_cpu, m) {
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_cache, Tensor sin_cache) -> ()");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("write_kv_cache_fp8(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "float k_scale, float v_scale) -> ()");
}

TORCH_LIBRARY_IMPL(pagellm_cpu, CPU, m) {
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("write_kv_cache", &write_kv_cache);
  m.impl("write_kv_cache_fp8", &write_kv_cache_fp8);
}
