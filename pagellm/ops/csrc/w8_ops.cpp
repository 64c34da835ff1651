// 8-bit weight matmuls on the CPU: int8 or FP8 (e4m3) codes (N, K) with float32 scales.
//
// - w8a16_linear: float activations, the weight expanded to float32 four rows at a time into a
//   small buffer (code * scale, exactly `dequantize()`), then fp32 FMAs over register tiles of
//   activation rows x 4 weight rows; up to 2 activation rows expand in registers (no buffer). Scales are (N, G): G groups of `group_size` input columns
//   (G = 1: per output row; FP8 blocks: the block scales repeated over their rows).
// - w8a8_linear: int8 weights with per-row scales, activations quantized to int8 inside the op
//   (dynamic: per row, scale amax / 127; static: one given scale), int32 dot products:
//     AVX-512 VNNI: vpdpbusd on u8 = q + 128 against s8 codes, minus 128 * (row sum of codes);
//     AVX2: maddubs with the sign trick (|q| as u8, sign(w, q) as s8), or, when a weight has a
//           -128 code (sign(-128) overflows), both widened to int16 and madd;
//     scalar: the reference loop.
//   out = float(int32 dot) * x_scale * w_scale.
//
// No -march: each ISA path has its own target attributes and the best one the CPU has (or
// PAGELLM_CPU_ISA) is picked per call, as for the GGUF kernels. The "avx512" path of w8a8 needs
// VNNI; on AVX-512 CPUs without it the AVX2 integer code runs.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gguf_common.h"

namespace pagellm_w8 {
namespace {

using pagellm_gguf::active_isa;
using pagellm_gguf::kAvx2;
using pagellm_gguf::kAvx512;
using pagellm_gguf::kScalar;

constexpr int64_t kRowsPerTile = 4;  // weight rows expanded / dotted together
constexpr int64_t kDirectMaxRows = 2;  // W8A16 up to this many activation rows: no expansion buffer

// e4m3fn: the byte with its sign moved to bit 15 and (exponent, mantissa) to bits 7-13 is a
// float16 whose value is 2^-8 of the e4m3 value, subnormals included (exponent bias 15 vs 7).
inline uint16_t e4m3_as_half_bits(uint8_t b) {
  return static_cast<uint16_t>(((b & 0x80) << 8) | ((b & 0x7F) << 7));
}

inline float e4m3_to_float(uint8_t b) {
  const int exp = (b >> 3) & 0xF, man = b & 7;
  const float mag = exp == 0 ? std::ldexp(static_cast<float>(man), -9)
                             : std::ldexp(1.f + static_cast<float>(man) / 8.f, exp - 7);
  return (b & 0x80) ? -mag : mag;
}

// ---- weight expansion (W8A16): rows [n, n + rows) to float32, `ldb` floats apart -------------

void expand_rows_scalar(const uint8_t* w, bool fp8, const float* scale, int64_t G, int64_t gs, int64_t K,
                        int64_t n, int64_t rows, float* buf, int64_t ldb) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* wr = w + (n + r) * K;
    const float* sr = scale + (n + r) * G;
    for (int64_t k = 0; k < K; ++k) {
      const float v = fp8 ? e4m3_to_float(wr[k]) : static_cast<float>(static_cast<int8_t>(wr[k]));
      buf[r * ldb + k] = v * sr[k / gs];
    }
  }
}

float dot_scalar(const float* a, const float* b, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += a[k] * b[k];
  return s;
}

#if PAGELLM_X86
#define W8_AVX2 __attribute__((target("avx2,fma,f16c")))
#define W8_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define W8_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

W8_AVX2 inline __m256 codes8_avx2(const uint8_t* p, bool fp8) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if (!fp8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  const __m128i b = _mm_cvtepu8_epi16(raw);
  const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                 _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7));
  return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
}

