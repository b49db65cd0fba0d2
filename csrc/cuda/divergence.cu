// Direct KL / JS tiles with fast intrinsics (--use_fast_math: __logf / lg2.approx).
//
// A block computes a 64 x 64 tile of (query, corpus) pairs, 4 x 4 per thread, walking d in slices
// of 16 staged in shared memory as float32.  Logs that depend on one row only are taken once per
// element while staging; only js needs a log per (pair, dim):
//   KL(q || c) = sum_j q_j (log q_j - log c_j)                         (q_j = 0 terms are 0)
//   JS(q, c)   = ln2 / 2 * sum_j [q_j log2 q_j + c_j log2 c_j + s_j - s_j log2 s_j],  s = q + c
// (from s log(s / 2) = ln2 (s log2 s - s)).  log c_j = -inf for c_j = 0 makes KL +inf exactly
// where the contract says.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>

#include "device.h"
#include "divergence.h"

namespace tlfast {
namespace cuda {
namespace {

constexpr int kTile = 64;          // pairs per block edge
constexpr int kPer = 4;            // pairs per thread edge
constexpr int kThreadsEdge = kTile / kPer;
constexpr int kSlice = 16;         // dims staged per step

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ float xlog2x(float x) { return x > 0.0f ? x * __log2f(x) : 0.0f; }

template <typename T, Divergence M>
__global__ void __launch_bounds__(kThreadsEdge * kThreadsEdge)
divergence_kernel(const T* __restrict__ q, int64_t ldq, int64_t nq, const T* __restrict__ c, int64_t ldc,
                  int64_t n, int64_t d, float* __restrict__ out, int64_t ldo) {
  // Staged per element: x and, for kl, log x (q) / log c; for js, x log2 x.
  __shared__ float qs[kSlice][kTile + 1], qaux[kSlice][kTile + 1];
  __shared__ float cs[kSlice][kTile + 1], caux[kSlice][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsEdge + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kPer][kPer] = {};

  for (int64_t d0 = 0; d0 < d; d0 += kSlice) {
    for (int e = tid; e < kTile * kSlice; e += kThreadsEdge * kThreadsEdge) {
      const int r = e / kSlice, t = e % kSlice;
      const int64_t dim = d0 + t;
      const bool dim_ok = dim < d;
      const float qv = (dim_ok && row0 + r < nq) ? load_float(q + (row0 + r) * ldq + dim) : 0.0f;
      const float cv = (dim_ok && col0 + r < n) ? load_float(c + (col0 + r) * ldc + dim) : 0.0f;
      qs[t][r] = qv;
      cs[t][r] = cv;
      if (M == Divergence::KL) {
        qaux[t][r] = qv > 0.0f ? __logf(qv) : 0.0f;
        // Padding (past d or past n) must add nothing: log 1 = 0.
        caux[t][r] = (dim_ok && col0 + r < n) ? (cv > 0.0f ? __logf(cv) : -INFINITY) : 0.0f;
      } else {
        qaux[t][r] = xlog2x(qv);
        caux[t][r] = xlog2x(cv);
      }
    }
    __syncthreads();
// Unrolled by 2, not 4: at 4 ptxas spills 12-24 bytes in the KL tile on sm_80 (57 registers, no
// spill at 2, on sm_80 and sm_90; tests/test_gpu_static.py checks).
#pragma unroll 2
    for (int t = 0; t < kSlice; ++t) {
      float qv[kPer], qa[kPer], cv[kPer], ca[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        qv[i] = qs[t][ty + i * kThreadsEdge];
        qa[i] = qaux[t][ty + i * kThreadsEdge];
        cv[i] = cs[t][tx + i * kThreadsEdge];
        ca[i] = caux[t][tx + i * kThreadsEdge];
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          if (M == Divergence::KL) {
            acc[i][j] += qv[i] > 0.0f ? qv[i] * (qa[i] - ca[j]) : 0.0f;
          } else {
            const float s = qv[i] + cv[j];
            acc[i][j] += qa[i] + ca[j] + s - xlog2x(s);
          }
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = row0 + ty + i * kThreadsEdge;
    if (r >= nq) continue;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t col = col0 + tx + j * kThreadsEdge;
      if (col >= n) continue;
      float v = acc[i][j];
      if (M == Divergence::JS) v = fmaxf(0.5f * 0.69314718f * v, 0.0f);
      out[r * ldo + col] = v;
    }
  }
}

template <typename T>
void launch(const void* q, int64_t ldq, int64_t nq, const void* c, int64_t ldc, int64_t n, int64_t d,
            Divergence metric, float* out, int64_t ldo, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kTile - 1) / kTile), static_cast<unsigned>((nq + kTile - 1) / kTile));
  const dim3 block(kThreadsEdge, kThreadsEdge);
  const T* qt = static_cast<const T*>(q);
  const T* ct = static_cast<const T*>(c);
  if (metric == Divergence::KL)
    divergence_kernel<T, Divergence::KL><<<grid, block, 0, stream>>>(qt, ldq, nq, ct, ldc, n, d, out, ldo);
  else
    divergence_kernel<T, Divergence::JS><<<grid, block, 0, stream>>>(qt, ldq, nq, ct, ldc, n, d, out, ldo);
}

}  // namespace

void divergence_tile(const void* q, int64_t ldq, int64_t nq, const void* c, int64_t ldc, int64_t n, int64_t d,
                     DType dtype, Divergence metric, float* out, int64_t ldo, uintptr_t stream) {
  if (nq < 1 || n < 1 || d < 1) throw std::invalid_argument("divergence_tile: nq, n and d must be >= 1");
  if (ldq < d || ldc < d || ldo < n) throw std::invalid_argument("divergence_tile: a row stride is smaller than the row");
  if ((n + kTile - 1) / kTile > 0x7FFFFFFF || (nq + kTile - 1) / kTile > 65535)
    throw std::invalid_argument("divergence_tile: tile too large; split the queries into chunks of <= 4,194,240 rows");
  if (metric != Divergence::KL && metric != Divergence::JS)
    throw std::invalid_argument("divergence_tile: metric must be kl (3) or js (4)");
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32: launch<float>(q, ldq, nq, c, ldc, n, d, metric, out, ldo, s); break;
    case DType::F16: launch<__half>(q, ldq, nq, c, ldc, n, d, metric, out, ldo, s); break;
    case DType::BF16: launch<__nv_bfloat16>(q, ldq, nq, c, ldc, n, d, metric, out, ldo, s); break;
    default: throw std::invalid_argument("divergence_tile: dtype must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
  check_launch("divergence_tile");
}

}  // namespace cuda
}  // namespace tlfast
