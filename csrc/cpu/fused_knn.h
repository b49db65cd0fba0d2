// Fused distance + k-selection on the CPU, written once with GCC vector extensions and compiled
// once per instruction set (fused_knn_avx512.cpp, fused_knn_avx2.cpp, fused_knn_generic.cpp).
//
// The tile of the distance matrix is never written out: a register block of MR queries x NR corpus
// rows is accumulated in vector registers, the metric epilogue is applied there, and each row's
// NR candidates are compared against that query's current k-th best in one vector compare.  Only
// lanes that beat it reach the (scalar) heap, which after the first few tiles is rare.
//
// Every metric is turned into a key where larger is better:
//   value = ALPHA * acc + qterm[row] + cterm[col]      (acc: dot product, or sum s*log s for js)
//   key   = value (ip, cosine) or -value (l2, kl, js)
//
// This header is included by exactly one translation unit per ISA, after that TU has switched the
// ISA on with `#pragma GCC target` (see fused_knn_std.h for why not with compiler flags).

#include "fused_knn_std.h"

#if !defined(TLFAST_ISA) || !defined(TLFAST_ISA_AVX512) || !defined(TLFAST_ISA_AVX2)
#error "define TLFAST_ISA (avx512 | avx2 | generic), TLFAST_ISA_AVX512 and TLFAST_ISA_AVX2 (0/1) before including fused_knn.h"
#endif

namespace tlfast {
namespace cpu {
namespace TLFAST_ISA {

#if TLFAST_ISA_AVX512
constexpr int W = 16;   // floats per vector
constexpr int MR = 12;  // query rows per register block: 12 x 2 accumulators of 32 zmm registers
#elif TLFAST_ISA_AVX2
constexpr int W = 8;
constexpr int MR = 6;   // 6 x 2 accumulators of 16 ymm registers
#else
constexpr int W = 4;
constexpr int MR = 6;
#endif
constexpr int NV = 2;          // vectors per row of the register block
constexpr int NR = NV * W;     // corpus rows per packed panel
constexpr int MR_JS = 4;       // js needs registers for the log, so its block is shorter

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

static inline unsigned movemask(vi m) {
#if TLFAST_ISA_AVX512
  return (unsigned)_mm512_movepi32_mask((__m512i)m);
#elif TLFAST_ISA_AVX2
  return (unsigned)_mm256_movemask_ps((__m256)m);
#else
  return (unsigned)_mm_movemask_ps((__m128)m);
#endif
}

static inline vf splat(float x) { return vf{} + x; }

// Natural log, vectorised (Cephes logf polynomial on [sqrt(1/2), sqrt(2))).  Relative error
// below 2e-7 for normal inputs; log(0) returns about -88 (finite), so 0 * log(0) == 0 exactly,
// which is the convention the divergences need.
static inline vf fast_log(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const vi small = m < splat(0.70710678118654752f);
  e = e + small;                                  // small lanes are -1 (true)
  vf ef = __builtin_convertvector(e, vf);
  m = small ? (m + m - 1.0f) : (m - 1.0f);
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + ef * 0.693359375f;
}

template <Metric M>
struct Epilogue {
  static constexpr float ALPHA = (M == Metric::L2) ? -2.0f
                                 : (M == Metric::KL) ? -1.0f
                                 : (M == Metric::JS) ? -0.5f
                                                     : 1.0f;
  static constexpr bool SMALLER_IS_BETTER = (M == Metric::L2 || M == Metric::KL || M == Metric::JS);
  static constexpr int ROWS = (M == Metric::JS) ? MR_JS : MR;

