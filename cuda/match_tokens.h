// C interface of the CUDA kernels in this folder (no PyTorch types, so the .cu files compile alone).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

enum VisionEffDtype { VISION_EFF_F32 = 0, VISION_EFF_F16 = 1, VISION_EFF_BF16 = 2 };

// a [B, NA, C], b [B, NB, C] contiguous; best [B, NA] float32, idx [B, NA] int64 (outputs).
cudaError_t vision_eff_match_tokens(const void* a, const void* b, float* best, int64_t* idx, int B, int NA, int NB,
                                    int C, float eps, VisionEffDtype dtype, cudaStream_t stream);
