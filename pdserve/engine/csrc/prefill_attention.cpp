// Causal self-attention of one prefill chunk with no context before it, bf16 in and
// out, on AVX-512 BF16 dot products (the prompt's first chunk: W3, every W1 prompt).
//
// torch's tiled CPU attention runs this at ~130 GFLOP/s on a 2-core AVX-512 BF16
// EPYC (half of a 2,048-token prefill). Here both products run as dot products of
// bf16 pairs with fp32 accumulation, the GEMM micro-kernel way:
//   S (4 rows x 16 keys) = Q · Kᵀ : K packed per 16 keys as (D/2, 16, 2), each pair
//                                   of a query row broadcast;
//   online softmax per row in fp32 (exp by range reduction + polynomial + scalef);
//   O (4 rows x D) += P · V       : V packed per key pair as (D, 2), P rounded to bf16
//                                   pairs (as flash attention does in bf16).
// Nothing of size L x L is built. GQA: query head h reads KV head h / (H / kvh).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

constexpr int kKeys = 16;  // keys per block: one zmm of fp32 scores per query row
constexpr int kRows = 4;   // query rows per micro-kernel

inline __m512 exp512(__m512 x) {
  // e^x = 2^n * e^r, n = round(x log2 e), |r| <= ln2 / 2; degree-6 polynomial for e^r.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// K (L, kvh, D) with row stride -> per KV head, per block of 16 keys: (D/2, 16, 2).
std::vector<uint16_t> pack_keys(const uint16_t* k, int64_t stride, int64_t L, int64_t kvh,
                                int64_t D, int64_t blocks) {
  std::vector<uint16_t> out(kvh * blocks * D * kKeys, 0);
  for (int64_t g = 0; g < kvh; ++g)
    for (int64_t j = 0; j < L; ++j) {
      const uint16_t* row = k + j * stride + g * D;
      uint16_t* dst = out.data() + ((g * blocks + j / kKeys) * D) * kKeys + (j % kKeys) * 2;
      for (int64_t p = 0; p < D / 2; ++p) {
        dst[p * kKeys * 2] = row[2 * p];
        dst[p * kKeys * 2 + 1] = row[2 * p + 1];
      }
    }
  return out;
}

// V (L, kvh, D) -> per KV head, per key pair: (D, 2).
std::vector<uint16_t> pack_values(const uint16_t* v, int64_t stride, int64_t L, int64_t kvh,
                                  int64_t D, int64_t blocks) {
  const int64_t pairs = blocks * kKeys / 2;
  std::vector<uint16_t> out(kvh * pairs * D * 2, 0);
  for (int64_t g = 0; g < kvh; ++g)
    for (int64_t j = 0; j < L; ++j) {
      const uint16_t* row = v + j * stride + g * D;
      uint16_t* dst = out.data() + (g * pairs + j / 2) * D * 2 + (j % 2);
      for (int64_t d = 0; d < D; ++d) dst[2 * d] = row[d];
    }
  return out;
}

// Query rows [r0, r0 + rows) of head h against keys [0, r + 1) each (D == 64).
void rows_block(const uint16_t* q, int64_t q_stride, int64_t h, int64_t r0, int rows,
                const uint16_t* kp, const uint16_t* vp, float scale, uint16_t* out,
                int64_t H) {
  constexpr int D = 64, kPairs = D / 2, kOut = D / 16;
  __m512 o[kRows][kOut];
  float m[kRows], l[kRows];
  uint32_t qp[kRows][kPairs];
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int c = 0; c < kOut; ++c) o[r][c] = _mm512_setzero_ps();
    const uint16_t* qr = q + (r0 + std::min(r, rows - 1)) * q_stride + h * D;
    for (int p = 0; p < kPairs; ++p) qp[r][p] = pair_at(qr + 2 * p);
  }
  const int64_t last = r0 + rows - 1, blocks = last / kKeys + 1;
  alignas(64) uint16_t pb[kRows][kKeys];
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 s[kRows];
    for (int r = 0; r < kRows; ++r) s[r] = _mm512_setzero_ps();
    const uint16_t* kb = kp + b * D * kKeys;
    for (int p = 0; p < kPairs; ++p) {
      const __m512bh kv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(kb + p * kKeys * 2));
      for (int r = 0; r < kRows; ++r)
        s[r] = _mm512_dpbf16_ps(s[r], kv,
                                reinterpret_cast<__m512bh>(_mm512_set1_epi32(qp[r][p])));
    }
    const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b * kKeys)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                           11, 12, 13, 14, 15));
    for (int r = 0; r < kRows; ++r) {
      const __mmask16 seen = _mm512_cmple_epi32_mask(
          key, _mm512_set1_epi32(static_cast<int>(r0 + std::min(r, rows - 1))));
      const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), seen,
                                          _mm512_mul_ps(s[r], _mm512_set1_ps(scale)));
      const float mx = std::max(m[r], _mm512_reduce_max_ps(x));
      const float corr = std::exp(m[r] - mx);  // 0 on the first block (m = -inf)
      const __m512 pr = _mm512_maskz_mov_ps(seen, exp512(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
      l[r] = l[r] * corr + _mm512_reduce_add_ps(pr);
      m[r] = mx;
      const __m512 cv = _mm512_set1_ps(corr);
      for (int c = 0; c < kOut; ++c) o[r][c] = _mm512_mul_ps(o[r][c], cv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pb[r]),
                         reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(pr)));
    }
    const uint16_t* vb = vp + b * (kKeys / 2) * D * 2;
    for (int jp = 0; jp < kKeys / 2; ++jp) {
      __m512bh vv[kOut];
      for (int c = 0; c < kOut; ++c)
        vv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(vb + (jp * D + c * 16) * 2));
      for (int r = 0; r < kRows; ++r) {
        const __m512bh pv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair_at(pb[r] + 2 * jp)));
        for (int c = 0; c < kOut; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], vv[c], pv);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    uint16_t* dst = out + ((r0 + r) * H + h) * D;
    for (int c = 0; c < kOut; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * 16),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][c], inv))));
  }
}

}  // namespace
#endif  // __AVX512BF16__

