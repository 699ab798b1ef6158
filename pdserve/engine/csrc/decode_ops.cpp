// fp32 CPU kernels for the per-token ops of a decode step.
//
// At batch 1 a decode step is ~40 small torch ops per layer, each paying dispatch and
// thread wake-up costs that dwarf its arithmetic (SDPA on one query: ~150 us, most of
// it set-up). These fuse each group into one call and read the paged pool in place.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 tensor");
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                       const torch::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(w.numel() == d, "w must have x.size(1) elements");
  float* xp = x.data_ptr<float>();
  const float* dp = nullptr;
  if (delta.has_value()) {
    check_f32(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta must have x's shape");
    dp = delta->data_ptr<float>();
  }
  auto out = torch::empty_like(x);
  float* op = out.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = xp + r * d;
      if (dp != nullptr)
        for (int64_t i = 0; i < d; ++i) xr[i] += dp[r * d + i];
      const float inv = 1.0f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) +
                                         static_cast<float>(eps));
      for (int64_t i = 0; i < d; ++i) op[r * d + i] = wp[i] * (xr[i] * inv);
    }
  });
  return out;
}

void rope_store_kv(const torch::Tensor& qkv, const torch::Tensor& positions,
                   const torch::Tensor& cos, const torch::Tensor& sin, int64_t num_heads,
                   int64_t num_kv_heads, const torch::Tensor& k_slots,
                   const torch::Tensor& v_slots, const torch::Tensor& slot_mapping) {
  // qkv (N, (H + 2 kvh) hd); cos/sin (P, hd/2); k_slots/v_slots (slots, kvh, hd).
  check_f32(qkv, "qkv");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  check_f32(k_slots, "k_slots");
  check_f32(v_slots, "v_slots");
  const int64_t n = qkv.size(0), hd = k_slots.size(2), half = hd / 2;
  const int64_t rotated = num_heads + num_kv_heads, width = qkv.size(1);
  TORCH_CHECK(width == (num_heads + 2 * num_kv_heads) * hd, "qkv width mismatch");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  float* base = qkv.data_ptr<float>();
  float* kp = k_slots.data_ptr<float>();
  float* vp = v_slots.data_ptr<float>();
  const int64_t kv_row = num_kv_heads * hd, max_pos = cos.size(0);
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < max_pos, "position out of the RoPE table");
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cos.data_ptr<float>() + pos[r] * half;
      const float* s = sin.data_ptr<float>() + pos[r] * half;
      float* row = base + r * width;
      for (int64_t h = 0; h < rotated; ++h) {  // the "rotate_half" layout of HF Llama
        float* x = row + h * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i] + x1 * s[i];
        }
      }
      std::copy(row + num_heads * hd, row + rotated * hd, kp + slot[r] * kv_row);
      std::copy(row + rotated * hd, row + width, vp + slot[r] * kv_row);
    }
  });
}

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache,
                                     const torch::Tensor& block_tables,
                                     const torch::Tensor& seq_lens, double scale) {
  // q (D, H, hd); caches (blocks, bs, kvh, hd); block_tables (D, nb); seq_lens (D,).
  check_f32(q, "q");
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64");
  const int64_t D = q.size(0), H = q.size(1), hd = q.size(2);
  const int64_t bs = k_cache.size(1), kvh = k_cache.size(2), nb = block_tables.size(1);
  TORCH_CHECK(H % kvh == 0 && k_cache.size(3) == hd, "head shapes mismatch");
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // One task per (request, query head): small enough to balance 2..N threads.
  at::parallel_for(0, D * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t d = t / H, h = t % H, g = h / (H / kvh), len = lens[d];
      TORCH_CHECK(len >= 1 && len <= nb * bs, "seq_len out of range for block table");
      const float* qh = qp + t * hd;
      p.resize(len);
      float mx = -INFINITY;
      for (int64_t i = 0; i < len; ++i) {
        const int64_t row = (tables[d * nb + i / bs] * bs + i % bs) * kvh + g;
        p[i] = dot(qh, kc + row * hd, hd) * sc;
        mx = std::max(mx, p[i]);
      }
      float sum = 0.f;
      for (int64_t i = 0; i < len; ++i) sum += (p[i] = std::exp(p[i] - mx));
      float* oh = op + t * hd;
      std::fill(oh, oh + hd, 0.f);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t row = (tables[d * nb + i / bs] * bs + i % bs) * kvh + g;
        axpy(p[i] / sum, vc + row * hd, oh, hd);
      }
    }
  });
  return out;
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  // gate_up (N, 2I) -> silu(gate) * up (N, I), the SwiGLU of a Llama MLP.
  check_f32(gate_up, "gate_up");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({n, inter}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gp + r * 2 * inter;
      for (int64_t i = 0; i < inter; ++i)
        op[r * inter + i] = g[i] / (1.f + std::exp(-g[i])) * g[inter + i];
    }
  });
  return out;
}
