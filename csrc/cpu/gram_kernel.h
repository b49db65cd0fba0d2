// The upper triangle of (A - 1sᵀ)ᵀ(A - 1sᵀ) (s an optional shift row), written once with GCC vector
// extensions and compiled once per instruction set (gram_avx512.cpp, gram_avx2.cpp, gram_generic.cpp).
//
// A GEMM whose depth is the long dimension (the n rows), so it is blocked along n: each slice of
// KC rows is packed once, as [KC][GNR] column panels (copies of contiguous row pieces, minus the
// shift, done row by row so every thread reads whole rows of A, as the prefetcher likes), then every
// register tile on or above the diagonal is accumulated over the slice and added to a float64 sum.
// The block is GMR x GNR with GMR dividing GNR, so a tile's rows are a slice of some column panel
// (read with stride GNR) and no second, row-major pack is needed: 4 x 24 on AVX2 (12 accumulators +
// 3 panel vectors + 1 broadcast = 16 ymm registers; measured 5-10% faster than the kNN's 6 x 16
// with its two packs, and than a second, contiguous pack of the tile rows), 8 x 48 on AVX-512.  A
// column panel (KC x GNR floats, 48 KiB) stays in L2 while the tiles above the diagonal stream past;
// panels go to the threads widest first (dynamic schedule), since panel p has about p + 1 tiles.
//
// Over more than two slices the float64 sums live in strips, one per column panel ((p + 1) GNR rows
// x GNR, contiguous, about d²/2 doubles in all), and go into the caller's row-major matrix once, at
// the end: a tile's update is then 4 contiguous rows of 24 doubles instead of 4 rows 8d bytes apart,
// scattered over the whole d x d matrix (8 MiB at d = 1024, past L2) for every slice - measured
// 5-13% faster on the 2-core EPYC at 100k x 1024.  Summing in float32 over at most KC rows and then
// in float64 is more accurate than a float32 GEMM over all n rows, and the triangle is half of
// torch's flops.  Given class codes, the thread that packs a row also adds it to its float32 sum
// of that class (flushed to float64 every SUM_ROWS of its rows), so LogME's moments take one read
// of the features.
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

// Columns [c0, c0 + GNR) of one row minus the shift (when given), zero past column d.
inline void pack_piece(const float* row, const float* shift, int64_t d, int64_t c0, float* out) {
  const int64_t valid = std::min<int64_t>(GNR, d - c0);
  if (valid == GNR && shift == nullptr) {
    std::memcpy(out, row + c0, GNR * sizeof(float));
  } else {
    if (shift == nullptr)
      for (int64_t j = 0; j < valid; ++j) out[j] = row[c0 + j];
    else
      for (int64_t j = 0; j < valid; ++j) out[j] = row[c0 + j] - shift[c0 + j];
    for (int64_t j = valid; j < GNR; ++j) out[j] = 0.0f;
  }
}

struct DoubleFree {
  void operator()(double* p) const { std::free(p); }
};

}  // namespace

// Rows of each thread's float32 class sums between flushes into the float64 ones: the sums' error
// class of a float32 sum over at most this many rows (what an index_add over 8192-row chunks gave).
constexpr int64_t SUM_ROWS = 8192;

