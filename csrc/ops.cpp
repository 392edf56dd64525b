// torch.library schemas and CPU bindings of mage_fast's compiled ops (namespace mage_fast).
// Thin: argument checks, dtype/layout normalisation, then the torch-free kernels in csrc/cpu.
// CUDA implementations of the same schemas live in csrc/cuda/ops_cuda.cpp (CUDA builds only).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace mage_fast {
namespace {

cpu::Metric parse_metric(c10::string_view metric) {
  if (metric == "l2") return cpu::Metric::kL2;
  if (metric == "cosine") return cpu::Metric::kCosine;
  TORCH_CHECK(false, "mage_fast::codebook_nn: metric must be 'l2' or 'cosine', got '", std::string(metric), "'");
}

bool is_float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor codebook_nn_cpu(const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric) {
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2 && z.size(1) == codebook.size(1),
              "mage_fast::codebook_nn: expects z (N, D) and codebook (K, D), got ", z.sizes(), " and ",
              codebook.sizes());
  TORCH_CHECK(is_float_type(z) && is_float_type(codebook), "mage_fast::codebook_nn: float32/float16/bfloat16 only, got ",
              z.scalar_type(), " and ", codebook.scalar_type());
  TORCH_CHECK(codebook.size(0) > 0 && codebook.size(0) < (int64_t{1} << 31),
              "mage_fast::codebook_nn: codebook size must be in [1, 2^31), got ", codebook.size(0));
  const cpu::Metric m = parse_metric(metric);
  // precision raised: fp16/bf16 inputs are converted to fp32, accumulation is fp32
  const at::Tensor zf = z.to(at::kFloat).contiguous();          // (N, D)
  const at::Tensor cf = codebook.to(at::kFloat).contiguous();   // (K, D)
  at::Tensor out = at::empty({z.size(0)}, z.options().dtype(at::kLong));  // (N,)
  cpu::codebook_nn(zf.data_ptr<float>(), cf.data_ptr<float>(), zf.size(0), cf.size(0), zf.size(1), m,
                   out.data_ptr<int64_t>(), at::get_num_threads());
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_step_cpu(const at::Tensor& logits, const at::Tensor& ids,
                                                   const at::Tensor& key, int64_t step, int64_t mask_len,
                                                   double noise_scale, int64_t mask_id) {
  TORCH_CHECK(logits.dim() == 3, "mage_fast::decode_step: logits must be (B, N, C), got ", logits.sizes());
  const int64_t B = logits.size(0), N = logits.size(1), C = logits.size(2);
  TORCH_CHECK(ids.sizes() == at::IntArrayRef({B, N}) && ids.scalar_type() == at::kLong,
              "mage_fast::decode_step: ids must be int64 (B, N) = (", B, ", ", N, "), got ", ids.scalar_type(), " ",
              ids.sizes());
  TORCH_CHECK(key.sizes() == at::IntArrayRef({B}) && key.scalar_type() == at::kLong,
              "mage_fast::decode_step: key must be int64 (B,), got ", key.scalar_type(), " ", key.sizes());
  TORCH_CHECK(is_float_type(logits), "mage_fast::decode_step: float logits only, got ", logits.scalar_type());
  TORCH_CHECK(C > 0, "mage_fast::decode_step: no classes (C = 0)");
  TORCH_CHECK(0 <= mask_len && mask_len <= N, "mage_fast::decode_step: mask_len must be in [0, N], got ", mask_len);
  // precision raised: sampling and log-softmax in fp32; a strided view is read in place when the
  // class dimension is contiguous
  at::Tensor lf = logits.to(at::kFloat);  // (B, N, C)
  if (lf.stride(2) != 1) lf = lf.contiguous();
  const at::Tensor idc = ids.contiguous(), keyc = key.contiguous();
  at::Tensor sampled = at::empty({B, N}, ids.options());   // (B, N)
  at::Tensor next_ids = at::empty({B, N}, ids.options());  // (B, N)
  cpu::decode_step(lf.data_ptr<float>(), lf.stride(0), lf.stride(1), idc.data_ptr<int64_t>(), keyc.data_ptr<int64_t>(),
                   B, N, C, step, mask_len, static_cast<float>(noise_scale), mask_id, sampled.data_ptr<int64_t>(),
                   next_ids.data_ptr<int64_t>(), at::get_num_threads());
  return {sampled, next_ids};
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK(x.dim() == 3 && index.dim() == 2 && index.size(0) == x.size(0),
              "mage_fast::gather_tokens: expects x (B, L, D) and index (B, K), got ", x.sizes(), " and ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "mage_fast::gather_tokens: index must be int64, got ",
              index.scalar_type());
  const at::Tensor xc = x.contiguous(), ic = index.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options());  // (B, K, D)
  const int64_t bad = cpu::gather_rows(xc.data_ptr(), ic.data_ptr<int64_t>(), B, L, K, D * x.element_size(),
                                       out.data_ptr(), at::get_num_threads());
  TORCH_CHECK(bad == 0, "mage_fast::gather_tokens: ", bad, " indices outside [0, ", L, ")");
  return out;
}

