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
#include <cstring>
#include <vector>

#include "simd_math.h"

namespace {

using pdserve_simd::bf16_bits1;
using pdserve_simd::exp8;
using pdserve_simd::hsum;
using pdserve_simd::widen1;
using pdserve_simd::widen8;

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// A bf16 pool row's values widened to fp32 (a bf16 is the top half of an fp32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return widen8(p); }
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return widen1(v); }

inline void store_row(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits1(src[i]);
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 tensor");
}

}  // namespace

// Whether a K/V pool pair is bf16 (else fp32); both contiguous, of one dtype.
bool check_pool(const torch::Tensor& k, const torch::Tensor& v) {
  const auto dt = k.scalar_type();
  TORCH_CHECK((dt == torch::kFloat32 || dt == torch::kBFloat16) && v.scalar_type() == dt &&
                  k.is_contiguous() && v.is_contiguous(),
              "the K/V pool must be contiguous float32 or bfloat16");
  return dt == torch::kBFloat16;
}

uint16_t* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

namespace {

}  // namespace

// The *_into functions take raw pointers so that fused C++ callers (decode_layer.cpp)
// run the very same loops as these ops; the torch wrappers below check and call them.

// x (n, d) += delta (if not null), in place; out (n, d) = rms_norm(x) * w.
void rms_norm_into(float* xp, const float* dp, const float* wp, float* op, int64_t n,
                   int64_t d, double eps) {
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
}

// qkv (n, (H + 2 kvh) hd): rotate q|k in place, copy k and v to their slots of
// kp/vp (slots, kvh, hd); cos/sin (max_pos, hd/2).
namespace {

template <typename KV>
void rope_store_kv_t(float* base, int64_t n, const int64_t* pos, const float* cos,
                     const float* sin, int64_t max_pos, int64_t num_heads, int64_t num_kv_heads,
                     int64_t hd, KV* kp, KV* vp, const int64_t* slot) {
  const int64_t half = hd / 2, rotated = num_heads + num_kv_heads;
  const int64_t width = (num_heads + 2 * num_kv_heads) * hd, kv_row = num_kv_heads * hd;
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < max_pos, "position out of the RoPE table");
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cos + pos[r] * half;
      const float* s = sin + pos[r] * half;
      float* row = base + r * width;
      for (int64_t h = 0; h < rotated; ++h) {  // the "rotate_half" layout of HF Llama
        float* x = row + h * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i] + x1 * s[i];
        }
      }
      store_row(row + num_heads * hd, kv_row, kp + slot[r] * kv_row);
      store_row(row + rotated * hd, kv_row, vp + slot[r] * kv_row);
    }
  });
}

}  // namespace

// The pool in fp32 or in bf16 (uint16_t: K/V rounded once as they are stored).
void rope_store_kv_into(float* base, int64_t n, const int64_t* pos, const float* cos,
                        const float* sin, int64_t max_pos, int64_t num_heads,
                        int64_t num_kv_heads, int64_t hd, float* kp, float* vp,
                        const int64_t* slot) {
  rope_store_kv_t(base, n, pos, cos, sin, max_pos, num_heads, num_kv_heads, hd, kp, vp, slot);
}
void rope_store_kv_into(float* base, int64_t n, const int64_t* pos, const float* cos,
                        const float* sin, int64_t max_pos, int64_t num_heads,
                        int64_t num_kv_heads, int64_t hd, uint16_t* kp, uint16_t* vp,
                        const int64_t* slot) {
  rope_store_kv_t(base, n, pos, cos, sin, max_pos, num_heads, num_kv_heads, hd, kp, vp, slot);
}

namespace {

// The 8 sums of 8 vectors, lane k = sum of a[k]'s lanes.
inline __m256 hsum8(const __m256* a) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                       _mm256_permute2f128_ps(s0, s1, 0x31));
}

constexpr int64_t kKeys = 8;  // keys scored together: 8 independent FMA chains

