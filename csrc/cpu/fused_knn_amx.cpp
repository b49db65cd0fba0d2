// The fused kernels of fused_knn.h compiled for AVX-512 with AVX512-BF16 and AMX: bf16 inputs of
// ip, cosine and l2 run on AMX tiles (tdpbf16ps) for d >= 16, on vdpbf16ps below.  The instruction
// set is switched on here, after the standard headers, so that no library code is compiled for it
// (see fused_knn_std.h).
#include "fused_knn_std.h"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#define TLFAST_ISA amx
#define TLFAST_ISA_AVX512 1
#define TLFAST_ISA_AVX2 1
#define TLFAST_ISA_BF16DOT 1
#define TLFAST_ISA_AMX 1
#include "fused_knn.h"
#pragma GCC pop_options
