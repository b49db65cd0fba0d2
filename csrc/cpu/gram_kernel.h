// The upper triangle of AᵀA, written once with GCC vector extensions and compiled once per
// instruction set (gram_avx512.cpp, gram_avx2.cpp, gram_generic.cpp).
//
// A GEMM whose depth is the long dimension (the n rows), so it is blocked along n: each slice of
// KC rows is packed once, as [KC][GNR] column panels (copies of contiguous row pieces, done row by
// row so every thread reads whole rows of A, as the prefetcher likes), then every register tile on
// or above the diagonal is accumulated over the slice and added to the float64 result.  The block
// is GMR x GNR with GMR dividing GNR, so a tile's rows are a slice of some column panel (read with
// stride GNR) and no second, row-major pack is needed: 4 x 24 on AVX2 (12 accumulators + 3 panel
// vectors + 1 broadcast = 16 ymm registers; measured 5-10% faster than the kNN's 6 x 16 with its
// two packs), 8 x 48 on AVX-512.  A column panel (KC x GNR floats, 48 KiB) stays in L2 while the
// tiles above the diagonal stream past; panels go to the threads widest first (dynamic schedule),
// since panel p has about p + 1 tiles.  Summing in float32 over at most KC rows and then in float64
// is more accurate than a float32 GEMM over all n rows, and the triangle is half of torch's flops.
//
// This header is included by exactly one translation unit per ISA, after that TU has switched the
// ISA on with `#pragma GCC target` (see fused_knn_std.h for why not with compiler flags).

#include "fused_knn_std.h"
#include "gram.h"

namespace tlfast {
namespace cpu {
namespace TLFAST_ISA {
namespace {

#include "register_block.h"

constexpr int GNV = 3;                             // vectors per tile row
constexpr int GNR = GNV * W;                       // columns per panel: 24 on AVX2, 48 on AVX-512
constexpr int GMR = TLFAST_ISA_AVX512 ? 8 : 4;     // rows per tile, a divisor of GNR
static_assert(GNR % GMR == 0, "a tile's rows must lie in one column panel");
// Rows per slice: a panel of KC x GNR floats is 48 KiB, read from L2 (3 vectors per step, half of
// L2's bandwidth at the FMA rate).  On the 2-core EPYC 512 rows measured ~10% faster than 256 (a
// 24 KiB panel in L1): half the float64 tile updates and packing barriers; 768 was no faster.
constexpr int64_t KC = TLFAST_ISA_AVX512 ? 256 : 512;

// Columns [c0, c0 + GNR) of one row, zero past column d.
inline void pack_piece(const float* row, int64_t d, int64_t c0, float* out) {
  const int64_t valid = std::min<int64_t>(GNR, d - c0);
  if (valid == GNR) {
    std::memcpy(out, row + c0, GNR * sizeof(float));
  } else {
    for (int64_t j = 0; j < valid; ++j) out[j] = row[c0 + j];
    for (int64_t j = valid; j < GNR; ++j) out[j] = 0.0f;
  }
}

}  // namespace

void gram_upper_add(const float* a, int64_t n, int64_t d, int threads, double* g) {
  if (n <= 0 || d <= 0) return;
  const int64_t panels = (d + GNR - 1) / GNR;
  const int64_t kc = std::min<int64_t>(KC, n);
  Buffer cols = aligned_floats((size_t)panels * kc * GNR);
#pragma omp parallel num_threads(threads)
  for (int64_t k0 = 0; k0 < n; k0 += kc) {
    const int64_t kk = std::min(kc, n - k0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < kk; ++t) {
      const float* row = a + (k0 + t) * d;
      for (int64_t p = 0; p < panels; ++p) pack_piece(row, d, p * GNR, cols.get() + (p * kc + t) * GNR);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t p = panels - 1 - q;
      const int64_t c0 = p * GNR, width = std::min<int64_t>(GNR, d - c0);
      const float* cp = cols.get() + p * kc * GNR;
      // Tiles with an entry on or above the diagonal: first row < c0 + width.
      for (int64_t r0 = 0; r0 < c0 + width; r0 += GMR) {
        vf acc[GMR][GNV];
        accumulate_block<GMR, GNV, GNR>(cols.get() + (r0 / GNR) * kc * GNR + r0 % GNR, cp, kk, acc);
        const int64_t height = std::min<int64_t>(GMR, d - r0);
        for (int64_t r = 0; r < height; ++r) {
          float part[GNR];
          std::memcpy(part, &acc[r][0], sizeof(part));
          double* out = g + (r0 + r) * d + c0;
          for (int64_t j = 0; j < width; ++j) out[j] += part[j];
        }
      }
    }
  }
}

}  // namespace TLFAST_ISA
}  // namespace cpu
}  // namespace tlfast
