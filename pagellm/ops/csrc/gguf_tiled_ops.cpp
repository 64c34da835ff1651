// GGUF Q4_0 / Q4_1 / Q8_0 weights repacked at load into 16-row tiles, and their matmuls.
//
// ggml stores each weight row as its own run of 32-value blocks, so a kernel that computes one
// output at a time pays for a horizontal sum per row, a scalar fp16 scale conversion per block and
// a single dependent accumulator chain; the existing row kernels ran compute-bound at ~11 GB/s
// against ~23 GB/s of DRAM bandwidth on 2 cores. Here 16 rows are interleaved block by block, so
// one SIMD lane is one output row and nothing is reduced across lanes:
//
//   tile t (rows 16t..16t+15), block b (values 32b..32b+31), stored at (t * nb + b) * kTileBytes:
//     d[16]  fp16 scales, one per row
//     m[16]  fp16 mins (Q4_1 only)
//     codes  4-bit: 4 chunks s of 64 bytes; byte 4j+i of chunk s holds row j's value 8s+i in its low
//                   nibble and value 8s+4+i in its high nibble (so a chunk's low nibbles are the 4
//                   values 8s..8s+3 of every row, 4 bytes per row: exactly a vpdpbusd operand)
//            Q8_0:  8 chunks u of 64 bytes; byte 4j+i = row j's value 4u+i plus 128, as u8
//
// Value = code * d + m (Q4_1) or (code - off) * d with off 8 (Q4_0) / 128 (Q8_0). The bytes are the
// GGUF bytes rearranged (rows padded to a multiple of 16), so memory use does not change.
//
// Two products on the layout: float32 activations (exact up to summation order: per block the
// codes are multiplied into float sums, then scaled), and int8 activations (x quantized per
// 32-value block as gguf_int8act_ops.cpp does: integer dot products with vpdpbusd on AVX-512 VNNI,
// maddubs on AVX2). Paths: AVX-512, AVX2 (a tile is two 8-row halves), scalar (the reference).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "gguf_common.h"

namespace pagellm_gguf {
namespace {

enum GgmlType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };
constexpr int64_t kTile = 16, kBlock = 32;

template <int64_t T>
constexpr int64_t kSrcBytes = T == Q4_0 ? 18 : T == Q4_1 ? 20 : 34;  // one GGUF block
template <int64_t T>
constexpr bool kHasMin = T == Q4_1;
template <int64_t T>
constexpr int64_t kCodeBytes = T == Q8_0 ? 512 : 256;  // 16 rows x 32 values
template <int64_t T>
constexpr int64_t kCodesAt = kHasMin<T> ? 64 : 32;  // after d[16] (and m[16])
template <int64_t T>
constexpr int64_t kTileBytes = kCodesAt<T> + kCodeBytes<T>;
template <int64_t T>
constexpr int kOffset = T == Q4_0 ? 8 : T == Q8_0 ? 128 : 0;

int64_t tiles(int64_t N) { return (N + kTile - 1) / kTile; }

// ---- repack and unpack ----------------------------------------------------------------------

// Value k (0..31) of a GGUF block as its unsigned code (Q8_0: plus 128).
template <int64_t T>
inline int src_code(const uint8_t* blk, int k) {
  if constexpr (T == Q8_0) return static_cast<int>(static_cast<int8_t>(blk[2 + k])) + 128;
  const uint8_t* qs = blk + 2 + (kHasMin<T> ? 2 : 0);
  return k < 16 ? (qs[k] & 0xF) : (qs[k - 16] >> 4);
}

// Value k of row j from a tile-block's codes.
template <int64_t T>
inline int tiled_code(const uint8_t* codes, int j, int k) {
  if constexpr (T == Q8_0) return codes[(k / 4) * 64 + 4 * j + k % 4];
  const int s = k / 8, within = k % 8;
  const uint8_t byte = codes[s * 64 + 4 * j + within % 4];
  return within < 4 ? (byte & 0xF) : (byte >> 4);
}

template <int64_t T>
void repack_typed(const uint8_t* src, int64_t N, int64_t nb, uint8_t* dst) {
  at::parallel_for(0, tiles(N), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* out = dst + (t * nb + b) * kTileBytes<T>;
        std::memset(out, 0, kTileBytes<T>);
        uint8_t* codes = out + kCodesAt<T>;
        for (int j = 0; j < kTile && t * kTile + j < N; ++j) {
          const uint8_t* blk = src + ((t * kTile + j) * nb + b) * kSrcBytes<T>;
          std::memcpy(out + 2 * j, blk, 2);
          if constexpr (kHasMin<T>) std::memcpy(out + 32 + 2 * j, blk + 2, 2);
          for (int k = 0; k < kBlock; ++k) {
            const int c = src_code<T>(blk, k);
            if constexpr (T == Q8_0) {
              codes[(k / 4) * 64 + 4 * j + k % 4] = static_cast<uint8_t>(c);
            } else {
              const int s = k / 8, within = k % 8;
              codes[s * 64 + 4 * j + within % 4] |= static_cast<uint8_t>(within < 4 ? c : c << 4);
            }
          }
        }
      }
    }
  });
}

