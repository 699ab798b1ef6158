// y = x · wᵀ for fp32 activations x (M, K) and int8 weights with an fp16 scale s and
// zero z per (row, group of 32 inputs): w = (s * q + z) * unscale (see
// pdserve/engine/int8_linear.py), fp32 out (M, N).
//
// Decode steps are bound by reading the weights: 1.125 bytes a weight (int8 plus two
// fp16 per 32), against bf16's 2. Activations stay exact fp32 (the result equals an
// fp32 matmul on the dequantized weights up to summation order):
//  - one activation row (decode at batch 1): per group, an fp32 dot of the widened int8
//    values with x, times s, plus z times the group's sum of x (summed once per call);
//  - 2-4 rows: each widened int8 vector is dequantized once in registers (s * q + z)
//    and feeds one FMA per activation row.
//
// Weights come packed (int8_linear.py ``pack_int8``): (ceil(N / 6), K / 16, 6, 16),
// the 6 rows an inner block reads interleaved 16 values at a time, so a thread streams
// one sequential run of memory; scales beside them (``pack_scales``): (ceil(N / 6),
// K / 32, 12) fp16, per block and group the 6 scales then the 6 zeros. fp16 is widened
// in integer AVX2 (no F16C: the AVX2 level's flags do not name it).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd_math.h"

namespace {

using pdserve_simd::hsum;

constexpr int64_t kRows = 6;    // weight rows per packed block
constexpr int64_t kChunk = 16;  // K values of one row stored together
constexpr int64_t kGroup = 32;  // K values per scale and zero
constexpr int64_t kSz = 2 * kRows;  // fp16 values per (block, group): scales, zeros

inline __m256 load_int8x8(const int8_t* p) {
  // vpmovsxbd with a memory operand: one load + one shuffle, then one convert.
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// 8 fp16 -> fp32, normals and subnormals exact: the fp16 bits moved to fp32's
// exponent/mantissa positions read as 2^-112 times the value.
inline __m256 load_half8(const uint16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16);
  const __m256i mag = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x7fff)), 13);
  const __m256 two112 = _mm256_castsi256_ps(_mm256_set1_epi32(0x77800000));
  return _mm256_or_ps(_mm256_mul_ps(_mm256_castsi256_ps(mag), two112), _mm256_castsi256_ps(sign));
}

// The 6 scales then 6 zeros of one (block, group), widened into sz[0..11].
inline void load_group_sz(const uint16_t* p, float* sz) {
  _mm256_storeu_ps(sz, load_half8(p));
  _mm256_storeu_ps(sz + 4, load_half8(p + 4));  // overlaps 4..7: the same values again
}

#if defined(__AVX512F__)
inline __m512 load_int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// block_row (below) on 16-lane vectors, where the CPU has them: a chunk of a row (16
// int8) is one vector, so a batch-1 step widens half as many vectors and keeps up with
// memory (AMX Xeon, 2 threads: the AVX2 loop streamed 8 GB/s of int8, the bf16
// kernel 14).
void block_row16(const float* x, const float* xs, const int8_t* wb, const uint16_t* szb,
                 float* y, int64_t groups, int64_t rows, float unscale) {
  __m512 acc[kRows];
  float zacc[kRows] = {};
  for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  alignas(32) float sz[kSz];
  for (int64_t g = 0; g < groups; ++g) {
    load_group_sz(szb + g * kSz, sz);
    const __m512 x0 = _mm512_loadu_ps(x + g * kGroup), x1 = _mm512_loadu_ps(x + g * kGroup + 16);
    const int8_t* w0 = wb + g * 2 * kRows * kChunk;  // chunk 2g
    const int8_t* w1 = w0 + kRows * kChunk;          // chunk 2g + 1
    _mm_prefetch(reinterpret_cast<const char*>(w0 + 8 * kRows * kChunk), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + 8 * kRows * kChunk), _MM_HINT_T0);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 p = _mm512_fmadd_ps(load_int8x16(w1 + r * kChunk), x1,
                                       _mm512_mul_ps(load_int8x16(w0 + r * kChunk), x0));
      acc[r] = _mm512_fmadd_ps(p, _mm512_set1_ps(sz[r]), acc[r]);
      zacc[r] += sz[kRows + r] * xs[g];
    }
  }
  for (int64_t r = 0; r < rows; ++r) y[r] = (_mm512_reduce_add_ps(acc[r]) + zacc[r]) * unscale;
}
#endif

