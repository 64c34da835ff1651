// Weight-only matmuls on GGUF block-quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; the K-quants
// Q4_K, Q5_K, Q6_K live in gguf_kquant_ops.cpp and are dispatched from here).
//
// The weight stays in its on-disk blocks of 32 values (a float16 scale, maybe a float16 min,
// 4/5/8-bit codes); each block is expanded to float32 in registers right where it is multiplied,
// so a decode step reads the quantized bytes only. Activations and accumulation are float32.
// Many activation rows (prefill) instead expand a slab of weight rows once and hand it to at::mm.
//
// One build runs on every x86-64 CPU: the AVX-512 and AVX2+FMA paths are compiled with their own
// target attributes and chosen at run time from cpuid; PAGELLM_CPU_ISA=scalar|avx2|avx512 forces
// one (an error when the CPU lacks it). Built by pagellm/ops/gguf_cpu.py, registered as
// torch.ops.pagellm_gguf.*.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gguf_common.h"

namespace {
using namespace pagellm_gguf;

// ggml type ids (gguf.GGMLQuantizationType) and their block sizes in bytes (32 values each).
enum GgmlType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 };
constexpr int64_t kBlock = 32;

int64_t block_bytes(int64_t type) {
  switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
  }
  TORCH_CHECK(false, "ggml type ", type,
              " has no GGUF CPU kernel (supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)");
}

// Bytes of one block of type T, at compile time for the inner loops.
template <int64_t T>
constexpr int64_t kBytes = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- scalar: the reference layout of each block, value i of 32 -----------------------------

template <int64_t T>
void dequant_block_scalar(const uint8_t* b, float* y) {
  const float d = half_at(b);
  if constexpr (T == Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < 32; ++i) y[i] = d * q[i];
  } else {
    constexpr bool has_min = (T == Q4_1 || T == Q5_1);
    constexpr bool five = (T == Q5_0 || T == Q5_1);
    const float m = has_min ? half_at(b + 2) : 0.f;
    const uint32_t qh = five ? u32_at(b + (has_min ? 4 : 2)) : 0;
    const uint8_t* qs = b + 2 + (has_min ? 2 : 0) + (five ? 4 : 0);
    const int offset = has_min ? 0 : (five ? 16 : 8);  // symmetric types centre their codes
    for (int j = 0; j < 16; ++j) {
      int lo = qs[j] & 0xF, hi = qs[j] >> 4;
      if (five) {
        lo |= ((qh >> j) & 1) << 4;
        hi |= ((qh >> (j + 16)) & 1) << 4;
      }
      y[j] = has_min ? lo * d + m : (lo - offset) * d;
      y[j + 16] = has_min ? hi * d + m : (hi - offset) * d;
    }
  }
}

template <int64_t T>
void dot_rows_scalar(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, int64_t rows, float* out,
                     int64_t ldo) {
  float buf[kBlock];
  float acc[kFusedMaxRows] = {0};
  for (int64_t b = 0; b < nb; ++b) {
    prefetch_block(w + b * kBytes<T>, kBytes<T>);
    dequant_block_scalar<T>(w + b * kBytes<T>, buf);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ldx + b * kBlock;
      float s = 0.f;
      for (int i = 0; i < kBlock; ++i) s += buf[i] * xr[i];
      acc[r] += s;
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r * ldo] = acc[r];
}

template <int64_t T>
void dequant_row_scalar(const uint8_t* w, int64_t nb, float* y) {
  for (int64_t b = 0; b < nb; ++b) dequant_block_scalar<T>(w + b * kBytes<T>, y + b * kBlock);
}

#if PAGELLM_X86
// ---- AVX2 + FMA: a block is 4 vectors of 8 floats ------------------------------------------
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))

