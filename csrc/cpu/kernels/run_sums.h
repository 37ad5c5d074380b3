// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// One run's or block's two float64 sums in every build, and a channel's statistics from them.

// Two float64 sums over one run: term(i, &u, &v) gives element i's two addends. Eight
// independent accumulators per sum (the compiler vectorises them), combined in a fixed order.
template <typename Term>
inline void two_sums_run(int64_t len, Term&& term, double* s1, double* s2) {
  double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      double u, v;
      term(i + j, &u, &v);
      a[j] += u;
      b[j] += v;
    }
  }
  double ta = 0, tb = 0;
  for (; i < len; ++i) {
    double u, v;
    term(i, &u, &v);
    ta += u;
    tb += v;
  }
  *s1 += ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + ta;
  *s2 += ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7])) + tb;
}

// sum(x - shift) and sum((x - shift)^2) over one run.
template <typename scalar_t>
inline void shifted_sums_run(const scalar_t* __restrict p, int64_t len, double shift, LaneSums& acc) {
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    shifted_sums_run_simd(p, len, shift, acc);
    return;
  }
#endif
  two_sums_run(
      len,
      [&](int64_t i, double* u, double* v) {
        const double d = static_cast<double>(p[i]) - shift;
        *u = d;
        *v = d * d;
      },
      &acc.sa, &acc.sb);
}

// A block's shifted sums from its LaneSums (the lanes hold sums against the float32 shift).
// Always inlined: called out of line it took the block's LaneSums by address, and GCC then kept
// the float64 lanes in memory, loaded and stored around every run of the block.
[[gnu::always_inline]] inline void finish_shifted(const LaneSums& acc, double shift, double* s1, double* s2) {
  *s1 = acc.sa;
  *s2 = acc.sb;
#ifdef BN_EXT_AVX2_INTRINSICS
  double A, B;
  acc.totals(&A, &B);
  add_shifted_sums(A, B, acc.n, shift, s1, s2);
#else
  (void)shift;
#endif
}

// Channel c's statistics from its shifted sums over `count` elements (inv_count = 1 / count,
// taken once for all channels).
inline void finish_channel(double shift, double s1, double s2, double count, double inv_count, double* mean,
                           double* var) {
  if (count <= 0) {
    *mean = 0;
    *var = 0;
    return;
  }
  const double d = s1 * inv_count;
  *mean = shift + d;
  // clamps rounding below zero; NaN (a NaN or Inf in the channel) passes, as in PyTorch
  *var = std::max(s2 * inv_count - d * d, 0.0);
}

// sum(dy) and sum(dy * (x - mean)) over one run.
template <typename scalar_t>
inline void grad_sums_run(const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t len, double mean,
                          LaneSums& acc) {
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    grad_sums_run_simd(dy, x, len, mean, acc);
    return;
  }
#endif
  two_sums_run(
      len,
      [&](int64_t i, double* u, double* v) {
        const double g = static_cast<double>(dy[i]);
        *u = g;
        *v = g * (static_cast<double>(x[i]) - mean);
      },
      &acc.sa, &acc.sb);
}

// A block's gradient sums from its LaneSums (the lanes hold sum(dy) and sum(dy * (x - mean_f))).
// Always inlined, as finish_shifted.
[[gnu::always_inline]] inline void finish_grad(const LaneSums& acc, double mean, double* sum_dy, double* sum_dy_xmu) {
  *sum_dy = acc.sa;
  *sum_dy_xmu = acc.sb;
#ifdef BN_EXT_AVX2_INTRINSICS
  double A, B;
  acc.totals(&A, &B);
  add_grad_sums(A, B, mean, sum_dy, sum_dy_xmu);
#else
  (void)mean;
#endif
}