at::Tensor scatter_tokens_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& all_mask,
                              const at::Tensor& pos_embed) {
  TORCH_CHECK(x.dim() == 3 && index.dim() == 2 && all_mask.dim() == 2 && pos_embed.dim() == 3,
              "mage_fast::scatter_tokens: expects x (B, K, D), index (B, K), all_mask (B, L), pos_embed (1, L, D)");
  const int64_t B = x.size(0), K = x.size(1), D = x.size(2), L = all_mask.size(1);
  TORCH_CHECK(index.size(0) == B && index.size(1) == K && all_mask.size(0) == B,
              "mage_fast::scatter_tokens: batch/keep sizes disagree: x ", x.sizes(), ", index ", index.sizes(),
              ", all_mask ", all_mask.sizes());
  TORCH_CHECK(pos_embed.size(0) == 1 && pos_embed.size(1) == L && pos_embed.size(2) == D,
              "mage_fast::scatter_tokens: pos_embed must be (1, ", L, ", ", D, "), got ", pos_embed.sizes());
  TORCH_CHECK(K > 0, "mage_fast::scatter_tokens: x needs the class slot (K >= 1)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && pos_embed.scalar_type() == at::kFloat,
              "mage_fast::scatter_tokens: float32 x and pos_embed only, got ", x.scalar_type(), " and ",
              pos_embed.scalar_type());
  TORCH_CHECK(index.scalar_type() == at::kLong && all_mask.scalar_type() == at::kBool,
              "mage_fast::scatter_tokens: index must be int64 and all_mask bool, got ", index.scalar_type(), " and ",
              all_mask.scalar_type());
  const at::Tensor xc = x.contiguous(), ic = index.contiguous(), mc = all_mask.contiguous(),
                   pc = pos_embed.contiguous();
  at::Tensor out = at::empty({B, L, D}, x.options());  // (B, L, D)
  const int64_t bad = cpu::scatter_tokens(xc.data_ptr<float>(), ic.data_ptr<int64_t>(), mc.data_ptr<bool>(),
                                          pc.data_ptr<float>(), B, K, L, D, out.data_ptr<float>(),
                                          at::get_num_threads());
  TORCH_CHECK(bad == 0, "mage_fast::scatter_tokens: ", bad, " indices outside [0, ", L, ")");
  return out;
}