// Scores of one query against 8 keys (rows k[0..7], hd values each), times sc.
template <typename KV>
inline __m256 scores8(const float* q, const KV* const* k, int64_t hd, float sc) {
  __m256 acc[kKeys];
  for (int64_t j = 0; j < kKeys; ++j) acc[j] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= hd; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    for (int64_t j = 0; j < kKeys; ++j)
      acc[j] = _mm256_fmadd_ps(qv, load8(k[j] + c), acc[j]);
  }
  __m256 s = hsum8(acc);
  if (c < hd) {  // head dims that are not a multiple of 8
    alignas(32) float tail[kKeys];
    for (int64_t j = 0; j < kKeys; ++j) {
      tail[j] = 0.f;
      for (int64_t i = c; i < hd; ++i) tail[j] += q[i] * widen(k[j][i]);
    }
    s = _mm256_add_ps(s, _mm256_load_ps(tail));
  }
  return _mm256_mul_ps(s, _mm256_set1_ps(sc));
}

// The rows of keys [0, len) of one KV head, walked block by block (no division per key).
template <typename KV>
class KeyRows {
 public:
  KeyRows(const KV* cache, const int64_t* table, int64_t bs, int64_t row, int64_t off)
      : cache_(cache), table_(table), bs_(bs), row_(row), off_(off) {}
  // Pointers to the next n keys' rows into out[0..n); out[n..8) repeat the last one.
  void next(int64_t n, const KV** out) {
    for (int64_t j = 0; j < n; ++j) {
      out[j] = cache_ + (table_[b_] * bs_ + o_) * row_ + off_;
      if (++o_ == bs_) o_ = 0, ++b_;
    }
    for (int64_t j = n; j < kKeys; ++j) out[j] = out[n - 1];
  }

 private:
  const KV* cache_;
  const int64_t* table_;
  int64_t bs_, row_, off_, b_ = 0, o_ = 0;
};

// out[0, hd) += sum over t < m of w[t] * v[t][0, hd), t in order: each element takes
// the same fused multiply-adds as m calls of axpy, with out held in registers over
// the m rows instead of loaded and stored for each.
template <typename KV>
inline void add_weighted(float* out, const float* w, const KV* const* v, int64_t m,
                         int64_t hd) {
  int64_t c = 0;
  for (; c + 32 <= hd; c += 32) {
    __m256 a0 = _mm256_loadu_ps(out + c), a1 = _mm256_loadu_ps(out + c + 8);
    __m256 a2 = _mm256_loadu_ps(out + c + 16), a3 = _mm256_loadu_ps(out + c + 24);
    for (int64_t t = 0; t < m; ++t) {
      const __m256 wt = _mm256_set1_ps(w[t]);
      a0 = _mm256_fmadd_ps(wt, load8(v[t] + c), a0);
      a1 = _mm256_fmadd_ps(wt, load8(v[t] + c + 8), a1);
      a2 = _mm256_fmadd_ps(wt, load8(v[t] + c + 16), a2);
      a3 = _mm256_fmadd_ps(wt, load8(v[t] + c + 24), a3);
    }
    _mm256_storeu_ps(out + c, a0);
    _mm256_storeu_ps(out + c + 8, a1);
    _mm256_storeu_ps(out + c + 16, a2);
    _mm256_storeu_ps(out + c + 24, a3);
  }
  for (; c + 8 <= hd; c += 8) {
    __m256 a = _mm256_loadu_ps(out + c);
    for (int64_t t = 0; t < m; ++t)
      a = _mm256_fmadd_ps(_mm256_set1_ps(w[t]), load8(v[t] + c), a);
    _mm256_storeu_ps(out + c, a);
  }
  for (; c < hd; ++c)
    for (int64_t t = 0; t < m; ++t) out[c] += w[t] * widen(v[t][c]);
}

