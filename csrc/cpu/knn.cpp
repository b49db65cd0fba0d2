// Runtime dispatch to the widest instruction set this CPU supports.
#include "knn.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tlfast {
namespace cpu {

namespace {
enum class Isa { AVX512, AVX2, GENERIC };

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // fused_knn_avx512.cpp is compiled for all of these (its #pragma GCC target).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
    return Isa::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::AVX2;
#endif
  return Isa::GENERIC;
}

Isa best() {
  static const Isa isa = detect();
  return isa;
}

// fused_knn_amx.cpp: that set plus AMX-TILE / AMX-BF16, once Linux has granted this process the
// tile state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; kernels >= 5.16).
bool has_amx_bf16();

// fused_knn_avx512bf16.cpp: the AVX-512 set above plus AVX512-BF16 (vdpbf16ps).
bool has_bf16_dot() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = best() == Isa::AVX512 && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool has_amx_bf16() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool ok = [] {
    if (!has_bf16_dot() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}
}  // namespace

std::string isa() {
  switch (best()) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "generic";
  }
}

void knn(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, int64_t k, Metric metric,
         bool exclude_self, int threads, float* out_values, int64_t* out_idx) {
  switch (best()) {
    case Isa::AVX512: return avx512::knn(q, nq, c, n, d, k, metric, exclude_self, threads, out_values, out_idx);
    case Isa::AVX2: return avx2::knn(q, nq, c, n, d, k, metric, exclude_self, threads, out_values, out_idx);
    default: return generic::knn(q, nq, c, n, d, k, metric, exclude_self, threads, out_values, out_idx);
  }
}

void knn_half(const uint16_t* q, int64_t nq, const uint16_t* c, int64_t n, int64_t d, int64_t k, Metric metric,
              HalfType type, bool exclude_self, int threads, float* out_values, int64_t* out_idx) {
  if (type == HalfType::BF16 && has_amx_bf16())
    return amx::knn_half(q, nq, c, n, d, k, metric, type, exclude_self, threads, out_values, out_idx);
  if (type == HalfType::BF16 && has_bf16_dot())
    return avx512bf16::knn_half(q, nq, c, n, d, k, metric, type, exclude_self, threads, out_values, out_idx);
  switch (best()) {
    case Isa::AVX512:
      return avx512::knn_half(q, nq, c, n, d, k, metric, type, exclude_self, threads, out_values, out_idx);
    case Isa::AVX2:
      return avx2::knn_half(q, nq, c, n, d, k, metric, type, exclude_self, threads, out_values, out_idx);
    default:
      return generic::knn_half(q, nq, c, n, d, k, metric, type, exclude_self, threads, out_values, out_idx);
  }
}

std::string half_kernel(HalfType type) {
  if (type == HalfType::BF16 && has_amx_bf16()) return "amx-bf16";
  if (type == HalfType::BF16 && has_bf16_dot()) return "avx512-bf16";
  return isa() + "-widen";
}

void pairwise(const float* q, int64_t nq, const float* c, int64_t n, int64_t d, Metric metric, int threads,
              float* out) {
  switch (best()) {
    case Isa::AVX512: return avx512::pairwise(q, nq, c, n, d, metric, threads, out);
    case Isa::AVX2: return avx2::pairwise(q, nq, c, n, d, metric, threads, out);
    default: return generic::pairwise(q, nq, c, n, d, metric, threads, out);
  }
}

}  // namespace cpu
}  // namespace tlfast
