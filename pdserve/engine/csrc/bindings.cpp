// One extension module for pdserve's CPU kernels (built by pdserve/engine/cpu_kernels.py).
#include <torch/extension.h>

torch::Tensor linear_bf16w(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor pack_bf16_weight(const torch::Tensor& w);
torch::Tensor linear_bf16w_packed(const torch::Tensor& x, const torch::Tensor& packed, int64_t N);
torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                       const torch::Tensor& w, double eps);
void rope_store_kv(const torch::Tensor& qkv, const torch::Tensor& positions,
                   const torch::Tensor& cos, const torch::Tensor& sin, int64_t num_heads,
                   int64_t num_kv_heads, const torch::Tensor& k_slots,
                   const torch::Tensor& v_slots, const torch::Tensor& slot_mapping);
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache,
                                     const torch::Tensor& block_tables,
                                     const torch::Tensor& seq_lens, double scale);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor linear_int8w_packed(const torch::Tensor& x, const torch::Tensor& packed,
                                  const torch::Tensor& scales, int64_t N, double unscale);
torch::Tensor causal_attention_bf16(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, double scale);
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                            const torch::Tensor& w, double eps);
torch::Tensor silu_mul_bf16(const torch::Tensor& gate_up);
void rope_store_kv_bf16(const torch::Tensor& qkv, const torch::Tensor& positions,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t num_heads,
                        int64_t num_kv_heads, const torch::Tensor& k_slots,
                        const torch::Tensor& v_slots, const torch::Tensor& slot_mapping);
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
                  const std::vector<torch::Tensor>& scales, const std::vector<double>& unscale);

// The instruction set this module was compiled for (cpu_kernels.py records it too,
// and refuses to import a module the running CPU cannot execute).
std::string compiled_isa() {
#if defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(__AVX512F__)
  return "avx512";
#else
  return "avx2";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Kernels touch no Python object: let other threads (the worker's event loop, its
  // health answers) run while one computes, as torch's own ops do.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear_bf16w", &linear_bf16w, nogil, "fp32 x times bf16 weight (transposed), fp32 out");
  m.def("pack_bf16_weight", &pack_bf16_weight, nogil, "bf16 (N, K) -> the packed layout");
  m.def("linear_bf16w_packed", &linear_bf16w_packed, nogil, "fp32 x times a packed bf16 weight");
  m.def("rms_norm", &rms_norm, nogil, "x += delta (in place, if given); return rms_norm(x) * w");
  m.def("rope_store_kv", &rope_store_kv, nogil, "rotate q|k of qkv in place, store k and v in slots");
  m.def("paged_decode_attention", &paged_decode_attention, nogil,
        "one query token per request against its paged K/V");
  m.def("silu_mul", &silu_mul, nogil, "silu(gate) * up of a fused (N, 2I) gate|up output");
  m.def("compiled_isa", &compiled_isa, "the ISA level this module was built for");
  m.def("decode_layer", &decode_layer, nogil, "one decoder layer for the decode rows of a step");
  m.def("causal_attention_bf16", &causal_attention_bf16, nogil,
        "bf16 causal self-attention of a first prefill chunk (AVX-512 BF16 builds only)");
  m.def("rms_norm_bf16", &rms_norm_bf16, nogil,
        "bf16 x += delta (in place, if given); return rms_norm(x) * w in bf16");
  m.def("silu_mul_bf16", &silu_mul_bf16, nogil, "bf16 silu(gate) * up of a fused (N, 2I) gate|up");
  m.def("rope_store_kv_bf16", &rope_store_kv_bf16, nogil,
        "rotate q|k of a bf16 qkv in place, store k and v in fp32 slots");
  m.def("linear_int8w_packed", &linear_int8w_packed, nogil,
        "fp32 x times a packed int8 weight with fp16 scales and zeros per group of 32");
}
