// Paged decode attention over a quantized KV cache (pagellm/attention/kv_quant.py):
//   fp8:  float8_e4m3fn values, value = stored * scale with one scalar scale for K and one for V;
//   int8: int8 values, value = stored * scale[block][slot][head] (one fp32 scale per token-head).
//
// The same walk as cpu_ops.cpp's paged_decode_attention (one task = one request and a run of its
// KV heads, each token's K/V row read once for all query heads of the GQA group), except that
// each row is dequantized to float32 as it is read, so the cache is never expanded in memory.
// Scores, softmax and the V sum are float32; the result is rounded to q's dtype.
//
// Compiled without -march=native: the row loops have a scalar and an AVX2+FMA path (target
// attributes), picked at run time from cpuid; PAGELLM_CPU_ISA=scalar|avx2 forces one (avx512
// takes the AVX2 path: these loops have no AVX-512 variant). Built by pagellm/ops/kv_quant_cpu.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define PAGELLM_KVQ_X86 1
#include <immintrin.h>
#endif

namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1 };

bool cpu_has_avx2() {
#if PAGELLM_KVQ_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The best path, or the one PAGELLM_CPU_ISA names (read per call, so tests can switch).
int64_t active_isa() {
  const bool avx2 = cpu_has_avx2();
  const char* env = std::getenv("PAGELLM_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto" || want == "avx512") return avx2 ? kAvx2 : kScalar;
  TORCH_CHECK(want == "scalar" || want == "avx2", "PAGELLM_CPU_ISA=", want,
              " is not one of auto, scalar, avx2, avx512");
  if (want == "scalar") return kScalar;
  TORCH_CHECK(avx2, "PAGELLM_CPU_ISA=avx2 but this CPU does not support AVX2+FMA");
  return kAvx2;
}

// All 256 float8_e4m3fn values (bias 7, no infinities, S.1111.111 is NaN).
std::array<float, 256> make_fp8_table() {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b) {
    const int exponent = (b >> 3) & 15, mantissa = b & 7;
    float value;
    if (exponent == 15 && mantissa == 7) {
      value = NAN;
    } else if (exponent == 0) {
      value = std::ldexp(mantissa / 8.0f, -6);  // subnormal
    } else {
      value = std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
    }
    table[b] = (b & 0x80) ? -value : value;
  }
  return table;
}

const float* fp8_table() {
  static const std::array<float, 256> table = make_fp8_table();  // immutable after first use
  return table.data();
}

// How one layer's K or V cache is stored.
struct QuantRows {
  const uint8_t* fp8 = nullptr;  // fp8 bytes, or
  const int8_t* int8 = nullptr;  // int8 values
  float scale = 1.f;             // fp8: the layer's scalar scale
  const float* scales = nullptr;  // int8: [blocks, block_size, kv_heads]
};

// ---- row loops: dst[0..n) = dequantized src; dot; y += a * x ---------------------------------
void fp8_row_scalar(const uint8_t* src, float scale, float* dst, int64_t n) {
  const float* table = fp8_table();
  for (int64_t i = 0; i < n; ++i) dst[i] = table[src[i]] * scale;
}

void int8_row_scalar(const int8_t* src, float scale, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  // Eight partial sums: the same association as the AVX2 path's lanes.
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_scalar(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// All query heads of a task against one token's dequantized K heads (query head r reads kv head
// r / group): dst[r * stride] = q_r . k. One call per token, so the per-head work inlines.
void scores_scalar(const float* query, const float* kv, int64_t rows, int64_t group, int64_t head_dim, float* dst,
                   int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) dst[r * stride] = dot_scalar(query + r * head_dim, kv + (r / group) * head_dim, head_dim);
}

// acc_r += p[r * stride] * v (v: the token's dequantized V heads).
void accumulate_scalar(const float* p, int64_t stride, const float* kv, int64_t rows, int64_t group, int64_t head_dim,
                       float* acc) {
  for (int64_t r = 0; r < rows; ++r) axpy_scalar(p[r * stride], kv + (r / group) * head_dim, acc + r * head_dim, head_dim);
}

#if PAGELLM_KVQ_X86
__attribute__((target("avx2,fma"))) void fp8_row_avx2(const uint8_t* src, float scale, float* dst, int64_t n) {
  const float* table = fp8_table();
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_i32gather_ps(table, idx, 4), s));
  }
  for (; i < n; ++i) dst[i] = table[src[i]] * scale;
}

__attribute__((target("avx2,fma"))) void int8_row_avx2(const int8_t* src, float scale, float* dst, int64_t n) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  float s = _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

