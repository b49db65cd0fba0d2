// CPU entry points of the fused kNN / pairwise kernels.  Inputs are float32, row-major, contiguous.
#pragma once
#include <cstdint>
#include <string>

namespace tlfast {
namespace cpu {

// Same order as tlfast/metrics.py (METRIC_CODES).
enum class Metric : int { IP = 0, COSINE = 1, L2 = 2, KL = 3, JS = 4 };

// kl: log(0) is replaced by -kKlZeroLog, so a term q > 0 against c == 0 adds at least
// q * 2^126 to the divergence; any value above kKlInfThreshold is reported as +inf.  Genuine
// finite KL values in float32 are below ~104 (-log of the smallest subnormal), so this is exact
// for every q >= 2^-102 (about 2e-31).
constexpr float kKlZeroLog = 8.507059e37f;  // 2^126
constexpr float kKlInfThreshold = 16777216.0f;  // 2^24

// 16-bit inputs, passed as their bit patterns.  Plain structs, so that no arithmetic on them is
// compiled outside the ISA kernels.
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };
enum class HalfType : int { BF16 = 0, FP16 = 1 };

// Writes the k best corpus rows for each query, best first; ties go to the smaller index.
void knn(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, int64_t k, Metric metric,
         bool exclude_self, int threads, float* out_values, int64_t* out_idx);

// knn on bfloat16 / float16 inputs (bit patterns), consumed natively: widened row by row while
// packing, or multiplied in bf16 with fp32 accumulation where the CPU has AVX512-BF16 / AMX.
void knn_half(const uint16_t* q, int64_t nq, const uint16_t* c, int64_t n, int64_t d, int64_t k, Metric metric,
              HalfType type, bool exclude_self, int threads, float* out_values, int64_t* out_idx);

// Name of the kernel knn_half uses for `type` on this machine ("amx-bf16", "avx512-bf16", or
// "<isa>-widen" where the products run in float32 on the widened values).
std::string half_kernel(HalfType type);

// Writes the full (nq, n) matrix of metric values.
void pairwise(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, Metric metric, int threads,
              float* out);

// Name of the instruction set the dispatcher picked on this machine ("avx512", "avx2", "generic").
std::string isa();

#define TLFAST_DECLARE_ISA(ns)                                                                          \
  namespace ns {                                                                                        \
  void knn(const float*, int64_t, const float*, int64_t, int64_t, int64_t, Metric, bool, int, float*,   \
           int64_t*);                                                                                   \
  void pairwise(const float*, int64_t, const float*, int64_t, int64_t, Metric, int, float*);            \
  void knn_half(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, Metric, HalfType, \
                bool, int, float*, int64_t*);                                                           \
  }
TLFAST_DECLARE_ISA(avx512)
TLFAST_DECLARE_ISA(avx512bf16)
TLFAST_DECLARE_ISA(amx)
TLFAST_DECLARE_ISA(avx2)
TLFAST_DECLARE_ISA(generic)
#undef TLFAST_DECLARE_ISA

}  // namespace cpu
}  // namespace tlfast
