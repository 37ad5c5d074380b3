// The baseline x86-64 build of the BatchNorm entry points and the fused forward (kernels_common.h: why two units).
#define BN_EXT_CPU_PART BN_EXT_CPU_PART_MAIN
#include "kernels_default.h"