// The 32 codes of a block as 4 x 8 int32 (values 0-7, 8-15, 16-23, 24-31).
template <int64_t T>
AVX2_FN inline void codes_avx2(const uint8_t* b, __m256i q[4]) {
  if constexpr (T == Q8_0) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    const __m128i lo = _mm256_castsi256_si128(raw), hi = _mm256_extracti128_si256(raw, 1);
    q[0] = _mm256_cvtepi8_epi32(lo);
    q[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8));
    q[2] = _mm256_cvtepi8_epi32(hi);
    q[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8));
  } else {
    constexpr bool has_min = (T == Q4_1 || T == Q5_1);
    constexpr bool five = (T == Q5_0 || T == Q5_1);
    const uint8_t* qs = b + 2 + (has_min ? 2 : 0) + (five ? 4 : 0);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0xF);
    const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    q[0] = _mm256_cvtepu8_epi32(lo);
    q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    q[2] = _mm256_cvtepu8_epi32(hi);
    q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
    if constexpr (five) {  // bit i of qh is the fifth bit of value i
      const __m256i qh = _mm256_set1_epi32(static_cast<int>(u32_at(b + (has_min ? 4 : 2))));
      const __m256i one = _mm256_set1_epi32(1);
      for (int v = 0; v < 4; ++v) {
        const __m256i shift = _mm256_setr_epi32(8 * v, 8 * v + 1, 8 * v + 2, 8 * v + 3, 8 * v + 4, 8 * v + 5,
                                                8 * v + 6, 8 * v + 7);
        const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(qh, shift), one);
        q[v] = _mm256_or_si256(q[v], _mm256_slli_epi32(bit, 4));
      }
    }
  }
}

// y = code * d + bias, the block's 32 floats.
template <int64_t T>
AVX2_FN inline void dequant_avx2(const uint8_t* b, __m256 y[4]) {
  __m256i q[4];
  codes_avx2<T>(b, q);
  const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b));
  float bias = 0.f;
  if constexpr (T == Q4_1 || T == Q5_1) bias = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 2));
  if constexpr (T == Q4_0) bias = -8.f * d;
  if constexpr (T == Q5_0) bias = -16.f * d;
  const __m256 vd = _mm256_set1_ps(d), vb = _mm256_set1_ps(bias);
  for (int v = 0; v < 4; ++v) y[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[v]), vd, vb);
}

AVX2_FN inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int64_t T, int R>
AVX2_FN void dot_tile_avx2(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* out, int64_t ldo) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 y[4];
    prefetch_block(w + b * kBytes<T>, kBytes<T>);
    dequant_avx2<T>(w + b * kBytes<T>, y);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * kBlock;
      acc[r][0] = _mm256_fmadd_ps(y[0], _mm256_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(y[1], _mm256_loadu_ps(xr + 8), acc[r][1]);
      acc[r][0] = _mm256_fmadd_ps(y[2], _mm256_loadu_ps(xr + 16), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(y[3], _mm256_loadu_ps(xr + 24), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum_avx2(_mm256_add_ps(acc[r][0], acc[r][1]));
}

template <int64_t T>
AVX2_FN void dequant_row_avx2(const uint8_t* w, int64_t nb, float* y) {
  for (int64_t b = 0; b < nb; ++b) {
    __m256 v[4];
    dequant_avx2<T>(w + b * kBytes<T>, v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(y + b * kBlock + 8 * i, v[i]);
  }
}

// ---- AVX-512: a block is 2 vectors of 16 floats --------------------------------------------
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

template <int64_t T>
AVX512_FN inline void dequant_avx512(const uint8_t* b, __m512 y[2]) {
  __m512i q[2];
  if constexpr (T == Q8_0) {
    q[0] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
    q[1] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)));
  } else {
    constexpr bool has_min = (T == Q4_1 || T == Q5_1);
    constexpr bool five = (T == Q5_0 || T == Q5_1);
    const uint8_t* qs = b + 2 + (has_min ? 2 : 0) + (five ? 4 : 0);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0xF);
    q[0] = _mm512_cvtepu8_epi32(_mm_and_si128(raw, mask));
    q[1] = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
    if constexpr (five) {  // bit i of qh is the fifth bit of value i
      const uint32_t qh = u32_at(b + (has_min ? 4 : 2));
      const __m512i bits_lo = _mm512_maskz_set1_epi32(static_cast<__mmask16>(qh & 0xFFFF), 16);
      const __m512i bits_hi = _mm512_maskz_set1_epi32(static_cast<__mmask16>(qh >> 16), 16);
      q[0] = _mm512_or_si512(q[0], bits_lo);
      q[1] = _mm512_or_si512(q[1], bits_hi);
    }
  }
  const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b));
  float bias = 0.f;
  if constexpr (T == Q4_1 || T == Q5_1) bias = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(b + 2));
  if constexpr (T == Q4_0) bias = -8.f * d;
  if constexpr (T == Q5_0) bias = -16.f * d;
  const __m512 vd = _mm512_set1_ps(d), vb = _mm512_set1_ps(bias);
  y[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[0]), vd, vb);
  y[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[1]), vd, vb);
}

