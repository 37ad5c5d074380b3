// The CPU kernel loops for any x86-64 (or other) CPU.
#include "kernels_common.h"

#include <type_traits>

#define BN_EXT_CPU_ISA isa_default
#include "kernels.h"
