// bf16 CPU kernels for the elementwise ops of a wide step (prefill chunks, batched
// decode on CPUs with native bf16: model.py runs those steps in bf16 end to end).
//
// torch runs each of these as several memory-bound passes over (N, d) bf16 tensors
// (its rms_norm alone is pow, mean, add, rsqrt, mul, mul, a cast); fused, each is one
// pass. Every value is computed as torch computes it: bf16 widened to fp32 (a 16-bit
// shift), fp32 arithmetic, rounded back to bf16 round-to-nearest-even at each point
// where torch rounds (after each op of its decomposition), so results equal torch's up
// to fp32 summation order (rms_norm's mean) and exp's last fp32 bit (silu). AVX2 only
// (__m256), so the file builds at every ISA level.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd_math.h"

namespace {

using pdserve_simd::bf16_bits1;
using pdserve_simd::exp8;
#if defined(__AVX512F__)
using pdserve_simd::exp16;
#endif
using pdserve_simd::hsum;
using pdserve_simd::widen1;
using pdserve_simd::widen8;

// fp32 -> the bf16 bits (in the low 16 of each lane), round-to-nearest-even, NaN ->
// 0x7fc0: c10::round_to_nearest_even, 8 lanes at a time.
inline __m256i bf16_bits8(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

// x rounded to bf16, kept as fp32 (what torch's next op widens it back to).
inline __m256 round8(__m256 x) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(x), 16));
}

inline float round1(float x) { return widen1(bf16_bits1(x)); }

inline void store8(uint16_t* p, __m256 x) {
  const __m256i packed = _mm256_packus_epi32(bf16_bits8(x), _mm256_setzero_si256());
  const __m256i lanes = _mm256_permute4x64_epi64(packed, 0b1000);  // qwords 0 and 2
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(lanes));
}

inline void store8_f32(float* p, __m256 x) { _mm256_storeu_ps(p, x); }

// Rows per task: torch's grain (32K elements) in rows of ``width`` elements, so a step
// of a few dozen rows (batched decode) runs on one thread, as torch's own ops do there,
// instead of paying a thread wake-up for microseconds of work.
inline int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1));
}

}  // namespace

bool check_pool(const torch::Tensor& k, const torch::Tensor& v);  // decode_ops.cpp

namespace {

void check_bf16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 && t.is_contiguous() && t.dim() == 2, name,
              " must be a contiguous 2-d bfloat16 tensor");
}

const uint16_t* bits(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

uint16_t* bits_mut(const torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

}  // namespace

// Row r of x (n, d) bf16: x += delta (if not null; bf16(x + delta) as torch's add),
// then out = bf16(x * rsqrt(mean(x^2) + eps) * w) in fp32 (torch's rms_norm for bf16
// input: upcast, one rounding at the end). w: d fp32 values (already bf16-rounded).
void rms_norm_bf16_into(uint16_t* xp, const uint16_t* dp, const float* w, uint16_t* op,
                        int64_t n, int64_t d, float eps) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* x = xp + r * d;
      const uint16_t* dl = dp == nullptr ? nullptr : dp + r * d;
      __m256 acc = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        __m256 v = widen8(x + i);
        if (dl != nullptr) {
          v = round8(_mm256_add_ps(v, widen8(dl + i)));
          store8(x + i, v);
        }
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum(acc);
      for (; i < d; ++i) {
        float v = widen1(x[i]);
        if (dl != nullptr) x[i] = bf16_bits1(v + widen1(dl[i])), v = widen1(x[i]);
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
      const __m256 iv = _mm256_set1_ps(inv);
      uint16_t* o = op + r * d;
      for (i = 0; i + 8 <= d; i += 8)
        store8(o + i, _mm256_mul_ps(_mm256_mul_ps(widen8(x + i), iv), _mm256_loadu_ps(w + i)));
      for (; i < d; ++i) o[i] = bf16_bits1(widen1(x[i]) * inv * w[i]);
    }
  });
}