// Attention of query heads [h0, h0 + nh) of R consecutive query rows that share one
// block table (a request's token and its drafts; R = 1 for a plain decode row), all
// in KV head g, row r over keys [0, lens[r]): each key and value row is read once for
// all of them, and each (row, head) is computed exactly as it would be alone.
// p: scratch of R * nh * (the longest len rounded up to 8).
template <typename KV>
void attend_group(const float* qp, int64_t q_row, int64_t R, const int64_t* lens, int64_t H,
                  int64_t hd, int64_t h0, int64_t nh, const KV* kc, const KV* vc, int64_t bs,
                  int64_t kvh, int64_t g, const int64_t* table, float sc, float* op,
                  float* p) {
  const int64_t longest = *std::max_element(lens, lens + R);
  const int64_t stride = (longest + kKeys - 1) / kKeys * kKeys, row = kvh * hd;
  const KV* keys[kKeys];
  KeyRows<KV> walk(kc, table, bs, row, g * hd);
  for (int64_t i = 0; i < longest; i += kKeys) {
    walk.next(std::min(kKeys, longest - i), keys);
    for (int64_t r = 0; r < R; ++r) {
      if (i >= lens[r]) continue;  // lanes past lens[r] are masked below
      for (int64_t j = 0; j < nh; ++j)
        _mm256_storeu_ps(p + (r * nh + j) * stride + i,
                         scores8(qp + r * q_row + (h0 + j) * hd, keys, hd, sc));
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t len = lens[r], end = (len + kKeys - 1) / kKeys * kKeys;
    for (int64_t j = 0; j < nh; ++j) {  // softmax over [0, len) of each head's scores
      float* pj = p + (r * nh + j) * stride;
      for (int64_t i = len; i < end; ++i) pj[i] = -INFINITY;
      __m256 mx = _mm256_set1_ps(-INFINITY);
      for (int64_t i = 0; i < end; i += kKeys) mx = _mm256_max_ps(mx, _mm256_loadu_ps(pj + i));
      alignas(32) float lanes[kKeys];
      _mm256_store_ps(lanes, mx);
      const __m256 m = _mm256_set1_ps(*std::max_element(lanes, lanes + kKeys));
      __m256 sum = _mm256_setzero_ps();
      for (int64_t i = 0; i < end; i += kKeys) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(pj + i), m));
        _mm256_storeu_ps(pj + i, e);
        sum = _mm256_add_ps(sum, e);
      }
      const float inv = 1.f / hsum(sum);
      for (int64_t i = 0; i < len; ++i) pj[i] *= inv;
      float* out = op + (r * H + h0 + j) * hd;
      std::fill(out, out + hd, 0.f);
    }
  }
  KeyRows<KV> values(vc, table, bs, row, g * hd);
  const KV* v[kKeys];
  for (int64_t i = 0; i < longest; i += kKeys) {
    const int64_t n = std::min(kKeys, longest - i);
    values.next(n, v);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t m = std::min(n, lens[r] - i);  // this row's keys in the chunk
      for (int64_t j = 0; m > 0 && j < nh; ++j)
        add_weighted(op + (r * H + h0 + j) * hd, p + (r * nh + j) * stride + i, v, m, hd);
    }
  }
}

template <typename KV>
void paged_decode_attention_t(const float* qp, int64_t q_row, int64_t D, int64_t H,
                              int64_t hd, const KV* kc, const KV* vc, int64_t bs,
                              int64_t kvh, const int64_t* tables, int64_t nb,
                              const int64_t* lens, float sc, float* op) {
  for (int64_t d = 0; d < D; ++d)
    TORCH_CHECK(lens[d] >= 1 && lens[d] <= nb * bs, "seq_len out of range for block table");
  // Groups of consecutive rows with the same block table (a request's token and its
  // drafts) read their keys together.
  std::vector<int64_t> starts;
  int64_t widest = 1;
  for (int64_t d = 0; d < D; ++d)
    if (d == 0 || !std::equal(tables + d * nb, tables + (d + 1) * nb, tables + (d - 1) * nb)) {
      if (!starts.empty()) widest = std::max(widest, d - starts.back());
      starts.push_back(d);
    }
  widest = std::max(widest, D - starts.back());
  starts.push_back(D);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  // A task is (group, KV head): its G query heads share each key read. With too few
  // of those to keep every thread busy (batch 1: 3 KV heads on 2 threads), one task
  // per query head instead.
  const int64_t G = H / kvh;
  const int64_t per = groups * kvh >= 4 * at::get_num_threads() ? G : 1;
  const int64_t tasks = groups * H / per;
  int64_t longest = 0;
  for (int64_t d = 0; d < D; ++d) longest = std::max(longest, lens[d]);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(widest * per * ((longest + kKeys - 1) / kKeys * kKeys));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q = t / (H / per), h0 = t % (H / per) * per;
      const int64_t d = starts[q], R = starts[q + 1] - d;
      attend_group(qp + d * q_row, q_row, R, lens + d, H, hd, h0, per, kc, vc, bs, kvh,
                   h0 / G, tables + d * nb, sc, op + d * H * hd, p.data());
    }
  });
}

}  // namespace

