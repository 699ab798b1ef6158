// One decoder layer for the D decode rows of a step, in one native call.
//
// At batch 1 a layer is ~10 kernel calls and ~40 torch view/alloc ops from Python,
// each costing microseconds of dispatch; here the whole layer runs in C++ on
// preallocated scratch, calling the same inner loops as the per-op kernels
// (bf16_gemv.cpp, decode_ops.cpp), so it gives the same numbers as the per-op path:
//   h = rms_norm(x) -> qkv = h Wqkv -> RoPE(q, k), k/v into their slots
//   -> attn = paged attention(q) -> x += attn Wo ; h = rms_norm(x)
//   -> gate_up = h Wgu -> act = silu(gate) * up -> x += act Wdown
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>

// The raw-pointer loops of the per-op kernels.
void linear_bf16w_packed_into(const float* xp, int64_t M, int64_t K, const uint16_t* wp,
                              int64_t blocks, int64_t N, float* yp);
void rms_norm_into(float* xp, const float* dp, const float* wp, float* op, int64_t n,
                   int64_t d, double eps);
// Each for an fp32 pool (float*) and a bf16 one (uint16_t*).
void rope_store_kv_into(float* base, int64_t n, const int64_t* pos, const float* cos,
                        const float* sin, int64_t max_pos, int64_t num_heads,
                        int64_t num_kv_heads, int64_t hd, float* kp, float* vp,
                        const int64_t* slot);
void rope_store_kv_into(float* base, int64_t n, const int64_t* pos, const float* cos,
                        const float* sin, int64_t max_pos, int64_t num_heads,
                        int64_t num_kv_heads, int64_t hd, uint16_t* kp, uint16_t* vp,
                        const int64_t* slot);
void paged_decode_attention_into(const float* qp, int64_t q_row, int64_t D, int64_t H,
                                 int64_t hd, const float* kc, const float* vc, int64_t bs,
                                 int64_t kvh, const int64_t* tables, int64_t nb,
                                 const int64_t* lens, float sc, float* op);
void paged_decode_attention_into(const float* qp, int64_t q_row, int64_t D, int64_t H,
                                 int64_t hd, const uint16_t* kc, const uint16_t* vc,
                                 int64_t bs, int64_t kvh, const int64_t* tables, int64_t nb,
                                 const int64_t* lens, float sc, float* op);
bool check_pool(const torch::Tensor& k, const torch::Tensor& v);
uint16_t* bf16_ptr(const torch::Tensor& t);
void silu_mul_into(const float* gp, int64_t n, int64_t inter, float* op);
void check_int8_linear(const torch::Tensor& x, const torch::Tensor& packed,
                       const torch::Tensor& scales, int64_t N);
void linear_int8w_packed_into(const float* xp, int64_t M, int64_t K, const int8_t* wp,
                              const uint16_t* sp, int64_t blocks, int64_t N, float us,
                              float* yp);

namespace {

float* f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 tensor");
  return t.data_ptr<float>();
}

const int64_t* i64(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.is_contiguous(), name,
              " must be a contiguous int64 tensor");
  return t.data_ptr<int64_t>();
}

// One linear's weight as the call takes it: packed bf16 (see pack_bf16_weight), fp32
// (N, K), or packed int8 with its fp16 scales and zeros and the 2^-shift ``unscale``
// (see pdserve/engine/int8_linear.py).
struct Weight {
  const torch::Tensor& w;
  const torch::Tensor& scales;  // int8 only (empty otherwise)
  double unscale;
};

// y (M, N) = x (M, K) · wᵀ.
void linear_into(const torch::Tensor& x, const Weight& weight, const torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const torch::Tensor& w = weight.w;
  if (w.scalar_type() == torch::kChar) {
    check_int8_linear(x, w, weight.scales, N);
    linear_int8w_packed_into(f32(x, "x"), M, K, w.data_ptr<int8_t>(),
                             reinterpret_cast<const uint16_t*>(weight.scales.data_ptr<at::Half>()),
                             w.size(0), N, static_cast<float>(weight.unscale), f32(y, "y"));
  } else if (w.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(w.dim() == 4 && w.size(1) * 16 == K && w.size(0) * w.size(2) >= N,
                "packed bf16 weight does not fit");
    linear_bf16w_packed_into(f32(x, "x"), M, K,
                             reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                             w.size(0), N, f32(y, "y"));
  } else {
    // The GEMM F.linear runs on fp32 weights: fp32 models match the per-op path exactly.
    TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == K, "fp32 weight shape");
    auto out = y;
    at::mm_out(out, x, w.t());
  }
}

}  // namespace