// One packed block (6 weight rows) against one activation row. ``xs``: x's sum per
// group. Per group, each row's dot runs in two independent chains (one per chunk).
void block_row(const float* x, const float* xs, const int8_t* wb, const uint16_t* szb,
               float* y, int64_t groups, int64_t rows, float unscale) {
  __m256 acc[kRows];
  float zacc[kRows] = {};
  for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  alignas(32) float sz[kSz];
  for (int64_t g = 0; g < groups; ++g) {
    load_group_sz(szb + g * kSz, sz);
    const float* xg = x + g * kGroup;
    const __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8);
    const __m256 x2 = _mm256_loadu_ps(xg + 16), x3 = _mm256_loadu_ps(xg + 24);
    const int8_t* w0 = wb + g * 2 * kRows * kChunk;  // chunk 2g
    const int8_t* w1 = w0 + kRows * kChunk;          // chunk 2g + 1
    _mm_prefetch(reinterpret_cast<const char*>(w0 + 8 * kRows * kChunk), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + 8 * kRows * kChunk), _MM_HINT_T0);
    for (int64_t r = 0; r < kRows; ++r) {
      __m256 p = _mm256_mul_ps(load_int8x8(w0 + r * kChunk), x0);
      __m256 p1 = _mm256_mul_ps(load_int8x8(w1 + r * kChunk), x2);
      p = _mm256_fmadd_ps(load_int8x8(w0 + r * kChunk + 8), x1, p);
      p1 = _mm256_fmadd_ps(load_int8x8(w1 + r * kChunk + 8), x3, p1);
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(p, p1), _mm256_set1_ps(sz[r]), acc[r]);
      zacc[r] += sz[kRows + r] * xs[g];
    }
  }
  for (int64_t r = 0; r < rows; ++r) y[r] = (hsum(acc[r]) + zacc[r]) * unscale;
}

// Half a block (3 rows from ``r0``) against MT activation rows: each int8 vector is
// widened and dequantized once and feeds MT FMAs. MT = 4: 12 accumulators + 3 w + 1 x
// registers; the scales and zeros are broadcast from L1 as they are needed.
template <int MT>
void half_block_rows(const float* x, int64_t K, const int8_t* wb, const uint16_t* szb, float* y,
                     int64_t N, int64_t groups, int64_t r0, int64_t rows, float unscale) {
  constexpr int64_t R = kRows / 2;
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  alignas(32) float sz[kSz];
  for (int64_t g = 0; g < groups; ++g) {
    load_group_sz(szb + g * kSz, sz);
    for (int64_t c = 2 * g; c < 2 * g + 2; ++c) {
      const int8_t* wc = wb + c * kRows * kChunk + r0 * kChunk;
      _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * kRows * kChunk), _MM_HINT_T0);
      for (int64_t half = 0; half < kChunk; half += 8) {
        __m256 w[R];
        for (int64_t r = 0; r < R; ++r)
          w[r] = _mm256_fmadd_ps(load_int8x8(wc + r * kChunk + half),
                                 _mm256_broadcast_ss(sz + r0 + r),
                                 _mm256_broadcast_ss(sz + kRows + r0 + r));
        for (int m = 0; m < MT; ++m) {
          const __m256 xm = _mm256_loadu_ps(x + m * K + c * kChunk + half);
          for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(w[r], xm, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int64_t r = r0; r < std::min(rows, r0 + R); ++r)
      y[m * N + r] = hsum(acc[m][r - r0]) * unscale;
}

template <int MT>
void block_rows(const float* x, int64_t K, const int8_t* wb, const uint16_t* szb, float* y,
                int64_t N, int64_t groups, int64_t rows, float unscale) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows / 2)
    half_block_rows<MT>(x, K, wb, szb, y, N, groups, r0, rows, unscale);
}

