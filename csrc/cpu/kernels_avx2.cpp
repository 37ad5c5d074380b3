// The AVX2 + FMA build of the BatchNorm entry points and the fused forward (kernels_common.h: why two units).
#define BN_EXT_CPU_PART BN_EXT_CPU_PART_MAIN
#include "kernels_avx2.h"
