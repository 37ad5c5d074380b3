// The AVX2 loops again, with 16-wide AVX-512 bodies in front of the 8-wide ones and bfloat16
// stores rounded by AVX-512 BF16's vcvtneps2bf16 (one instruction instead of ten); chosen at run
// time on CPUs that have AVX512_BF16, AVX512VL and AVX512BW.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns that the undefined-vector helpers of avx512fintrin.h read an uninitialised value
// (2,245 warnings in this unit, none about our code): silenced here, before any header, only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "kernels_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512bf16")
#define BN_EXT_CPU_ISA isa_avx512bf16
#define BN_EXT_AVX2_INTRINSICS 1
#define BN_EXT_AVX512BF16 1
#include "kernels.h"
#pragma GCC pop_options
#else
// No such variant for this compiler/architecture: a copy of the baseline loops (never chosen).
#include <type_traits>
#define BN_EXT_CPU_ISA isa_avx512bf16
#include "kernels.h"
#endif
