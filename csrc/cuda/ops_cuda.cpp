// CUDA bindings of torch.ops.mage_fast (schemas in csrc/ops.cpp): argument checks, dtype
// switches, workspace allocation, then the C launchers of csrc/cuda/*.cu on the current stream.
// Compiled only in CUDA builds (setup.py with a CUDA torch and nvcc; CMake with MAGE_FAST_CUDA=ON).
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.h"

namespace mage_fast {
namespace {

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "mage_fast::", op, " CUDA launch failed: ", mage_fast_cuda_error_string(err));
}

int compute_capability_major(int device) {
  int major = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  TORCH_CHECK(err == cudaSuccess, "mage_fast: cudaDeviceGetAttribute(ComputeCapabilityMajor) failed on device ",
              device, ": ", cudaGetErrorString(err));
  return major;
}

bool is_float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor codebook_nn_cuda(const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric) {
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2 && z.size(1) == codebook.size(1),
              "mage_fast::codebook_nn: expects z (N, D) and codebook (K, D), got ", z.sizes(), " and ",
              codebook.sizes());
  TORCH_CHECK(z.device() == codebook.device(), "mage_fast::codebook_nn: z and codebook on different devices");
  TORCH_CHECK(is_float_type(z) && is_float_type(codebook), "mage_fast::codebook_nn: float32/float16/bfloat16 only");
  TORCH_CHECK(metric == "l2" || metric == "cosine", "mage_fast::codebook_nn: metric must be 'l2' or 'cosine'");
  TORCH_CHECK(codebook.size(0) > 0 && codebook.size(0) < (int64_t{1} << 31),
              "mage_fast::codebook_nn: codebook size must be in [1, 2^31), got ", codebook.size(0));
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  at::Tensor out = at::empty({N}, z.options().dtype(at::kLong));  // (N,)
  at::Tensor ws = at::empty({static_cast<int64_t>(mage_fast_cuda_codebook_nn_workspace(N, K))},
                            z.options().dtype(at::kByte));
  const void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool tensor_cores = z.scalar_type() == codebook.scalar_type() && z.scalar_type() != at::kFloat &&
                            compute_capability_major(z.get_device()) >= 8;
  if (tensor_cores) {  // fp16/bf16 products are exact in the fp32 accumulators
    const at::Tensor zc = z.contiguous(), cc = codebook.contiguous();  // (N, D), (K, D)
    check_launch(mage_fast_cuda_codebook_nn_16bit(zc.data_ptr(), cc.data_ptr(), z.scalar_type() == at::kBFloat16, N, K,
                                                  D, metric == "cosine", ws.data_ptr(), out.data_ptr<int64_t>(),
                                                  const_cast<void*>(stream)),
                 "codebook_nn");
    return out;
  }
  // precision raised: mixed or pre-sm_80 16-bit inputs are converted to fp32, accumulation is fp32
  const at::Tensor zf = z.to(at::kFloat).contiguous();         // (N, D)
  const at::Tensor cf = codebook.to(at::kFloat).contiguous();  // (K, D)
  check_launch(mage_fast_cuda_codebook_nn(zf.data_ptr<float>(), cf.data_ptr<float>(), N, K, D, metric == "cosine",
                                          ws.data_ptr(), out.data_ptr<int64_t>(), const_cast<void*>(stream)),
               "codebook_nn");
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_step_cuda(const at::Tensor& logits, const at::Tensor& ids,
                                                    const at::Tensor& key, int64_t step, int64_t mask_len,
                                                    double noise_scale, int64_t mask_id) {
  TORCH_CHECK(logits.dim() == 3, "mage_fast::decode_step: logits must be (B, N, C), got ", logits.sizes());
  const int64_t B = logits.size(0), N = logits.size(1), C = logits.size(2);
  TORCH_CHECK(ids.sizes() == at::IntArrayRef({B, N}) && ids.scalar_type() == at::kLong,
              "mage_fast::decode_step: ids must be int64 (B, N)");
  TORCH_CHECK(key.sizes() == at::IntArrayRef({B}) && key.scalar_type() == at::kLong,
              "mage_fast::decode_step: key must be int64 (B,)");
  TORCH_CHECK(ids.device() == logits.device() && key.device() == logits.device(),
              "mage_fast::decode_step: logits, ids and key on different devices");
  TORCH_CHECK(is_float_type(logits), "mage_fast::decode_step: float logits only, got ", logits.scalar_type());
  TORCH_CHECK(C > 0, "mage_fast::decode_step: no classes (C = 0)");
  TORCH_CHECK(0 <= mask_len && mask_len <= N, "mage_fast::decode_step: mask_len must be in [0, N], got ", mask_len);
  const c10::cuda::CUDAGuard guard(logits.device());
  // read in its own dtype (the kernel widens to fp32 in registers): no fp32 copy of the logits
  const at::Tensor lf = logits.stride(2) == 1 ? logits : logits.contiguous();  // (B, N, C)
  const int dtype = lf.scalar_type() == at::kFloat ? 0 : lf.scalar_type() == at::kHalf ? 1 : 2;
  const at::Tensor idc = ids.contiguous(), keyc = key.contiguous();
  at::Tensor sampled = at::empty({B, N}, ids.options());                   // (B, N)
  at::Tensor next_ids = at::empty({B, N}, ids.options());                  // (B, N)
  at::Tensor conf = at::empty({B, N}, logits.options().dtype(at::kFloat)); // (B, N) workspace
  check_launch(mage_fast_cuda_decode_step(lf.data_ptr(), dtype, lf.stride(0), lf.stride(1), idc.data_ptr<int64_t>(),
                                          keyc.data_ptr<int64_t>(), B, N, C, step, mask_len,
                                          static_cast<float>(noise_scale), mask_id, conf.data_ptr<float>(),
                                          sampled.data_ptr<int64_t>(), next_ids.data_ptr<int64_t>(),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "decode_step");
  return {sampled, next_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(mage_fast, CUDA, m) {
  m.impl("codebook_nn", &codebook_nn_cuda);
  m.impl("decode_step", &decode_step_cuda);
}

}  // namespace mage_fast