  // value from the accumulator; the kl sentinel (see pack_corpus) becomes +inf.
  static inline vf value(vf acc, float qterm, vf cterm) {
    vf v = acc * ALPHA + (cterm + qterm);
    if (M == Metric::L2 || M == Metric::JS) v = v < 0.0f ? splat(0.0f) : v;
    if (M == Metric::KL) v = v > kKlInfThreshold ? splat(INFINITY) : v;
    return v;
  }
  static inline vf key(vf value) {
    vf k = SMALLER_IS_BETTER ? -value : value;
    return k == k ? k : splat(-INFINITY);  // a NaN never outranks a number
  }
};

// Inner loop over d for one MR x NR register block.
template <Metric M, int ROWS>
static inline void accumulate(const float* __restrict qp,  // [d][ROWS], packed query micro-panel
                              const float* __restrict cp,  // [d][NR], packed corpus panel
                              int64_t d, vf acc[ROWS][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.0f);
  for (int64_t t = 0; t < d; ++t) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = *(const vf*)(cp + t * NR + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const float a = qp[t * ROWS + r];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (M == Metric::JS) {
          const vf s = b[v] + a;
          acc[r][v] += s * fast_log(s);
        } else {
          acc[r][v] += b[v] * a;
        }
      }
    }
  }
}

// Bounded heap of the k best (key, index) pairs; the root is the worst kept.
struct TopK {
  float* key;
  int64_t* idx;
  int64_t size;
  int64_t k;

  // a is worse than b: smaller key, or equal key and larger index.
  static inline bool worse(float ka, int64_t ia, float kb, int64_t ib) {
    return ka < kb || (ka == kb && ia > ib);
  }
  inline float threshold() const { return size < k ? -INFINITY : key[0]; }

  void sift_down(int64_t i) {
    const float kx = key[i];
    const int64_t ix = idx[i];
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= size) break;
      if (c + 1 < size && worse(key[c + 1], idx[c + 1], key[c], idx[c])) ++c;
      if (!worse(key[c], idx[c], kx, ix)) break;
      key[i] = key[c];
      idx[i] = idx[c];
      i = c;
    }
    key[i] = kx;
    idx[i] = ix;
  }
  void push(float kx, int64_t ix) {
    if (size < k) {
      int64_t i = size++;
      while (i > 0) {
        const int64_t p = (i - 1) / 2;
        if (!worse(kx, ix, key[p], idx[p])) break;
        key[i] = key[p];
        idx[i] = idx[p];
        i = p;
      }
      key[i] = kx;
      idx[i] = ix;
    } else if (worse(key[0], idx[0], kx, ix)) {
      key[0] = kx;
      idx[0] = ix;
      sift_down(0);
    }
  }
};

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], AlignedFree>;

static Buffer aligned_floats(size_t count) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, std::max<size_t>(count, 1) * sizeof(float)) != 0) throw std::bad_alloc();
  return Buffer(static_cast<float*>(p));
}

// Per-row transform applied once while packing: cosine rows are normalised, kl corpus rows become
// log c (with a large negative sentinel for c == 0, so that q > 0 against c == 0 gives +inf).
template <Metric M>
static inline float corpus_entry(float x, float inv_norm) {
  if (M == Metric::COSINE) return x * inv_norm;
  if (M == Metric::KL) return x > 0.0f ? std::log(x) : -kKlZeroLog;
  return x;
}

static inline double xlogx(double x) { return x > 0.0 ? x * std::log(x) : 0.0; }

// Row terms of the epilogue: l2 ||x||^2, kl sum q log q (queries only), js (sum x log x + ln2 sum x) / 2.
template <Metric M>
static float row_term(const float* x, int64_t d, bool is_query) {
  double s = 0.0;
  if (M == Metric::L2) {
    for (int64_t t = 0; t < d; ++t) s += (double)x[t] * x[t];
  } else if (M == Metric::KL) {
    if (!is_query) return 0.0f;
    for (int64_t t = 0; t < d; ++t) s += xlogx(x[t]);
  } else if (M == Metric::JS) {
    for (int64_t t = 0; t < d; ++t) s += xlogx(x[t]) + 0.69314718055994531 * x[t];
    s *= 0.5;
  }
  return (float)s;
}

static float inverse_norm(const float* x, int64_t d) {
  double s = 0.0;
  for (int64_t t = 0; t < d; ++t) s += (double)x[t] * x[t];
  return s > 0.0 ? (float)(1.0 / std::sqrt(s)) : 0.0f;
}