template <int64_t T>
void dequantize_typed(const uint8_t* w, int64_t N, int64_t nb, float* y) {
  at::parallel_for(0, tiles(N), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tb = w + (t * nb + b) * kTileBytes<T>;
        for (int j = 0; j < kTile && t * kTile + j < N; ++j) {
          const float d = half_at(tb + 2 * j), m = kHasMin<T> ? half_at(tb + 32 + 2 * j) : 0.f;
          float* row = y + (t * kTile + j) * nb * kBlock + b * kBlock;
          for (int k = 0; k < kBlock; ++k) {
            const int c = tiled_code<T>(tb + kCodesAt<T>, j, k);
            row[k] = kHasMin<T> ? c * d + m : (c - kOffset<T>) * d;
          }
        }
      }
    }
  });
}

// ---- scalar reference -----------------------------------------------------------------------

// Rows [0, M) of x times tile t: out[r * ldo + j] for the tile's `valid` rows. Float32 activations:
// per block, sum of code * x, then * d plus m (or - off * d) times the block's sum of x.
template <int64_t T>
void tile_f32_scalar(const uint8_t* w, int64_t nb, const float* x, const float* xsum, int64_t M, int64_t K,
                     float* out, int64_t ldo, int valid) {
  for (int64_t r = 0; r < M; ++r) {
    for (int j = 0; j < valid; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tb = w + b * kTileBytes<T>;
        float s = 0.f;
        for (int k = 0; k < kBlock; ++k) s += tiled_code<T>(tb + kCodesAt<T>, j, k) * x[r * K + b * kBlock + k];
        const float d = half_at(tb + 2 * j), sx = xsum[r * nb + b];
        acc += kHasMin<T> ? d * s + half_at(tb + 32 + 2 * j) * sx : d * (s - kOffset<T> * sx);
      }
      out[r * ldo + j] = acc;
    }
  }
}

// int8 activations: integer sums of code * xq per block, then d * dx * isum + m * ds (or - off * d * ds).
// A group of quantized activation rows: codes (rows, K), scales and scaled code sums (rows, nb).
struct XRows {
  const int8_t* q;
  const float* d;
  const float* ds;
};

template <int64_t T>
void tile_i8_scalar(const uint8_t* w, int64_t nb, XRows x, int64_t M, int64_t K, float* out, int64_t ldo,
                    int valid) {
  for (int64_t r = 0; r < M; ++r) {
    for (int j = 0; j < valid; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tb = w + b * kTileBytes<T>;
        int isum = 0;
        for (int k = 0; k < kBlock; ++k) isum += tiled_code<T>(tb + kCodesAt<T>, j, k) * x.q[r * K + b * kBlock + k];
        const float d = half_at(tb + 2 * j), dx = x.d[r * nb + b], ds = x.ds[r * nb + b];
        acc += d * dx * static_cast<float>(isum) + (kHasMin<T> ? half_at(tb + 32 + 2 * j) * ds : -kOffset<T> * d * ds);
      }
      out[r * ldo + j] = acc;
    }
  }
}

