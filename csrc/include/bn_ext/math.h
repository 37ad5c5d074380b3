// Per-channel math shared by the CPU and CUDA kernels. Everything here is tested on the
// CPU through the ops (the merge by tests/test_sync.py's gather_stats tests, the running-stat
// blend by tests/test_modules.py and tests/test_parity.py).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BN_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host: the CPU kernels are compiled once per instruction set, and an
// out-of-line copy (the linker keeps one) is baseline SSE code called from inside AVX-512 loops
#define BN_EXT_HOST_DEVICE inline __attribute__((always_inline))
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
BN_EXT_HOST_DEVICE WelfordPartial<acc_t> welford_merge(const WelfordPartial<acc_t>& a, const WelfordPartial<acc_t>& b) {
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

// Channel c's statistics over all ranks, from the gathered table of per-rank rows
// [count, mean (C), biased var (C)] (contiguous, `ranks` rows). Rows merge in rank order, so the
// result is the same bits on every rank; rows with count 0 drop out.
template <typename T>
BN_EXT_HOST_DEVICE WelfordPartial<double> merge_rank_rows(const T* stats, int64_t ranks, int64_t C, int64_t c) {
  WelfordPartial<double> acc{0.0, 0.0, 0.0};
  for (int64_t r = 0; r < ranks; ++r) {
    const T* row = stats + r * (2 * C + 1);
    const double n = static_cast<double>(row[0]);
    const WelfordPartial<double> part{n, static_cast<double>(row[1 + c]), static_cast<double>(row[1 + C + c]) * n};
    acc = welford_merge(acc, part);
  }
  return acc;
}

// Total element count of a gathered table (the first column).
template <typename T>
BN_EXT_HOST_DEVICE double total_rank_count(const T* stats, int64_t ranks, int64_t C) {
  double total = 0.0;
  for (int64_t r = 0; r < ranks; ++r) total += static_cast<double>(stats[r * (2 * C + 1)]);
  return total;
}

// 1 / sqrt(var + eps), as PyTorch computes it (not rsqrt: we want its rounding on the CPU).
template <typename acc_t>
BN_EXT_HOST_DEVICE acc_t invstd_from_var(acc_t var, double eps) {
#ifdef __CUDA_ARCH__
  return acc_t(1) / static_cast<acc_t>(::sqrt(var + static_cast<acc_t>(eps)));
#else
  return acc_t(1) / static_cast<acc_t>(std::sqrt(var + static_cast<acc_t>(eps)));
#endif
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

// One more batch counted: num_batches_tracked += 1 (when tracked), and the factor the running
// stats blend with: momentum, or 1 / num_batches_tracked (cumulative average) when momentum is None.
BN_EXT_HOST_DEVICE double count_batch(int64_t* num_batches_tracked, bool has_momentum, double momentum) {
  if (num_batches_tracked == nullptr) return momentum;
  const int64_t n = *num_batches_tracked + 1;
  *num_batches_tracked = n;
  return has_momentum ? momentum : 1.0 / static_cast<double>(n);
}

// Elementwise forward per channel: y = ((x - mean_hi) - mean_lo) * scale + shift. The mean is
// split into the part the compute type holds and the remainder, so x - mean stays exact for
// inputs whose mean is large against their spread (a folded x * scale + shift would not).
template <typename opmath_t>
struct ForwardCoeffs {
  opmath_t mean_hi, mean_lo, scale, shift;
};

// Where |mean| is at most kFoldLimit standard deviations, y = x * scale + (bias - mean * scale)
// (one multiply-add, as PyTorch computes it) is within an ulp or two of the output's typical size
// of the split form, and it is what the coefficients say: mean_hi = mean_lo = 0, the mean folded
// into shift. Kernels then skip the two subtractions. A large mean against the spread keeps the
// split form, which stays exact there.
constexpr double kFoldLimit = 4.0;

// Whether a channel's mean folds into its shift (see kFoldLimit).
BN_EXT_HOST_DEVICE bool mean_folds(double mean, double invstd) {
  return mean == 0.0 || (mean < 0 ? -mean : mean) * invstd <= kFoldLimit;
}

// From invstd = invstd_from_var(var, eps) (which callers with many channels compute in vectors).
template <typename opmath_t>
BN_EXT_HOST_DEVICE ForwardCoeffs<opmath_t> forward_coeffs_from_invstd(double mean, double invstd, double weight,
                                                                      double bias) {
  ForwardCoeffs<opmath_t> k;
  const double scale = weight * invstd;
  k.scale = static_cast<opmath_t>(scale);
  if (mean_folds(mean, invstd)) {
    // fold with the scale the kernel multiplies by, so x == mean still maps to about bias
    k.mean_hi = k.mean_lo = opmath_t(0);
    k.shift = static_cast<opmath_t>(bias - mean * static_cast<double>(k.scale));
    return k;
  }
  k.mean_hi = static_cast<opmath_t>(mean);
  k.mean_lo = static_cast<opmath_t>(mean - static_cast<double>(k.mean_hi));
  k.shift = static_cast<opmath_t>(bias);
  return k;
}

template <typename opmath_t>
BN_EXT_HOST_DEVICE ForwardCoeffs<opmath_t> forward_coeffs(double mean, double var, double weight, double bias,
                                                          double eps) {
  return forward_coeffs_from_invstd<opmath_t>(mean, invstd_from_var(var, eps), weight, bias);
}

// Elementwise backward per channel: dx = k_dy * dy + k_x * ((x - mean_hi) - mean_lo) + k_0.
// In training, sum_dy and sum_dy_xmu = sum(dy * (x - mean)) are over the `count` elements the
// statistics came from; in eval mode the statistics are constants and k_x = k_0 = 0. Where the
// mean is within kFoldLimit standard deviations it folds into k_0, as in forward_coeffs, and
// mean_hi = mean_lo = 0.
template <typename opmath_t>
struct BackwardCoeffs {
  opmath_t k_dy, k_x, k_0, mean_hi, mean_lo;
};

// From invstd = invstd_from_var(var, eps) and inv_count = 1 / count.
template <typename opmath_t>
BN_EXT_HOST_DEVICE BackwardCoeffs<opmath_t> backward_coeffs_from_invstd(double mean, double invstd, double weight,
                                                                        double sum_dy, double sum_dy_xmu,
                                                                        double inv_count, bool training) {
  const double k_dy = weight * invstd;
  BackwardCoeffs<opmath_t> k;
  k.k_dy = static_cast<opmath_t>(k_dy);
  k.k_x = k.k_0 = k.mean_hi = k.mean_lo = opmath_t(0);
  if (training) {
    k.k_x = static_cast<opmath_t>(-k_dy * invstd * invstd * sum_dy_xmu * inv_count);
    const double k_0 = -k_dy * sum_dy * inv_count;
    if (mean_folds(mean, invstd)) {
      // dx = k_dy * dy + k_x * x + (k_0 - k_x * mean): the mean folded as in forward_coeffs
      k.k_0 = static_cast<opmath_t>(k_0 - mean * static_cast<double>(k.k_x));
    } else {
      k.k_0 = static_cast<opmath_t>(k_0);
      k.mean_hi = static_cast<opmath_t>(mean);
      k.mean_lo = static_cast<opmath_t>(mean - static_cast<double>(k.mean_hi));
    }
  }
  return k;
}

template <typename opmath_t>
BN_EXT_HOST_DEVICE BackwardCoeffs<opmath_t> backward_coeffs(double mean, double var, double weight, double sum_dy,
                                                            double sum_dy_xmu, double eps, double count,
                                                            bool training) {
  return backward_coeffs_from_invstd<opmath_t>(mean, invstd_from_var(var, eps), weight, sum_dy, sum_dy_xmu, 1.0 / count,
                                               training);
}

}  // namespace bn_ext
