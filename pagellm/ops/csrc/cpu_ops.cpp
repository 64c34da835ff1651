// CPU kernels for the hot non-matmul work of a decode step.
//
// Decode attention reads each request's K/V rows straight from the paged cache through its
// block table: no gathered copy, one pass over the context, all query heads of a GQA group
// served by each K/V row read. RMSNorm (with the residual add) and SiLU-and-mul are single
// passes instead of the 4-6 temporaries the torch expressions make.
//
// Built at first use by pagellm/ops/cpu.py (torch.utils.cpp_extension) and registered as
// torch.ops.pagellm_cpu.*. Everything accumulates in float32 whatever the storage dtype.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The dtypes a model runs in: float32, bfloat16, float16.
#define DISPATCH_MODEL_DTYPES(TYPE, NAME, ...)                                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

// exp(x) as Cephes' expf computes it: 2^n * p(r) with r = x - n ln2, inputs clamped to the
// normal-float range; within 2 ulp of expf. Scalar here, 16 lanes at once in exp16 below.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
// AVX-512 paths, 16 floats per register. Compilers do not vectorise the horizontal sums and the
// exp of these loops on their own (without -ffast-math), and those sums dominate decode attention.
constexpr int64_t kVec = 16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Stores 16 floats in the storage dtype, rounding to nearest even as torch's casts do.
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(c10::BFloat16* p, __m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
inline void store16(c10::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

// x rounded to scalar_t's precision, as a float: what a torch op in that dtype would hand on.
template <typename scalar_t>
inline __m512 round16(__m512 x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    alignas(64) scalar_t tmp[kVec];
    store16(tmp, x);
    return load16(tmp);
  }
}

inline __m512 exp16(__m512 x) {
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
#endif

template <typename scalar_t>
inline float dot(const float* a, const scalar_t* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; i + 2 * kVec <= n; i += 2 * kVec) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + kVec), load16(b + i + kVec), acc1);
  }
  for (; i + kVec <= n; i += kVec) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <typename scalar_t>
inline void axpy(float alpha, const scalar_t* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 a = _mm512_set1_ps(alpha);
  for (; i + kVec <= n; i += kVec) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, load16(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

// In place: scores[0..n) -> softmax(scores).
inline void softmax(float* scores, int64_t n) {
  int64_t i = 0;
  float max_score = -INFINITY, sum = 0.f;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (; i + kVec <= n; i += kVec) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(scores + i));
  max_score = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < n; ++i) max_score = std::max(max_score, scores[i]);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(max_score);
  __m512 vsum = _mm512_setzero_ps();
  for (; i + kVec <= n; i += kVec) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + i), vm));
    _mm512_storeu_ps(scores + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < n; ++i) {
    scores[i] = fast_exp(scores[i] - max_score);
    sum += scores[i];
  }
  const float inv = 1.f / sum;
  for (i = 0; i < n; ++i) scores[i] *= inv;
}

template <typename scalar_t>
void decode_attention_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                             double logit_softcap) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t table_width = block_tables.size(1);
  const int64_t token_stride = num_kv_heads * head_dim;  // elements between a block's rows
  const int64_t block_stride = block_size * token_stride;
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const float scale_f = static_cast<float>(scale);
  const float softcap = static_cast<float>(logit_softcap);

  // A task is one request and a run of its kv heads. All heads by default, so a token's K (or V)
  // row is read as one contiguous run: reading one head's slice per task made the hardware
  // prefetcher fetch the other heads' bytes too (3x the memory traffic at 3 kv heads). Small
  // batches split by head so every thread has work.
  const int64_t heads_per_task = batch >= 2 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t tasks_per_request = num_kv_heads / heads_per_task;
  const int64_t rows = heads_per_task * group;  // query heads of a task
  at::parallel_for(0, batch * tasks_per_request, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(rows * head_dim), acc(rows * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_request, kv_head0 = (task % tasks_per_request) * heads_per_task;
      const int64_t len = lens[b];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t n = std::max<int64_t>(len - first, 0);
      const int32_t* table = tables + b * table_width;
      const scalar_t* q_row = q_ptr + (b * num_heads + kv_head0 * group) * head_dim;
      for (int64_t i = 0; i < rows * head_dim; ++i) query[i] = static_cast<float>(q_row[i]) * scale_f;
      scores.resize(rows * n);
      for (int64_t t = first; t < len; ++t) {
        const scalar_t* k_tok = k_ptr + table[t / block_size] * block_stride + (t % block_size) * token_stride +
                                kv_head0 * head_dim;
        for (int64_t r = 0; r < rows; ++r) {  // query head r reads kv head r / group
          float s = dot(query.data() + r * head_dim, k_tok + (r / group) * head_dim, head_dim);
          if (softcap > 0.f) s = softcap * std::tanh(s / softcap);
          scores[r * n + (t - first)] = s;
        }
      }
      for (int64_t r = 0; r < rows; ++r) softmax(scores.data() + r * n, n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const scalar_t* v_tok = v_ptr + table[t / block_size] * block_stride + (t % block_size) * token_stride +
                                kv_head0 * head_dim;
        for (int64_t r = 0; r < rows; ++r)
          axpy(scores[r * n + (t - first)], v_tok + (r / group) * head_dim, acc.data() + r * head_dim, head_dim);
      }
      scalar_t* o_row = out_ptr + (b * num_heads + kv_head0 * group) * head_dim;
      for (int64_t i = 0; i < rows * head_dim; ++i) o_row[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale, int64_t sliding_window, double logit_softcap) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [batch, heads, head_dim] tensor");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              "out must be a contiguous tensor shaped and typed like q");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "k_cache/v_cache must be contiguous [blocks, block_size, kv_heads, head_dim] tensors");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "the caches must have q's dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "head_dim must match and heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(0),
              "block_tables must be a contiguous int32 [batch, max_blocks] tensor");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.numel() == q.size(0) && seq_lens.is_contiguous(),
              "seq_lens must be a contiguous int32 [batch] tensor");
  if (seq_lens.numel() > 0) {
    // The kernel reads table entries up to each length without further checks.
    const int64_t longest = seq_lens.max().item<int64_t>();
    TORCH_CHECK(longest <= block_tables.size(1) * k_cache.size(1),
                "a seq_len (", longest, ") is longer than its block table covers");
  }
  DISPATCH_MODEL_DTYPES(q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention_kernel<scalar_t>(out, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                      logit_softcap);
  });
}

