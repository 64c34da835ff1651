// CPU kernels for the hot non-matmul work of a decode step.
//
// Decode attention reads each request's K/V rows straight from the paged cache through its
// block table: no gathered copy, one pass over the context, all query heads of a GQA group
// served by each K/V row read. RMSNorm (with the residual add) and SiLU-and-mul are single
// passes instead of the 4-6 temporaries the torch expressions make.
//
// Built at first use by pagellm/ops/cpu.py (torch.utils.cpp_extension) and registered as
// torch.ops.pagellm_cpu.*. Everything accumulates in float32 whatever the storage dtype.
//
// Each kernel has a scalar reference here and AVX2+FMA / AVX-512 bodies (cpu_ops_simd.h over
// cpu_vec.h, each carrying its target attribute); the file is built without -march=native and
// every call picks a path with cpu_isa.h's active_isa() (PAGELLM_CPU_ISA forces one).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "cpu_vec.h"

// The dtypes a model runs in: float32, bfloat16, float16.
#define DISPATCH_MODEL_DTYPES(TYPE, NAME, ...)                                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

// exp(x) as Cephes' expf computes it: 2^n * p(r) with r = x - n ln2, inputs clamped to the
// normal-float range; within 2 ulp of expf. Scalar here; cpu_vec.h has the 8- and 16-lane forms.
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

// What the kernels read, for every path.
template <typename scalar_t>
struct DecodeArgs {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  scalar_t* out;
  const int32_t* tables;
  const int32_t* lens;
  int64_t num_heads, head_dim, block_size, group, table_width;
  int64_t token_stride;  // elements between a block's rows
  int64_t block_stride;
  float scale, softcap;
  int64_t sliding_window;
};

template <typename scalar_t>
struct NormArgs {
  const scalar_t* x;
  scalar_t* residual;  // null: no residual add
  scalar_t* out;
  const scalar_t* weight;
  int64_t hidden;
  float eps;
};

// ---- scalar reference paths ---------------------------------------------------------------------

namespace scalar_path {

template <typename scalar_t>
inline float dot(const float* a, const scalar_t* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// In place: scores[0..n) -> softmax(scores).
inline void softmax(float* scores, int64_t n) {
  float max_score = -INFINITY, sum = 0.f;
  for (int64_t i = 0; i < n; ++i) max_score = std::max(max_score, scores[i]);
  for (int64_t i = 0; i < n; ++i) {
    scores[i] = fast_exp(scores[i] - max_score);
    sum += scores[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) scores[i] *= inv;
}

// Two passes over the context: all scores, their softmax, then the weighted V rows.
// work: 2 * rows * head_dim floats; scores grows to rows * context.
template <typename scalar_t>
void decode_task(const DecodeArgs<scalar_t>& a, int64_t b, int64_t kv_head0, int64_t heads, float* work,
                 std::vector<float>& scores) {
  const int64_t D = a.head_dim, rows = heads * a.group;
  const int64_t len = a.lens[b];
  const int64_t first = a.sliding_window > 0 ? std::max<int64_t>(0, len - a.sliding_window) : 0;
  const int64_t n = std::max<int64_t>(len - first, 0);
  const int32_t* table = a.tables + b * a.table_width;
  float* query = work;
  float* acc = work + rows * D;
  const scalar_t* q_row = a.q + (b * a.num_heads + kv_head0 * a.group) * D;
  for (int64_t i = 0; i < rows * D; ++i) query[i] = static_cast<float>(q_row[i]) * a.scale;
  scores.resize(rows * n);
  auto token = [&](const scalar_t* cache, int64_t t) {
    return cache + table[t / a.block_size] * a.block_stride + (t % a.block_size) * a.token_stride + kv_head0 * D;
  };
  for (int64_t t = first; t < len; ++t) {
    const scalar_t* k_tok = token(a.k, t);
    for (int64_t r = 0; r < rows; ++r) {  // query head r reads kv head r / group
      float s = dot(query + r * D, k_tok + (r / a.group) * D, D);
      if (a.softcap > 0.f) s = a.softcap * std::tanh(s / a.softcap);
      scores[r * n + (t - first)] = s;
    }
  }
  for (int64_t r = 0; r < rows; ++r) softmax(scores.data() + r * n, n);
  std::fill(acc, acc + rows * D, 0.f);
  for (int64_t t = first; t < len; ++t) {
    const scalar_t* v_tok = token(a.v, t);
    for (int64_t r = 0; r < rows; ++r) {
      const float w = scores[r * n + (t - first)];
      const scalar_t* v_row = v_tok + (r / a.group) * D;
      for (int64_t i = 0; i < D; ++i) acc[r * D + i] += w * static_cast<float>(v_row[i]);
    }
  }
  scalar_t* o_row = a.out + (b * a.num_heads + kv_head0 * a.group) * D;
  for (int64_t i = 0; i < rows * D; ++i) o_row[i] = static_cast<scalar_t>(acc[i]);
}

template <typename scalar_t>
void rms_norm_rows(const NormArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* xr = a.x + row * H;
    scalar_t* rr = a.residual ? a.residual + row * H : nullptr;
    float sum_sq = 0.f;
    for (int64_t i = 0; i < H; ++i) {
      // The sum is stored in the model dtype first, as `x + residual` would be.
      if (rr) rr[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      const float v = static_cast<float>(rr ? rr[i] : xr[i]);
      sum_sq += v * v;
    }
    const float inv = 1.f / std::sqrt(sum_sq / H + a.eps);
    const scalar_t* src = rr ? rr : xr;
    scalar_t* o = a.out + row * H;
    // Llama order: normalise in float32, cast to the model dtype, then scale by the weight.
    for (int64_t i = 0; i < H; ++i)
      o[i] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(static_cast<float>(src[i]) * inv)) *
                                   static_cast<float>(a.weight[i]));
  }
}

template <typename scalar_t>
void silu_and_mul_rows(const scalar_t* x, scalar_t* out, int64_t d, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* gate = x + row * 2 * d;
    const scalar_t* up = gate + d;
    scalar_t* o = out + row * d;
    for (int64_t i = 0; i < d; ++i) {
      const float g = static_cast<float>(gate[i]);
      // Rounded to the model dtype between the two ops, as F.silu(gate) * up is.
      const float act = static_cast<float>(static_cast<scalar_t>(g / (1.f + fast_exp(-g))));
      o[i] = static_cast<scalar_t>(act * static_cast<float>(up[i]));
    }
  }
}

}  // namespace scalar_path