__attribute__((target("avx2,fma"))) void scores_avx2(const float* query, const float* kv, int64_t rows, int64_t group,
                                                     int64_t head_dim, float* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) dst[r * stride] = dot_avx2(query + r * head_dim, kv + (r / group) * head_dim, head_dim);
}

__attribute__((target("avx2,fma"))) void accumulate_avx2(const float* p, int64_t stride, const float* kv, int64_t rows,
                                                         int64_t group, int64_t head_dim, float* acc) {
  for (int64_t r = 0; r < rows; ++r) axpy_avx2(p[r * stride], kv + (r / group) * head_dim, acc + r * head_dim, head_dim);
}
#endif

struct RowOps {
  void (*fp8_row)(const uint8_t*, float, float*, int64_t);
  void (*int8_row)(const int8_t*, float, float*, int64_t);
  void (*scores)(const float*, const float*, int64_t, int64_t, int64_t, float*, int64_t);
  void (*accumulate)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*);
};

RowOps row_ops(int64_t isa) {
#if PAGELLM_KVQ_X86
  if (isa == kAvx2) return {fp8_row_avx2, int8_row_avx2, scores_avx2, accumulate_avx2};
#endif
  return {fp8_row_scalar, int8_row_scalar, scores_scalar, accumulate_scalar};
}

// Token `slot` (block * block_size + offset), heads [head0, head0 + heads) -> dst (heads * head_dim floats).
inline void dequantize_token(const RowOps& ops, const QuantRows& rows, int64_t slot, int64_t num_kv_heads,
                             int64_t head0, int64_t heads, int64_t head_dim, float* dst) {
  const int64_t first = (slot * num_kv_heads + head0) * head_dim;
  if (rows.fp8) {
    ops.fp8_row(rows.fp8 + first, rows.scale, dst, heads * head_dim);
    return;
  }
  for (int64_t h = 0; h < heads; ++h)
    ops.int8_row(rows.int8 + first + h * head_dim, rows.scales[slot * num_kv_heads + head0 + h],
                 dst + h * head_dim, head_dim);
}

void softmax_inplace(float* scores, int64_t n) {
  float max_score = -INFINITY, sum = 0.f;
  for (int64_t i = 0; i < n; ++i) max_score = std::max(max_score, scores[i]);
  for (int64_t i = 0; i < n; ++i) {
    scores[i] = std::exp(scores[i] - max_score);
    sum += scores[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) scores[i] *= inv;
}

template <typename scalar_t>
void quant_decode_kernel(at::Tensor& out, const at::Tensor& q, const QuantRows& k_rows, const QuantRows& v_rows,
                         int64_t block_size, int64_t num_kv_heads, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, double scale, int64_t sliding_window, double logit_softcap) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t group = num_heads / num_kv_heads, table_width = block_tables.size(1);
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const float scale_f = static_cast<float>(scale), softcap = static_cast<float>(logit_softcap);
  const RowOps ops = row_ops(active_isa());
  // As in cpu_ops.cpp: whole tokens (all kv heads) per task for large batches, one head otherwise.
  const int64_t heads_per_task = batch >= 2 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t tasks_per_request = num_kv_heads / heads_per_task;
  const int64_t rows = heads_per_task * group;
  at::parallel_for(0, batch * tasks_per_request, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(rows * head_dim), acc(rows * head_dim), kv(heads_per_task * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_request, head0 = (task % tasks_per_request) * heads_per_task;
      const int64_t len = lens[b];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t n = std::max<int64_t>(len - first, 0);
      const int32_t* table = tables + b * table_width;
      const scalar_t* q_row = q_ptr + (b * num_heads + head0 * group) * head_dim;
      for (int64_t i = 0; i < rows * head_dim; ++i) query[i] = static_cast<float>(q_row[i]) * scale_f;
      scores.resize(rows * n);
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
        dequantize_token(ops, k_rows, slot, num_kv_heads, head0, heads_per_task, head_dim, kv.data());
        float* column = scores.data() + (t - first);  // row r's score for token t: column[r * n]
        ops.scores(query.data(), kv.data(), rows, group, head_dim, column, n);
        if (softcap > 0.f)
          for (int64_t r = 0; r < rows; ++r) column[r * n] = softcap * std::tanh(column[r * n] / softcap);
      }
      for (int64_t r = 0; r < rows; ++r) softmax_inplace(scores.data() + r * n, n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
        dequantize_token(ops, v_rows, slot, num_kv_heads, head0, heads_per_task, head_dim, kv.data());
        ops.accumulate(scores.data() + (t - first), n, kv.data(), rows, group, head_dim, acc.data());
      }
      scalar_t* o_row = out_ptr + (b * num_heads + head0 * group) * head_dim;
      for (int64_t i = 0; i < rows * head_dim; ++i) o_row[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

void check_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& seq_lens) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [batch, heads, head_dim] tensor");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              "out must be a contiguous tensor shaped and typed like q");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache/v_cache must be contiguous [blocks, block_size, kv_heads, head_dim] tensors of one dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "head_dim must match and heads must be a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(0),
              "block_tables must be a contiguous int32 [batch, max_blocks] tensor");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.numel() == q.size(0) && seq_lens.is_contiguous(),
              "seq_lens must be a contiguous int32 [batch] tensor");
  if (seq_lens.numel() > 0) {
    const int64_t longest = seq_lens.max().item<int64_t>();
    TORCH_CHECK(longest <= block_tables.size(1) * k_cache.size(1), "a seq_len (", longest,
                ") is longer than its block table covers");
    // Table entries are trusted below: check they name real blocks.
    if (block_tables.numel() > 0) {
      const int64_t lo = block_tables.min().item<int64_t>(), hi = block_tables.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < k_cache.size(0), "block_tables name blocks outside the cache");
    }
  }
}

