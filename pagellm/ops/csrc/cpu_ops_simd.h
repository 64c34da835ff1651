// The SIMD bodies of cpu_ops.cpp's kernels, written once against a vector struct and included
// once per x86 path: cpu_ops.cpp defines `Vec` (pagellm_vec::Avx2 or ::Avx512) and `SIMD_FN`
// (that path's target attribute) in a namespace of its own, then includes this file. The
// argument structs and fast_exp come from cpu_ops.cpp. No include guard, on purpose.
//
// Every function here is SIMD_FN so Vec's intrinsics inline into it; the callers (parallel_for
// lambdas in cpu_ops.cpp, compiled for the baseline ISA) call these once per task or row range.

using R = typename Vec::R;
constexpr int64_t kW = Vec::W;

// Decode attention for one request and the `heads` kv heads from kv_head0: q.k over head_dim in
// registers, eight context tokens at a time (reduced together into one 8-lane score vector), an
// online softmax (running max and sum per query head), and V rows accumulated with FMAs. K and V
// rows of a tile are read once each, straight from the paged cache. head_dim % kW == 0.
// work: 2 * rows * head_dim + 2 * rows floats, rows = heads * group.
//
// With splits > 1 the task covers part `split` of the context (a multiple of the tile) and
// leaves its unnormalised state in `partial` (run max, run sum, then acc: rows * (head_dim + 2)
// floats) for merge_splits; otherwise it writes the output rows.
template <typename scalar_t>
SIMD_FN void decode_task(const DecodeArgs<scalar_t>& a, int64_t b, int64_t kv_head0, int64_t heads, float* work,
                         int64_t split = 0, int64_t splits = 1, float* partial = nullptr) {
  constexpr int kTile = 8;
  const int64_t D = a.head_dim, rows = heads * a.group;
  const int64_t window_start = a.sliding_window > 0 ? std::max<int64_t>(0, a.lens[b] - a.sliding_window) : 0;
  const int64_t part = (std::max<int64_t>(a.lens[b] - window_start, 0) + splits * kTile - 1) / (splits * kTile) * kTile;
  const int64_t first = std::min<int64_t>(window_start + split * part, a.lens[b]);
  const int64_t len = std::min<int64_t>(first + part, a.lens[b]);
  float* query = work;
  float* acc = query + rows * D;
  float* run_max = acc + rows * D;
  float* run_sum = run_max + rows;

  const scalar_t* q_row = a.q + (b * a.num_heads + kv_head0 * a.group) * D;
  const R scale = Vec::set1(a.scale);
  for (int64_t i = 0; i < rows * D; i += kW) {
    Vec::store(query + i, Vec::mul(Vec::load(q_row + i), scale));
    Vec::store(acc + i, Vec::zero());
  }
  for (int64_t r = 0; r < rows; ++r) {
    run_max[r] = -INFINITY;
    run_sum[r] = 0.f;
  }

  const int32_t* table = a.tables + b * a.table_width;
  const int64_t head_offset = kv_head0 * D;
  int64_t block = first / a.block_size, in_block = first % a.block_size;  // walks the table, no divisions
  const __m256 lane = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  alignas(32) float p[kTile];

  for (int64_t t0 = first; t0 < len; t0 += kTile) {
    const int64_t count = std::min<int64_t>(kTile, len - t0);
    const scalar_t* k_rows[kTile];
    const scalar_t* v_rows[kTile];
    for (int u = 0; u < kTile; ++u) {
      if (u < count) {
        const int64_t at = table[block] * a.block_stride + in_block * a.token_stride + head_offset;
        k_rows[u] = a.k + at;
        v_rows[u] = a.v + at;
        if (++in_block == a.block_size) in_block = 0, ++block;
      } else {  // a short last tile reads token t0 again and gives it no weight
        k_rows[u] = k_rows[0];
        v_rows[u] = v_rows[0];
      }
    }
    const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(count)), _CMP_LT_OQ);

    for (int64_t r = 0; r < rows; ++r) {  // query head r reads kv head r / group
      const int64_t kv = (r / a.group) * D;
      const float* qr = query + r * D;
      R dots[kTile];
      for (int u = 0; u < kTile; ++u) dots[u] = Vec::zero();
      for (int64_t j = 0; j < D; j += kW) {
        const R qv = Vec::load(qr + j);
        for (int u = 0; u < kTile; ++u) dots[u] = Vec::fmadd(qv, Vec::load(k_rows[u] + kv + j), dots[u]);
      }
      __m256 s = Vec::reduce8(dots);
      if (a.softcap > 0.f) {  // Gemma 2's tanh capping: rare, so std::tanh on the 8 scores
        _mm256_store_ps(p, s);
        for (int u = 0; u < kTile; ++u) p[u] = a.softcap * std::tanh(p[u] / a.softcap);
        s = _mm256_load_ps(p);
      }
      s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, valid);

      const float new_max = std::max(run_max[r], pagellm_vec::hmax8(s));
      const float correction = run_max[r] == -INFINITY ? 0.f : fast_exp(run_max[r] - new_max);
      const __m256 weights = _mm256_and_ps(pagellm_vec::exp8(_mm256_sub_ps(s, _mm256_set1_ps(new_max))), valid);
      run_sum[r] = run_sum[r] * correction + pagellm_vec::hsum8(weights);
      run_max[r] = new_max;
      _mm256_store_ps(p, weights);

      float* ar = acc + r * D;
      const R c = Vec::set1(correction);
      for (int64_t j = 0; j < D; j += kW) {
        R x = Vec::mul(Vec::load(ar + j), c);
        for (int u = 0; u < kTile; ++u) x = Vec::fmadd(Vec::set1(p[u]), Vec::load(v_rows[u] + kv + j), x);
        Vec::store(ar + j, x);
      }
    }
  }

  if (partial != nullptr) {
    std::copy(run_max, run_max + rows, partial);
    std::copy(run_sum, run_sum + rows, partial + rows);
    std::copy(acc, acc + rows * D, partial + 2 * rows);
    return;
  }
  scalar_t* o_row = a.out + (b * a.num_heads + kv_head0 * a.group) * D;
  for (int64_t r = 0; r < rows; ++r) {
    const R inv = Vec::set1(run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f);  // an empty context gives zeros
    for (int64_t j = 0; j < D; j += kW) Vec::store(o_row + r * D + j, Vec::mul(Vec::load(acc + r * D + j), inv));
  }
}

