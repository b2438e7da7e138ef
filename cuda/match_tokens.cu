// Fused token matching (token merging's bipartite match) in CUDA C++.
//
// For each row of a [B, NA, C]: cosine similarity with every row of b [B, NB, C], reduced on the
// fly to (max, argmax). The NA x NB similarity matrix is never written: a 64 x 64 tile of dot
// products lives in registers (4 x 4 per thread), inputs are staged through shared memory in
// chunks of 32 channels, and norms are computed in the kernel. Ties go to the lowest index.
//
// This file has no PyTorch dependency (it is compiled on its own by the nvcc test); the
// PyTorch binding is in vision_eff_C.cpp. Inputs must be contiguous [B, N, C].
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "match_tokens.h"

namespace {

constexpr int TILE = 64;     // rows of a and of b per tile
constexpr int CHUNK = 32;    // channels staged per step
constexpr int THREADS = 256; // 16 x 16 threads, each owning 4 x 4 outputs

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 1 / max(||row||, eps) for TILE rows starting at `row0` (4 threads per row).
template <typename T>
__device__ void inverse_norms(const T* base, int row0, int nrows, int C, float eps, float* out) {
    const int tid = threadIdx.x;
    const int r = tid >> 2, part = tid & 3;
    float s = 0.f;
    if (row0 + r < nrows) {
        const T* row = base + (int64_t)(row0 + r) * C;
        for (int c = part; c < C; c += 4) {
            float x = to_float(row[c]);
            s += x * x;
        }
    }
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if (part == 0) out[r] = 1.f / fmaxf(sqrtf(s), eps);
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
match_tokens_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ best_out,
                    int64_t* __restrict__ idx_out, int NA, int NB, int C, float eps) {
    __shared__ float As[TILE][CHUNK + 1];
    __shared__ float Bs[TILE][CHUNK + 1];
    __shared__ float inv_a[TILE];
    __shared__ float inv_b[TILE];

    const int batch = blockIdx.y;
    const int row0 = blockIdx.x * TILE;
    const T* A = a + (int64_t)batch * NA * C;
    const T* Bp = b + (int64_t)batch * NB * C;
    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;

    inverse_norms(A, row0, NA, C, eps, inv_a);

    float best[4];
    int best_idx[4];
    for (int i = 0; i < 4; ++i) { best[i] = -INFINITY; best_idx[i] = 0; }

    for (int col0 = 0; col0 < NB; col0 += TILE) {
        __syncthreads();
        inverse_norms(Bp, col0, NB, C, eps, inv_b);
        float acc[4][4] = {};
        for (int c0 = 0; c0 < C; c0 += CHUNK) {
            __syncthreads();
            for (int e = tid; e < TILE * CHUNK; e += THREADS) {
                const int r = e / CHUNK, c = e % CHUNK;
                const bool c_ok = c0 + c < C;
                As[r][c] = (c_ok && row0 + r < NA) ? to_float(A[(int64_t)(row0 + r) * C + c0 + c]) : 0.f;
                Bs[r][c] = (c_ok && col0 + r < NB) ? to_float(Bp[(int64_t)(col0 + r) * C + c0 + c]) : 0.f;
            }
            __syncthreads();
#pragma unroll 8
            for (int kk = 0; kk < CHUNK; ++kk) {
                float av[4], bv[4];
                for (int i = 0; i < 4; ++i) av[i] = As[ty * 4 + i][kk];
                for (int j = 0; j < 4; ++j) bv[j] = Bs[tx * 4 + j][kk];
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
        }
        __syncthreads();
        for (int i = 0; i < 4; ++i) {
            const float ia = inv_a[ty * 4 + i];
            for (int j = 0; j < 4; ++j) {
                const int col = col0 + tx * 4 + j;
                if (col < NB) {
                    const float sim = acc[i][j] * ia * inv_b[tx * 4 + j];
                    if (sim > best[i] || (sim == best[i] && col < best_idx[i])) { best[i] = sim; best_idx[i] = col; }
                }
            }
        }
    }
    // reduce over the 16 threads (tx) that share a row group; they are 16 consecutive lanes
    for (int i = 0; i < 4; ++i) {
        float v = best[i];
        int ix = best_idx[i];
        for (int off = 8; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, off);
            const int oi = __shfl_xor_sync(0xffffffffu, ix, off);
            if (ov > v || (ov == v && oi < ix)) { v = ov; ix = oi; }
        }
        const int row = row0 + ty * 4 + i;
        if (tx == 0 && row < NA) {
            best_out[(int64_t)batch * NA + row] = v;
            idx_out[(int64_t)batch * NA + row] = ix;
        }
    }
}

template <typename T>
cudaError_t launch(const void* a, const void* b, float* best, int64_t* idx, int B, int NA, int NB, int C,
                   float eps, cudaStream_t stream) {
    dim3 grid((NA + TILE - 1) / TILE, B);
    match_tokens_kernel<T><<<grid, THREADS, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                         best, idx, NA, NB, C, eps);
    return cudaGetLastError();
}

}  // namespace

cudaError_t vision_eff_match_tokens(const void* a, const void* b, float* best, int64_t* idx, int B, int NA, int NB,
                                    int C, float eps, VisionEffDtype dtype, cudaStream_t stream) {
    switch (dtype) {
        case VISION_EFF_F32: return launch<float>(a, b, best, idx, B, NA, NB, C, eps, stream);
        case VISION_EFF_F16: return launch<__half>(a, b, best, idx, B, NA, NB, C, eps, stream);
        case VISION_EFF_BF16: return launch<__nv_bfloat16>(a, b, best, idx, B, NA, NB, C, eps, stream);
    }
    return cudaErrorInvalidValue;
}