// rows of x (and residual) -> normed rows; with a residual, residual += x first and the sum is normed.
template <typename scalar_t>
void rms_norm_kernel(at::Tensor& out, const at::Tensor& x, at::Tensor* residual, const at::Tensor& weight,
                     double eps) {
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* res_ptr = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const scalar_t* w_ptr = weight.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x_ptr + r * hidden;
      float sum_sq = 0.f;
      if (res_ptr) {
        scalar_t* rr = res_ptr + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
          // The sum is stored in the model dtype first, as `x + residual` would be.
          rr[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          row[i] = static_cast<float>(rr[i]);
        }
      } else {
        for (int64_t i = 0; i < hidden; ++i) row[i] = static_cast<float>(xr[i]);
      }
      sum_sq = dot(row.data(), row.data(), hidden);
      const float inv = 1.f / std::sqrt(sum_sq / hidden + static_cast<float>(eps));
      scalar_t* o = out_ptr + r * hidden;
      // Llama order: normalise in float32, cast to the model dtype, then scale by the weight.
      for (int64_t i = 0; i < hidden; ++i)
        o[i] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(row[i] * inv)) *
                                     static_cast<float>(w_ptr[i]));
    }
  });
}

void check_norm_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes(),
              "x and out must be contiguous and the same shape");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous(),
              "weight must be a contiguous [hidden] tensor");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "x, out and weight must share a dtype");
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(out, x, weight);
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "rms_norm",
                                  [&] { rms_norm_kernel<scalar_t>(out, x, nullptr, weight, eps); });
}

void fused_add_rms_norm(at::Tensor out, const at::Tensor& x, at::Tensor residual, const at::Tensor& weight,
                        double eps) {
  check_norm_args(out, x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must be contiguous and shaped and typed like x");
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "fused_add_rms_norm",
                                  [&] { rms_norm_kernel<scalar_t>(out, x, &residual, weight, eps); });
}

// x: [..., 2 * d] = [gate | up] -> out: [..., d] = silu(gate) * up.
template <typename scalar_t>
void silu_and_mul_kernel(at::Tensor& out, const at::Tensor& x) {
  const int64_t d = out.size(-1), rows = out.numel() / d;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = x_ptr + r * 2 * d;
      const scalar_t* up = gate + d;
      scalar_t* o = out_ptr + r * d;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + kVec <= d; i += kVec) {
        const __m512 g = load16(gate + i);
        const __m512 act = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        store16(o + i, _mm512_mul_ps(round16<scalar_t>(act), load16(up + i)));
      }
#endif
      for (; i < d; ++i) {
        const float g = static_cast<float>(gate[i]);
        // Rounded to the model dtype between the two ops, as F.silu(gate) * up is.
        const float act = static_cast<float>(static_cast<scalar_t>(g / (1.f + fast_exp(-g))));
        o[i] = static_cast<scalar_t>(act * static_cast<float>(up[i]));
      }
    }
  });
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.size(-1) == 2 * out.size(-1) &&
                  x.numel() == 2 * out.numel() && x.scalar_type() == out.scalar_type(),
              "x must be contiguous [..., 2d] and out [..., d] of the same dtype");
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "silu_and_mul",
                                  [&] { silu_and_mul_kernel<scalar_t>(out, x); });
}

}  // namespace

TORCH_LIBRARY(pagellm_cpu, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int sliding_window, float logit_softcap) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(pagellm_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}