#if PAGELLM_X86
#define TILED512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define TILED_VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TILED256_FN __attribute__((target("avx2,fma,f16c")))

// ---- AVX-512: one lane per tile row ---------------------------------------------------------

// The 8 code vectors of a tile-block: v[u] lane j = row j's values 4u..4u+3 (one byte each).
template <int64_t T>
TILED512_FN inline void codes512(const uint8_t* codes, __m512i v[8]) {
  if constexpr (T == Q8_0) {
    for (int u = 0; u < 8; ++u) v[u] = _mm512_loadu_si512(codes + 64 * u);
  } else {
    const __m512i nib = _mm512_set1_epi8(0xF);
    for (int s = 0; s < 4; ++s) {
      const __m512i p = _mm512_loadu_si512(codes + 64 * s);
      v[2 * s] = _mm512_and_si512(p, nib);
      v[2 * s + 1] = _mm512_and_si512(_mm512_srli_epi16(p, 4), nib);
    }
  }
}

template <int64_t T, int R>
TILED512_FN void tile_f32_avx512(const uint8_t* w, int64_t nb, const float* x, const float* xsum, int64_t K,
                                 float* out, int64_t ldo, int valid) {
  // Independent FMA chains per row (latency 4, 2 ports): R rows give R chains, so 5-8 rows need
  // one each (which also keeps v, s and acc within the 32 vector registers).
  constexpr int kAcc = R == 1 ? 4 : R <= 4 ? 2 : 1;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i byte = _mm512_set1_epi32(0xFF);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = w + b * kTileBytes<T>;
    prefetch_block(tb, kTileBytes<T>);
    __m512i v[8];
    codes512<T>(tb + kCodesAt<T>, v);
    __m512 s[R][kAcc];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < kAcc; ++a) s[r][a] = _mm512_setzero_ps();
    for (int u = 0; u < 8; ++u) {
      for (int i = 0; i < 4; ++i) {
        const __m512i c = i == 3 ? _mm512_srli_epi32(v[u], 24) : _mm512_and_si512(_mm512_srli_epi32(v[u], 8 * i), byte);
        const __m512 cf = _mm512_cvtepi32_ps(c);
        const int k = 4 * u + i;
        for (int r = 0; r < R; ++r)
          s[r][k % kAcc] = _mm512_fmadd_ps(cf, _mm512_set1_ps(x[r * K + b * kBlock + k]), s[r][k % kAcc]);
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb)));
    for (int r = 0; r < R; ++r) {
      __m512 sum = s[r][0];
      for (int a = 1; a < kAcc; ++a) sum = _mm512_add_ps(sum, s[r][a]);
      const __m512 sx = _mm512_set1_ps(xsum[r * nb + b]);
      if constexpr (kHasMin<T>) {
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 32)));
        acc[r] = _mm512_fmadd_ps(m, sx, _mm512_fmadd_ps(d, sum, acc[r]));
      } else {
        acc[r] = _mm512_fmadd_ps(d, _mm512_fnmadd_ps(_mm512_set1_ps(static_cast<float>(kOffset<T>)), sx, sum), acc[r]);
      }
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo, keep, acc[r]);
}

// int8 activations, VNNI: vpdpbusd multiplies each row's 4 code bytes by the 4 activation bytes
// broadcast to every lane and adds them into that row's int32 lane.
template <int64_t T, int R>
TILED_VNNI_FN void tile_i8_vnni(const uint8_t* w, int64_t nb, XRows x, int64_t K, float* out, int64_t ldo,
                                int valid) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int nb32 = static_cast<int>(nb);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = w + b * kTileBytes<T>;
    prefetch_block(tb, kTileBytes<T>);
    __m512i v[8];
    codes512<T>(tb + kCodesAt<T>, v);
    __m512i isum[R][2];
    for (int r = 0; r < R; ++r) {
      const int32_t* xq = reinterpret_cast<const int32_t*>(x.q + r * K + b * kBlock);
      isum[r][0] = isum[r][1] = _mm512_setzero_si512();
      for (int u = 0; u < 8; ++u)
        isum[r][u & 1] = _mm512_dpbusd_epi32(isum[r][u & 1], v[u], _mm512_set1_epi32(xq[u]));
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb)));
    for (int r = 0; r < R; ++r) {
      const int64_t xb = r * nb32 + b;
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(isum[r][0], isum[r][1]));
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(x.d[xb])), sum, acc[r]);
      if constexpr (kHasMin<T>) {
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 32)));
        acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.ds[xb]), acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(d, _mm512_set1_ps(-kOffset<T> * x.ds[xb]), acc[r]);
      }
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo, keep, acc[r]);
}