template <int64_t T, int R>
AVX512_FN void dot_tile_avx512(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* out,
                               int64_t ldo) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 y[2];
    prefetch_block(w + b * kBytes<T>, kBytes<T>);
    dequant_avx512<T>(w + b * kBytes<T>, y);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * kBlock;
      acc[r][0] = _mm512_fmadd_ps(y[0], _mm512_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(y[1], _mm512_loadu_ps(xr + 16), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

template <int64_t T>
AVX512_FN void dequant_row_avx512(const uint8_t* w, int64_t nb, float* y) {
  for (int64_t b = 0; b < nb; ++b) {
    __m512 v[2];
    dequant_avx512<T>(w + b * kBytes<T>, v);
    _mm512_storeu_ps(y + b * kBlock, v[0]);
    _mm512_storeu_ps(y + b * kBlock + 16, v[1]);
  }
}
#endif  // PAGELLM_X86

// ---- run-time dispatch --------------------------------------------------------------------

// Rows [r0, r0 + rows) of x (rows <= kFusedMaxRows) times weight row n, written down column n.
template <int64_t T>
void dot_rows(int64_t isa, const uint8_t* w, int64_t nb, const float* x, int64_t ldx, int64_t rows, float* out,
              int64_t ldo) {
#if PAGELLM_X86
  for (int64_t r = 0; r < rows;) {
    const int64_t left = rows - r;
    const int tile = left >= 4 ? 4 : static_cast<int>(left);
    const float* xr = x + r * ldx;
    float* o = out + r * ldo;
    if (isa == kAvx512) {
      switch (tile) {
        case 4: dot_tile_avx512<T, 4>(w, nb, xr, ldx, o, ldo); break;
        case 3: dot_tile_avx512<T, 3>(w, nb, xr, ldx, o, ldo); break;
        case 2: dot_tile_avx512<T, 2>(w, nb, xr, ldx, o, ldo); break;
        default: dot_tile_avx512<T, 1>(w, nb, xr, ldx, o, ldo);
      }
    } else if (isa == kAvx2) {
      switch (tile) {
        case 4: dot_tile_avx2<T, 4>(w, nb, xr, ldx, o, ldo); break;
        case 3: dot_tile_avx2<T, 3>(w, nb, xr, ldx, o, ldo); break;
        case 2: dot_tile_avx2<T, 2>(w, nb, xr, ldx, o, ldo); break;
        default: dot_tile_avx2<T, 1>(w, nb, xr, ldx, o, ldo);
      }
    } else {
      dot_rows_scalar<T>(w, nb, xr, ldx, tile, o, ldo);
    }
    r += tile;
  }
#else
  dot_rows_scalar<T>(w, nb, x, ldx, rows, out, ldo);
#endif
}

template <int64_t T>
void dequant_row(int64_t isa, const uint8_t* w, int64_t nb, float* y) {
#if PAGELLM_X86
  if (isa == kAvx512) return dequant_row_avx512<T>(w, nb, y);
  if (isa == kAvx2) return dequant_row_avx2<T>(w, nb, y);
#endif
  dequant_row_scalar<T>(w, nb, y);
}

template <int64_t T>
void dequant_rows(int64_t isa, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t n0, int64_t n1, float* y) {
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) dequant_row<T>(isa, w + n * row_bytes, nb, y + (n - n0) * nb * kBlock);
  });
}

template <int64_t T>
void linear_typed(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t isa = active_isa();
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), nb = K / kBlock;
  const int64_t row_bytes = nb * kBytes<T>;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (M <= kFusedMaxRows) {
    const float* xp = x.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, 8, [&](int64_t a, int64_t e) {
      for (int64_t n = a; n < e; ++n) dot_rows<T>(isa, wp + n * row_bytes, nb, xp, K, M, op + n, N);
    });
    return;
  }
  // Many rows: expand a slab of weight rows (<= ~8 MiB of float32) and multiply it with at::mm.
  const int64_t slab = std::max<int64_t>(16, (int64_t{2} << 20) / K);
  at::Tensor buf = at::empty({std::min(slab, N), K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += slab) {
    const int64_t n1 = std::min(N, n0 + slab);
    at::Tensor wf = buf.narrow(0, 0, n1 - n0);
    dequant_rows<T>(isa, wp, row_bytes, nb, n0, n1, wf.data_ptr<float>());
    if (n0 == 0 && n1 == N) {
      at::mm_out(out, x, wf.t());
    } else {
      out.narrow(1, n0, n1 - n0).copy_(at::mm(x, wf.t()));
    }
  }
}

