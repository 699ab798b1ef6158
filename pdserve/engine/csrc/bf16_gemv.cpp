// y = x · wᵀ for fp32 activations x (M, K) and bf16 weights w (N, K), fp32 out (M, N).
//
// For CPUs without native bf16 (AVX2 only): decode steps are bound by reading the
// weights, so keeping them in bf16 halves the bytes; each 8-lane load is widened
// to fp32 in registers (a bf16 is the top half of an fp32) and accumulated in fp32.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd_math.h"

namespace {

using pdserve_simd::hsum;
using pdserve_simd::widen1;
using pdserve_simd::widen8;

constexpr int64_t kRows = 6;  // weight rows per inner block: 12 accumulators, x reused

void block(const float* x, const uint16_t* w, float* y, int64_t K, int64_t n0, int64_t rows) {
  // Two accumulators per row (even and odd 8-lane steps): 8 independent FMA chains
  // hide the FMA latency; the loop is then bound by memory, not by dependencies.
  __m256 acc0[kRows], acc1[kRows];
  for (int64_t r = 0; r < rows; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* row = w + (n0 + r) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(row + kRows * K), _MM_HINT_T0);
      acc0[r] = _mm256_fmadd_ps(widen8(row), x0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(widen8(row + 8), x1, acc1[r]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    for (int64_t r = 0; r < rows; ++r)
      acc0[r] = _mm256_fmadd_ps(widen8(w + (n0 + r) * K + k), x0, acc0[r]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float s = hsum(_mm256_add_ps(acc0[r], acc1[r]));
    for (int64_t kk = k; kk < K; ++kk) s += x[kk] * widen1(w[(n0 + r) * K + kk]);
    y[n0 + r] = s;
  }
}

}  // namespace

torch::Tensor linear_bf16w(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be float32");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "w must be bfloat16");
  TORCH_CHECK(x.size(1) == w.size(1), "K mismatch");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows;
      const int64_t rows = std::min(kRows, N - n0);
      for (int64_t m = 0; m < M; ++m) block(xp + m * K, wp, yp + m * N, K, n0, rows);
    }
  });
  return y;
}

// Packed layout: (ceil(N / 6), K / 16, 6, 16). The 6 rows one inner block reads are
// interleaved 16 values at a time, so each thread streams one sequential run of
// memory instead of 6 strided rows: the hardware prefetcher keeps up, and a decode
// step's weight reads get closer to the memory bandwidth.
torch::Tensor pack_bf16_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16, "w (N, K) bf16 expected");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 16 == 0, "K must be a multiple of 16");
  const int64_t blocks = (N + kRows - 1) / kRows;
  auto padded = torch::zeros({blocks * kRows, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  // (blocks, 6, K/16, 16) -> (blocks, K/16, 6, 16)
  return padded.view({blocks, kRows, K / 16, 16}).permute({0, 2, 1, 3}).contiguous();
}

namespace {

// One packed block (6 weight rows) against one activation row.
void packed_block_row(const float* x, const uint16_t* wb, float* y, int64_t chunks,
                      int64_t rows) {
  __m256 acc0[kRows], acc1[kRows];
  for (int64_t r = 0; r < kRows; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256 x0 = _mm256_loadu_ps(x + c * 16), x1 = _mm256_loadu_ps(x + c * 16 + 8);
    const uint16_t* wc = wb + c * kRows * 16;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * kRows * 16), _MM_HINT_T0);
    for (int64_t r = 0; r < kRows; ++r) {
      acc0[r] = _mm256_fmadd_ps(widen8(wc + r * 16), x0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(widen8(wc + r * 16 + 8), x1, acc1[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) y[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

// Half a block (3 of its 6 rows, from ``r0``) against MT activation rows: each
// widened weight vector (the batch-1 kernel's bottleneck) feeds MT FMAs, so an extra
// row of a batch costs a fraction of the first. MT = 4: 12 accumulators + 3 w +
// 1 x registers, all of AVX2's 16 without spilling.
template <int MT>
void packed_half_block_rows(const float* x, int64_t K, const uint16_t* wb, float* y, int64_t N,
                            int64_t chunks, int64_t r0, int64_t rows) {
  constexpr int64_t R = kRows / 2;
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint16_t* wc = wb + c * kRows * 16 + r0 * 16;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * kRows * 16), _MM_HINT_T0);
    for (int64_t half = 0; half < 16; half += 8) {
      __m256 w[R];
      for (int64_t r = 0; r < R; ++r) w[r] = widen8(wc + r * 16 + half);
      for (int m = 0; m < MT; ++m) {
        const __m256 xm = _mm256_loadu_ps(x + m * K + c * 16 + half);
        for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(w[r], xm, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int64_t r = r0; r < std::min(rows, r0 + R); ++r) y[m * N + r] = hsum(acc[m][r - r0]);
}

// Activation rows [m, m + MT) against one packed block, three weight rows at a time.
template <int MT>
void packed_block_rows(const float* x, int64_t K, const uint16_t* wb, float* y, int64_t N,
                       int64_t chunks, int64_t rows) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows / 2)
    packed_half_block_rows<MT>(x, K, wb, y, N, chunks, r0, rows);
}

}  // namespace

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
// AVX-512 BF16 path, built only at that ISA level (cpu_kernels.py picks the flags).
//
// _mm512_dpbf16_ps multiplies bf16 pairs exactly and accumulates in fp32, but it
// takes bf16 activations. Rounding x to bf16 would cost ~3 significant digits, so x is
// split into three bf16 parts (x = hi + mid + lo to ~2^-27 relative, "bf16x3") and
// each weight pair meets all three: the result matches the fp32 matmul on the same
// bf16 weights as closely as the AVX2 path does (the self-check and the parity tests
// keep their fp32 tolerances), at 3 dot-product uops per 32 weights instead of
// 2 widens + 2 shifts + 2 FMAs.
namespace {

constexpr int kParts = 3;

inline __m512 widen_bf16x16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// x (M, K) fp32 -> (M, kParts, K) bf16 parts whose sum is x.
std::vector<uint16_t> split_bf16x3(const float* x, int64_t M, int64_t K) {
  std::vector<uint16_t> out(static_cast<size_t>(M * kParts * K));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; k += 16) {
      __m512 rest = _mm512_loadu_ps(x + m * K + k);
      for (int p = 0; p < kParts; ++p) {
        __m256i part = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(rest));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.data() + (m * kParts + p) * K + k),
                            part);
        rest = _mm512_sub_ps(rest, widen_bf16x16(part));
      }
    }
  }
  return out;
}