W8_AVX2 void expand_rows_avx2(const uint8_t* w, bool fp8, const float* scale, int64_t G, int64_t gs, int64_t K,
                              int64_t n, int64_t rows, float* buf, int64_t ldb) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* wr = w + (n + r) * K;
    for (int64_t g = 0; g < G; ++g) {
      const float s = scale[(n + r) * G + g];
      const __m256 vs = _mm256_set1_ps(s);
      const int64_t k1 = std::min(K, (g + 1) * gs);
      int64_t k = g * gs;
      for (; k + 8 <= k1; k += 8) _mm256_storeu_ps(buf + r * ldb + k, _mm256_mul_ps(codes8_avx2(wr + k, fp8), vs));
      for (; k < k1; ++k)
        buf[r * ldb + k] = (fp8 ? e4m3_to_float(wr[k]) : static_cast<float>(static_cast<int8_t>(wr[k]))) * s;
    }
  }
}

W8_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[i * ldo + j] = x row i . buf row j, for MR activation rows and 4 expanded weight rows.
template <int MR>
W8_AVX2 void tile_avx2(const float* x, int64_t ldx, const float* buf, int64_t ldb, int64_t K, int64_t nr,
                       float* out, int64_t ldo) {
  __m256 acc[MR][kRowsPerTile];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRowsPerTile; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[kRowsPerTile];
    for (int j = 0; j < kRowsPerTile; ++j) wv[j] = _mm256_loadu_ps(buf + j * ldb + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < kRowsPerTile; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) {
      float s = hsum_avx2(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * ldx + t] * buf[j * ldb + t];
      out[i * ldo + j] = s;
    }
}

W8_AVX512 inline __m512 codes16_avx512(const uint8_t* p, bool fp8) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (!fp8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  const __m256i b = _mm256_cvtepu8_epi16(raw);
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
  return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
}

W8_AVX512 void expand_rows_avx512(const uint8_t* w, bool fp8, const float* scale, int64_t G, int64_t gs, int64_t K,
                                  int64_t n, int64_t rows, float* buf, int64_t ldb) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* wr = w + (n + r) * K;
    for (int64_t g = 0; g < G; ++g) {
      const float s = scale[(n + r) * G + g];
      const __m512 vs = _mm512_set1_ps(s);
      const int64_t k1 = std::min(K, (g + 1) * gs);
      int64_t k = g * gs;
      for (; k + 16 <= k1; k += 16)
        _mm512_storeu_ps(buf + r * ldb + k, _mm512_mul_ps(codes16_avx512(wr + k, fp8), vs));
      for (; k < k1; ++k)
        buf[r * ldb + k] = (fp8 ? e4m3_to_float(wr[k]) : static_cast<float>(static_cast<int8_t>(wr[k]))) * s;
    }
  }
}

template <int MR>
W8_AVX512 void tile_avx512(const float* x, int64_t ldx, const float* buf, int64_t ldb, int64_t K, int64_t nr,
                           float* out, int64_t ldo) {
  __m512 acc[MR][kRowsPerTile];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRowsPerTile; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[kRowsPerTile];
    for (int j = 0; j < kRowsPerTile; ++j) wv[j] = _mm512_loadu_ps(buf + j * ldb + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < kRowsPerTile; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * ldx + t] * buf[j * ldb + t];
      out[i * ldo + j] = s;
    }
}

// Few activation rows: each weight row is expanded in registers where it is used (code * scale,
// the same float as the buffer path) and never stored; MR rows x 4 weight rows per pass.
template <int MR>
W8_AVX512 void direct_avx512(const float* x, int64_t ldx, const uint8_t* w, bool fp8, const float* scale,
                             int64_t G, int64_t gs, int64_t K, int64_t n, int64_t nr, float* out, int64_t ldo) {
  __m512 acc[MR][kRowsPerTile];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRowsPerTile; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k1 = std::min(K, (g + 1) * gs);
    __m512 vs[kRowsPerTile];
    for (int j = 0; j < nr; ++j) vs[j] = _mm512_set1_ps(scale[(n + j) * G + g]);
    for (int64_t k = g * gs; k < k1; k += 16) {
      const __mmask16 mask = k1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k1 - k)) - 1);
      __m512 xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
      for (int j = 0; j < nr; ++j) {
        const uint8_t* p = w + (n + j) * K + k;
        const __m128i raw = _mm_maskz_loadu_epi8(mask, p);
        __m512 wv;
        if (!fp8) {
          wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
        } else {
          const __m256i b = _mm256_cvtepu8_epi16(raw);
          const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                            _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
          wv = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
        }
        wv = _mm512_mul_ps(wv, vs[j]);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// AVX2: 8 values per step; a group's last < 8 values are summed in scalar.
template <int MR>
W8_AVX2 void direct_avx2(const float* x, int64_t ldx, const uint8_t* w, bool fp8, const float* scale,
                         int64_t G, int64_t gs, int64_t K, int64_t n, int64_t nr, float* out, int64_t ldo) {
  __m256 acc[MR][kRowsPerTile];
  float tail[MR][kRowsPerTile] = {};
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRowsPerTile; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k1 = std::min(K, (g + 1) * gs);
    int64_t k = g * gs;
    for (; k + 8 <= k1; k += 8) {
      __m256 xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < nr; ++j) {
        const __m256 wv = _mm256_mul_ps(codes8_avx2(w + (n + j) * K + k, fp8), _mm256_set1_ps(scale[(n + j) * G + g]));
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
      }
    }
    for (; k < k1; ++k)
      for (int j = 0; j < nr; ++j) {
        const uint8_t c = w[(n + j) * K + k];
        const float v = (fp8 ? e4m3_to_float(c) : static_cast<float>(static_cast<int8_t>(c))) * scale[(n + j) * G + g];
        for (int i = 0; i < MR; ++i) tail[i][j] += x[i * ldx + k] * v;
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) out[i * ldo + j] = hsum_avx2(acc[i][j]) + tail[i][j];
}
#endif

