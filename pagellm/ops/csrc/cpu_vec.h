// The SIMD vocabulary of cpu_ops.cpp's kernels: one struct per x86 path (Avx2: 8 floats a
// register, Avx512: 16), each function carrying its path's target attribute so the file builds
// without -march=native. Loads widen the storage dtype (float32, bfloat16, float16) to float32;
// stores round to nearest even as torch's casts do.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu_isa.h"

#if PAGELLM_X86

#define PAGELLM_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define PAGELLM_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

namespace pagellm_vec {

// ---- 8-lane helpers, shared by both paths (every AVX-512 CPU has AVX2) -----------------------

PAGELLM_AVX2_FN inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PAGELLM_AVX2_FN inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane u of the result = the sum of a[u]'s lanes: eight dot products finished at once.
PAGELLM_AVX2_FN inline __m256 reduce8x8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: a0..a3, a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) as Cephes' expf computes it (2^n * p(r), r = x - n ln2, inputs clamped to the
// normal-float range): within 2 ulp of expf, the same polynomial as the scalar fast_exp.
PAGELLM_AVX2_FN inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// float32 bits rounded to nearest even at bfloat16 precision (low 16 bits left as junk); NaN stays NaN.
PAGELLM_AVX2_FN inline __m256i bf16_round_bits8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_set1_ps(NAN), nan));
}

// ---- AVX2 + FMA: 8 floats ----------------------------------------------------------------------

struct Avx2 {
  using R = __m256;
  static constexpr int64_t W = 8;

  PAGELLM_AVX2_FN static R zero() { return _mm256_setzero_ps(); }
  PAGELLM_AVX2_FN static R set1(float v) { return _mm256_set1_ps(v); }
  PAGELLM_AVX2_FN static R add(R a, R b) { return _mm256_add_ps(a, b); }
  PAGELLM_AVX2_FN static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  PAGELLM_AVX2_FN static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  PAGELLM_AVX2_FN static R div(R a, R b) { return _mm256_div_ps(a, b); }
  PAGELLM_AVX2_FN static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  PAGELLM_AVX2_FN static float hsum(R v) { return hsum8(v); }
  PAGELLM_AVX2_FN static R exp(R x) { return exp8(x); }
  PAGELLM_AVX2_FN static __m256 reduce8(const R a[8]) { return reduce8x8(a); }

  PAGELLM_AVX2_FN static R load(const float* p) { return _mm256_loadu_ps(p); }
  PAGELLM_AVX2_FN static R load(const c10::BFloat16* p) {  // bf16 is the top half of a float
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  PAGELLM_AVX2_FN static R load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  PAGELLM_AVX2_FN static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  PAGELLM_AVX2_FN static void store(c10::BFloat16* p, R x) {
    const __m256i top = _mm256_srli_epi32(bf16_round_bits8(x), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  PAGELLM_AVX2_FN static void store(c10::Half* p, R x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }

  // x rounded to scalar_t's precision, as a float: what a torch op in that dtype would hand on.
  template <typename scalar_t>
  PAGELLM_AVX2_FN static R round(R x) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_and_si256(bf16_round_bits8(x), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    } else {
      return x;
    }
  }
};

// ---- AVX-512 (F, BW, VL): 16 floats --------------------------------------------------------------

struct Avx512 {
  using R = __m512;
  static constexpr int64_t W = 16;

  PAGELLM_AVX512_FN static R zero() { return _mm512_setzero_ps(); }
  PAGELLM_AVX512_FN static R set1(float v) { return _mm512_set1_ps(v); }
  PAGELLM_AVX512_FN static R add(R a, R b) { return _mm512_add_ps(a, b); }
  PAGELLM_AVX512_FN static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  PAGELLM_AVX512_FN static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  PAGELLM_AVX512_FN static R div(R a, R b) { return _mm512_div_ps(a, b); }
  PAGELLM_AVX512_FN static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  PAGELLM_AVX512_FN static float hsum(R v) { return _mm512_reduce_add_ps(v); }

  PAGELLM_AVX512_FN static R exp(R x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  }

  // Each register's two 256-bit halves added, then the 8-lane reduction.
  PAGELLM_AVX512_FN static __m256 reduce8(const R a[8]) {
    __m256 h[8];
    for (int u = 0; u < 8; ++u)
      h[u] = _mm256_add_ps(_mm512_castps512_ps256(a[u]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[u]), 1)));
    return reduce8x8(h);
  }

  PAGELLM_AVX512_FN static R load(const float* p) { return _mm512_loadu_ps(p); }
  PAGELLM_AVX512_FN static R load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  PAGELLM_AVX512_FN static R load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  PAGELLM_AVX512_FN static __m512i bf16_round_bits(R x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  }

  PAGELLM_AVX512_FN static void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  PAGELLM_AVX512_FN static void store(c10::BFloat16* p, R x) {
    const __m256i top = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round_bits(x), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), top);
  }
  PAGELLM_AVX512_FN static void store(c10::Half* p, R x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }

  template <typename scalar_t>
  PAGELLM_AVX512_FN static R round(R x) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_and_si512(bf16_round_bits(x), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    } else {
      return x;
    }
  }
};

}  // namespace pagellm_vec

#endif  // PAGELLM_X86
