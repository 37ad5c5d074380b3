// Per-channel math shared by the CPU and CUDA kernels. Everything here is tested on the
// CPU through the ops (tests/test_math.py exercises the merge and blend paths).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BN_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BN_EXT_HOST_DEVICE inline
#endif

namespace bn_ext {

// Partial statistics of one slice of a channel: element count, mean and the sum of squared
// deviations from that mean (M2). Counts are carried in the accumulation type so that merging
// needs no integer/float conversions in the inner loop.
template <typename acc_t>
struct WelfordPartial {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

// Chan et al.'s pairwise merge. Stable where a running sum / sum-of-squares is not: the
// correction term uses the difference of the two means, never the raw sums.
template <typename acc_t>
BN_EXT_HOST_DEVICE WelfordPartial<acc_t> welford_merge(
    const WelfordPartial<acc_t>& a, const WelfordPartial<acc_t>& b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t b_share = b.count / count;
  WelfordPartial<acc_t> out;
  out.count = count;
  out.mean = a.mean + delta * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  return out;
}

// 1 / sqrt(var + eps), as PyTorch computes it (not rsqrt: we want its rounding on the CPU).
template <typename acc_t>
BN_EXT_HOST_DEVICE acc_t invstd_from_var(acc_t var, double eps) {
  return acc_t(1) / static_cast<acc_t>(std::sqrt(var + static_cast<acc_t>(eps)));
}

// Unbiased variance from the biased one over `count` elements (NaN for count 1, as 0/0).
template <typename acc_t>
BN_EXT_HOST_DEVICE acc_t unbiased_from_biased(acc_t var, int64_t count) {
  const acc_t sum_sq = var * static_cast<acc_t>(count);
  return sum_sq / static_cast<acc_t>(count - 1);
}

// running <- factor * batch + (1 - factor) * running, in double as PyTorch's CPU path does.
BN_EXT_HOST_DEVICE double running_blend(double running, double batch, double factor) {
  return factor * batch + (1.0 - factor) * running;
}

}  // namespace bn_ext