// out (M, N) = x (M, K) . expanded weight rows, tile by tile.
void w8a16_impl(int64_t isa, const float* x, int64_t M, int64_t K, const uint8_t* w, bool fp8, const float* scale,
                int64_t N, int64_t G, int64_t gs, float* out) {
  const int64_t tiles = (N + kRowsPerTile - 1) / kRowsPerTile;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(kRowsPerTile * K, 0.f);
    float* b = buf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * kRowsPerTile, nr = std::min(kRowsPerTile, N - n);
#if PAGELLM_X86
      if (M <= kDirectMaxRows && isa == kAvx512) {
        if (M == 2) direct_avx512<2>(x, K, w, fp8, scale, G, gs, K, n, nr, out + n, N);
        else direct_avx512<1>(x, K, w, fp8, scale, G, gs, K, n, nr, out + n, N);
        continue;
      }
      if (M <= kDirectMaxRows && isa == kAvx2) {
        if (M == 2) direct_avx2<2>(x, K, w, fp8, scale, G, gs, K, n, nr, out + n, N);
        else direct_avx2<1>(x, K, w, fp8, scale, G, gs, K, n, nr, out + n, N);
        continue;
      }
      if (isa == kAvx512) {
        expand_rows_avx512(w, fp8, scale, G, gs, K, n, nr, b, K);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile_avx512<4>(x + m * K, K, b, K, K, nr, out + m * N + n, N);
        for (; m < M; ++m) tile_avx512<1>(x + m * K, K, b, K, K, nr, out + m * N + n, N);
        continue;
      }
      if (isa == kAvx2) {
        expand_rows_avx2(w, fp8, scale, G, gs, K, n, nr, b, K);
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) tile_avx2<2>(x + m * K, K, b, K, K, nr, out + m * N + n, N);
        for (; m < M; ++m) tile_avx2<1>(x + m * K, K, b, K, K, nr, out + m * N + n, N);
        continue;
      }
#endif
      expand_rows_scalar(w, fp8, scale, G, gs, K, n, nr, b, K);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < nr; ++j) out[m * N + n + j] = dot_scalar(x + m * K, b + j * K, K);
    }
  });
}

// ---- W8A8: activation rows quantized to int8 --------------------------------------------------

// q (M, K) int8 and the per-row scale: static (input_scale > 0) clamps to [-128, 127]; dynamic
// uses amax / 127 (1 for an all-zero row). q = round-half-even(x / scale), as torch.round(x / s).
void quantize_rows(const float* x, int64_t M, int64_t K, double input_scale, int8_t* q, float* xs) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      float s = static_cast<float>(input_scale);
      if (input_scale <= 0) {
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
        s = amax > 0.f ? amax / 127.f : 1.f;
      }
      xs[m] = s;
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::nearbyint(xr[k] / s);
        q[m * K + k] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, v)));
      }
    }
  });
}

int32_t idot_scalar(const int8_t* a, const int8_t* b, int64_t K) {
  int32_t s = 0;
  for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(a[k]) * static_cast<int32_t>(b[k]);
  return s;
}