// q (L, H, 64), k and v (L, kvh, 64) bf16, dims 1 and 2 contiguous (any row stride):
// query i attends to keys 0..i. Returns (L, H * 64) bf16.
torch::Tensor causal_attention_bf16(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v (L, heads, D) expected");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
              v.scalar_type() == torch::kBFloat16, "bf16 q, k, v expected");
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2), kvh = k.size(1);
  TORCH_CHECK(D == 64 && k.size(2) == 64 && v.size(2) == 64, "head dim 64 expected");
  TORCH_CHECK(k.size(0) == L && v.size(0) == L && v.size(1) == kvh && H % kvh == 0,
              "k and v: one row per query, H a multiple of the KV heads");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == D, "heads and dims must be contiguous");
  auto out = torch::empty({L, H * D}, q.options());
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const int64_t blocks = (L + kKeys - 1) / kKeys;
  const auto kp = pack_keys(reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>()),
                            k.stride(0), L, kvh, D, blocks);
  const auto vp = pack_values(reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>()),
                              v.stride(0), L, kvh, D, blocks);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t row_blocks = (L + kRows - 1) / kRows, group = H / kvh;
  // Work items (head, row block). Causal rows grow in cost and parallel_for hands each
  // thread one contiguous range, so row blocks alternate last / first: every range
  // holds long and short ones alike.
  at::parallel_for(0, H * row_blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H, h = i % H, g = h / group;
      const int64_t rb = t % 2 ? t / 2 : row_blocks - 1 - t / 2;
      const int64_t r0 = rb * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, L - r0));
      rows_block(qp, q.stride(0), h, r0, rows, kp.data() + g * blocks * D * kKeys,
                 vp.data() + g * blocks * (kKeys / 2) * D * 2, static_cast<float>(scale), op, H);
    }
  });
#else
  TORCH_CHECK(false, "causal_attention_bf16 needs AVX-512 BF16");
#endif
  return out;
}
