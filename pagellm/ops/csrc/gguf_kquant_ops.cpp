// Weight-only matmuls on GGUF K-quant weights (Q4_K, Q5_K, Q6_K): 256-value super-blocks.
//
// A super-block holds 16 groups of 16 values (Q4_K/Q5_K: 8 groups of 32, each split in two here):
// y = scale[g] * code - min[g], with scale/min from 6-bit (Q4_K/Q5_K) or int8 (Q6_K) sub-scales
// times the block's float16 d (and dmin). Decode (few activation rows) unpacks each super-block's
// codes to int8 in L1 and expands them to float32 right where they are multiplied, so a step reads
// the quantized bytes only; prefill expands a slab of weight rows and hands it to at::mm.
//
// The expansion is mul-then-sub (built with -ffp-contract=off), the same float32 operations as
// gguf's reference dequantize, so the values are bit-identical on every path. AVX-512 / AVX2+FMA /
// scalar are chosen at run time as in gguf_ops.cpp (PAGELLM_CPU_ISA forces one).

#include <ATen/Parallel.h>

#include <algorithm>

#include "gguf_common.h"

namespace pagellm_gguf {
namespace {

enum KType : int64_t { Q4_K = 12, Q5_K = 13, Q6_K = 14 };
constexpr int64_t kSuper = 256;
template <int64_t T>
constexpr int64_t kKBytes = T == Q4_K ? 144 : T == Q5_K ? 176 : 210;

#define PAGELLM_INLINE inline __attribute__((always_inline))

// The 6-bit scale and min of 32-value group j (0..7) from Q4_K/Q5_K's 12 packed bytes.
PAGELLM_INLINE void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The scale and min of each 16-value group of a super-block (Q4_K/Q5_K: each 32-group twice).
// Always inlined into each ISA's function, so it is compiled for that ISA.
template <int64_t T>
PAGELLM_INLINE void unpack_scales(const uint8_t* b, float* scale, float* minv) {
  if constexpr (T == Q6_K) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_at(b + 208);
    for (int g = 0; g < 16; ++g) {
      scale[g] = d * static_cast<float>(sc[g]);
      minv[g] = 0.f;
    }
  } else {
    const float d = half_at(b), dmin = half_at(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_min_k4(j, b + 4, &sc, &m);
      scale[2 * j] = scale[2 * j + 1] = d * static_cast<float>(sc);
      minv[2 * j] = minv[2 * j + 1] = dmin * static_cast<float>(m);
    }
  }
}

// A super-block's 256 codes as int8 (Q6_K: -32..31, the others 0..15 / 0..31). Plain integer code,
// the scalar path's; the AVX2 path has its own below.
template <int64_t T>
PAGELLM_INLINE void unpack_codes(const uint8_t* b, int8_t* q) {
  if constexpr (T == Q6_K) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    for (int n = 0; n < 2; ++n, ql += 64, qh += 32) {
      int8_t* o = q + n * 128;
      for (int l = 0; l < 32; ++l) {
        o[l] = static_cast<int8_t>(((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
        o[l + 32] = static_cast<int8_t>(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
        o[l + 64] = static_cast<int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        o[l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      }
    }
  } else {
    const uint8_t* qh = b + 16;  // Q5_K only: bit j of qh[l] is the fifth bit of group j's value l
    const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
    for (int j = 0; j < 8; ++j) {
      const uint8_t* p = qs + (j / 2) * 32;
      const int shift = (j & 1) * 4;
      for (int l = 0; l < 32; ++l) {
        int v = (p[l] >> shift) & 0xF;
        if constexpr (T == Q5_K) v |= ((qh[l] >> j) & 1) << 4;
        q[j * 32 + l] = static_cast<int8_t>(v);
      }
    }
  }
}

// ---- scalar ------------------------------------------------------------------------------

template <int64_t T>
void dequant_super_scalar(const uint8_t* b, float* y) {
  int8_t q[kSuper];
  float scale[16], minv[16];
  unpack_scales<T>(b, scale, minv);
  unpack_codes<T>(b, q);
  for (int i = 0; i < kSuper; ++i) y[i] = scale[i / 16] * static_cast<float>(q[i]) - minv[i / 16];
}

template <int64_t T>
void dot_rows_scalar(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, int64_t rows, float* out,
                     int64_t ldo) {
  float buf[kSuper];
  float acc[kFusedMaxRows] = {0};
  for (int64_t b = 0; b < nb; ++b) {
    prefetch_block(w + b * kKBytes<T>, kKBytes<T>);
    dequant_super_scalar<T>(w + b * kKBytes<T>, buf);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ldx + b * kSuper;
      float s = 0.f;
      for (int i = 0; i < kSuper; ++i) s += buf[i] * xr[i];
      acc[r] += s;
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r * ldo] = acc[r];
}

#if PAGELLM_X86
// ---- AVX2 + FMA: a 16-value group is 2 vectors of 8 floats -------------------------------
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))

AVX2_FN inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
AVX2_FN inline void store32(int8_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
AVX2_FN inline __m256i lo4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0xF)); }
AVX2_FN inline __m256i hi4(__m256i v) { return lo4(_mm256_srli_epi16(v, 4)); }
// Bits shift and shift+1 of each byte, moved to bits 4 and 5 (the 16-bit shift leaks across
// bytes; the mask keeps only the wanted bits).
AVX2_FN inline __m256i two_bits_at4(__m256i v, int shift) {
  const __m256i bits = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(3));
  return _mm256_slli_epi16(bits, 4);
}

