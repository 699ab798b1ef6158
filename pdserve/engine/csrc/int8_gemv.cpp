// y = (x · qᵀ) * scale for fp32 activations x (M, K), int8 weights q (N, K) with one
// fp32 scale per output channel (symmetric: w ≈ q * scale), fp32 out (M, N).
//
// Decode steps are bound by reading the weights: int8 reads a quarter of fp32's bytes
// and half of bf16's. Activations stay exact fp32 (no activation quantization, so the
// result equals an fp32 matmul on the dequantized weights up to summation order):
// each 8-lane int8 load is widened int8 -> int32 -> fp32 in registers and FMA'd with
// x; the scale is applied once per output, after the sum.
//
// Weights come packed by pdserve/engine/linear.py's ``pack_int8``: (ceil(N / 6),
// K / 16, 6, 16) int8 (rows and K zero-padded), the layout of bf16_gemv.cpp's packed
// kernel: the 6 rows one inner block reads are interleaved 16 values at a time, so a
// thread streams one sequential run of memory.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kRows = 6;  // weight rows per packed block
constexpr int64_t kChunk = 16;  // K values of one row stored together

inline __m256 load_int8x8(const int8_t* p) {
  // vpmovsxbd with a memory operand: one load + one shuffle, then one convert.
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One packed block (6 weight rows) against one activation row: 12 accumulators,
// two per row (even and odd 8-lane halves), so the FMA chains hide their latency.
void block_row(const float* x, const int8_t* wb, const float* scale, float* y, int64_t chunks,
               int64_t rows) {
  __m256 acc0[kRows], acc1[kRows];
  for (int64_t r = 0; r < kRows; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256 x0 = _mm256_loadu_ps(x + c * kChunk), x1 = _mm256_loadu_ps(x + c * kChunk + 8);
    const int8_t* wc = wb + c * kRows * kChunk;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * kRows * kChunk), _MM_HINT_T0);
    for (int64_t r = 0; r < kRows; ++r) {
      acc0[r] = _mm256_fmadd_ps(load_int8x8(wc + r * kChunk), x0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(load_int8x8(wc + r * kChunk + 8), x1, acc1[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) y[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) * scale[r];
}

// Half a block (3 rows from ``r0``) against MT activation rows: each widened weight
// vector (the widening is the batch-1 loop's bottleneck after memory) feeds MT FMAs.
// MT = 4: 12 accumulators + 3 w + 1 x registers, AVX2's 16 without spilling.
template <int MT>
void half_block_rows(const float* x, int64_t K, const int8_t* wb, const float* scale, float* y,
                     int64_t N, int64_t chunks, int64_t r0, int64_t rows) {
  constexpr int64_t R = kRows / 2;
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* wc = wb + c * kRows * kChunk + r0 * kChunk;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * kRows * kChunk), _MM_HINT_T0);
    for (int64_t half = 0; half < kChunk; half += 8) {
      __m256 w[R];
      for (int64_t r = 0; r < R; ++r) w[r] = load_int8x8(wc + r * kChunk + half);
      for (int m = 0; m < MT; ++m) {
        const __m256 xm = _mm256_loadu_ps(x + m * K + c * kChunk + half);
        for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(w[r], xm, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int64_t r = r0; r < std::min(rows, r0 + R); ++r)
      y[m * N + r] = hsum(acc[m][r - r0]) * scale[r];
}

template <int MT>
void block_rows(const float* x, int64_t K, const int8_t* wb, const float* scale, float* y,
                int64_t N, int64_t chunks, int64_t rows) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows / 2)
    half_block_rows<MT>(x, K, wb, scale, y, N, chunks, r0, rows);
}

}  // namespace

torch::Tensor linear_int8w_packed(const torch::Tensor& x, const torch::Tensor& packed,
                                  const torch::Tensor& scales, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x (M, K) float32 expected");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kInt8 &&
                  packed.size(2) == kRows && packed.size(3) == kChunk && packed.is_contiguous(),
              "packed int8 weight expected (see pdserve/engine/linear.py pack_int8)");
  TORCH_CHECK(packed.size(0) * kRows >= N && N > (packed.size(0) - 1) * kRows, "N mismatch");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N &&
                  scales.scalar_type() == torch::kFloat32 && scales.is_contiguous(),
              "scales (N,) float32 expected");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), chunks = packed.size(1);
  TORCH_CHECK(chunks * kChunk == K, "K mismatch (x must be zero-padded to the packed K)");
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Blocks outermost: a block (6 x K bytes) is read from memory once and stays in L1
  // while every activation row passes over it.
  at::parallel_for(0, packed.size(0), 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* wb = wp + b * chunks * kRows * kChunk;
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      const float* x = xp;
      const float* s = sp + n0;
      float* y = yp + n0;
      int64_t m = M;
      for (; m >= 4; m -= 4, x += 4 * K, y += 4 * N) block_rows<4>(x, K, wb, s, y, N, chunks, rows);
      if (m == 3) block_rows<3>(x, K, wb, s, y, N, chunks, rows);
      if (m == 2) block_rows<2>(x, K, wb, s, y, N, chunks, rows);
      if (m == 1) block_row(x, wb, s, y, chunks, rows);
    }
  });
  return y;
}