bool gram_upper_add(const float* a, int64_t n, int64_t d, int threads, double* g, const float* shift,
                    const int64_t* codes, int64_t classes, double* sums) {
  if (n <= 0 || d <= 0) return true;
  const int64_t panels = (d + GNR - 1) / GNR;
  const int64_t kc = std::min<int64_t>(KC, n);
  Buffer cols = aligned_floats((size_t)panels * kc * GNR);
  // Strip p: rows [0, (p + 1) GNR) x the panel's GNR columns, at offset GNR² p (p + 1) / 2.  Worth
  // its zeroing and final pass only over more than two slices; up to two, tiles add into g directly,
  // as they do past d ~ 11k, where the strips (d²/2 doubles) would pass 512 MiB.
  const size_t strip_bytes = (size_t)GNR * GNR * panels * (panels + 1) / 2 * sizeof(double);
  const bool use_strips = n > 2 * kc && strip_bytes <= (size_t(512) << 20);
  std::unique_ptr<double[], DoubleFree> strips;
  if (use_strips) {
    void* raw = nullptr;
    if (posix_memalign(&raw, 64, strip_bytes) != 0) throw std::bad_alloc();
    strips.reset(static_cast<double*>(raw));
  }
  // Class sums, when asked: per thread, float32 rows of the classes it has seen since its last flush.
  const bool with_sums = codes != nullptr && sums != nullptr && classes > 0;
  Buffer partial = aligned_floats(with_sums ? (size_t)threads * classes * d : 1);
  std::vector<unsigned char> touched(with_sums ? (size_t)threads * classes : 1, 0);
  if (with_sums) std::memset(partial.get(), 0, sizeof(float) * threads * classes * d);
  int bad_code = 0;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* mine = with_sums ? partial.get() + (size_t)tid * classes * d : nullptr;
    unsigned char* seen = with_sums ? touched.data() + (size_t)tid * classes : nullptr;
    int64_t since_flush = 0;
    auto flush = [&]() {
#pragma omp critical(tlfast_gram_class_sums)
      for (int64_t c = 0; c < classes; ++c) {
        if (!seen[c]) continue;
        float* src = mine + c * d;
        double* dst = sums + c * d;
        for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
        std::memset(src, 0, sizeof(float) * d);
        seen[c] = 0;
      }
      since_flush = 0;
    };
    if (use_strips) {
#pragma omp for schedule(static)
      for (int64_t p = 0; p < panels; ++p)
        std::memset(strips.get() + (size_t)GNR * GNR * p * (p + 1) / 2, 0, sizeof(double) * GNR * GNR * (p + 1));
    }
    for (int64_t k0 = 0; k0 < n; k0 += kc) {
      const int64_t kk = std::min(kc, n - k0);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < kk; ++t) {
        const float* row = a + (k0 + t) * d;
        for (int64_t p = 0; p < panels; ++p) pack_piece(row, shift, d, p * GNR, cols.get() + (p * kc + t) * GNR);
        if (with_sums) {
          const int64_t c = codes[k0 + t];
          if (c < 0 || c >= classes) {
#pragma omp atomic write
            bad_code = 1;
            continue;
          }
          float* dst = mine + c * d;
          if (shift == nullptr)
            for (int64_t j = 0; j < d; ++j) dst[j] += row[j];
          else
            for (int64_t j = 0; j < d; ++j) dst[j] += row[j] - shift[j];
          seen[c] = 1;
          if (++since_flush == SUM_ROWS) flush();
        }
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t p = panels - 1 - q;
        const int64_t c0 = p * GNR, width = std::min<int64_t>(GNR, d - c0);
        const float* cp = cols.get() + p * kc * GNR;
        double* strip = use_strips ? strips.get() + (size_t)GNR * GNR * p * (p + 1) / 2 : nullptr;
        // Tiles with an entry on or above the diagonal: first row < c0 + width (<= (p + 1) GNR - GMR).
        for (int64_t r0 = 0; r0 < c0 + width; r0 += GMR) {
          vf acc[GMR][GNV];
          accumulate_block<GMR, GNV, GNR>(cols.get() + (r0 / GNR) * kc * GNR + r0 % GNR, cp, kk, acc);
          if (use_strips) {
#pragma GCC unroll 8
            for (int r = 0; r < GMR; ++r) {
              float part[GNR];
              std::memcpy(part, &acc[r][0], sizeof(part));
              double* out = strip + (r0 + r) * GNR;
#pragma GCC unroll 48
              for (int j = 0; j < GNR; ++j) out[j] += part[j];
            }
          } else {
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
    if (with_sums) flush();
    if (use_strips) {
      // Into g: rows [0, min(d, first row past panel p's last tile)) of each panel's columns.
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t c0 = p * GNR, width = std::min<int64_t>(GNR, d - c0);
        const int64_t rows = std::min<int64_t>(d, (c0 + width + GMR - 1) / GMR * GMR);
        const double* strip = strips.get() + (size_t)GNR * GNR * p * (p + 1) / 2;
        for (int64_t i = 0; i < rows; ++i) {
          double* out = g + i * d + c0;
          const double* in = strip + i * GNR;
          for (int64_t j = 0; j < width; ++j) out[j] += in[j];
        }
      }
    }
  }
  return bad_code == 0;
}

}  // namespace TLFAST_ISA
}  // namespace cpu
}  // namespace tlfast