void check_weight(const at::Tensor& w, int64_t type, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous(),
              "GGUF weight must be a contiguous CPU uint8 tensor");
  const int64_t kbytes = kquant_block_bytes(type);
  const int64_t block = kbytes ? 256 : kBlock, bytes = kbytes ? kbytes : block_bytes(type);
  TORCH_CHECK(in_features % block == 0, "in_features ", in_features, " is not a multiple of ", block);
  TORCH_CHECK(w.numel() == out_features * (in_features / block) * bytes, "GGUF weight has ", w.numel(),
              " bytes, expected ", out_features * (in_features / block) * bytes);
}

#define GGUF_TYPE_SWITCH(TYPE, FN, ...)                   \
  switch (TYPE) {                                         \
    case Q4_0: FN<Q4_0>(__VA_ARGS__); break;              \
    case Q4_1: FN<Q4_1>(__VA_ARGS__); break;              \
    case Q5_0: FN<Q5_0>(__VA_ARGS__); break;              \
    case Q5_1: FN<Q5_1>(__VA_ARGS__); break;              \
    case Q8_0: FN<Q8_0>(__VA_ARGS__); break;              \
    default: block_bytes(TYPE); /* raises */              \
  }

// x (..., K) float32 times the (N, K) quantized weight -> (..., N) float32. With int8_activations,
// decode-sized batches of the 32-value types quantize x per block and use integer dot products.
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t out_features,
                       bool int8_activations) {
  const int64_t K = x.size(-1);
  check_weight(w, type, out_features, K);
  TORCH_CHECK(x.device().is_cpu(), "gguf_linear runs on the CPU");
  // A decode step's activations are already 2-D contiguous float32: skip the no-op reshape / to /
  // contiguous / view, a dispatch each, four linears a layer.
  const bool flat = x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous();
  const at::Tensor x2 = flat ? x : x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x2.size(0), out_features}, x2.options());
  if (x2.size(0) > 0) {
    if (kquant_block_bytes(type)) {
      kquant_linear(x2, w, type, out);
    } else if (int8_activations && x2.size(0) <= kFusedMaxRows && int8act_supported(type)) {
      int8act_linear(x2, w, type, out);
    } else {
      GGUF_TYPE_SWITCH(type, linear_typed, x2, w, out);
    }
  }
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return out.view(shape);
}

// The whole (N, K) weight as float32 (embedding rows, tests).
at::Tensor gguf_dequantize(const at::Tensor& w, int64_t type, int64_t out_features, int64_t in_features) {
  check_weight(w, type, out_features, in_features);
  at::Tensor y = at::empty({out_features, in_features}, at::kFloat);
  if (kquant_block_bytes(type)) {
    kquant_dequantize(w, type, out_features, in_features, y.data_ptr<float>());
    return y;
  }
  const int64_t nb = in_features / kBlock, isa = active_isa();
  GGUF_TYPE_SWITCH(type, dequant_rows, isa, w.data_ptr<uint8_t>(), nb * block_bytes(type), nb, 0, out_features,
                   y.data_ptr<float>());
  return y;
}

int64_t gguf_isa() { return active_isa(); }
int64_t gguf_supported_isas() { return supported_isas(); }

}  // namespace

TORCH_LIBRARY(pagellm_gguf, m) {
  m.def("linear(Tensor x, Tensor w, int ggml_type, int out_features, bool int8_activations=False) -> Tensor");
  m.def("dequantize(Tensor w, int ggml_type, int out_features, int in_features) -> Tensor");
  m.def("isa() -> int", &gguf_isa);
  m.def("supported_isas() -> int", &gguf_supported_isas);
}

TORCH_LIBRARY_IMPL(pagellm_gguf, CPU, m) {
  m.impl("linear", &gguf_linear);
  m.impl("dequantize", &gguf_dequantize);
}