// Corpus panel p: rows [p*NR, p*NR+NR) as [d][NR] (zero padded past n) and their epilogue terms.
template <Metric M>
static void pack_panel(const float* c, int64_t n, int64_t d, int64_t p, float* dst, float* cterm) {
  for (int j = 0; j < NR; ++j) {
    const int64_t row = p * NR + j;
    if (row < n) {
      const float* x = c + row * d;
      const float inv = (M == Metric::COSINE) ? inverse_norm(x, d) : 1.0f;
      for (int64_t t = 0; t < d; ++t) dst[t * NR + j] = corpus_entry<M>(x[t], inv);
      cterm[j] = row_term<M>(x, d, false);
    } else {
      for (int64_t t = 0; t < d; ++t) dst[t * NR + j] = 0.0f;
      cterm[j] = 0.0f;
    }
  }
}

template <Metric M>
static void pack_corpus(const float* c, int64_t n, int64_t d, float* packed, float* cterm, int threads) {
  const int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < panels; ++p) pack_panel<M>(c, n, d, p, packed + p * d * NR, cterm + p * NR);
}

// Query micro-panels: rows [r0, r0 + rows) of q as consecutive [d][ROWS] panels.
template <Metric M, int ROWS>
static void pack_queries(const float* q, int64_t nq, int64_t d, int64_t r0, int64_t rows, float* packed,
                         float* qterm) {
  for (int64_t i = 0; i < rows; i += ROWS) {
    float* dst = packed + i * d;
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = r0 + i + r;
      if (row < nq) {
        const float* x = q + row * d;
        const float inv = (M == Metric::COSINE) ? inverse_norm(x, d) : 1.0f;
        for (int64_t t = 0; t < d; ++t) dst[t * ROWS + r] = x[t] * inv;
        qterm[i + r] = row_term<M>(x, d, true);
      } else {
        for (int64_t t = 0; t < d; ++t) dst[t * ROWS + r] = 0.0f;
        qterm[i + r] = 0.0f;
      }
    }
  }
}

// Query block size: each corpus panel streamed from memory is reused for every query of the
// block (2 * rows flops per loaded float), so the block is as large as half an L2 allows.
static int64_t query_block_rows(int64_t d, int rows) {
  int64_t mb = (512 * 1024 / 4) / std::max<int64_t>(d, 1);
  mb = std::max<int64_t>(rows, std::min<int64_t>(mb, 48 * rows));
  return mb / rows * rows;
}

