// The fused Sinkhorn tile pass, written once with GCC vector extensions and compiled once per
// instruction set (sinkhorn_avx512.cpp, sinkhorn_avx2.cpp, sinkhorn_generic.cpp).
//
// Same register block as the fused kNN (fused_knn.h): MR rows of u x NR rows of v accumulated in
// vector registers over d, with v packed once into [d][NR] panels that stay in L1 while a block of
// rows of u (half an L2) streams past them.  The epilogue, instead of a top-k, folds the tile into
// an online log-sum-exp per row: a running scalar maximum M_i and per-lane sums S_i of
// exp(z_ij - M_i).  A tile only rescales S_i when one of its values beats M_i (a vector compare,
// then a horizontal max), which after the first panels is rare, so the cost is one fast exp per
// pair against the 2d flops of its dot product.
//
// This header is included by exactly one translation unit per ISA, after that TU has switched the
// ISA on with `#pragma GCC target` (see fused_knn_std.h for why not with compiler flags).

#include "fused_knn_std.h"
#include "sinkhorn.h"

namespace tlfast {
namespace cpu {
namespace TLFAST_ISA {
namespace {

#include "register_block.h"

// beta of the padding columns past m: finite (so that 0 * it stays 0 in the cost sum) and far
// below any real z, so exp(z - M) is exactly 0 there.
constexpr float kPadBeta = -1e30f;

inline bool any_greater(vf a, float t) {
  const vi m = a > t;
  int32_t lanes[W];
  std::memcpy(lanes, &m, sizeof(m));
  int32_t any = 0;
  for (int l = 0; l < W; ++l) any |= lanes[l];
  return any != 0;
}

inline float hmax(vf a) {
  float x[W];
  std::memcpy(x, &a, sizeof(a));
  float m = x[0];
  for (int l = 1; l < W; ++l) m = x[l] > m ? x[l] : m;
  return m;
}

inline double hsum(vf a) {
  float x[W];
  std::memcpy(x, &a, sizeof(a));
  double s = 0.0;
  for (int l = 0; l < W; ++l) s += x[l];
  return s;
}

// exp(x) for x <= 0 (x - max), vectorised: 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 in
// [-ln2/2, ln2/2] (ln 2 split in two for an exact reduction), p the Cephes expf polynomial
// (relative error < 2e-7).  Below -87 (where float32 underflows) the result is exactly 0.
inline vf fast_exp(vf x) {
  const vi tiny = x < -87.0f;
  x = x < -87.0f ? splat(-87.0f) : x;
  const vf n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504088896341f + (x < 0.0f ? splat(-0.5f) : splat(0.5f)), vi), vf);
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf out = p * (vf)scale;
  return tiny ? splat(0.0f) : out;
}

// Panel p of v: rows [p*NR, p*NR + NR) as [d][NR], zero past m; its beta and cost_col lanes.
void pack_panel(const float* v, int64_t m, int64_t d, int64_t p, const float* beta, const float* cost_col,
                float* dst, float* dbeta, float* dcost) {
  for (int j = 0; j < NR; ++j) {
    const int64_t row = p * NR + j;
    const bool ok = row < m;
    for (int64_t t = 0; t < d; ++t) dst[t * NR + j] = ok ? v[row * d + t] : 0.0f;
    dbeta[j] = ok ? beta[row] : kPadBeta;
    dcost[j] = ok && cost_col ? cost_col[row] : 0.0f;
  }
}

void pack_rows(const float* u, int64_t n, int64_t d, int64_t r0, int64_t rows, float* dst) {
  for (int64_t i = 0; i < rows; i += MR) {
    float* panel = dst + i * d;
    for (int r = 0; r < MR; ++r) {
      const int64_t row = r0 + i + r;
      for (int64_t t = 0; t < d; ++t) panel[t * MR + r] = row < n ? u[row * d + t] : 0.0f;
    }
  }
}

// Rows of u per block: each packed panel of v is reused by every row of the block, so the block
// is as large as half an L2 allows (as in fused_knn.h).
int64_t block_rows(int64_t d) {
  int64_t mb = (512 * 1024 / 4) / std::max<int64_t>(d, 1);
  mb = std::max<int64_t>(MR, std::min<int64_t>(mb, 48 * MR));
  return mb / MR * MR;
}

template <bool COST>
void lse_impl(const float* u, int64_t n, const float* v, int64_t m, int64_t d, float scale, const float* beta,
              float alpha, const float* cost_col, int threads, float* out_lse, float* out_cost) {
  const int64_t panels = (m + NR - 1) / NR;
  Buffer vpacked = aligned_floats((size_t)panels * d * NR);
  Buffer vbeta = aligned_floats((size_t)panels * NR);
  Buffer vcost = aligned_floats((size_t)panels * NR);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < panels; ++p)
    pack_panel(v, m, d, p, beta, cost_col, vpacked.get() + p * d * NR, vbeta.get() + p * NR, vcost.get() + p * NR);