#if PAGELLM_X86
W8_AVX2 inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Dots of one activation row with 4 weight rows. sign trick: |q| (u8) x sign(w, q) (s8) in pairs
// to int16 (no saturation: |q| <= 128, |w| <= 127), then pairs to int32.
W8_AVX2 void idot4_sign_avx2(const int8_t* q, const int8_t* w, int64_t K, int64_t nr, int32_t* out) {
  __m256i acc[kRowsPerTile];
  for (int j = 0; j < kRowsPerTile; ++j) acc[j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k));
    const __m256i qa = _mm256_sign_epi8(qv, qv);
    for (int j = 0; j < nr; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
      const __m256i p = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(wv, qv));
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(p, ones));
    }
  }
  for (int j = 0; j < nr; ++j) out[j] = hsum_epi32_avx2(acc[j]) + idot_scalar(q + k, w + j * K + k, K - k);
}

// Any codes (-128 included): both sides widened to int16, madd to int32.
W8_AVX2 void idot4_wide_avx2(const int8_t* q, const int8_t* w, int64_t K, int64_t nr, int32_t* out) {
  __m256i acc[kRowsPerTile];
  for (int j = 0; j < kRowsPerTile; ++j) acc[j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256i qv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
    for (int j = 0; j < nr; ++j) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(qv, wv));
    }
  }
  for (int j = 0; j < nr; ++j) out[j] = hsum_epi32_avx2(acc[j]) + idot_scalar(q + k, w + j * K + k, K - k);
}

// VNNI: u = q ^ 0x80 = q + 128 as u8; dot(u, w) = dot(q, w) + 128 * sum(w). MR activation rows
// share each weight load. The tail is a masked load (bytes past K read as 0 on both sides), so no
// scalar loop and no read past the row. out[i * kRowsPerTile + j]: row i with weight row j.
template <int MR>
W8_VNNI void idot_tile_vnni(const uint8_t* u, int64_t K, const int8_t* w, int64_t nr, const int32_t* wsum,
                            int32_t* out) {
  __m512i acc[MR][kRowsPerTile];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRowsPerTile; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1);
    __m512i uv[MR];
    for (int i = 0; i < MR; ++i) uv[i] = _mm512_maskz_loadu_epi8(mask, u + i * K + k);
    for (int j = 0; j < nr; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], uv[i], wv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) out[i * kRowsPerTile + j] = _mm512_reduce_add_epi32(acc[i][j]) - 128 * wsum[j];
}
#endif

void w8a8_impl(int64_t isa, const float* x, int64_t M, int64_t K, const int8_t* w, const float* wscale,
               const int32_t* wsum, bool has_min_code, int64_t N, double input_scale, float* out) {
  std::vector<int8_t> q(M * K);
  std::vector<float> xs(M);
  quantize_rows(x, M, K, input_scale, q.data(), xs.data());
  const bool vnni = isa == kAvx512 && pagellm_gguf::cpu_has_avx512_vnni();
  std::vector<uint8_t> u(vnni ? M * K : 0);
  for (size_t i = 0; i < u.size(); ++i) u[i] = static_cast<uint8_t>(q[i]) ^ 0x80;
  const int64_t tiles = (N + kRowsPerTile - 1) / kRowsPerTile;
  constexpr int kMR = 4;  // activation rows per VNNI tile
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    int32_t acc[kMR * kRowsPerTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * kRowsPerTile, nr = std::min(kRowsPerTile, N - n);
      const int8_t* wt = w + n * K;
      for (int64_t m = 0; m < M;) {
        int64_t rows = 1;
#if PAGELLM_X86
        if (vnni) {
          rows = std::min<int64_t>(kMR, M - m);
          const uint8_t* um = u.data() + m * K;
          if (rows == 4) idot_tile_vnni<4>(um, K, wt, nr, wsum + n, acc);
          else if (rows == 3) idot_tile_vnni<3>(um, K, wt, nr, wsum + n, acc);
          else if (rows == 2) idot_tile_vnni<2>(um, K, wt, nr, wsum + n, acc);
          else idot_tile_vnni<1>(um, K, wt, nr, wsum + n, acc);
        } else if (isa != kScalar) {
          const int8_t* qm = q.data() + m * K;
          if (has_min_code) idot4_wide_avx2(qm, wt, K, nr, acc);
          else idot4_sign_avx2(qm, wt, K, nr, acc);
        } else
#endif
        {
          const int8_t* qm = q.data() + m * K;
          for (int64_t j = 0; j < nr; ++j) acc[j] = idot_scalar(qm, wt + j * K, K);
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < nr; ++j)
            out[(m + i) * N + n + j] = static_cast<float>(acc[i * kRowsPerTile + j]) * xs[m + i] * wscale[n + j];
        m += rows;
      }
    }
  });
}

