// The CPU kernel loops compiled for AVX2 + FMA, chosen at run time on CPUs that have them.
// Headers are included before the target pragma, so only kernels.h's loops get AVX2 code
// (shared inline functions from torch and the standard library stay baseline).
#include "kernels_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define BN_EXT_CPU_ISA isa_avx2
#define BN_EXT_AVX2_INTRINSICS 1
#include "kernels.h"
#pragma GCC pop_options
#else
// No AVX2 variant for this compiler/architecture: a second copy of the baseline loops.
#define BN_EXT_CPU_ISA isa_avx2
#include "kernels.h"
#endif