torch::Tensor rms_norm_bf16(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                            const torch::Tensor& w, double eps) {
  check_bf16(x, "x");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == d, "w must have x's width");
  // TorchOps takes w.to(bf16): round an fp32 weight to bf16 first, as it does.
  const torch::Tensor wf = w.to(torch::kBFloat16).to(torch::kFloat32).contiguous();
  const uint16_t* dp = nullptr;
  if (delta.has_value()) {
    check_bf16(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta must have x's shape");
    dp = bits(*delta);
  }
  torch::Tensor out = torch::empty_like(x);
  rms_norm_bf16_into(bits_mut(x), dp, wf.data_ptr<float>(), bits_mut(out), n, d,
                     static_cast<float>(eps));
  return out;
}

#if defined(__AVX512F__)
namespace {
// The 16-lane twins of widen8 and bf16_bits8 (exp16 is exp8's, in simd_math.h). AVX-512
// builds: silu's exp and division bound it, not memory, so twice the lanes is nearly
// twice the speed.
inline __m512 widen16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline __m512i bf16_bits16(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7fc0));
}

inline void store16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits16(x)));
}

inline __m512 round16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(x), 16));
}
}  // namespace
#endif

// gate_up (n, 2I) bf16 -> out (n, I) = bf16(bf16(silu(gate)) * up), as torch's
// F.silu(gate) * up in bf16 (silu = x / (1 + exp(-x)) in fp32, rounded, then the mul).
void silu_mul_bf16_into(const uint16_t* gp, uint16_t* op, int64_t n, int64_t inter) {
  at::parallel_for(0, n, grain_rows(2 * inter), [&](int64_t r0, int64_t r1) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* g = gp + r * 2 * inter;
      const uint16_t* u = g + inter;
      uint16_t* o = op + r * inter;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= inter; i += 16) {
        const __m512 x = widen16(g + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        store16(o + i, _mm512_mul_ps(round16(s), widen16(u + i)));
      }
#endif
      for (; i + 8 <= inter; i += 8) {
        const __m256 x = widen8(g + i);
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
        store8(o + i, _mm256_mul_ps(round8(s), widen8(u + i)));
      }
      for (; i < inter; ++i) {
        const float x = widen1(g[i]);
        o[i] = bf16_bits1(round1(x / (1.f + std::exp(-x))) * widen1(u[i]));
      }
    }
  });
}