// ---- SIMD paths: one body (cpu_ops_simd.h), built once per ISA ----------------------------------

#if PAGELLM_X86
namespace avx2_path {
using Vec = pagellm_vec::Avx2;
#define SIMD_FN PAGELLM_AVX2_FN
#include "cpu_ops_simd.h"
#undef SIMD_FN
}  // namespace avx2_path

namespace avx512_path {
using Vec = pagellm_vec::Avx512;
#define SIMD_FN PAGELLM_AVX512_FN
#include "cpu_ops_simd.h"
#undef SIMD_FN
}  // namespace avx512_path
#endif

using pagellm_isa::kAvx2;
using pagellm_isa::kAvx512;
using pagellm_isa::kScalar;

// The SIMD decode bodies step through head_dim a whole register at a time: a head_dim that is
// not a multiple of the register width takes the next narrower path.
int64_t decode_isa(int64_t isa, int64_t head_dim) {
  if (isa == kAvx512 && head_dim % 16 != 0) isa = kAvx2;
  if (isa == kAvx2 && head_dim % 8 != 0) isa = kScalar;
  return isa;
}

// Combines the parts of one (request, kv heads) unit written by decode_task: each part's sums
// rescaled to the largest running max, then normalised. Empty parts (max -inf) weigh nothing.
template <typename scalar_t>
void merge_splits(const float* parts, int64_t splits, int64_t rows, int64_t head_dim, scalar_t* out) {
  const int64_t stride = rows * (head_dim + 2);
  std::vector<float> acc(head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    float top = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) top = std::max(top, parts[s * stride + r]);
    float total = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t s = 0; s < splits; ++s) {
      const float* part = parts + s * stride;
      if (part[r] == -INFINITY) continue;
      const float w = std::exp(part[r] - top);
      total += w * part[rows + r];
      const float* part_acc = part + 2 * rows + r * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) acc[i] += w * part_acc[i];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;  // an empty context gives zeros
    for (int64_t i = 0; i < head_dim; ++i) out[r * head_dim + i] = static_cast<scalar_t>(acc[i] * inv);
  }
}