template <Metric M>
static void knn_impl(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, int64_t k,
                     bool exclude_self, int threads, float* out_values, int64_t* out_idx) {
  using E = Epilogue<M>;
  constexpr int ROWS = E::ROWS;
  const int64_t panels = (n + NR - 1) / NR;
  int64_t mb = query_block_rows(d, ROWS);
  int64_t qblocks = (nq + mb - 1) / mb;
  // Few query blocks: split the corpus into segments too, then merge the per-segment lists.
  const auto segments_for = [&](int64_t blocks) {
    return blocks < threads ? std::min<int64_t>(panels, (threads + blocks - 1) / blocks * 2) : int64_t{1};
  };
  int64_t segments = segments_for(qblocks);
  // Each segment holds a k-heap per query: segments * nq * k * 12 bytes, which with a large k
  // grows with the thread count (nq = 100, k = 50,000: 60 MB per segment).  Past kHeapBudget,
  // parallelise over smaller query blocks instead (>= ROWS rows, enough blocks for every thread)
  // and cap the segments, so the heaps cost at most max(nq * k * 12, kHeapBudget) bytes.
  constexpr size_t kHeapBudget = size_t{64} << 20;
  const size_t segment_heap_bytes = (size_t)nq * k * (sizeof(float) + sizeof(int64_t));
  if (segments > 1 && segments * segment_heap_bytes > kHeapBudget) {
    const int64_t per_thread = (nq + threads - 1) / threads;
    mb = std::min<int64_t>(mb, std::max<int64_t>(ROWS, (per_thread + ROWS - 1) / ROWS * ROWS));
    qblocks = (nq + mb - 1) / mb;
    segments = std::min<int64_t>(segments_for(qblocks),
                                 std::max<int64_t>(1, (int64_t)(kHeapBudget / segment_heap_bytes)));
  }
  segments = std::max<int64_t>(segments, 1);
  // Several query blocks visit every panel: pack the corpus once.  One block: each panel is
  // packed into a thread-local buffer right before use, so the corpus is read exactly once.
  const bool prepack = qblocks > 1;
  Buffer cpacked = aligned_floats(prepack ? (size_t)panels * d * NR : 0);
  Buffer cterm = aligned_floats(prepack ? (size_t)panels * NR : 0);
  if (prepack) pack_corpus<M>(c, n, d, cpacked.get(), cterm.get(), threads);
  const int64_t panels_per_seg = (panels + segments - 1) / segments;

  std::vector<float> hkey((size_t)segments * nq * k);
  std::vector<int64_t> hidx((size_t)segments * nq * k);
  std::vector<int64_t> hsize((size_t)segments * nq, 0);

#pragma omp parallel num_threads(threads)
  {
    Buffer qpacked = aligned_floats((size_t)mb * d);
    Buffer cbuf = aligned_floats(prepack ? 0 : (size_t)d * NR);
    Buffer cbuf_term = aligned_floats(NR);
    std::vector<float> qterm(mb), thr(mb);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qblocks * segments; ++item) {
      const int64_t qb = item / segments, seg = item % segments;
      const int64_t r0 = qb * mb, rows = std::min(mb, nq - r0);
      const int64_t rows_padded = (rows + ROWS - 1) / ROWS * ROWS;
      const int64_t p0 = seg * panels_per_seg, p1 = std::min(panels, p0 + panels_per_seg);
      if (p0 >= p1) continue;
      pack_queries<M, ROWS>(q, nq, d, r0, rows_padded, qpacked.get(), qterm.data());
      std::vector<TopK> heaps(rows);
      for (int64_t r = 0; r < rows; ++r) {
        const size_t off = ((size_t)seg * nq + r0 + r);
        heaps[r] = TopK{hkey.data() + off * k, hidx.data() + off * k, 0, k};
        thr[r] = -INFINITY;
      }
      for (int64_t p = p0; p < p1; ++p) {
        const float* cp;
        const float* ctp;
        if (prepack) {
          cp = cpacked.get() + p * d * NR;
          ctp = cterm.get() + p * NR;
        } else {
          pack_panel<M>(c, n, d, p, cbuf.get(), cbuf_term.get());
          cp = cbuf.get();
          ctp = cbuf_term.get();
        }
        const int64_t col0 = p * NR;
        const unsigned valid = (n - col0 >= NR) ? (unsigned)((1ull << NR) - 1) : (unsigned)((1ull << (n - col0)) - 1);
        for (int64_t i = 0; i < rows_padded; i += ROWS) {
          vf acc[ROWS][NV];
          accumulate<M, ROWS>(qpacked.get() + i * d, cp, d, acc);
          const int rmax = (int)std::min<int64_t>(ROWS, rows - i);
          for (int r = 0; r < rmax; ++r) {
            const int64_t row = i + r;
            const float t = thr[row];
            unsigned hits = 0;
            vf keys[NV];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              const vf ct = *(const vf*)(ctp + v * W);
              keys[v] = E::key(E::value(acc[r][v], qterm[row], ct));
              hits |= movemask(keys[v] >= t) << (v * W);
            }
            hits &= valid;
            if (exclude_self) {
              const int64_t self = r0 + row - col0;
              if (self >= 0 && self < NR) hits &= ~(1u << self);
            }
            if (!hits) continue;
            float kf[NR];
            std::memcpy(kf, keys, sizeof(kf));
            TopK& h = heaps[row];
            while (hits) {
              const int lane = __builtin_ctz(hits);
              hits &= hits - 1;
              h.push(kf[lane], col0 + lane);
            }
            thr[row] = h.threshold();
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) hsize[(size_t)seg * nq + r0 + r] = heaps[r].size;
    }

    // Merge the segments' lists and order each query's k best, best first, ties by index.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < nq; ++r) {
      std::vector<std::pair<float, int64_t>> cand;
      cand.reserve(segments * k);
      for (int64_t s = 0; s < segments; ++s) {
        const size_t off = ((size_t)s * nq + r) * k;
        for (int64_t j = 0; j < hsize[(size_t)s * nq + r]; ++j) cand.emplace_back(hkey[off + j], hidx[off + j]);
      }
      auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      };
      const int64_t take = std::min<int64_t>(k, (int64_t)cand.size());
      std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), better);
      for (int64_t j = 0; j < k; ++j) {
        const bool ok = j < take;
        const float key = ok ? cand[j].first : -INFINITY;
        out_values[r * k + j] = E::SMALLER_IS_BETTER ? -key : key;
        out_idx[r * k + j] = ok ? cand[j].second : -1;
      }
    }
  }
}

