// Block-wide k-selection on the GPU (k <= 2048), fused with the metric epilogue of a distance tile.
#pragma once
#include <cstdint>

namespace tlfast {
namespace cuda {

constexpr int64_t kMaxSelectK = 2048;

// How a tile entry becomes a metric value while it is read (faiss adds norms in this pass too):
//   NONE    value = tile                        (ip; kl / js tiles that are already values)
//   COSINE  value = tile * qterm[r] * cterm[c]  (inverse norms)
//   L2      value = max(qterm[r] + cterm[c] - 2 tile, 0)
enum class Epilogue : int { NONE = 0, COSINE = 1, L2 = 2 };

// For each of `rows` rows of `tile` (row stride ld, float32), merges the `cols` entries of the row
// into that row's running list of the k best (values [rows, k] float32, indices [rows, k] int64,
// best first, ties to the smaller index), in place.  Column c has corpus index col_base + c;
// qterm is indexed by row, cterm by column (both device pointers, or null with Epilogue::NONE).
// has_prior: the lists already hold k entries from earlier tiles (else they start empty).
// exclude_row_base >= 0 drops the entry whose index equals exclude_row_base + row (self pair).
// Runs on `stream` without synchronising.  Rows with fewer than k candidates in total get index -1.
void select_k(const float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t col_base,
              const float* qterm, const float* cterm, Epilogue epilogue, bool smaller_is_better,
              int64_t exclude_row_base, bool has_prior, int64_t k, float* values, int64_t* indices,
              uintptr_t stream);

}  // namespace cuda
}  // namespace tlfast