template <typename scalar_t>
void decode_attention_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                             double logit_softcap, int64_t isa, int64_t longest) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;
  const DecodeArgs<scalar_t> args{q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                  out.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                  seq_lens.data_ptr<int32_t>(), num_heads, head_dim, block_size, group,
                                  block_tables.size(1), token_stride, block_size * token_stride,
                                  static_cast<float>(scale), static_cast<float>(logit_softcap), sliding_window};

  // A task is one request and a run of its kv heads. All heads by default, so a token's K (or V)
  // row is read as one contiguous run: reading one head's slice per task made the hardware
  // prefetcher fetch the other heads' bytes too (3x the memory traffic at 3 kv heads). Small
  // batches split by head so every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t heads_per_task = batch >= 2 * threads ? num_kv_heads : 1;
  const int64_t tasks_per_request = num_kv_heads / heads_per_task;
  const int64_t rows = heads_per_task * group;  // query heads of a task
  const int64_t units = batch * tasks_per_request;
  // Fewer (request, kv head) units than two per thread (batch 1: as many as kv heads) leave
  // threads idle or unevenly loaded: the SIMD paths then also split each context into parts of
  // at least kMinSplitTokens, merged after (flash-decoding's split-KV).
  constexpr int64_t kMinSplitTokens = 64;
  const int64_t splits = isa == kScalar || units == 0
                             ? 1
                             : std::max<int64_t>(1, std::min((2 * threads + units - 1) / units,
                                                             longest / kMinSplitTokens));
  std::vector<float> partials(splits > 1 ? units * splits * rows * (head_dim + 2) : 0);
  at::parallel_for(0, units * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(2 * rows * head_dim + 2 * rows), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t unit = task / splits, split = task % splits;
      const int64_t b = unit / tasks_per_request, kv_head0 = (unit % tasks_per_request) * heads_per_task;
      float* partial = splits > 1 ? partials.data() + task * rows * (head_dim + 2) : nullptr;
#if PAGELLM_X86
      if (isa == kAvx512) {
        avx512_path::decode_task(args, b, kv_head0, heads_per_task, work.data(), split, splits, partial);
        continue;
      }
      if (isa == kAvx2) {
        avx2_path::decode_task(args, b, kv_head0, heads_per_task, work.data(), split, splits, partial);
        continue;
      }
#endif
      scalar_path::decode_task(args, b, kv_head0, heads_per_task, work.data(), scores);
    }
  });
  // Serial: a few thousand multiply-adds at most, less than a second fork/join would cost.
  for (int64_t unit = 0; splits > 1 && unit < units; ++unit) {
    const int64_t b = unit / tasks_per_request, kv_head0 = (unit % tasks_per_request) * heads_per_task;
    merge_splits(partials.data() + unit * splits * rows * (head_dim + 2), splits, rows, head_dim,
                 args.out + (b * num_heads + kv_head0 * group) * head_dim);
  }
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
  int64_t longest = 0;
  if (seq_lens.numel() > 0) {
    // The kernel reads table entries up to each length without further checks. (A plain loop:
    // seq_lens.max().item() was two aten calls per layer.)
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    longest = *std::max_element(lens, lens + seq_lens.numel());
    TORCH_CHECK(longest <= block_tables.size(1) * k_cache.size(1),
                "a seq_len (", longest, ") is longer than its block table covers");
  }
  const int64_t isa = decode_isa(pagellm_isa::active_isa(), q.size(2));
  DISPATCH_MODEL_DTYPES(q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention_kernel<scalar_t>(out, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                      logit_softcap, isa, longest);
  });
}

// rows of x (and residual) -> normed rows; with a residual, residual += x first and the sum is normed.
template <typename scalar_t>
void rms_norm_kernel(at::Tensor& out, const at::Tensor& x, at::Tensor* residual, const at::Tensor& weight,
                     double eps, int64_t isa) {
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const NormArgs<scalar_t> args{x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                                out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), hidden, static_cast<float>(eps)};
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
#if PAGELLM_X86
    if (isa == kAvx512) return avx512_path::rms_norm_rows(args, begin, end);
    if (isa == kAvx2) return avx2_path::rms_norm_rows(args, begin, end);
#endif
    scalar_path::rms_norm_rows(args, begin, end);
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
  const int64_t isa = pagellm_isa::active_isa();
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "rms_norm",
                        [&] { rms_norm_kernel<scalar_t>(out, x, nullptr, weight, eps, isa); });
}

void fused_add_rms_norm(at::Tensor out, const at::Tensor& x, at::Tensor residual, const at::Tensor& weight,
                        double eps) {
  check_norm_args(out, x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must be contiguous and shaped and typed like x");
  const int64_t isa = pagellm_isa::active_isa();
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "fused_add_rms_norm",
                        [&] { rms_norm_kernel<scalar_t>(out, x, &residual, weight, eps, isa); });
}

// x: [..., 2 * d] = [gate | up] -> out: [..., d] = silu(gate) * up.
void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.size(-1) == 2 * out.size(-1) &&
                  x.numel() == 2 * out.numel() && x.scalar_type() == out.scalar_type(),
              "x must be contiguous [..., 2d] and out [..., d] of the same dtype");
  const int64_t isa = pagellm_isa::active_isa();
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "silu_and_mul", [&] {
    const int64_t d = out.size(-1), rows = d > 0 ? out.numel() / d : 0;
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
#if PAGELLM_X86
      if (isa == kAvx512) return avx512_path::silu_and_mul_rows(x_ptr, out_ptr, d, begin, end);
      if (isa == kAvx2) return avx2_path::silu_and_mul_rows(x_ptr, out_ptr, d, begin, end);
#endif
      scalar_path::silu_and_mul_rows(x_ptr, out_ptr, d, begin, end);
    });
  });
}

int64_t cpu_isa() { return pagellm_isa::active_isa(); }
int64_t cpu_supported_isas() { return pagellm_isa::supported_isas(); }

}  // namespace

TORCH_LIBRARY(pagellm_cpu, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int sliding_window, float logit_softcap) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  // The path the next call takes and the paths this CPU has (bit i: scalar, avx2, avx512).
  m.def("isa() -> int", &cpu_isa);
  m.def("supported_isas() -> int", &cpu_supported_isas);
}

TORCH_LIBRARY_IMPL(pagellm_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}
