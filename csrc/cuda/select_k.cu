// Block select in the spirit of faiss's BlockSelect: one thread block per row keeps the row's best
// candidates in shared memory and only touches them for entries that beat the current k-th best.
//
// Candidates are 64-bit words that order exactly like the contract (tlfast/triton/select.py):
//   word = ordered(key) << 32 | (2^32 - 1 - index),   key = value, or -value when smaller is better
// so one integer comparison ranks by key and breaks ties toward the smaller index, and a plain
// bitonic sort of words is the final, deterministic order.
//
// Shared memory holds L = next_pow2(k_pad + kThreads) words: [0, k_pad) the best so far, sorted,
// [k_pad, L) a staging area.  Each pass reads kThreads entries; those above the threshold (the
// k-th best word) are appended to the staging area.  When it could overflow, and at the end, the
// whole buffer is bitonic-sorted and the threshold raised.  After the first tiles few entries
// pass the threshold, so the sort runs rarely and the pass is a coalesced read plus one compare.
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "device.h"
#include "select_k.h"

namespace tlfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr long long kNever = LLONG_MIN;  // below every real word: an empty slot

__device__ __forceinline__ long long to_word(float value, bool smaller_is_better, long long index) {
  float key = smaller_is_better ? -value : value;
  if (key != key) key = -INFINITY;  // a NaN never outranks a number
  if (key == 0.0f) key = 0.0f;      // -0 and +0 are the same key
  const int bits = __float_as_int(key);
  const unsigned ordered = static_cast<unsigned>(bits ^ ((bits >> 31) & 0x7FFFFFFF));
  return static_cast<long long>((static_cast<unsigned long long>(ordered) << 32) |
                                (0xFFFFFFFFull - static_cast<unsigned long long>(index)));
}

__device__ __forceinline__ void from_word(long long word, bool smaller_is_better, float* value, int64_t* index) {
  if (word == kNever) {
    *value = __int_as_float(0x7FC00000);  // NaN with index -1: fewer than k candidates existed
    *index = -1;
    return;
  }
  const int hi = static_cast<int>(word >> 32);
  const float key = __int_as_float(hi ^ ((hi >> 31) & 0x7FFFFFFF));
  *value = smaller_is_better ? (key == 0.0f ? 0.0f : -key) : key;
  *index = static_cast<int64_t>(0xFFFFFFFFull - (static_cast<unsigned long long>(word) & 0xFFFFFFFFull));
}

// Sorts buf[0, len) descending; len is a power of two.
__device__ void bitonic_sort_desc(long long* buf, int len) {
  for (int size = 2; size <= len; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < len / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const long long a = buf[lo], b = buf[hi];
        if ((a < b) == desc) {
          buf[lo] = b;
          buf[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

struct Params {
  const float* tile;
  int64_t ld, cols, col_base;
  const float* qterm;
  const float* cterm;
  Epilogue epilogue;
  bool smaller_is_better, has_prior;
  int64_t exclude_row_base;
  int k, k_pad, len;
  float* values;
  int64_t* indices;
};

__global__ void __launch_bounds__(kThreads) select_k_kernel(Params p) {
  extern __shared__ long long buf[];
  __shared__ int staged;
  __shared__ long long threshold;
  const int64_t row = blockIdx.x;
  float* out_values = p.values + row * p.k;
  int64_t* out_indices = p.indices + row * p.k;

  for (int i = threadIdx.x; i < p.len; i += blockDim.x)
    buf[i] = (p.has_prior && i < p.k) ? to_word(out_values[i], p.smaller_is_better, out_indices[i]) : kNever;
  if (threadIdx.x == 0) staged = 0;
  __syncthreads();
  if (threadIdx.x == 0) threshold = buf[p.k - 1];  // prior lists are sorted best first

  const float* tile_row = p.tile + row * p.ld;
  const float qterm = p.epilogue == Epilogue::NONE ? 0.0f : p.qterm[row];
  const int room = p.len - p.k_pad;
  for (int64_t base = 0; base < p.cols; base += blockDim.x) {
    __syncthreads();
    const int before = staged;  // every thread reads the same count before anyone appends
    __syncthreads();
    if (before > room - static_cast<int>(blockDim.x)) {
      for (int i = p.k_pad + before + threadIdx.x; i < p.len; i += blockDim.x) buf[i] = kNever;
      __syncthreads();
      bitonic_sort_desc(buf, p.len);
      if (threadIdx.x == 0) {
        staged = 0;
        threshold = buf[p.k - 1];
      }
      __syncthreads();
    }
    const int64_t col = base + threadIdx.x;
    if (col < p.cols) {
      float v = tile_row[col];
      if (p.epilogue == Epilogue::COSINE) v = v * qterm * p.cterm[col];
      if (p.epilogue == Epilogue::L2) v = fmaxf(qterm + p.cterm[col] - 2.0f * v, 0.0f);
      const int64_t index = p.col_base + col;
      const bool excluded = p.exclude_row_base >= 0 && index == p.exclude_row_base + row;
      const long long word = to_word(v, p.smaller_is_better, index);
      if (!excluded && word > threshold) buf[p.k_pad + atomicAdd(&staged, 1)] = word;
    }
  }
  __syncthreads();
  for (int i = p.k_pad + staged + threadIdx.x; i < p.len; i += blockDim.x) buf[i] = kNever;
  __syncthreads();
  bitonic_sort_desc(buf, p.len);
  for (int i = threadIdx.x; i < p.k; i += blockDim.x) from_word(buf[i], p.smaller_is_better, &out_values[i], &out_indices[i]);
}

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

}  // namespace

void select_k(const float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t col_base,
              const float* qterm, const float* cterm, Epilogue epilogue, bool smaller_is_better,
              int64_t exclude_row_base, bool has_prior, int64_t k, float* values, int64_t* indices,
              uintptr_t stream) {
  if (rows < 1 || cols < 1) throw std::invalid_argument("select_k: rows and cols must be >= 1");
  if (ld < cols) throw std::invalid_argument("select_k: ld must be >= cols");
  if (k < 1 || k > kMaxSelectK)
    throw std::invalid_argument("select_k: k must be in [1, " + std::to_string(kMaxSelectK) + "]");
  if (col_base < 0 || col_base + cols > (int64_t{1} << 32))
    throw std::invalid_argument("select_k: corpus indices must fit in 32 bits");
  const int k_pad = next_pow2(k);
  Params p{tile, ld, cols, col_base, qterm, cterm, epilogue, smaller_is_better, has_prior,
           exclude_row_base, static_cast<int>(k), k_pad, next_pow2(k_pad + kThreads), values, indices};
  const size_t shared = static_cast<size_t>(p.len) * sizeof(long long);
  // L <= 4096 words = 32 KiB: within the default 48 KiB of dynamic shared memory on every arch.
  select_k_kernel<<<static_cast<unsigned>(rows), kThreads, shared, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  check_launch("select_k");
}

}  // namespace cuda
}  // namespace tlfast