at::Tensor winograd_weight_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.scalar_type() == at::kFloat,
              "mage_fast::winograd_weight: expects a float32 (Cout, Cin, 3, 3) weight, got ", w.scalar_type(), " ",
              w.sizes());
  const at::Tensor wc = w.contiguous();
  at::Tensor U = at::empty({36, w.size(1), w.size(0)}, w.options());  // (36, Cin, Cout)
  cpu::winograd_f43_weight(wc.data_ptr<float>(), w.size(0), w.size(1), U.data_ptr<float>());
  return U;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& U, const c10::optional<at::Tensor>& bias,
                                bool upsample) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat,
              "mage_fast::winograd_conv3x3: expects float32 x (N, C, H, W), got ", x.scalar_type(), " ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(U.dim() == 3 && U.size(0) == 36 && U.size(1) == C && U.scalar_type() == at::kFloat,
              "mage_fast::winograd_conv3x3: U must be float32 (36, ", C, ", Cout) from winograd_weight, got ",
              U.scalar_type(), " ", U.sizes());
  const int64_t Cout = U.size(2);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == Cout && bias->scalar_type() == at::kFloat),
              "mage_fast::winograd_conv3x3: bias must be float32 (", Cout, ",)");
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast), Uc = U.contiguous();
  const int64_t Ho = upsample ? 2 * H : H, Wo = upsample ? 2 * W : W;
  at::Tensor y = at::empty({N, Cout, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t tiles = N * ((Ho + 3) / 4) * ((Wo + 3) / 4);
  if (tiles == 0 || Cout == 0) return y;
  // tiles per chunk: the chunk's transformed input and products (36 x P x (C + Cout) floats) about 4 MiB
  // (the chunk's share of the time in the transforms and products is flat from 1/4 to 4x this size here)
  const int64_t P = std::max<int64_t>(16, std::min<int64_t>(tiles, (int64_t{1} << 20) / (36 * (C + Cout))));
  at::Tensor V = at::empty({36, P, C}, x.options()), M = at::empty({36, P, Cout}, x.options());
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* b = bias.has_value() ? bc.data_ptr<float>() : nullptr;
  const int nt = at::get_num_threads();
  for (int64_t t0 = 0; t0 < tiles; t0 += P) {
    const int64_t p = std::min(P, tiles - t0);
    cpu::winograd_f43_input(xc.data_ptr<float>(), N, H, W, C, upsample, t0, p, P, V.data_ptr<float>(), nt);
    if (p == P) {  // the 36 products (P x C) @ (C x Cout)
      at::bmm_out(M, V, Uc);
      cpu::winograd_f43_output(M.data_ptr<float>(), p, P, t0, N, Ho, Wo, Cout, b, y.data_ptr<float>(), nt);
    } else {  // the last, shorter chunk
      const at::Tensor Mp = at::bmm(V.narrow(1, 0, p), Uc).contiguous();
      cpu::winograd_f43_output(Mp.data_ptr<float>(), p, p, t0, N, Ho, Wo, Cout, b, y.data_ptr<float>(), nt);
    }
  }
  return y;
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                               double eps, bool silu) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat,
              "mage_fast::group_norm_silu: expects float32 x (N, C, H, W), got ", x.scalar_type(), " ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(groups > 0 && C % groups == 0, "mage_fast::group_norm_silu: ", C, " channels do not split into ",
              groups, " groups");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && weight.scalar_type() == at::kFloat && bias.dim() == 1 &&
                  bias.size(0) == C && bias.scalar_type() == at::kFloat,
              "mage_fast::group_norm_silu: weight and bias must be float32 (", C, ",), got ", weight.sizes(), " and ",
              bias.sizes());
  TORCH_CHECK(eps >= 0.0, "mage_fast::group_norm_silu: eps must be >= 0, got ", eps);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast), wc = weight.contiguous(), bc = bias.contiguous();
  at::Tensor y = at::empty({N, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  cpu::group_norm_nhwc(xc.data_ptr<float>(), N, H * W, C, groups, wc.data_ptr<float>(), bc.data_ptr<float>(),
                       static_cast<float>(eps), silu, y.data_ptr<float>(), at::get_num_threads());
  return y;
}

at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "mage_fast::dropout: expects a float32 or bfloat16 tensor, got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "mage_fast::dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(offset >= 0, "mage_fast::dropout: offset must be >= 0, got ", offset);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const uint64_t s = static_cast<uint64_t>(seed);
  if (x.scalar_type() == at::kFloat) {
    cpu::dropout_f32(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel(), p, s, offset, at::get_num_threads());
  } else {
    cpu::dropout_bf16(reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()),
                      xc.numel(), p, s, offset, at::get_num_threads());
  }
  return y;
}