void run(at::Tensor& out, const at::Tensor& q, const QuantRows& k_rows, const QuantRows& v_rows,
         const at::Tensor& k_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
         int64_t sliding_window, double logit_softcap) {
  AT_DISPATCH_SWITCH(q.scalar_type(), "paged_decode_attention_quant",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       quant_decode_kernel<scalar_t>(out, q, k_rows, v_rows, k_cache.size(1), k_cache.size(2),
                                                     block_tables, seq_lens, scale, sliding_window, logit_softcap);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       quant_decode_kernel<scalar_t>(out, q, k_rows, v_rows, k_cache.size(1), k_cache.size(2),
                                                     block_tables, seq_lens, scale, sliding_window, logit_softcap);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       quant_decode_kernel<scalar_t>(out, q, k_rows, v_rows, k_cache.size(1), k_cache.size(2),
                                                     block_tables, seq_lens, scale, sliding_window, logit_softcap);
                     }));
}

void paged_decode_attention_fp8(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                double scale, int64_t sliding_window, double logit_softcap, double k_scale,
                                double v_scale) {
  check_args(out, q, k_cache, v_cache, block_tables, seq_lens);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat8_e4m3fn || k_cache.scalar_type() == at::kByte,
              "an fp8 cache is float8_e4m3fn (or its bytes as uint8)");
  QuantRows k_rows, v_rows;
  k_rows.fp8 = static_cast<const uint8_t*>(k_cache.data_ptr());
  v_rows.fp8 = static_cast<const uint8_t*>(v_cache.data_ptr());
  k_rows.scale = static_cast<float>(k_scale);
  v_rows.scale = static_cast<float>(v_scale);
  run(out, q, k_rows, v_rows, k_cache, block_tables, seq_lens, scale, sliding_window, logit_softcap);
}

void paged_decode_attention_int8(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& k_scales, const at::Tensor& v_scales,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                 int64_t sliding_window, double logit_softcap) {
  check_args(out, q, k_cache, v_cache, block_tables, seq_lens);
  TORCH_CHECK(k_cache.scalar_type() == at::kChar, "an int8 cache is int8");
  for (const at::Tensor* s : {&k_scales, &v_scales})
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->dim() == 3 &&
                    s->size(0) == k_cache.size(0) && s->size(1) == k_cache.size(1) && s->size(2) == k_cache.size(2),
                "int8 scales must be contiguous float32 [blocks, block_size, kv_heads] tensors");
  QuantRows k_rows, v_rows;
  k_rows.int8 = k_cache.data_ptr<int8_t>();
  v_rows.int8 = v_cache.data_ptr<int8_t>();
  k_rows.scales = k_scales.data_ptr<float>();
  v_rows.scales = v_scales.data_ptr<float>();
  run(out, q, k_rows, v_rows, k_cache, block_tables, seq_lens, scale, sliding_window, logit_softcap);
}

int64_t kvq_isa() { return active_isa(); }

}  // namespace

TORCH_LIBRARY(pagellm_kvq, m) {
  m.def("paged_decode_attention_fp8(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int sliding_window, float logit_softcap, float k_scale, float v_scale) -> ()");
  m.def("paged_decode_attention_int8(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, "
        "Tensor v_scales, Tensor block_tables, Tensor seq_lens, float scale, int sliding_window, "
        "float logit_softcap) -> ()");
  m.def("isa() -> int", &kvq_isa);
}

TORCH_LIBRARY_IMPL(pagellm_kvq, CPU, m) {
  m.impl("paged_decode_attention_fp8", &paged_decode_attention_fp8);
  m.impl("paged_decode_attention_int8", &paged_decode_attention_int8);
}