torch::Tensor silu_mul_bf16(const torch::Tensor& gate_up) {
  check_bf16(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  const int64_t n = gate_up.size(0), inter = gate_up.size(1) / 2;
  torch::Tensor out = torch::empty({n, inter}, gate_up.options());
  silu_mul_bf16_into(bits(gate_up), bits_mut(out), n, inter);
  return out;
}

namespace {

// One head x (hd bf16) rotated in place the "rotate_half" way with bf16 tables c, s
// (hd/2 fp32 values, bf16-rounded), each product, difference and sum rounded to bf16
// as torch's bf16 ops round them (rope.py: x1*c - x2*s, x2*c + x1*s). The rotated head
// is also written widened to fp32 into kp when kp is not null.
void rotate_head(uint16_t* x, const float* c, const float* s, int64_t half, float* kp) {
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 x1 = widen8(x + i), x2 = widen8(x + half + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    const __m256 a = round8(_mm256_sub_ps(round8(_mm256_mul_ps(x1, cv)),
                                          round8(_mm256_mul_ps(x2, sv))));
    const __m256 b = round8(_mm256_add_ps(round8(_mm256_mul_ps(x2, cv)),
                                          round8(_mm256_mul_ps(x1, sv))));
    store8(x + i, a);
    store8(x + half + i, b);
    if (kp != nullptr) store8_f32(kp + i, a), store8_f32(kp + half + i, b);
  }
  for (; i < half; ++i) {
    const float x1 = widen1(x[i]), x2 = widen1(x[half + i]);
    const float a = round1(round1(x1 * c[i]) - round1(x2 * s[i]));
    const float b = round1(round1(x2 * c[i]) + round1(x1 * s[i]));
    x[i] = bf16_bits1(a), x[half + i] = bf16_bits1(b);
    if (kp != nullptr) kp[i] = a, kp[half + i] = b;
  }
}

// qkv (n, (H + 2 kvh) hd) bf16: rotate q|k in place, write k and v into their slots of
// kp/vp (slots, kvh, hd): widened into an fp32 pool, as they are into a bf16 one;
// cos/sin (max_pos, hd/2) fp32 tables, rounded to bf16 here (TorchOps casts them to the
// activations' dtype).
template <typename KV>
void rope_store_kv_bf16_t(uint16_t* base, int64_t n, const int64_t* pos, const float* cos,
                          const float* sin, int64_t num_heads, int64_t num_kv_heads,
                          int64_t hd, KV* kp, KV* vp, const int64_t* slot) {
  constexpr bool kF32 = std::is_same_v<KV, float>;
  const int64_t half = hd / 2, width = (num_heads + 2 * num_kv_heads) * hd;
  const int64_t kv_row = num_kv_heads * hd;
  at::parallel_for(0, n, grain_rows(width), [&](int64_t r0, int64_t r1) {
    std::vector<float> cs(2 * half);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < half; ++i)
        cs[i] = round1(cos[pos[r] * half + i]), cs[half + i] = round1(sin[pos[r] * half + i]);
      uint16_t* row = base + r * width;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        float* k = nullptr;
        if constexpr (kF32)
          if (h >= num_heads) k = kp + slot[r] * kv_row + (h - num_heads) * hd;
        rotate_head(row + h * hd, cs.data(), cs.data() + half, half, k);
      }
      const uint16_t* v = row + (num_heads + num_kv_heads) * hd;
      if constexpr (kF32) {
        float* vo = vp + slot[r] * kv_row;
        int64_t i = 0;
        for (; i + 8 <= kv_row; i += 8) store8_f32(vo + i, widen8(v + i));
        for (; i < kv_row; ++i) vo[i] = widen1(v[i]);
      } else {  // a bf16 pool: the rotated k and the v, bit for bit
        std::memcpy(kp + slot[r] * kv_row, row + num_heads * hd, kv_row * sizeof(uint16_t));
        std::memcpy(vp + slot[r] * kv_row, v, kv_row * sizeof(uint16_t));
      }
    }
  });
}

}  // namespace

void rope_store_kv_bf16(const torch::Tensor& qkv, const torch::Tensor& positions,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t num_heads,
                        int64_t num_kv_heads, const torch::Tensor& k_slots,
                        const torch::Tensor& v_slots, const torch::Tensor& slot_mapping) {
  check_bf16(qkv, "qkv");
  const int64_t n = qkv.size(0), hd = 2 * cos.size(1);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * hd, "qkv width != (H + 2 kvh) hd");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "cos and sin must be contiguous float32");
  const bool bf16_pool = check_pool(k_slots, v_slots);
  TORCH_CHECK(k_slots.numel() == v_slots.numel() && k_slots.size(-1) == hd &&
                  k_slots.numel() % (num_kv_heads * hd) == 0, "KV slots of (slots, kvh, hd)");
  for (const auto* t : {&positions, &slot_mapping})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->numel() == n,
                "positions and slot_mapping: (N,) int64");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  const int64_t slots = k_slots.numel() / (num_kv_heads * hd);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(pos[r] >= 0 && pos[r] < cos.size(0), "position out of the RoPE table");
    TORCH_CHECK(slot[r] >= 0 && slot[r] < slots, "slot out of the KV pool");
  }
  const auto into = [&](auto* kp, auto* vp) {
    rope_store_kv_bf16_t(bits_mut(qkv), n, pos, cos.data_ptr<float>(), sin.data_ptr<float>(),
                         num_heads, num_kv_heads, hd, kp, vp, slot);
  };
  if (bf16_pool)
    into(bits_mut(k_slots), bits_mut(v_slots));
  else
    into(k_slots.data_ptr<float>(), v_slots.data_ptr<float>());
}
