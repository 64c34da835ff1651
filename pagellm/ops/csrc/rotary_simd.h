// The SIMD body of rotary_ops.cpp, included once per x86 path: the includer defines `Vec`
// (pagellm_vec::Avx2 or ::Avx512) and `SIMD_FN` (that path's target attribute) in a namespace of
// its own. No include guard, on purpose (see cpu_ops_simd.h).

// Rotates the first 2 * half values of `heads` head rows (head_stride apart) in place, neox
// style: [x1 | x2] -> [x1 c1 - x2 s1 | x2 c2 + x1 s2]. Each product is rounded before the add,
// as torch's `x * cos + rotate_half(x) * sin` rounds it (this file is built without FP
// contraction), so the result matches it bit for bit.
SIMD_FN void rotate_heads(float* x, int64_t heads, int64_t head_stride, const float* cos, const float* sin,
                          int64_t half) {
  using R = typename Vec::R;
  constexpr int64_t kW = Vec::W;
  const int64_t vec_end = half / kW * kW;
  for (int64_t h = 0; h < heads; ++h) {
    float* x1p = x + h * head_stride;
    float* x2p = x1p + half;
    for (int64_t i = 0; i < vec_end; i += kW) {
      const R x1 = Vec::load(x1p + i), x2 = Vec::load(x2p + i);
      Vec::store(x1p + i, Vec::sub(Vec::mul(x1, Vec::load(cos + i)), Vec::mul(x2, Vec::load(sin + i))));
      Vec::store(x2p + i, Vec::add(Vec::mul(x2, Vec::load(cos + half + i)), Vec::mul(x1, Vec::load(sin + half + i))));
    }
    if (vec_end < half) rotate_tail(x1p, cos, sin, half, vec_end);
  }
}