// x (D, d): the residual stream, updated in place. Scratch (each D rows): h (d),
// qkv ((H + 2 kvh) hd), attn (H hd), gate_up (2I), act (I), tmp (d).
void decode_layer(const torch::Tensor& x, const torch::Tensor& h, const torch::Tensor& qkv,
                  const torch::Tensor& attn, const torch::Tensor& gate_up,
                  const torch::Tensor& act, const torch::Tensor& tmp,
                  const torch::Tensor& in_norm, const torch::Tensor& qkv_w,
                  const torch::Tensor& o_w, const torch::Tensor& post_norm,
                  const torch::Tensor& gate_up_w, const torch::Tensor& down_w,
                  const torch::Tensor& positions, const torch::Tensor& cos,
                  const torch::Tensor& sin, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& slot_mapping,
                  const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                  int64_t num_heads, double eps, double scale,
                  const std::vector<torch::Tensor>& scales, const std::vector<double>& unscale) {
  const int64_t D = x.size(0), d = x.size(1);
  const int64_t bs = k_cache.size(1), kvh = k_cache.size(2), hd = k_cache.size(3);
  const int64_t width = (num_heads + 2 * kvh) * hd, nb = block_tables.size(1);
  TORCH_CHECK(qkv.size(0) == D && qkv.size(1) == width, "qkv scratch shape");
  TORCH_CHECK(attn.size(1) == num_heads * hd && tmp.size(1) == d && h.size(1) == d,
              "scratch shapes");
  TORCH_CHECK(block_tables.size(0) == D && seq_lens.size(0) == D && positions.size(0) == D &&
              slot_mapping.size(0) == D, "one position, slot, block table and length per row");
  TORCH_CHECK(num_heads % kvh == 0 && cos.size(1) * 2 == hd, "head shapes");
  TORCH_CHECK(scales.size() == 4 && unscale.size() == 4,
              "scales and unscale: one per linear (qkv, o, gate_up, down)");
  const Weight wqkv{qkv_w, scales[0], unscale[0]}, wo{o_w, scales[1], unscale[1]};
  const Weight wgu{gate_up_w, scales[2], unscale[2]}, wdown{down_w, scales[3], unscale[3]};
  float* xp = f32(x, "x");

  rms_norm_into(xp, nullptr, f32(in_norm, "in_norm"), f32(h, "h"), D, d, eps);
  linear_into(h, wqkv, qkv);
  const auto rope_attend = [&](auto* kc, auto* vc) {
    rope_store_kv_into(f32(qkv, "qkv"), D, i64(positions, "positions"), f32(cos, "cos"),
                       f32(sin, "sin"), cos.size(0), num_heads, kvh, hd, kc, vc,
                       i64(slot_mapping, "slot_mapping"));
    paged_decode_attention_into(qkv.data_ptr<float>(), width, D, num_heads, hd, kc, vc, bs,
                                kvh, i64(block_tables, "block_tables"), nb,
                                i64(seq_lens, "seq_lens"), static_cast<float>(scale),
                                f32(attn, "attn"));
  };
  if (check_pool(k_cache, v_cache))
    rope_attend(bf16_ptr(k_cache), bf16_ptr(v_cache));
  else
    rope_attend(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  linear_into(attn, wo, tmp);
  rms_norm_into(xp, f32(tmp, "tmp"), f32(post_norm, "post_norm"), h.data_ptr<float>(), D, d,
                eps);
  linear_into(h, wgu, gate_up);
  silu_mul_into(f32(gate_up, "gate_up"), D, act.size(1), f32(act, "act"));
  linear_into(act, wdown, tmp);
  const float* dp = tmp.data_ptr<float>();
  for (int64_t i = 0; i < D * d; ++i) xp[i] += dp[i];
}