template <Metric M>
static void pairwise_impl(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, int threads,
                          float* out) {
  using E = Epilogue<M>;
  constexpr int ROWS = E::ROWS;
  const int64_t panels = (n + NR - 1) / NR;
  Buffer cpacked = aligned_floats((size_t)panels * d * NR);
  Buffer cterm = aligned_floats((size_t)panels * NR);
  pack_corpus<M>(c, n, d, cpacked.get(), cterm.get(), threads);
  const int64_t mb = query_block_rows(d, ROWS);
  const int64_t qblocks = (nq + mb - 1) / mb;
#pragma omp parallel num_threads(threads)
  {
    Buffer qpacked = aligned_floats((size_t)mb * d);
    std::vector<float> qterm(mb);
#pragma omp for schedule(dynamic, 1)
    for (int64_t qb = 0; qb < qblocks; ++qb) {
      const int64_t r0 = qb * mb, rows = std::min(mb, nq - r0);
      const int64_t rows_padded = (rows + ROWS - 1) / ROWS * ROWS;
      pack_queries<M, ROWS>(q, nq, d, r0, rows_padded, qpacked.get(), qterm.data());
      for (int64_t p = 0; p < panels; ++p) {
        const float* cp = cpacked.get() + p * d * NR;
        const int64_t col0 = p * NR, cols = std::min<int64_t>(NR, n - col0);
        for (int64_t i = 0; i < rows_padded; i += ROWS) {
          vf acc[ROWS][NV];
          accumulate<M, ROWS>(qpacked.get() + i * d, cp, d, acc);
          const int rmax = (int)std::min<int64_t>(ROWS, rows - i);
          for (int r = 0; r < rmax; ++r) {
            float vals[NR];
            for (int v = 0; v < NV; ++v) {
              const vf ct = *(const vf*)(cterm.get() + col0 + v * W);
              const vf val = E::value(acc[r][v], qterm[i + r], ct);
              std::memcpy(vals + v * W, &val, sizeof(val));
            }
            std::memcpy(out + (r0 + i + r) * n + col0, vals, cols * sizeof(float));
          }
        }
      }
    }
  }
}

void knn(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, int64_t k, Metric metric,
         bool exclude_self, int threads, float* out_values, int64_t* out_idx) {
  switch (metric) {
    case Metric::IP: return knn_impl<Metric::IP>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::COSINE: return knn_impl<Metric::COSINE>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::L2: return knn_impl<Metric::L2>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::KL: return knn_impl<Metric::KL>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::JS: return knn_impl<Metric::JS>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
  }
}

void pairwise(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, Metric metric, int threads,
              float* out) {
  switch (metric) {
    case Metric::IP: return pairwise_impl<Metric::IP>(q, nq, c, n, d, threads, out);
    case Metric::COSINE: return pairwise_impl<Metric::COSINE>(q, nq, c, n, d, threads, out);
    case Metric::L2: return pairwise_impl<Metric::L2>(q, nq, c, n, d, threads, out);
    case Metric::KL: return pairwise_impl<Metric::KL>(q, nq, c, n, d, threads, out);
    case Metric::JS: return pairwise_impl<Metric::JS>(q, nq, c, n, d, threads, out);
  }
}

}  // namespace TLFAST_ISA
}  // namespace cpu
}  // namespace tlfast