void check_args(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x (M, K) float32 expected");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kInt8 &&
                  packed.size(2) == kRows && packed.size(3) == kChunk && packed.is_contiguous(),
              "packed int8 weight expected (see pdserve/engine/int8_linear.py pack_int8)");
  TORCH_CHECK(packed.size(0) * kRows >= N && N > (packed.size(0) - 1) * kRows, "N mismatch");
  TORCH_CHECK(x.size(1) == packed.size(1) * kChunk && x.size(1) % kGroup == 0, "K mismatch");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == torch::kFloat16 &&
                  scales.size(0) == packed.size(0) && scales.size(1) * kGroup == x.size(1) &&
                  scales.size(2) == kSz && scales.is_contiguous(),
              "packed fp16 scales (blocks, K/32, 12) expected (see pack_scales)");
}

}  // namespace

// The checks of linear_int8w_packed, for callers of the raw form below.
void check_int8_linear(const torch::Tensor& x, const torch::Tensor& packed,
                       const torch::Tensor& scales, int64_t N) {
  check_args(x, packed, scales, N);
}

// y (M, N) = x (M, K) · dequant(w)ᵀ on raw pointers: w packed (blocks, K/16, 6, 16) int8,
// sp its (blocks, K/32, 12) fp16 scales and zeros (decode_layer.cpp calls this too).
void linear_int8w_packed_into(const float* xp, int64_t M, int64_t K, const int8_t* wp,
                              const uint16_t* sp, int64_t blocks, int64_t N, float us,
                              float* yp) {
  const int64_t groups = K / kGroup;
  std::vector<float> xs;  // x's sum per group, for the one-row path (M % 4 == 1)
  if (M % 4 == 1) {
    const float* last = xp + (M - 1) * K;
    xs.resize(groups);
    for (int64_t g = 0; g < groups; ++g) {
      __m256 s = _mm256_add_ps(_mm256_loadu_ps(last + g * kGroup), _mm256_loadu_ps(last + g * kGroup + 8));
      s = _mm256_add_ps(s, _mm256_add_ps(_mm256_loadu_ps(last + g * kGroup + 16),
                                         _mm256_loadu_ps(last + g * kGroup + 24)));
      xs[g] = hsum(s);
    }
  }
  // Blocks outermost: a block (6 x K bytes) is read from memory once and stays in L1
  // while every activation row passes over it.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* wb = wp + b * K * kRows;
      const uint16_t* szb = sp + b * groups * kSz;
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      const float* x = xp;
      float* y = yp + n0;
      int64_t m = M;
      for (; m >= 4; m -= 4, x += 4 * K, y += 4 * N)
        block_rows<4>(x, K, wb, szb, y, N, groups, rows, us);
      if (m == 3) block_rows<3>(x, K, wb, szb, y, N, groups, rows, us);
      if (m == 2) block_rows<2>(x, K, wb, szb, y, N, groups, rows, us);
#if defined(__AVX512F__)
      if (m == 1) block_row16(x, xs.data(), wb, szb, y, groups, rows, us);
#else
      if (m == 1) block_row(x, xs.data(), wb, szb, y, groups, rows, us);
#endif
    }
  });
}

torch::Tensor linear_int8w_packed(const torch::Tensor& x, const torch::Tensor& packed,
                                  const torch::Tensor& scales, int64_t N, double unscale) {
  check_args(x, packed, scales, N);
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto y = torch::empty({M, N}, xc.options());
  linear_int8w_packed_into(xc.data_ptr<float>(), M, K, packed.data_ptr<int8_t>(),
                           reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                           packed.size(0), N, static_cast<float>(unscale), y.data_ptr<float>());
  return y;
}