// unpack_codes with 32 bytes at a time.
template <int64_t T>
AVX2_FN inline void unpack_codes_avx2(const uint8_t* b, int8_t* q) {
  if constexpr (T == Q6_K) {
    const __m256i bias = _mm256_set1_epi8(32);
    for (int n = 0; n < 2; ++n) {
      const __m256i a = load32(b + n * 64), c = load32(b + n * 64 + 32), h = load32(b + 128 + n * 32);
      store32(q + n * 128, _mm256_sub_epi8(_mm256_or_si256(lo4(a), two_bits_at4(h, 0)), bias));
      store32(q + n * 128 + 32, _mm256_sub_epi8(_mm256_or_si256(lo4(c), two_bits_at4(h, 2)), bias));
      store32(q + n * 128 + 64, _mm256_sub_epi8(_mm256_or_si256(hi4(a), two_bits_at4(h, 4)), bias));
      store32(q + n * 128 + 96, _mm256_sub_epi8(_mm256_or_si256(hi4(c), two_bits_at4(h, 6)), bias));
    }
  } else {
    const __m256i qh = load32(b + 16), one = _mm256_set1_epi8(1);
    for (int p = 0; p < 4; ++p) {
      const __m256i raw = load32(b + (T == Q5_K ? 48 : 16) + p * 32);
      __m256i lo = lo4(raw), hi = hi4(raw);
      if constexpr (T == Q5_K) {  // as in two_bits_at4, the mask drops what the 16-bit shift leaks
        const __m256i b0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * p)), one);
        const __m256i b1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * p + 1)), one);
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
      }
      store32(q + 2 * p * 32, lo);
      store32(q + (2 * p + 1) * 32, hi);
    }
  }
}

template <int64_t T>
AVX2_FN void dequant_super_avx2(const uint8_t* b, float* y) {
  alignas(32) int8_t q[kSuper];
  float scale[16], minv[16];
  unpack_scales<T>(b, scale, minv);
  unpack_codes_avx2<T>(b, q);
  for (int g = 0; g < 16; ++g) {
    const __m256 vs = _mm256_set1_ps(scale[g]), vm = _mm256_set1_ps(minv[g]);
    for (int h = 0; h < 2; ++h) {
      const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 16 + h * 8));
      const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
      _mm256_storeu_ps(y + g * 16 + h * 8, _mm256_sub_ps(_mm256_mul_ps(v, vs), vm));
    }
  }
}

