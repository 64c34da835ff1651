// GGUF matmuls with int8 activations (the 32-value block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0),
// for decode-sized batches: an opt-in trade of exactness for speed (EngineConfig.cpu_int8_activations).
//
// Each activation row is quantized per 32-value block to int8 with one float scale (amax / 127),
// the layout of the weight's blocks, so a block's dot product is an integer one:
//   sum_i w_i x_i ~= d_w * d_x * sum_i q_i xq_i + bias_w * d_x * sum_i xq_i
// with bias_w the block's min (Q4_1, Q5_1) or -offset * d_w (Q4_0: 8, Q5_0: 16), 0 for Q8_0. The
// integer sums take one `maddubs` (u8 x s8 -> s16 pairs) and one `madd` per 32 values instead of
// expanding every weight to float32 and four FMAs. Accumulation across blocks is float32.
//
// The AVX2 code is also the AVX-512 path (every AVX-512 CPU has AVX2; 256-bit integer ops avoid
// the wide-vector clock penalties of older parts). The scalar path is the reference: it computes
// the same integer sums, so every path gives the same result up to float summation order.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gguf_common.h"

namespace pagellm_gguf {
namespace {

enum GgmlType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 };
constexpr int64_t kBlock = 32;

template <int64_t T>
constexpr int64_t kBytes = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
template <int64_t T>
constexpr bool kHasMin = (T == Q4_1 || T == Q5_1);
template <int64_t T>
constexpr bool kFive = (T == Q5_0 || T == Q5_1);

// One 32-value block of x: codes into q, returns the sum of the codes; *d gets the block's scale.
// nearbyint rounds half to even, as the SIMD paths' cvtps do.
inline int quantize_block_scalar(const float* xb, int8_t* q, float* d) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
  *d = amax / 127.f;
  const float inv = *d > 0.f ? 1.f / *d : 0.f;
  int sum = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  return sum;
}

#if PAGELLM_X86
// The same block with AVX2: |x| max, x * (1 / d) rounded to nearest even, packed to 32 bytes.
// The same float operations as the scalar block, so the codes and scales are bit-identical.
__attribute__((target("avx2,fma,f16c"))) inline int quantize_block_avx2(const float* xb, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xb + 8 * j);
  __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  *d = _mm_cvtss_f32(m) / 127.f;
  const __m256 inv = _mm256_set1_ps(*d > 0.f ? 1.f / *d : 0.f);
  __m256i c[4];
  for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // MXCSR: nearest even
  // int32 -> int16 -> int8 packs work per 128-bit lane; the permute puts the 32 codes back in order.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}
#endif

}  // namespace

QuantizedRows quantize_rows(int64_t isa, const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock;
  QuantizedRows r{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      int8_t* q = r.q.data() + m * K + b * kBlock;
      float* d = r.d.data() + m * nb + b;
#if PAGELLM_X86
      const int sum = isa != kScalar ? quantize_block_avx2(xb, q, d) : quantize_block_scalar(xb, q, d);
#else
      const int sum = quantize_block_scalar(xb, q, d);
#endif
      r.ds[m * nb + b] = *d * static_cast<float>(sum);
    }
  }
  return r;
}

namespace {

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The block's bias per unit of activation: min, or -offset * d for the symmetric types.
template <int64_t T>
inline float block_bias(const uint8_t* b, float d) {
  if constexpr (kHasMin<T>) return half_at(b + 2);
  if constexpr (T == Q4_0) return -8.f * d;
  if constexpr (T == Q5_0) return -16.f * d;
  return 0.f;
}

// ---- scalar reference -----------------------------------------------------------------------

template <int64_t T>
void codes_scalar(const uint8_t* b, int codes[32]) {
  if constexpr (T == Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < 32; ++i) codes[i] = q[i];
  } else {
    const uint32_t qh = kFive<T> ? u32_at(b + (kHasMin<T> ? 4 : 2)) : 0;
    const uint8_t* qs = b + 2 + (kHasMin<T> ? 2 : 0) + (kFive<T> ? 4 : 0);
    for (int j = 0; j < 16; ++j) {
      codes[j] = (qs[j] & 0xF) | (kFive<T> ? ((qh >> j) & 1) << 4 : 0);
      codes[j + 16] = (qs[j] >> 4) | (kFive<T> ? ((qh >> (j + 16)) & 1) << 4 : 0);
    }
  }
}

template <int64_t T>
void dot_rows_scalar(const uint8_t* w, int64_t nb, const QuantizedRows& x, int64_t K, int64_t r0, int64_t rows,
                     float* out, int64_t ldo) {
  for (int64_t r = r0; r < r0 + rows; ++r) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + b * kBytes<T>;
      prefetch_block(blk, kBytes<T>);
      int codes[32];
      codes_scalar<T>(blk, codes);
      const int8_t* xq = x.q.data() + r * K + b * kBlock;
      int isum = 0;
      for (int i = 0; i < 32; ++i) isum += codes[i] * xq[i];
      const float d = half_at(blk);
      acc += d * x.d[r * nb + b] * static_cast<float>(isum) + block_bias<T>(blk, d) * x.ds[r * nb + b];
    }
    out[(r - r0) * ldo] = acc;
  }
}

