// The float32 register block of the CPU kernels: ROWS x (VECS vectors) accumulated in registers
// over a depth, from two packed panels.  One microkernel for the fused kNN (fused_knn.h), the fused
// Sinkhorn pass (sinkhorn_kernel.h) and the Gram product (gram_kernel.h); each picks its block.
//
// Included inside `namespace tlfast::cpu::TLFAST_ISA` by a header that one translation unit per
// ISA includes after switching the ISA on (see fused_knn_std.h): the definitions are per ISA, so
// there is no include guard (tests/cpp/gram_check.cpp includes it once per layout it checks).

#if !defined(TLFAST_ISA) || !defined(TLFAST_ISA_AVX512) || !defined(TLFAST_ISA_AVX2)
#error "define TLFAST_ISA (avx512 | avx2 | generic), TLFAST_ISA_AVX512 and TLFAST_ISA_AVX2 (0/1) first (isa_begin.h)"
#endif

#ifndef TLFAST_ISA_AMX
#define TLFAST_ISA_AMX 0
#endif

#if TLFAST_ISA_AMX && TLFAST_ISA_AVX512
constexpr int W = 16;
constexpr int MR = 16;  // an AMX A tile holds 16 query rows
#elif TLFAST_ISA_AMX && TLFAST_ISA_AVX2
constexpr int W = 8;    // tests only: the AMX block with the tile operations written out
constexpr int MR = 16;
#elif TLFAST_ISA_AVX512
constexpr int W = 16;   // floats per vector
constexpr int MR = 12;  // rows per register block: 12 x 2 accumulators of 32 zmm registers
#elif TLFAST_ISA_AVX2
constexpr int W = 8;
constexpr int MR = 6;   // 6 x 2 accumulators of 16 ymm registers
#else
constexpr int W = 4;
constexpr int MR = 6;
#endif
constexpr int NV = 2;       // vectors per row of the register block
constexpr int NR = NV * W;  // columns per packed panel

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

static inline vf splat(float x) { return vf{} + x; }

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], AlignedFree>;

static inline Buffer aligned_floats(size_t count) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, std::max<size_t>(count, 1) * sizeof(float)) != 0) throw std::bad_alloc();
  return Buffer(static_cast<float*>(p));
}

// The term of a plain dot product; fused_knn.h passes s log s of the sum for js.
struct Product {
  vf operator()(vf b, float a) const { return b * a; }
};

// acc = the ROWS x (VECS * W) sums over `depth` of term(b, a) (the products, by default) of a row
// panel up (row r of step t at up[t * LDA + r]) and a column panel vp [depth][VECS * W].  LDA =
// ROWS for a packed row micro-panel; the Gram product reads its rows out of a column panel
// instead (LDA = VECS * W).
template <int ROWS, int VECS = NV, int LDA = ROWS, typename Term = Product>
static inline void accumulate_block(const float* __restrict up, const float* __restrict vp, int64_t depth,
                                    vf acc[ROWS][VECS], Term term = Term{}) {
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) acc[r][w] = splat(0.0f);
  for (int64_t t = 0; t < depth; ++t) {
    vf b[VECS];
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) b[w] = *(const vf*)(vp + t * (VECS * W) + w * W);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const float a = up[t * LDA + r];
#pragma GCC unroll 4
      for (int w = 0; w < VECS; ++w) acc[r][w] += term(b[w], a);
    }
  }
}