AVX2_FN inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int64_t T, int R>
AVX2_FN void dot_tile_avx2(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* out, int64_t ldo) {
  alignas(32) float buf[kSuper];
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    prefetch_block(w + b * kKBytes<T>, kKBytes<T>);
    dequant_super_avx2<T>(w + b * kKBytes<T>, buf);  // 1 KiB, stays in L1 for the R rows
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * kSuper;
      for (int i = 0; i < kSuper; i += 16) {
        acc[r][0] = _mm256_fmadd_ps(_mm256_load_ps(buf + i), _mm256_loadu_ps(xr + i), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_load_ps(buf + i + 8), _mm256_loadu_ps(xr + i + 8), acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum_avx2(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// ---- AVX-512: a 16-value group is 1 vector ------------------------------------------------
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

template <int64_t T>
AVX512_FN void dequant_super_avx512(const uint8_t* b, float* y) {
  alignas(64) int8_t q[kSuper];
  float scale[16], minv[16];
  unpack_scales<T>(b, scale, minv);
  unpack_codes_avx2<T>(b, q);  // AVX-512 includes AVX2
  for (int g = 0; g < 16; ++g) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16));
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
    _mm512_storeu_ps(y + g * 16, _mm512_sub_ps(_mm512_mul_ps(v, _mm512_set1_ps(scale[g])),
                                               _mm512_set1_ps(minv[g])));
  }
}

template <int64_t T, int R>
AVX512_FN void dot_tile_avx512(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* out,
                               int64_t ldo) {
  alignas(64) float buf[kSuper];
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    prefetch_block(w + b * kKBytes<T>, kKBytes<T>);
    dequant_super_avx512<T>(w + b * kKBytes<T>, buf);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + b * kSuper;
      for (int i = 0; i < kSuper; i += 32) {
        acc[r][0] = _mm512_fmadd_ps(_mm512_load_ps(buf + i), _mm512_loadu_ps(xr + i), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_load_ps(buf + i + 16), _mm512_loadu_ps(xr + i + 16), acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#endif  // PAGELLM_X86

// ---- dispatch -----------------------------------------------------------------------------

template <int64_t T>
void dequant_row(int64_t isa, const uint8_t* w, int64_t nb, float* y) {
  for (int64_t b = 0; b < nb; ++b) {
#if PAGELLM_X86
    if (isa == kAvx512) { dequant_super_avx512<T>(w + b * kKBytes<T>, y + b * kSuper); continue; }
    if (isa == kAvx2) { dequant_super_avx2<T>(w + b * kKBytes<T>, y + b * kSuper); continue; }
#endif
    dequant_super_scalar<T>(w + b * kKBytes<T>, y + b * kSuper);
  }
}

template <int64_t T>
void dequant_rows(int64_t isa, const uint8_t* w, int64_t nb, int64_t n0, int64_t n1, float* y) {
  const int64_t row_bytes = nb * kKBytes<T>;
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) dequant_row<T>(isa, w + n * row_bytes, nb, y + (n - n0) * nb * kSuper);
  });
}

template <int64_t T>
void dot_rows(int64_t isa, const uint8_t* w, int64_t nb, const float* x, int64_t ldx, int64_t rows, float* out,
              int64_t ldo) {
  for (int64_t r = 0; r < rows;) {
    const int64_t left = rows - r;
    const int tile = left >= 4 ? 4 : static_cast<int>(left);
    const float* xr = x + r * ldx;
    float* o = out + r * ldo;
#if PAGELLM_X86
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
#else
    dot_rows_scalar<T>(w, nb, xr, ldx, tile, o, ldo);
#endif
    r += tile;
  }
}

template <int64_t T>
void linear_typed(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t isa = active_isa();
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), nb = K / kSuper;
  const int64_t row_bytes = nb * kKBytes<T>;
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
    dequant_rows<T>(isa, wp, nb, n0, n1, wf.data_ptr<float>());
    if (n0 == 0 && n1 == N) {
      at::mm_out(out, x, wf.t());
    } else {
      out.narrow(1, n0, n1 - n0).copy_(at::mm(x, wf.t()));
    }
  }
}

}  // namespace

int64_t kquant_block_bytes(int64_t type) {
  switch (type) {
    case Q4_K: return kKBytes<Q4_K>;
    case Q5_K: return kKBytes<Q5_K>;
    case Q6_K: return kKBytes<Q6_K>;
  }
  return 0;
}

void kquant_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out) {
  switch (type) {
    case Q4_K: return linear_typed<Q4_K>(x, w, out);
    case Q5_K: return linear_typed<Q5_K>(x, w, out);
    case Q6_K: return linear_typed<Q6_K>(x, w, out);
  }
  TORCH_CHECK(false, "ggml type ", type, " is not a K-quant (Q4_K=12, Q5_K=13, Q6_K=14)");
}

void kquant_dequantize(const at::Tensor& w, int64_t type, int64_t N, int64_t K, float* y) {
  const int64_t isa = active_isa(), nb = K / kSuper;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  switch (type) {
    case Q4_K: return dequant_rows<Q4_K>(isa, wp, nb, 0, N, y);
    case Q5_K: return dequant_rows<Q5_K>(isa, wp, nb, 0, N, y);
    case Q6_K: return dequant_rows<Q6_K>(isa, wp, nb, 0, N, y);
  }
  TORCH_CHECK(false, "ggml type ", type, " is not a K-quant (Q4_K=12, Q5_K=13, Q6_K=14)");
}

}  // namespace pagellm_gguf