  const int64_t mb = block_rows(d);
  const int64_t blocks = (n + mb - 1) / mb;
  // Few row blocks (n small against the thread count): split the columns as well and merge the
  // partial log-sum-exps, so that every thread has work.
  int64_t segments = 1;
  if (blocks < threads) segments = std::min<int64_t>(panels, (threads + blocks - 1) / blocks);
  const int64_t per_seg = (panels + segments - 1) / segments;
  std::vector<float> part_max((size_t)segments * n), part_sum((size_t)segments * n), part_cost((size_t)segments * n);

#pragma omp parallel num_threads(threads)
  {
    Buffer upacked = aligned_floats((size_t)mb * d);
    // Per-row state: running maximum, and NV vectors of partial sums (of exp and of exp * cost).
    // Aligned float buffers, not std::vector<vf>: no library template is instantiated for the ISA.
    std::vector<float> rmax(mb);
    Buffer sum_buf = aligned_floats((size_t)mb * NR), cost_buf = aligned_floats((size_t)mb * NR);
    vf* rsum = reinterpret_cast<vf*>(sum_buf.get());
    vf* rcost = reinterpret_cast<vf*>(cost_buf.get());
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < blocks * segments; ++item) {
      const int64_t b = item / segments, seg = item % segments;
      const int64_t r0 = b * mb, rows = std::min(mb, n - r0);
      const int64_t rows_padded = (rows + MR - 1) / MR * MR;
      const int64_t p0 = seg * per_seg, p1 = std::min(panels, p0 + per_seg);
      pack_rows(u, n, d, r0, rows_padded, upacked.get());
      for (int64_t r = 0; r < rows; ++r) rmax[r] = -INFINITY;
      for (int64_t r = 0; r < rows * NV; ++r) rsum[r] = rcost[r] = splat(0.0f);
      for (int64_t p = p0; p < p1; ++p) {
        const float* vp = vpacked.get() + p * d * NR;
        vf bt[NV], ct[NV];
#pragma GCC unroll 4
        for (int w = 0; w < NV; ++w) {
          bt[w] = *(const vf*)(vbeta.get() + p * NR + w * W);
          ct[w] = *(const vf*)(vcost.get() + p * NR + w * W);
        }
        for (int64_t i = 0; i < rows_padded; i += MR) {
          vf acc[MR][NV];
          accumulate_block<MR>(upacked.get() + i * d, vp, d, acc);
          const int rmax_rows = (int)std::min<int64_t>(MR, rows - i);
          for (int r = 0; r < rmax_rows; ++r) {
            const int64_t row = i + r;
            vf z[NV];
#pragma GCC unroll 4
            for (int w = 0; w < NV; ++w) z[w] = acc[r][w] * scale + bt[w];
            vf top = z[0];
#pragma GCC unroll 4
            for (int w = 1; w < NV; ++w) top = z[w] > top ? z[w] : top;
            float mx = rmax[row];
            vf* s = &rsum[row * NV];
            vf* c = &rcost[row * NV];
            if (any_greater(top, mx)) {
              const float nm = hmax(top);
              const vf shrink = fast_exp(splat(mx - nm));  // 0 on the first panel (mx = -inf)
#pragma GCC unroll 4
              for (int w = 0; w < NV; ++w) {
                s[w] *= shrink;
                if (COST) c[w] *= shrink;
              }
              rmax[row] = mx = nm;
            }
#pragma GCC unroll 4
            for (int w = 0; w < NV; ++w) {
              const vf e = fast_exp(z[w] - mx);
              s[w] += e;
              if (COST) c[w] += e * (acc[r][w] * alpha + ct[w]);
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        double s = 0.0, c = 0.0;
        for (int w = 0; w < NV; ++w) {
          s += hsum(rsum[r * NV + w]);
          if (COST) c += hsum(rcost[r * NV + w]);
        }
        const size_t at = (size_t)seg * n + r0 + r;
        part_max[at] = rmax[r];
        part_sum[at] = (float)s;
        part_cost[at] = (float)c;
      }
    }
    // Merge the column segments: log sum exp = M + log sum_s S_s exp(M_s - M).
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      float top = -INFINITY;
      for (int64_t s = 0; s < segments; ++s) top = std::max(top, part_max[(size_t)s * n + r]);
      double s_tot = 0.0, c_tot = 0.0;
      for (int64_t s = 0; s < segments; ++s) {
        const size_t at = (size_t)s * n + r;
        if (part_max[at] == -INFINITY) continue;
        const double w = std::exp((double)part_max[at] - top);
        s_tot += w * part_sum[at];
        c_tot += w * part_cost[at];
      }
      out_lse[r] = (float)(top + std::log(s_tot));
      if (COST) out_cost[r] = (float)(c_tot / s_tot);
    }
  }
}

}  // namespace

void lse_rows(const float* u, int64_t n, const float* v, int64_t m, int64_t d, float scale, const float* beta,
              float alpha, const float* cost_col, int threads, float* out_lse, float* out_cost) {
  if (out_cost)
    lse_impl<true>(u, n, v, m, d, scale, beta, alpha, cost_col, threads, out_lse, out_cost);
  else
    lse_impl<false>(u, n, v, m, d, scale, beta, alpha, cost_col, threads, out_lse, out_cost);
}

}  // namespace TLFAST_ISA
}  // namespace cpu
}  // namespace tlfast