// ---- AVX2: a tile is two halves of 8 rows (bytes 32h..32h+31 of every 64-byte chunk) ---------

template <int64_t T>
TILED256_FN inline void codes256(const uint8_t* codes, int h, __m256i v[8]) {
  if constexpr (T == Q8_0) {
    for (int u = 0; u < 8; ++u) v[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * u + 32 * h));
  } else {
    const __m256i nib = _mm256_set1_epi8(0xF);
    for (int s = 0; s < 4; ++s) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * s + 32 * h));
      v[2 * s] = _mm256_and_si256(p, nib);
      v[2 * s + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), nib);
    }
  }
}

TILED256_FN inline __m256 half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int64_t T, int R>
TILED256_FN void tile_f32_avx2(const uint8_t* w, int64_t nb, const float* x, const float* xsum, int64_t K,
                               float* out, int64_t ldo, int valid) {
  constexpr int kAcc = R == 1 ? 4 : 2;
  const __m256i byte = _mm256_set1_epi32(0xFF);
  for (int h = 0; h < 2 && 8 * h < valid; ++h) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* tb = w + b * kTileBytes<T>;
      if (h == 0) prefetch_block(tb, kTileBytes<T>);
      __m256i v[8];
      codes256<T>(tb + kCodesAt<T>, h, v);
      __m256 s[R][kAcc];
      for (int r = 0; r < R; ++r)
        for (int a = 0; a < kAcc; ++a) s[r][a] = _mm256_setzero_ps();
      for (int u = 0; u < 8; ++u) {
        for (int i = 0; i < 4; ++i) {
          const __m256i c = i == 3 ? _mm256_srli_epi32(v[u], 24) : _mm256_and_si256(_mm256_srli_epi32(v[u], 8 * i), byte);
          const __m256 cf = _mm256_cvtepi32_ps(c);
          const int k = 4 * u + i;
          for (int r = 0; r < R; ++r)
            s[r][k % kAcc] = _mm256_fmadd_ps(cf, _mm256_set1_ps(x[r * K + b * kBlock + k]), s[r][k % kAcc]);
        }
      }
      const __m256 d = half8(tb + 16 * h);
      for (int r = 0; r < R; ++r) {
        __m256 sum = s[r][0];
        for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, s[r][a]);
        const __m256 sx = _mm256_set1_ps(xsum[r * nb + b]);
        if constexpr (kHasMin<T>) {
          acc[r] = _mm256_fmadd_ps(half8(tb + 32 + 16 * h), sx, _mm256_fmadd_ps(d, sum, acc[r]));
        } else {
          acc[r] = _mm256_fmadd_ps(d, _mm256_fnmadd_ps(_mm256_set1_ps(static_cast<float>(kOffset<T>)), sx, sum), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[r]);
      for (int j = 8 * h; j < std::min(valid, 8 * h + 8); ++j) out[r * ldo + j] = tmp[j - 8 * h];
    }
  }
}

