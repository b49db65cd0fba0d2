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

// Writes the k best corpus rows for each query, best first; ties go to the smaller index.
void knn(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, int64_t k, Metric metric,
         bool exclude_self, int threads, float* out_values, int64_t* out_idx);

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
  }
TLFAST_DECLARE_ISA(avx512)
TLFAST_DECLARE_ISA(avx2)
TLFAST_DECLARE_ISA(generic)
#undef TLFAST_DECLARE_ISA

}  // namespace cpu
}  // namespace tlfast
