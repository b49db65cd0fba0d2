// Checks the bf16-pair path of fused_knn.h (the layout the AVX512-BF16 and AMX kernels use) on any AVX2
// CPU: built with TLFAST_ISA_BF16DOT and the AVX2 ISA, its written-out vdpbf16ps must give the
// float32 kernel's answers on the widened inputs (same indices except on near-ties, values within
// float32 summation-order error).  Exit status 0 on success; run by tests/test_isa_isolation.py.
#include "cpu/fused_knn_std.h"
#include <cstdio>
#include <random>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define TLFAST_ISA bf16pairs
#define TLFAST_ISA_AVX512 0
#define TLFAST_ISA_AVX2 1
#define TLFAST_ISA_BF16DOT 1
#ifndef CHECK_AMX  // -DCHECK_AMX=1: the AMX block (16 queries, tdpbf16ps written out) for d >= 16
#define CHECK_AMX 0
#endif
#define TLFAST_ISA_AMX CHECK_AMX
#include "cpu/fused_knn.h"
#pragma GCC pop_options

using namespace tlfast::cpu;

static uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}

int main() {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  int failures = 0;
  for (int64_t d : {1, 2, 19, 64}) {
    // one query block (panels packed as used) or several (corpus packed once); a partial panel
    const int64_t nq = d == 64 ? 800 : 37, n = 301;
    std::vector<uint16_t> q(nq * d), c(n * d);
    for (auto& x : q) x = to_bf16(normal(gen));
    for (auto& x : c) x = to_bf16(normal(gen));
    std::vector<float> qf(q.size()), cf(c.size());
    for (size_t i = 0; i < q.size(); ++i) { uint32_t u = (uint32_t)q[i] << 16; std::memcpy(&qf[i], &u, 4); }
    for (size_t i = 0; i < c.size(); ++i) { uint32_t u = (uint32_t)c[i] << 16; std::memcpy(&cf[i], &u, 4); }
    for (Metric m : {Metric::IP, Metric::COSINE, Metric::L2}) {
      if (d == 1 && m == Metric::COSINE) continue;  // every value is +-1: all ties
      for (int64_t k : {(int64_t)1, (int64_t)5, n}) {
        std::vector<float> v1(nq * k), v2(nq * k);
        std::vector<int64_t> i1(nq * k), i2(nq * k);
        bf16pairs::knn_half(q.data(), nq, c.data(), n, d, k, m, HalfType::BF16, false, 2, v1.data(), i1.data());
        bf16pairs::knn(qf.data(), nq, cf.data(), n, d, k, m, false, 2, v2.data(), i2.data());
        for (int64_t j = 0; j < nq * k; ++j) {
          const float tol = 1e-5f * (1.0f + std::fabs(v2[j])) * (float)(d + 1);
          if (std::fabs(v1[j] - v2[j]) > tol) {
            std::printf("d=%ld metric=%d k=%ld entry %ld: %g vs %g\n", (long)d, (int)m, (long)k, (long)j, v1[j], v2[j]);
            ++failures;
            break;
          }
          if (i1[j] != i2[j] && std::fabs(v1[j] - v2[j]) > 0.0f && k < n) {
            // an index swap is allowed only between values equal within the tolerance (near-ties)
            bool near_tie = j % k + 1 < k && std::fabs(v2[j] - v2[j + 1]) <= tol;
            near_tie |= j % k > 0 && std::fabs(v2[j] - v2[j - 1]) <= tol;
            if (!near_tie) {
              std::printf("d=%ld metric=%d k=%ld entry %ld: index %ld vs %ld\n", (long)d, (int)m, (long)k, (long)j,
                          (long)i1[j], (long)i2[j]);
              ++failures;
              break;
            }
          }
        }
      }
    }
  }
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
