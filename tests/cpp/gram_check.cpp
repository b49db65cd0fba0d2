// The Gram kernel (csrc/cpu/gram_kernel.h) in every register layout, built for the machine running
// the tests: CHECK_LAYOUT=0 the generic 4 x 12 tiles, 1 AVX2's 4 x 24, 2 AVX-512's 8 x 48 (GCC
// lowers its 16-float vectors to the narrower registers, so the tiling and packing logic runs on
// any CPU).  Against a float64 product on odd shapes: every entry on or above the diagonal within
// float32 rounding, and below it every entry untouched or, in a tile across the diagonal, added
// its true value; with and without a shift row subtracted as the rows are packed; the class sums
// within float32 rounding over 8192 rows, and an out-of-range code reported.  Exit status 0 when
// all hold.
#include "cpu/fused_knn_std.h"
#if CHECK_LAYOUT == 0
#define TLFAST_ISA generic
#define TLFAST_ISA_AVX512 0
#define TLFAST_ISA_AVX2 0
#elif CHECK_LAYOUT == 1
#define TLFAST_ISA avx2
#define TLFAST_ISA_AVX512 0
#define TLFAST_ISA_AVX2 1
#else
#define TLFAST_ISA avx512
#define TLFAST_ISA_AVX512 1
#define TLFAST_ISA_AVX2 1
#endif
#include "cpu/gram_kernel.h"

#include <cstdio>
#include <random>

std::string tlfast::cpu::isa() { return "check"; }

int main() {
  using tlfast::cpu::TLFAST_ISA::gram_upper_add;
  const int64_t shapes[][2] = {{1, 1}, {2, 3}, {255, 4}, {256, 11}, {257, 12}, {300, 23}, {511, 24}, {512, 25}, {513, 13}, {129, 26},
                               {1025, 5}, {1600, 30}, {1100, 97}, {20000, 5},
                               {700, 47}, {64, 48}, {1000, 49}, {130, 96}, {333, 97}, {520, 130}};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  int failures = 0;
  // float32 sums over at most KC <= 512 rows, then float64: |error| <= 513 u sum |a_ti a_tj|.
  const double tol = 513 * std::ldexp(1.0, -24);
  for (auto& s : shapes) {
    const int64_t n = s[0], d = s[1];
    std::vector<float> a(n * d);
    for (auto& x : a) x = normal(rng);
    if (n > 3)
      for (int64_t j = 0; j < d; ++j) a[2 * d + j] *= 1e3f;  // one dominant row
    // The shift is subtracted in float32 as the rows are packed: the reference subtracts it the same way.
    std::vector<float> shift(d), b(n * d);
    for (auto& x : shift) x = normal(rng) + 3.0f;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < d; ++j) b[t * d + j] = a[t * d + j] - shift[j];
    for (int run = 0; run < 6; ++run) {
      const int threads = 1 + run % 3;
      const bool shifted = run >= 3;
      const std::vector<float>& ref_rows = shifted ? b : a;
      const double sentinel = -12345.0;
      std::vector<double> g(d * d, sentinel);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = i; j < d; ++j) g[i * d + j] = 0.5;  // the kernel adds to what is there
      // Class sums on odd runs: codes in [0, classes), float32 per thread over <= 8192 rows, then float64.
      const bool with_sums = run % 2 == 1;
      const int64_t classes = 1 + n % 7;
      std::vector<int64_t> codes(n);
      for (int64_t t = 0; t < n; ++t) codes[t] = (t * 7 + 3) % classes;
      std::vector<double> sums(classes * d, 0.25);
      const bool ok = gram_upper_add(a.data(), n, d, threads, g.data(), shifted ? shift.data() : nullptr,
                                     with_sums ? codes.data() : nullptr, with_sums ? classes : 0,
                                     with_sums ? sums.data() : nullptr);
      if (!ok) {
        std::printf("n=%ld d=%ld: valid codes reported invalid\n", (long)n, (long)d);
        ++failures;
      }
      if (with_sums) {
        const double sum_tol = std::min<int64_t>(n, 8192) * std::ldexp(1.0, -24);
        for (int64_t c = 0; c < classes; ++c)
          for (int64_t j = 0; j < d; ++j) {
            double ref = 0.0, mag = 0.0;
            for (int64_t t = 0; t < n; ++t)
              if (codes[t] == c) {
                ref += ref_rows[t * d + j];
                mag += std::fabs(ref_rows[t * d + j]);
              }
            if (std::fabs(sums[c * d + j] - 0.25 - ref) > sum_tol * mag + 1e-12) {
              std::printf("n=%ld d=%ld threads=%d shifted=%d: sums[%ld][%ld] = %.9g, expected %.9g\n", (long)n,
                          (long)d, threads, (int)shifted, (long)c, (long)j, sums[c * d + j] - 0.25, ref);
              ++failures;
            }
          }
      }
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          double ref = 0.0, mag = 0.0;
          for (int64_t t = 0; t < n; ++t) {
            ref += (double)ref_rows[t * d + i] * ref_rows[t * d + j];
            mag += std::fabs((double)ref_rows[t * d + i] * ref_rows[t * d + j]);
          }
          const double got = g[i * d + j];
          if (j >= i) {
            if (std::fabs(got - 0.5 - ref) > tol * mag + 1e-12) {
              std::printf("n=%ld d=%ld threads=%d shifted=%d: g[%ld][%ld] = %.9g, expected %.9g\n", (long)n, (long)d, threads, (int)shifted,
                          (long)i, (long)j, got - 0.5, ref);
              ++failures;
            }
          } else if (got != sentinel && std::fabs(got - sentinel - ref) > tol * mag + 1e-9) {
            // Below the diagonal only the tiles across it may add, and then the true value.
            std::printf("n=%ld d=%ld: below-diagonal g[%ld][%ld] = %.9g is neither untouched nor += %.9g\n",
                        (long)n, (long)d, (long)i, (long)j, got, ref);
            ++failures;
          }
        }
    }
  }
  {  // A code outside [0, classes): reported, the Gram still complete.
    std::vector<float> a(600 * 3, 1.0f);
    std::vector<int64_t> codes(600, 0);
    codes[599] = 2;
    std::vector<double> g(9, 0.0), sums(2 * 3, 0.0);
    if (gram_upper_add(a.data(), 600, 3, 2, g.data(), nullptr, codes.data(), 2, sums.data()) || g[0] != 600.0) {
      std::printf("an out-of-range code was not reported\n");
      ++failures;
    }
  }
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