// int8 activations with maddubs (u8 x s8 pairs into saturating int16): fine for 4-bit codes
// (15 * 127 * 2 < 32767); Q8_0's codes are made signed again and multiplied by sign tricks.
template <int64_t T, int R>
TILED256_FN void tile_i8_avx2(const uint8_t* w, int64_t nb, XRows x, int64_t K, float* out, int64_t ldo,
                              int valid) {
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int h = 0; h < 2 && 8 * h < valid; ++h) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* tb = w + b * kTileBytes<T>;
      if (h == 0) prefetch_block(tb, kTileBytes<T>);
      __m256i v[8];
      codes256<T>(tb + kCodesAt<T>, h, v);
      if constexpr (T == Q8_0)
        for (int u = 0; u < 8; ++u) v[u] = _mm256_xor_si256(v[u], flip);  // back to the signed values
      const __m256 d = half8(tb + 16 * h);
      for (int r = 0; r < R; ++r) {
        const int32_t* xq = reinterpret_cast<const int32_t*>(x.q + r * K + b * kBlock);
        __m256i isum = _mm256_setzero_si256();
        for (int u = 0; u < 8; ++u) {
          __m256i xv = _mm256_set1_epi32(xq[u]), wv = v[u];
          if constexpr (T == Q8_0) {
            xv = _mm256_sign_epi8(xv, wv);
            wv = _mm256_sign_epi8(wv, wv);
          }
          isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
        }
        const int64_t xb = r * nb + b;
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x.d[xb])), _mm256_cvtepi32_ps(isum), acc[r]);
        if constexpr (kHasMin<T>) {
          acc[r] = _mm256_fmadd_ps(half8(tb + 32 + 16 * h), _mm256_set1_ps(x.ds[xb]), acc[r]);
        } else if constexpr (T == Q4_0) {
          acc[r] = _mm256_fmadd_ps(d, _mm256_set1_ps(-8.f * x.ds[xb]), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[r]);
      for (int j = 8 * h; j < std::min(valid, 8 * h + 8); ++j) out[r * ldo + j] = tmp[j - 8 * h];
    }
  }
}
#endif  // PAGELLM_X86

// ---- dequantize tiles into W^T (K, n): lane j of a code vector is column j, so stores are whole rows --

// Value (code - off) * d, or code * d + m (one fused multiply-add, as the row kernels' SIMD paths).
template <int64_t T>
void tiles_to_wt_scalar(const uint8_t* w, int64_t nb, int64_t n_tiles, float* wt, int64_t ldn) {
  for (int64_t t = 0; t < n_tiles; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* tb = w + (t * nb + b) * kTileBytes<T>;
      for (int j = 0; j < kTile; ++j) {
        const float d = half_at(tb + 2 * j), m = kHasMin<T> ? half_at(tb + 32 + 2 * j) : 0.f;
        for (int k = 0; k < kBlock; ++k) {
          const int c = tiled_code<T>(tb + kCodesAt<T>, j, k);
          wt[(b * kBlock + k) * ldn + t * kTile + j] =
              kHasMin<T> ? std::fma(static_cast<float>(c), d, m) : static_cast<float>(c - kOffset<T>) * d;
        }
      }
    }
}

#if PAGELLM_X86
template <int64_t T>
TILED512_FN void tiles_to_wt_avx512(const uint8_t* w, int64_t nb, int64_t n_tiles, float* wt, int64_t ldn) {
  const __m512i byte = _mm512_set1_epi32(0xFF), off = _mm512_set1_epi32(kOffset<T>);
  for (int64_t b = 0; b < nb; ++b)  // writes walk W^T's rows; the tiles are read with a stride
    for (int64_t t = 0; t < n_tiles; ++t) {
      const uint8_t* tb = w + (t * nb + b) * kTileBytes<T>;
      __m512i v[8];
      codes512<T>(tb + kCodesAt<T>, v);
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb)));
      __m512 m = _mm512_setzero_ps();
      if constexpr (kHasMin<T>) m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 32)));
      for (int u = 0; u < 8; ++u)
        for (int i = 0; i < 4; ++i) {
          const __m512i c = i == 3 ? _mm512_srli_epi32(v[u], 24) : _mm512_and_si512(_mm512_srli_epi32(v[u], 8 * i), byte);
          const __m512 y = kHasMin<T> ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), d, m)
                                      : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, off)), d);
          _mm512_storeu_ps(wt + (b * kBlock + 4 * u + i) * ldn + t * kTile, y);
        }
    }
}