// RMSNorm of rows [begin, end), with the residual add first when a.residual is set.
template <typename scalar_t>
SIMD_FN void rms_norm_rows(const NormArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* xr = a.x + row * H;
    scalar_t* rr = a.residual ? a.residual + row * H : nullptr;
    const scalar_t* src = rr ? rr : xr;  // what gets normed: x, or the new residual
    R sq = Vec::zero();
    int64_t i = 0;
    if (rr) {
      for (; i + kW <= H; i += kW) {
        // The sum is stored in the model dtype first, as `x + residual` would be.
        const R s = Vec::template round<scalar_t>(Vec::add(Vec::load(xr + i), Vec::load(rr + i)));
        Vec::store(rr + i, s);
        sq = Vec::fmadd(s, s, sq);
      }
    } else {
      for (; i + kW <= H; i += kW) {
        const R v = Vec::load(xr + i);
        sq = Vec::fmadd(v, v, sq);
      }
    }
    float sum_sq = Vec::hsum(sq);
    for (; i < H; ++i) {
      if (rr) rr[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      const float v = static_cast<float>(src[i]);
      sum_sq += v * v;
    }
    const float inv = 1.f / std::sqrt(sum_sq / H + a.eps);
    const R vinv = Vec::set1(inv);
    scalar_t* o = a.out + row * H;
    // Llama order: normalise in float32, cast to the model dtype, then scale by the weight.
    for (i = 0; i + kW <= H; i += kW)
      Vec::store(o + i, Vec::mul(Vec::template round<scalar_t>(Vec::mul(Vec::load(src + i), vinv)), Vec::load(a.weight + i)));
    for (; i < H; ++i)
      o[i] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(static_cast<float>(src[i]) * inv)) *
                                   static_cast<float>(a.weight[i]));
  }
}

// silu(gate) * up for rows [begin, end) of x = [gate | up].
template <typename scalar_t>
SIMD_FN void silu_and_mul_rows(const scalar_t* x, scalar_t* out, int64_t d, int64_t begin, int64_t end) {
  const R one = Vec::set1(1.f), minus_one = Vec::set1(-1.f);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* gate = x + row * 2 * d;
    const scalar_t* up = gate + d;
    scalar_t* o = out + row * d;
    int64_t i = 0;
    for (; i + kW <= d; i += kW) {
      const R g = Vec::load(gate + i);
      const R act = Vec::div(g, Vec::add(one, Vec::exp(Vec::mul(g, minus_one))));
      // Rounded to the model dtype between the two ops, as F.silu(gate) * up is.
      Vec::store(o + i, Vec::mul(Vec::template round<scalar_t>(act), Vec::load(up + i)));
    }
    for (; i < d; ++i) {
      const float g = static_cast<float>(gate[i]);
      const float act = static_cast<float>(static_cast<scalar_t>(g / (1.f + fast_exp(-g))));
      o[i] = static_cast<scalar_t>(act * static_cast<float>(up[i]));
    }
  }
}
