// The Gram product of gram_kernel.h compiled for generic (isa_begin.h switches the ISA on).
#define TLFAST_BUILD_GENERIC
#include "isa_begin.h"
#include "gram_kernel.h"
#pragma GCC pop_options