// ---- ops ------------------------------------------------------------------------------------

at::Tensor flat_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "the 8-bit weight kernels run on the CPU");
  TORCH_CHECK(x.size(-1) == K, "activations have ", x.size(-1), " columns, the weight ", K);
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

at::Tensor shaped_like(const at::Tensor& out, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.view(shape);
}

// x (..., K) times w (N, K) int8 or float8_e4m3fn with scale (N, G) float32 (G groups of
// `group_size` columns, the last one possibly short) -> (..., N) float32.
at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t group_size) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "weight must be a contiguous CPU (N, K) tensor");
  const bool fp8 = w.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || w.scalar_type() == at::kChar, "weight must be int8 or float8_e4m3fn, got ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N,
              "scale must be a contiguous float32 (N, G) tensor");
  const int64_t G = scale.size(1);
  TORCH_CHECK(group_size > 0 && (K + group_size - 1) / group_size == G, "group_size ", group_size, " with K ", K,
              " does not give ", G, " groups");
  const at::Tensor x2 = flat_rows(x, K);
  at::Tensor out = at::empty({x2.size(0), N}, x2.options());
  if (x2.size(0) > 0 && N > 0)
    w8a16_impl(active_isa(), x2.data_ptr<float>(), x2.size(0), K, reinterpret_cast<const uint8_t*>(w.data_ptr()), fp8,
               scale.data_ptr<float>(), N, G, group_size, out.data_ptr<float>());
  return shaped_like(out, x, N);
}

// x (..., K) times int8 w (N, K) with per-row scales; activations quantized to int8 per row
// (input_scale <= 0) or with the static input_scale. w_sum: int32 (N,) row sums of the codes.
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& w_sum,
                       bool has_min_code, double input_scale) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() && w.scalar_type() == at::kChar,
              "weight must be a contiguous CPU int8 (N, K) tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "scale must be a contiguous float32 (N,) tensor");
  TORCH_CHECK(w_sum.scalar_type() == at::kInt && w_sum.is_contiguous() && w_sum.numel() == N,
              "w_sum must be a contiguous int32 (N,) tensor");
  const at::Tensor x2 = flat_rows(x, K);
  at::Tensor out = at::empty({x2.size(0), N}, x2.options());
  if (x2.size(0) > 0 && N > 0)
    w8a8_impl(active_isa(), x2.data_ptr<float>(), x2.size(0), K, w.data_ptr<int8_t>(), scale.data_ptr<float>(),
              w_sum.data_ptr<int32_t>(), has_min_code, N, input_scale, out.data_ptr<float>());
  return shaped_like(out, x, N);
}

int64_t w8_isa() { return active_isa(); }
int64_t w8_supported_isas() { return pagellm_gguf::supported_isas(); }
bool w8_has_vnni() { return pagellm_gguf::cpu_has_avx512_vnni(); }

}  // namespace
}  // namespace pagellm_w8

TORCH_LIBRARY(pagellm_w8, m) {
  m.def("w8a16_linear(Tensor x, Tensor w, Tensor scale, int group_size) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor w, Tensor scale, Tensor w_sum, bool has_min_code, float input_scale) -> Tensor");
  m.def("isa() -> int", &pagellm_w8::w8_isa);
  m.def("supported_isas() -> int", &pagellm_w8::w8_supported_isas);
  m.def("has_vnni() -> bool", &pagellm_w8::w8_has_vnni);
}

TORCH_LIBRARY_IMPL(pagellm_w8, CPU, m) {
  m.impl("w8a16_linear", &pagellm_w8::w8a16_linear);
  m.impl("w8a8_linear", &pagellm_w8::w8a8_linear);
}