#if PAGELLM_X86
#define INT8_FN __attribute__((target("avx2,fma,f16c")))

// Byte i is 0xFF where bit i of `bits` is set (the fifth code bit of Q5 blocks).
INT8_FN inline __m256i bit_bytes(uint32_t bits) {
  const __m256i which = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i mask = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), which);
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
}

// The block's 32 codes as bytes (value i in byte i): unsigned for the 4/5-bit types, signed for Q8_0.
template <int64_t T>
INT8_FN inline __m256i codes_avx2(const uint8_t* b) {
  if constexpr (T == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  } else {
    const uint8_t* qs = b + 2 + (kHasMin<T> ? 2 : 0) + (kFive<T> ? 4 : 0);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i nib = _mm_set1_epi8(0xF);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nib), _mm_and_si128(raw, nib));
    if constexpr (kFive<T>) {
      const __m256i fifth = _mm256_and_si256(bit_bytes(u32_at(b + (kHasMin<T> ? 4 : 2))), _mm256_set1_epi8(16));
      q = _mm256_or_si256(q, fifth);
    }
    return q;
  }
}

// Eight int32 partial sums of codes x activation codes.
template <int64_t T>
INT8_FN inline __m256i block_dot_avx2(__m256i q, const int8_t* xq) {
  __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  if constexpr (T == Q8_0) {  // signed x signed: |w| times x carrying w's sign
    xv = _mm256_sign_epi8(xv, q);
    q = _mm256_sign_epi8(q, q);
  }
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), _mm256_set1_epi16(1));
}

INT8_FN inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int64_t T, int R>
INT8_FN void dot_tile_avx2(const uint8_t* w, int64_t nb, const QuantizedRows& x, int64_t K, int64_t r0, float* out,
                           int64_t ldo) {
  __m256 acc[R];
  float bias_acc[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    bias_acc[r] = 0.f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes<T>;
    prefetch_block(blk, kBytes<T>);
    const __m256i q = codes_avx2<T>(blk);
    const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk));
    const float bias = block_bias<T>(blk, d);
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r;
      const __m256i isum = block_dot_avx2<T>(q, x.q.data() + row * K + b * kBlock);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * x.d[row * nb + b]), acc[r]);
      if constexpr (T != Q8_0) bias_acc[r] += bias * x.ds[row * nb + b];
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum8(acc[r]) + bias_acc[r];
}
#endif  // PAGELLM_X86

template <int64_t T>
void dot_rows(int64_t isa, const uint8_t* w, int64_t nb, const QuantizedRows& x, int64_t K, int64_t M, float* out,
              int64_t ldo) {
#if PAGELLM_X86
  if (isa != kScalar) {
    for (int64_t r = 0; r < M;) {
      const int64_t left = M - r;
      const int tile = left >= 4 ? 4 : static_cast<int>(left);
      float* o = out + r * ldo;
      switch (tile) {
        case 4: dot_tile_avx2<T, 4>(w, nb, x, K, r, o, ldo); break;
        case 3: dot_tile_avx2<T, 3>(w, nb, x, K, r, o, ldo); break;
        case 2: dot_tile_avx2<T, 2>(w, nb, x, K, r, o, ldo); break;
        default: dot_tile_avx2<T, 1>(w, nb, x, K, r, o, ldo);
      }
      r += tile;
    }
    return;
  }
#endif
  dot_rows_scalar<T>(w, nb, x, K, 0, M, out, ldo);
}

template <int64_t T>
void linear_typed(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t isa = active_isa();
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), nb = K / kBlock;
  const QuantizedRows xq = quantize_rows(isa, x.data_ptr<float>(), M, K);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) dot_rows<T>(isa, wp + n * nb * kBytes<T>, nb, xq, K, M, op + n, N);
  });
}

}  // namespace

bool int8act_supported(int64_t type) {
  return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0;
}

void int8act_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out) {
  switch (type) {
    case Q4_0: linear_typed<Q4_0>(x, w, out); break;
    case Q4_1: linear_typed<Q4_1>(x, w, out); break;
    case Q5_0: linear_typed<Q5_0>(x, w, out); break;
    case Q5_1: linear_typed<Q5_1>(x, w, out); break;
    case Q8_0: linear_typed<Q8_0>(x, w, out); break;
    default: TORCH_CHECK(false, "ggml type ", type, " has no int8-activation kernel");
  }
}

}  // namespace pagellm_gguf