template <int64_t T>
TILED256_FN void tiles_to_wt_avx2(const uint8_t* w, int64_t nb, int64_t n_tiles, float* wt, int64_t ldn) {
  const __m256i byte = _mm256_set1_epi32(0xFF), off = _mm256_set1_epi32(kOffset<T>);
  for (int64_t b = 0; b < nb; ++b)  // writes walk W^T's rows; the tiles are read with a stride
    for (int64_t t = 0; t < n_tiles; ++t) {
      const uint8_t* tb = w + (t * nb + b) * kTileBytes<T>;
      for (int h = 0; h < 2; ++h) {
        __m256i v[8];
        codes256<T>(tb + kCodesAt<T>, h, v);
        const __m256 d = half8(tb + 16 * h);
        const __m256 m = kHasMin<T> ? half8(tb + 32 + 16 * h) : _mm256_setzero_ps();
        for (int u = 0; u < 8; ++u)
          for (int i = 0; i < 4; ++i) {
            const __m256i c = i == 3 ? _mm256_srli_epi32(v[u], 24) : _mm256_and_si256(_mm256_srli_epi32(v[u], 8 * i), byte);
            const __m256 y = kHasMin<T> ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), d, m)
                                        : _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, off)), d);
            _mm256_storeu_ps(wt + (b * kBlock + 4 * u + i) * ldn + t * kTile + 8 * h, y);
          }
      }
    }
}
#endif

// Tiles [t0, t1) as float32 W^T into wt (K, ldn), column 0 = row 16 * t0; in parallel over tiles.
template <int64_t T>
void tiles_to_wt(int64_t isa, const uint8_t* w, int64_t nb, int64_t t0, int64_t t1, float* wt, int64_t ldn) {
  at::parallel_for(t0, t1, 4, [&](int64_t a, int64_t e) {
    const uint8_t* src = w + a * nb * kTileBytes<T>;
    float* dst = wt + (a - t0) * kTile;
#if PAGELLM_X86
    if (isa == kAvx512) return tiles_to_wt_avx512<T>(src, nb, e - a, dst, ldn);
    if (isa == kAvx2) return tiles_to_wt_avx2<T>(src, nb, e - a, dst, ldn);
#endif
    tiles_to_wt_scalar<T>(src, nb, e - a, dst, ldn);
  });
}

// Many rows of float32 activations: expand slabs of tiles into W^T and multiply with at::mm.
template <int64_t T>
void linear_dense_slabs(const at::Tensor& x, const at::Tensor& w, int64_t N, at::Tensor& out) {
  const int64_t isa = active_isa(), K = x.size(1), nb = K / kBlock;
  const int64_t slab_tiles = std::max<int64_t>(1, (int64_t{2} << 20) / (K * kTile));  // ~8 MiB of float32
  const uint8_t* wp = w.data_ptr<uint8_t>();
  for (int64_t t0 = 0; t0 < tiles(N); t0 += slab_tiles) {
    const int64_t t1 = std::min(tiles(N), t0 + slab_tiles);
    const int64_t n0 = t0 * kTile, n1 = std::min(N, t1 * kTile), cols = (t1 - t0) * kTile;
    at::Tensor wt = at::empty({K, cols}, x.options());
    tiles_to_wt<T>(isa, wp, nb, t0, t1, wt.data_ptr<float>(), cols);
    const at::Tensor wt_used = cols == n1 - n0 ? wt : wt.narrow(1, 0, n1 - n0);
    if (n0 == 0 && n1 == N) {
      at::mm_out(out, x, wt_used);
    } else {
      out.narrow(1, n0, n1 - n0).copy_(at::mm(x, wt_used));
    }
  }
}

// ---- dispatch -------------------------------------------------------------------------------