// Lanes 0-7 hold one row's partial sums, lanes 8-15 the next row's.
inline void store_pair(__m512 acc, float* y, int64_t r, int64_t rows) {
  const __m256 lo = _mm512_castps512_ps256(acc);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  if (r < rows) y[r] = hsum(lo);
  if (r + 1 < rows) y[r + 1] = hsum(hi);
}

// One packed block (6 rows) against MT activation rows. A 512-bit load takes two
// rows' 16 values of a chunk; the activation's 16 values are broadcast to both halves.
template <int MT>
void packed_block_rows_bf16dp(const uint16_t* xs, int64_t K, const uint16_t* wb, float* y,
                              int64_t N, int64_t chunks, int64_t rows) {
  constexpr int kPairs = kRows / 2;
  __m512 acc[MT][kPairs];
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < kPairs; ++p) acc[m][p] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint16_t* wc = wb + c * kRows * 16;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * kRows * 16), _MM_HINT_T0);
    __m512bh w[kPairs];
    for (int p = 0; p < kPairs; ++p)
      w[p] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wc + p * 32));
    for (int m = 0; m < MT; ++m) {
      for (int part = 0; part < kParts; ++part) {
        const uint16_t* xp = xs + (m * kParts + part) * K + c * 16;
        const __m512bh xv = reinterpret_cast<__m512bh>(
            _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp))));
        for (int p = 0; p < kPairs; ++p) acc[m][p] = _mm512_dpbf16_ps(acc[m][p], w[p], xv);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < kPairs; ++p) store_pair(acc[m][p], y + m * N, 2 * p, rows);
}

void linear_packed_bf16dp(const float* xp, int64_t M, int64_t K, const uint16_t* wp,
                          int64_t blocks, float* yp, int64_t N) {
  const std::vector<uint16_t> xs = split_bf16x3(xp, M, K);
  const int64_t chunks = K / 16, stride = kParts * K;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint16_t* wb = wp + b * chunks * kRows * 16;
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      const uint16_t* x = xs.data();
      float* y = yp + n0;
      int64_t m = M;
      for (; m >= 4; m -= 4, x += 4 * stride, y += 4 * N)
        packed_block_rows_bf16dp<4>(x, K, wb, y, N, chunks, rows);
      if (m == 3) packed_block_rows_bf16dp<3>(x, K, wb, y, N, chunks, rows);
      if (m == 2) packed_block_rows_bf16dp<2>(x, K, wb, y, N, chunks, rows);
      if (m == 1) packed_block_rows_bf16dp<1>(x, K, wb, y, N, chunks, rows);
    }
  });
}

}  // namespace
#endif  // __AVX512BF16__

// y (M, N) = x (M, K) · wᵀ for a packed bf16 weight of ``blocks`` blocks; raw pointers
// so that fused C++ callers (decode_layer.cpp) run the very same loops.
void linear_bf16w_packed_into(const float* xp, int64_t M, int64_t K, const uint16_t* wp,
                              int64_t blocks, int64_t N, float* yp) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  linear_packed_bf16dp(xp, M, K, wp, blocks, yp, N);
  return;
#endif
  const int64_t chunks = K / 16;
  // Blocks outermost: a block (6 x K bf16, at most a few KB) is read from memory
  // once and stays in L1 while every activation row passes over it.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint16_t* wb = wp + b * chunks * kRows * 16;
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      const float* x = xp;
      float* y = yp + n0;
      int64_t m = M;
      for (; m >= 4; m -= 4, x += 4 * K, y += 4 * N)
        packed_block_rows<4>(x, K, wb, y, N, chunks, rows);
      if (m == 3) packed_block_rows<3>(x, K, wb, y, N, chunks, rows);
      if (m == 2) packed_block_rows<2>(x, K, wb, y, N, chunks, rows);
      if (m == 1) packed_block_row(x, wb, y, chunks, rows);
    }
  });
}

torch::Tensor linear_bf16w_packed(const torch::Tensor& x, const torch::Tensor& packed,
                                  int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x (M, K) float32 expected");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kRows && packed.size(3) == 16,
              "packed weight expected (see pack_bf16_weight)");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), chunks = packed.size(1);
  TORCH_CHECK(chunks * 16 == K, "K mismatch");
  auto y = torch::empty({M, N}, xc.options());
  linear_bf16w_packed_into(xc.data_ptr<float>(), M, K,
                           reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                           packed.size(0), N, y.data_ptr<float>());
  return y;
}
