// PyTorch binding of the CUDA kernels: the extension module vision_eff._C (JIT name vision_eff_C).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "match_tokens.h"

namespace {

VisionEffDtype dtype_code(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return VISION_EFF_F32;
        case at::kHalf: return VISION_EFF_F16;
        case at::kBFloat16: return VISION_EFF_BF16;
        default: TORCH_CHECK(false, "match_tokens: dtype ", t.scalar_type(), " is not supported (float32, float16, bfloat16)");
    }
}

std::tuple<at::Tensor, at::Tensor> match_tokens(const at::Tensor& a_in, const at::Tensor& b_in) {
    TORCH_CHECK(a_in.is_cuda() && b_in.is_cuda(), "match_tokens: a and b must be CUDA tensors");
    TORCH_CHECK(a_in.dim() == 3 && b_in.dim() == 3, "match_tokens: a and b must be [B, N, C]");
    TORCH_CHECK(a_in.size(0) == b_in.size(0) && a_in.size(2) == b_in.size(2), "match_tokens: batch/channels differ");
    TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "match_tokens: a and b must share a dtype");
    TORCH_CHECK(b_in.size(1) > 0, "match_tokens: b has no tokens");
    const c10::cuda::CUDAGuard guard(a_in.device());
    auto a = a_in.contiguous();
    auto b = b_in.contiguous();
    const auto B = a.size(0), NA = a.size(1), NB = b.size(1), C = a.size(2);
    auto best = at::empty({B, NA}, a.options().dtype(at::kFloat));
    auto idx = at::empty({B, NA}, a.options().dtype(at::kLong));
    if (NA == 0 || B == 0) return {best, idx};
    auto err = vision_eff_match_tokens(a.data_ptr(), b.data_ptr(), best.data_ptr<float>(), idx.data_ptr<int64_t>(),
                                       (int)B, (int)NA, (int)NB, (int)C, 1e-6f, dtype_code(a),
                                       c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "match_tokens kernel launch failed: ", cudaGetErrorString(err));
    return {best, idx};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "vision-eff CUDA C++ kernels";
    m.def("match_tokens", &match_tokens, "cosine row max/argmax of a [B,NA,C] against b [B,NB,C]");
}