// Rows [0, M) of x times one tile, in row groups (each tile-block's codes expanded once per group):
// up to 8 rows on AVX-512 (32 vector registers), 4 on AVX2 (16) and scalar.
template <int64_t T>
void tile_f32(int64_t isa, const uint8_t* w, int64_t nb, const float* x, const float* xsum, int64_t M, int64_t K,
              float* out, int64_t ldo, int valid) {
  const int64_t group = isa == kAvx512 ? 8 : 4;
  for (int64_t r = 0; r < M; r += group) {
    const int rows = static_cast<int>(std::min<int64_t>(group, M - r));
    const float* xr = x + r * K;
    const float* sr = xsum + r * (K / kBlock);
    float* o = out + r * ldo;
#if PAGELLM_X86
    if (isa == kAvx512) {
      switch (rows) {
        case 8: tile_f32_avx512<T, 8>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 7: tile_f32_avx512<T, 7>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 6: tile_f32_avx512<T, 6>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 5: tile_f32_avx512<T, 5>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 4: tile_f32_avx512<T, 4>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 3: tile_f32_avx512<T, 3>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 2: tile_f32_avx512<T, 2>(w, nb, xr, sr, K, o, ldo, valid); break;
        default: tile_f32_avx512<T, 1>(w, nb, xr, sr, K, o, ldo, valid);
      }
      continue;
    }
    if (isa == kAvx2) {
      switch (rows) {
        case 4: tile_f32_avx2<T, 4>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 3: tile_f32_avx2<T, 3>(w, nb, xr, sr, K, o, ldo, valid); break;
        case 2: tile_f32_avx2<T, 2>(w, nb, xr, sr, K, o, ldo, valid); break;
        default: tile_f32_avx2<T, 1>(w, nb, xr, sr, K, o, ldo, valid);
      }
      continue;
    }
#endif
    tile_f32_scalar<T>(w, nb, xr, sr, rows, K, o, ldo, valid);
  }
}

template <int64_t T>
void tile_i8(int64_t isa, const uint8_t* w, int64_t nb, const QuantizedRows& x, int64_t M, int64_t K, float* out,
             int64_t ldo, int valid) {
  for (int64_t r = 0; r < M; r += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, M - r));
    const XRows xr{x.q.data() + r * K, x.d.data() + r * nb, x.ds.data() + r * nb};
    float* o = out + r * ldo;
#if PAGELLM_X86
#define TILE_ROWS(FN)                                  \
  switch (rows) {                                      \
    case 4: FN<T, 4>(w, nb, xr, K, o, ldo, valid); break;  \
    case 3: FN<T, 3>(w, nb, xr, K, o, ldo, valid); break;  \
    case 2: FN<T, 2>(w, nb, xr, K, o, ldo, valid); break;  \
    default: FN<T, 1>(w, nb, xr, K, o, ldo, valid);        \
  }
    if (isa == kAvx512 && cpu_has_avx512_vnni()) {
      TILE_ROWS(tile_i8_vnni)
      continue;
    }
    if (isa != kScalar) {  // AVX2, and AVX-512 CPUs without VNNI
      TILE_ROWS(tile_i8_avx2)
      continue;
    }
#undef TILE_ROWS
#endif
    tile_i8_scalar<T>(w, nb, xr, rows, K, o, ldo, valid);
  }
}

template <int64_t T>
void linear_typed(const at::Tensor& x, const at::Tensor& w, int64_t N, bool int8_activations, at::Tensor& out) {
  const int64_t isa = active_isa();
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t tile_bytes = nb * kTileBytes<T>;
  if (int8_activations) {
    const QuantizedRows xq = quantize_rows(isa, xp, M, K);
    at::parallel_for(0, tiles(N), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        tile_i8<T>(isa, wp + t * tile_bytes, nb, xq, M, K, op + t * kTile, N,
                   static_cast<int>(std::min(kTile, N - t * kTile)));
    });
    return;
  }
  std::vector<float> xsum(M * nb);  // per-block sums of x, for the mins / offsets
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int k = 0; k < kBlock; ++k) s += xp[r * K + b * kBlock + k];
      xsum[r * nb + b] = s;
    }
  at::parallel_for(0, tiles(N), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      tile_f32<T>(isa, wp + t * tile_bytes, nb, xp, xsum.data(), M, K, op + t * kTile, N,
                  static_cast<int>(std::min(kTile, N - t * kTile)));
  });
}

#define TILED_TYPE_SWITCH(TYPE, FN, ...)                                                           \
  switch (TYPE) {                                                                                  \
    case Q4_0: FN<Q4_0>(__VA_ARGS__); break;                                                       \
    case Q4_1: FN<Q4_1>(__VA_ARGS__); break;                                                       \
    case Q8_0: FN<Q8_0>(__VA_ARGS__); break;                                                       \
    default: TORCH_CHECK(false, "ggml type ", TYPE, " has no tiled layout (Q4_0, Q4_1, Q8_0 have)"); \
  }

