// The AVX-512 BF16 build of the fused BatchNorm + activation backward (kernels_common.h: why two units).
#define BN_EXT_CPU_PART BN_EXT_CPU_PART_ACT_BACKWARD
#include "kernels_avx512bf16.h"