// Query d's head h is at qp + d * q_row + h * hd (q_row: H * hd when packed, wider
// when q is the head of each qkv row); out (D, H, hd); caches (blocks, bs, kvh, hd),
// fp32 or bf16 (uint16_t), widened to fp32 as they are read.
void paged_decode_attention_into(const float* qp, int64_t q_row, int64_t D, int64_t H,
                                 int64_t hd, const float* kc, const float* vc, int64_t bs,
                                 int64_t kvh, const int64_t* tables, int64_t nb,
                                 const int64_t* lens, float sc, float* op) {
  paged_decode_attention_t(qp, q_row, D, H, hd, kc, vc, bs, kvh, tables, nb, lens, sc, op);
}
void paged_decode_attention_into(const float* qp, int64_t q_row, int64_t D, int64_t H,
                                 int64_t hd, const uint16_t* kc, const uint16_t* vc, int64_t bs,
                                 int64_t kvh, const int64_t* tables, int64_t nb,
                                 const int64_t* lens, float sc, float* op) {
  paged_decode_attention_t(qp, q_row, D, H, hd, kc, vc, bs, kvh, tables, nb, lens, sc, op);
}

// gate_up (n, 2I) -> out (n, I) = silu(gate) * up, the SwiGLU of a Llama MLP.
void silu_mul_into(const float* gp, int64_t n, int64_t inter, float* op) {
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gp + r * 2 * inter;
      for (int64_t i = 0; i < inter; ++i)
        op[r * inter + i] = g[i] / (1.f + std::exp(-g[i])) * g[inter + i];
    }
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                       const torch::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(w.numel() == d, "w must have x.size(1) elements");
  const float* dp = nullptr;
  if (delta.has_value()) {
    check_f32(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta must have x's shape");
    dp = delta->data_ptr<float>();
  }
  auto out = torch::empty_like(x);
  rms_norm_into(x.data_ptr<float>(), dp, w.data_ptr<float>(), out.data_ptr<float>(), n, d, eps);
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
  const bool bf16 = check_pool(k_slots, v_slots);
  const int64_t hd = k_slots.size(2);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * hd, "qkv width mismatch");
  const auto into = [&](auto* kp, auto* vp) {
    rope_store_kv_into(qkv.data_ptr<float>(), qkv.size(0), positions.data_ptr<int64_t>(),
                       cos.data_ptr<float>(), sin.data_ptr<float>(), cos.size(0), num_heads,
                       num_kv_heads, hd, kp, vp, slot_mapping.data_ptr<int64_t>());
  };
  if (bf16)
    into(bf16_ptr(k_slots), bf16_ptr(v_slots));
  else
    into(k_slots.data_ptr<float>(), v_slots.data_ptr<float>());
}

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache,
                                     const torch::Tensor& block_tables,
                                     const torch::Tensor& seq_lens, double scale) {
  // q (D, H, hd); caches (blocks, bs, kvh, hd); block_tables (D, nb); seq_lens (D,).
  check_f32(q, "q");
  const bool bf16 = check_pool(k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64");
  const int64_t D = q.size(0), H = q.size(1), hd = q.size(2);
  const int64_t bs = k_cache.size(1), kvh = k_cache.size(2), nb = block_tables.size(1);
  TORCH_CHECK(H % kvh == 0 && k_cache.size(3) == hd, "head shapes mismatch");
  auto out = torch::empty_like(q);
  const auto into = [&](const auto* kc, const auto* vc) {
    paged_decode_attention_into(q.data_ptr<float>(), H * hd, D, H, hd, kc, vc, bs, kvh,
                                block_tables.data_ptr<int64_t>(), nb,
                                seq_lens.data_ptr<int64_t>(), static_cast<float>(scale),
                                out.data_ptr<float>());
  };
  if (bf16)
    into(bf16_ptr(k_cache), bf16_ptr(v_cache));
  else
    into(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  return out;
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({n, inter}, gate_up.options());
  silu_mul_into(gate_up.data_ptr<float>(), n, inter, out.data_ptr<float>());
  return out;
}