bool is_bf16(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "mage_fast::", op, ": ", what,
              " must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

// Outputs are written in place (the Python side keeps them as reusable buffers: fresh tensors of this
// size cost more in first-touch page faults than the pass itself).
void attn_probs_cpu(const at::Tensor& s, const at::Tensor& lse, double scale, double dropout_p, int64_t seed,
                    int64_t offset, const at::Tensor& p, const at::Tensor& pd) {
  TORCH_CHECK(s.dim() >= 1 && s.is_contiguous(), "mage_fast::attn_probs: s must be contiguous rows");
  const int64_t K = s.size(-1), M = K ? s.numel() / K : 0;
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == M,
              "mage_fast::attn_probs: lse must be float32 with one value per row (", M, "), got ", lse.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0 && offset >= 0, "mage_fast::attn_probs: bad dropout_p or offset");
  TORCH_CHECK(pd.is_contiguous() && pd.numel() == s.numel(), "mage_fast::attn_probs: pd must be contiguous, ",
              s.numel(), " elements");
  const bool with_p = p.numel() > 0;
  TORCH_CHECK(!with_p || (p.scalar_type() == at::kFloat && p.is_contiguous() && p.numel() == s.numel()),
              "mage_fast::attn_probs: p must be empty or contiguous float32 with ", s.numel(), " elements");
  const bool s16 = is_bf16(s, "s", "attn_probs"), pd16 = is_bf16(pd, "pd", "attn_probs");
  cpu::attn_probs(s.data_ptr(), s16, lse.data_ptr<float>(), M, K, static_cast<float>(scale), dropout_p,
                  static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), with_p ? p.data_ptr<float>() : nullptr,
                  pd.data_ptr(), pd16, at::get_num_threads());
}

void attn_dscores_cpu(const at::Tensor& dp, const at::Tensor& p, const at::Tensor& delta, double scale,
                      double dropout_p, int64_t seed, int64_t offset, const at::Tensor& ds) {
  TORCH_CHECK(dp.dim() >= 1 && dp.is_contiguous() && p.is_contiguous() && p.scalar_type() == at::kFloat &&
                  p.numel() == dp.numel() && ds.is_contiguous() && ds.numel() == dp.numel(),
              "mage_fast::attn_dscores: dp, p (float32) and ds must be contiguous with one number of elements");
  const int64_t K = dp.size(-1), M = K ? dp.numel() / K : 0;
  TORCH_CHECK(delta.scalar_type() == at::kFloat && delta.is_contiguous() && delta.numel() == M,
              "mage_fast::attn_dscores: delta must be float32 with one value per row (", M, "), got ", delta.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0 && offset >= 0, "mage_fast::attn_dscores: bad dropout_p or offset");
  const bool dp16 = is_bf16(dp, "dp", "attn_dscores"), ds16 = is_bf16(ds, "ds", "attn_dscores");
  cpu::attn_dscores(dp.data_ptr(), dp16, p.data_ptr<float>(), delta.data_ptr<float>(), M, K, static_cast<float>(scale),
                    dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), ds.data_ptr(), ds16,
                    at::get_num_threads());
}

}  // namespace

TORCH_LIBRARY(mage_fast, m) {
  m.def("codebook_nn(Tensor z, Tensor codebook, str metric) -> Tensor");
  m.def("decode_step(Tensor logits, Tensor ids, Tensor key, int step, int mask_len, float noise_scale, "
        "int mask_id) -> (Tensor, Tensor)");
  m.def("gather_tokens(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_tokens(Tensor x, Tensor index, Tensor all_mask, Tensor pos_embed) -> Tensor");
  m.def("winograd_weight(Tensor w) -> Tensor");
  m.def("winograd_conv3x3(Tensor x, Tensor U, Tensor? bias, bool upsample) -> Tensor");
  m.def("group_norm_silu(Tensor x, int groups, Tensor weight, Tensor bias, float eps, bool silu) -> Tensor");
  m.def("dropout(Tensor x, float p, int seed, int offset) -> Tensor");
  m.def("attn_probs(Tensor s, Tensor lse, float scale, float dropout_p, int seed, int offset, Tensor(a!) p, "
        "Tensor(b!) pd) -> ()");
  m.def("attn_dscores(Tensor dp, Tensor p, Tensor delta, float scale, float dropout_p, int seed, int offset, "
        "Tensor(a!) ds) -> ()");
}

TORCH_LIBRARY_IMPL(mage_fast, CPU, m) {
  m.impl("codebook_nn", &codebook_nn_cpu);
  m.impl("decode_step", &decode_step_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
  m.impl("winograd_weight", &winograd_weight_cpu);
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("dropout", &dropout_cpu);
  m.impl("attn_probs", &attn_probs_cpu);
  m.impl("attn_dscores", &attn_dscores_cpu);
}

}  // namespace mage_fast
