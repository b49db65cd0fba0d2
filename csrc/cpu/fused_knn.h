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
// TLFAST_ISA_BF16DOT (AVX512-BF16 TU only): bf16 inputs of ip / cosine / l2 are multiplied with
// vdpbf16ps instead of being widened.
#ifndef TLFAST_ISA_BF16DOT
#define TLFAST_ISA_BF16DOT 0
#endif
// TLFAST_ISA_AMX (AMX TU only, with TLFAST_ISA_BF16DOT): for d >= 16 those products run on AMX
// tiles (tdpbf16ps) in blocks of 16 queries.
#ifndef TLFAST_ISA_AMX
#define TLFAST_ISA_AMX 0
#endif

namespace tlfast {
namespace cpu {
namespace TLFAST_ISA {

#include "register_block.h"

constexpr int MR_JS = 4;       // js needs registers for the log, so its block is shorter

static inline unsigned movemask(vi m) {
#if TLFAST_ISA_AVX512
  return (unsigned)_mm512_movepi32_mask((__m512i)m);
#elif TLFAST_ISA_AVX2
  return (unsigned)_mm256_movemask_ps((__m256)m);
#else
  return (unsigned)_mm_movemask_ps((__m128)m);
#endif
}

// Low-precision inputs (bf16, fp16) are widened to float32 row by row while packing, so the
// corpus is never copied to float32 as a whole: the packed panel is the only float32 form.
// Widening is exact, so the results equal those of the float32 kernel on the widened values.
static inline float widen(float x) { return x; }
static inline float widen(bf16_t x) {
  const uint32_t u = (uint32_t)x.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float widen(fp16_t x) {
#if TLFAST_ISA_AVX2
  return _cvtsh_ss(x.bits);  // F16C (switched on with avx2 in fused_knn_avx2.cpp / _avx512.cpp)
#else
  const uint32_t sign = (uint32_t)(x.bits & 0x8000u) << 16, e = (x.bits >> 10) & 0x1fu, man = x.bits & 0x3ffu;
  uint32_t u;
  if (e == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (e != 0) {
    u = sign | ((e + 112u) << 23) | (man << 13);
  } else {
    const float f = (float)man * 5.9604644775390625e-8f;  // subnormal: man * 2^-24, exact
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Row x as float32: itself for float32 input, else widened into scratch (d floats).
template <typename T>
static inline const float* float_row(const T* x, int64_t d, float* scratch) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else {
#if TLFAST_ISA_AVX2
    if constexpr (std::is_same<T, fp16_t>::value) {
      int64_t t = 0;
      for (; t + 8 <= d; t += 8)
        _mm256_storeu_ps(scratch + t, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + t))));
      for (; t < d; ++t) scratch[t] = widen(x[t]);
      return scratch;
    }
#endif
    for (int64_t t = 0; t < d; ++t) scratch[t] = widen(x[t]);
    return scratch;
  }
}

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

// bf16 products (vdpbf16ps): products of bf16 pairs are exact in fp32 and accumulate in fp32, so
// the values are those of the float32 kernel on the widened inputs up to the summation order.
// Panels then hold bf16 pairs (entries t, t+1 of a row in one 32-bit lane): corpus [ceil(d/2)][NR],
// query micro-panels [ceil(d/2)][ROWS]; both fit the float32 panel buffers (half their size).
// Cosine rows stay unnormalised (normalising would round them again): its epilogue scales by the
// inverse norms instead, kept in qterm / cterm.
template <Metric M, typename T>
constexpr bool kBf16Pairs = TLFAST_ISA_BF16DOT && std::is_same<T, bf16_t>::value &&
                            (M == Metric::IP || M == Metric::COSINE || M == Metric::L2);

template <typename T>
static inline uint32_t bf16_pair(const T* x, int64_t d, int64_t t2) {
  const uint32_t lo = x[2 * t2].bits, hi = (2 * t2 + 1 < d) ? x[2 * t2 + 1].bits : 0u;
  return lo | (hi << 16);
}

#if TLFAST_ISA_BF16DOT
template <int ROWS>
static inline void accumulate_bf16_pairs(const uint32_t* __restrict qp, const uint32_t* __restrict cp, int64_t d,
                                         vf acc[ROWS][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.0f);
  const int64_t d2 = (d + 1) / 2;
  for (int64_t t = 0; t < d2; ++t) {
#if TLFAST_ISA_AVX512
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_load_si512((const void*)(cp + t * NR + v * W));
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qp[t * ROWS + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = (vf)_mm512_dpbf16_ps((__m512)acc[r][v], a, b[v]);
    }
#else
    // vdpbf16ps written out (acc += lo(a) lo(b) + hi(a) hi(b), halves widened exactly): never
    // dispatched; tests/test_isa_isolation.py builds it for AVX2 to check the pair layout, packing
    // and epilogue on CPUs without AVX512-BF16.
    typedef uint32_t vu __attribute__((vector_size(W * 4)));
    vu b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *(const vu*)(cp + t * NR + v * W);
    for (int r = 0; r < ROWS; ++r) {
      const uint32_t a = qp[t * ROWS + r], alo_bits = a << 16, ahi_bits = a & 0xffff0000u;
      float alo, ahi;
      std::memcpy(&alo, &alo_bits, 4);
      std::memcpy(&ahi, &ahi_bits, 4);
      for (int v = 0; v < NV; ++v)
        acc[r][v] += (vf)(b[v] << 16) * alo + (vf)(b[v] & 0xffff0000u) * ahi;
    }
#endif
  }
}
#endif

// AMX: a block of 16 queries x NR corpus rows is NR / 16 fp32 C tiles (16 x 16), accumulated
// over d in steps of 32 bf16 (16 pairs): A tile = 16 query rows x 16 pairs, B tile = 16 pair-rows of
// a corpus panel x 16 columns, which is the pair layout above read with stride NR.  So AMX panels
// are the bf16 pair panels padded with zero pairs to amx_depth(d); query micro-panels are
// [16][amx_depth(d)] (row-major, as A tiles load).  For d >= 16, amx_depth(d) <= d, so both fit
// the float32 panel buffers; smaller d uses the vdpbf16ps path.
template <Metric M, typename T>
constexpr bool kAmx = TLFAST_ISA_AMX && kBf16Pairs<M, T>;
constexpr int64_t kAmxMinDim = 16;

static inline int64_t amx_depth(int64_t d) { return ((d + 1) / 2 + 15) / 16 * 16; }

template <Metric M, typename T>
static inline bool use_amx(int64_t d) {
  return kAmx<M, T> && d >= kAmxMinDim;
}

#if TLFAST_ISA_AMX
#if TLFAST_ISA_AVX512
struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every thread that runs tile instructions loads the configuration: tiles 0-1 C, 2 A, 3-4 B, each
// 16 rows of 64 bytes.  (The process asked the kernel for the tile state once: knn.cpp.)
static inline void amx_configure() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}
static inline void amx_release() { _tile_release(); }
#else
static inline void amx_configure() {}
static inline void amx_release() {}
#endif

template <int ROWS>
static inline void accumulate_amx(const uint32_t* __restrict qp, const uint32_t* __restrict cp, int64_t d,
                                  vf acc[ROWS][NV]) {
  static_assert(ROWS == 16, "an AMX A tile is 16 rows");
  const int64_t depth = amx_depth(d);
  alignas(64) float out[16 * NR];
#if TLFAST_ISA_AVX512
  static_assert(NR == 32, "two C tiles per block");
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t kc = 0; kc < depth; kc += 16) {
    _tile_loadd(2, qp + kc, depth * 4);
    _tile_loadd(3, cp + kc * NR, NR * 4);
    _tile_loadd(4, cp + kc * NR + 16, NR * 4);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  _tile_stored(0, out, NR * 4);
  _tile_stored(1, out + 16, NR * 4);
#else
  // tdpbf16ps written out (tests only): C[m][n] += sum_k lo(A[m][k]) lo(B[k][n]) + hi(A[m][k]) hi(B[k][n]).
  auto half = [](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  for (int m = 0; m < 16; ++m)
    for (int j = 0; j < NR; ++j) {
      float sum = 0.0f;
      for (int64_t t = 0; t < depth; ++t) {
        const uint32_t a = qp[m * depth + t], b = cp[t * NR + j];
        sum += half(a << 16) * half(b << 16) + half(a & 0xffff0000u) * half(b & 0xffff0000u);
      }
      out[m * NR + j] = sum;
    }
#endif
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(&acc[r][v], out + r * NR + v * W, sizeof(vf));
}
#endif

// js: the register block's sum of s log s, s = q_t + c_t, in place of the products.
struct SumLogSum {
  vf operator()(vf b, float a) const {
    const vf s = b + a;
    return s * fast_log(s);
  }
};

// Inner loop over d for one MR x NR register block (register_block.h).
template <Metric M, int ROWS>
static inline void accumulate(const float* __restrict qp,  // [d][ROWS], packed query micro-panel
                              const float* __restrict cp,  // [d][NR], packed corpus panel
                              int64_t d, vf acc[ROWS][NV]) {
  if (M == Metric::JS)
    accumulate_block<ROWS, NV, ROWS>(qp, cp, d, acc, SumLogSum{});
  else
    accumulate_block<ROWS>(qp, cp, d, acc);
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
template <Metric M, typename T>
static void pack_panel(const T* c, int64_t n, int64_t d, int64_t p, float* dst, float* cterm, float* scratch) {
  for (int j = 0; j < NR; ++j) {
    const int64_t row = p * NR + j;
    if (row < n) {
      const float* x = float_row(c + row * d, d, scratch);
      if constexpr (kBf16Pairs<M, T>) {
        uint32_t* dst2 = reinterpret_cast<uint32_t*>(dst);
        const int64_t d2 = (d + 1) / 2, depth = use_amx<M, T>(d) ? amx_depth(d) : d2;
        for (int64_t t2 = 0; t2 < depth; ++t2) dst2[t2 * NR + j] = t2 < d2 ? bf16_pair(c + row * d, d, t2) : 0u;
        cterm[j] = (M == Metric::COSINE) ? inverse_norm(x, d) : row_term<M>(x, d, false);
        continue;
      }
      const float inv = (M == Metric::COSINE) ? inverse_norm(x, d) : 1.0f;
      for (int64_t t = 0; t < d; ++t) dst[t * NR + j] = corpus_entry<M>(x[t], inv);
      cterm[j] = row_term<M>(x, d, false);
    } else {
      for (int64_t t = 0; t < d; ++t) dst[t * NR + j] = 0.0f;
      cterm[j] = 0.0f;
    }
  }
}

template <Metric M, typename T>
static void pack_corpus(const T* c, int64_t n, int64_t d, float* packed, float* cterm, int threads) {
  const int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(std::is_same<T, float>::value ? 0 : d);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p)
      pack_panel<M>(c, n, d, p, packed + p * d * NR, cterm + p * NR, scratch.data());
  }
}

// Query micro-panels: rows [r0, r0 + rows) of q as consecutive [d][ROWS] panels.
template <Metric M, int ROWS, typename T>
static void pack_queries(const T* q, int64_t nq, int64_t d, int64_t r0, int64_t rows, float* packed,
                         float* qterm, float* scratch) {
  for (int64_t i = 0; i < rows; i += ROWS) {
    float* dst = packed + i * d;
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = r0 + i + r;
      if (row < nq) {
        const float* x = float_row(q + row * d, d, scratch);
        if constexpr (kBf16Pairs<M, T>) {
          uint32_t* dst2 = reinterpret_cast<uint32_t*>(dst);
          const int64_t d2 = (d + 1) / 2;
          if (use_amx<M, T>(d)) {
            const int64_t depth = amx_depth(d);
            for (int64_t t2 = 0; t2 < depth; ++t2) dst2[r * depth + t2] = t2 < d2 ? bf16_pair(q + row * d, d, t2) : 0u;
          } else {
            for (int64_t t2 = 0; t2 < d2; ++t2) dst2[t2 * ROWS + r] = bf16_pair(q + row * d, d, t2);
          }
          qterm[i + r] = (M == Metric::COSINE) ? inverse_norm(x, d) : row_term<M>(x, d, true);
          continue;
        }
        const float inv = (M == Metric::COSINE) ? inverse_norm(x, d) : 1.0f;
        for (int64_t t = 0; t < d; ++t) dst[t * ROWS + r] = x[t] * inv;
        qterm[i + r] = row_term<M>(x, d, true);
      } else {
        if (use_amx<M, T>(d)) {  // AMX micro-panels are row-major, [ROWS][amx_depth(d)]
          for (int64_t t2 = 0; t2 < amx_depth(d); ++t2) dst[r * amx_depth(d) + t2] = 0.0f;
        } else {
          for (int64_t t = 0; t < d; ++t) dst[t * ROWS + r] = 0.0f;
        }
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

template <Metric M, typename T>
static void knn_impl(const T* q, int64_t nq, const T* c, int64_t n, int64_t d, int64_t k,
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
    std::vector<float> qterm(mb), thr(mb), scratch(std::is_same<T, float>::value ? 0 : d);
#if TLFAST_ISA_AMX
    if (use_amx<M, T>(d)) amx_configure();
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qblocks * segments; ++item) {
      const int64_t qb = item / segments, seg = item % segments;
      const int64_t r0 = qb * mb, rows = std::min(mb, nq - r0);
      const int64_t rows_padded = (rows + ROWS - 1) / ROWS * ROWS;
      const int64_t p0 = seg * panels_per_seg, p1 = std::min(panels, p0 + panels_per_seg);
      if (p0 >= p1) continue;
      pack_queries<M, ROWS>(q, nq, d, r0, rows_padded, qpacked.get(), qterm.data(), scratch.data());
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
          pack_panel<M>(c, n, d, p, cbuf.get(), cbuf_term.get(), scratch.data());
          cp = cbuf.get();
          ctp = cbuf_term.get();
        }
        const int64_t col0 = p * NR;
        const unsigned valid = (n - col0 >= NR) ? (unsigned)((1ull << NR) - 1) : (unsigned)((1ull << (n - col0)) - 1);
        for (int64_t i = 0; i < rows_padded; i += ROWS) {
          vf acc[ROWS][NV];
#if TLFAST_ISA_AMX
          if constexpr (kAmx<M, T>) {
            if (d >= kAmxMinDim)
              accumulate_amx<ROWS>(reinterpret_cast<const uint32_t*>(qpacked.get() + i * d),
                                   reinterpret_cast<const uint32_t*>(cp), d, acc);
            else
              accumulate_bf16_pairs<ROWS>(reinterpret_cast<const uint32_t*>(qpacked.get() + i * d),
                                          reinterpret_cast<const uint32_t*>(cp), d, acc);
          } else
#endif
#if TLFAST_ISA_BF16DOT
          if constexpr (kBf16Pairs<M, T>)
            accumulate_bf16_pairs<ROWS>(reinterpret_cast<const uint32_t*>(qpacked.get() + i * d),
                                        reinterpret_cast<const uint32_t*>(cp), d, acc);
          else
#endif
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
              keys[v] = (kBf16Pairs<M, T> && M == Metric::COSINE) ? E::key(acc[r][v] * (ct * qterm[row]))
                                                                  : E::key(E::value(acc[r][v], qterm[row], ct));
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
#if TLFAST_ISA_AMX
    if (use_amx<M, T>(d)) amx_release();
#endif

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
      pack_queries<M, ROWS>(q, nq, d, r0, rows_padded, qpacked.get(), qterm.data(), nullptr);
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

template <typename T>
static void knn_any(const T* q, int64_t nq, const T* c, int64_t n, int64_t d, int64_t k, Metric metric,
                    bool exclude_self, int threads, float* out_values, int64_t* out_idx) {
  switch (metric) {
    case Metric::IP: return knn_impl<Metric::IP>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::COSINE: return knn_impl<Metric::COSINE>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::L2: return knn_impl<Metric::L2>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::KL: return knn_impl<Metric::KL>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
    case Metric::JS: return knn_impl<Metric::JS>(q, nq, c, n, d, k, exclude_self, threads, out_values, out_idx);
  }
}

void knn(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, int64_t k, Metric metric,
         bool exclude_self, int threads, float* out_values, int64_t* out_idx) {
  knn_any(q, nq, c, n, d, k, metric, exclude_self, threads, out_values, out_idx);
}

void knn_half(const uint16_t* q, int64_t nq, const uint16_t* c, int64_t n, int64_t d, int64_t k, Metric metric,
              HalfType type, bool exclude_self, int threads, float* out_values, int64_t* out_idx) {
  if (type == HalfType::BF16)
    knn_any((const bf16_t*)q, nq, (const bf16_t*)c, n, d, k, metric, exclude_self, threads, out_values, out_idx);
  else
    knn_any((const fp16_t*)q, nq, (const fp16_t*)c, n, d, k, metric, exclude_self, threads, out_values, out_idx);
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