int64_t tile_block_bytes(int64_t type) {
  switch (type) {
    case Q4_0: return kTileBytes<Q4_0>;
    case Q4_1: return kTileBytes<Q4_1>;
    case Q8_0: return kTileBytes<Q8_0>;
  }
  TORCH_CHECK(false, "ggml type ", type, " has no tiled layout (Q4_0, Q4_1, Q8_0 have)");
}

void check_tiled(const at::Tensor& w, int64_t type, int64_t N, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous(),
              "a tiled GGUF weight must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(K % kBlock == 0, "in_features ", K, " is not a multiple of ", kBlock);
  TORCH_CHECK(w.numel() == tiles(N) * (K / kBlock) * tile_block_bytes(type), "tiled GGUF weight has ", w.numel(),
              " bytes, expected ", tiles(N) * (K / kBlock) * tile_block_bytes(type));
}

// The (N, K) GGUF weight (N rows of K / 32 blocks) in the tiled layout.
at::Tensor tiled_repack(const at::Tensor& w, int64_t type, int64_t N, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous(),
              "GGUF weight must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(K % kBlock == 0, "in_features ", K, " is not a multiple of ", kBlock);
  const int64_t nb = K / kBlock;
  at::Tensor out = at::empty({tiles(N) * nb * tile_block_bytes(type)}, w.options());
  const int64_t src_bytes = type == Q4_0 ? kSrcBytes<Q4_0> : type == Q4_1 ? kSrcBytes<Q4_1> : kSrcBytes<Q8_0>;
  TORCH_CHECK(w.numel() == N * nb * src_bytes, "GGUF weight has ", w.numel(), " bytes, expected ", N * nb * src_bytes);
  TILED_TYPE_SWITCH(type, repack_typed, w.data_ptr<uint8_t>(), N, nb, out.data_ptr<uint8_t>());
  return out;
}

at::Tensor tiled_dequantize(const at::Tensor& w, int64_t type, int64_t N, int64_t K) {
  check_tiled(w, type, N, K);
  at::Tensor y = at::empty({N, K}, at::kFloat);
  TILED_TYPE_SWITCH(type, dequantize_typed, w.data_ptr<uint8_t>(), N, K / kBlock, y.data_ptr<float>());
  return y;
}

// x (..., K) float32 times the tiled (N, K) weight -> (..., N) float32. Up to kFusedMaxRows rows
// (and any row count with int8 activations) run on the tiles; more rows expand the weight in
// slabs for at::mm, as the row-layout kernels do.
at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t N, bool int8_activations) {
  const int64_t K = x.size(-1);
  check_tiled(w, type, N, K);
  TORCH_CHECK(x.device().is_cpu(), "tiled_linear runs on the CPU");
  const bool flat = x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous();  // decode: no-op casts skipped
  const at::Tensor x2 = flat ? x : x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x2.size(0), N}, x2.options());
  const int64_t M = x2.size(0);
  if (M > 0 && (M <= kFusedMaxRows || int8_activations)) {
    TILED_TYPE_SWITCH(type, linear_typed, x2, w, N, int8_activations, out);
  } else if (M > 0) {
    TILED_TYPE_SWITCH(type, linear_dense_slabs, x2, w, N, out);
  }
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.view(shape);
}

}  // namespace
}  // namespace pagellm_gguf

TORCH_LIBRARY_FRAGMENT(pagellm_gguf, m) {
  m.def("tiled_repack(Tensor w, int ggml_type, int out_features, int in_features) -> Tensor");
  m.def("tiled_dequantize(Tensor w, int ggml_type, int out_features, int in_features) -> Tensor");
  m.def("tiled_linear(Tensor x, Tensor w, int ggml_type, int out_features, bool int8_activations=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagellm_gguf, CPU, m) {
  m.impl("tiled_repack", &pagellm_gguf::tiled_repack);
  m.impl("tiled_dequantize", &pagellm_gguf::tiled_dequantize);
  m.impl("tiled_linear", &pagellm_gguf::tiled_linear);
}
