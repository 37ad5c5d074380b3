// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// The elementwise forward: coefficients, NC(D)HW and channels-last passes, the per-channel
// (fused, grouped, pipelined) training forward.

// 1 / sqrt(var + eps) for every channel, four at a time in the SIMD builds (the same bits as
// invstd_from_var): the setup of thousands of channels (2048 of 7x7) otherwise spends microseconds
// per call in scalar square roots and divisions.
inline std::vector<double> invstd_vector(const std::vector<double>& var, double eps) {
  const int64_t C = static_cast<int64_t>(var.size());
  std::vector<double> out(C);
  int64_t c = 0;
#ifdef BN_EXT_AVX2_INTRINSICS
  const __m256d e = _mm256_set1_pd(eps), one = _mm256_set1_pd(1.0);
  for (; c + 4 <= C; c += 4)
    _mm256_storeu_pd(&out[c], _mm256_div_pd(one, _mm256_sqrt_pd(_mm256_add_pd(_mm256_loadu_pd(&var[c]), e))));
#endif
  for (; c < C; ++c) out[c] = invstd_from_var(var[c], eps);
  return out;
}

// Whether every channel's mean is folded into its shift (forward_coeffs, backward_coeffs), so the
// kernels can skip subtracting it.
template <typename opmath_t>
bool mean_folded(const std::vector<opmath_t>& mean_hi, const std::vector<opmath_t>& mean_lo) {
  for (size_t c = 0; c < mean_hi.size(); ++c)
    if (mean_hi[c] != opmath_t(0) || mean_lo[c] != opmath_t(0)) return false;
  return true;
}

template <typename opmath_t>
struct Affine {
  std::vector<opmath_t> mean_hi, mean_lo, scale, shift;
  Affine(const std::vector<double>& mean, const std::vector<double>& var, const std::vector<double>& weight,
         const std::vector<double>& bias, double eps)
      : Affine(mean, invstd_vector(var, eps), weight, bias) {}
  // From invstd_vector's values, where the caller has them already.
  Affine(const std::vector<double>& mean, const std::vector<double>& invstd, const std::vector<double>& weight,
         const std::vector<double>& bias)
      : mean_hi(mean.size()), mean_lo(mean.size()), scale(mean.size()), shift(mean.size()) {
    for (size_t c = 0; c < mean.size(); ++c) {
      const auto k = forward_coeffs_from_invstd<opmath_t>(mean[c], invstd[c], weight[c], bias[c]);
      mean_hi[c] = k.mean_hi;
      mean_lo[c] = k.mean_lo;
      scale[c] = k.scale;
      shift[c] = k.shift;
    }
  }
  bool folded() const { return mean_folded(mean_hi, mean_lo); }
};

template <typename scalar_t, typename opmath_t>
inline void normalize_run(const scalar_t* __restrict x, scalar_t* __restrict y, int64_t len, opmath_t hi, opmath_t lo,
                          opmath_t sc, opmath_t sh, bool stream) {
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    normalize_run_simd(x, y, len, hi, lo, sc, sh, stream);
    return;
  }
#endif
  for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>(((static_cast<opmath_t>(x[i]) - hi) - lo) * sc + sh);
}

template <typename scalar_t>
void elemt_kernel(const scalar_t* __restrict x, scalar_t* __restrict y, const Geometry& g,
                  const Affine<at::opmath_type<scalar_t>>& a, Sweep order, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (g.layout == Layout::kNCS) {
#ifdef BN_EXT_AVX2_INTRINSICS
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (planes_in_one_call(g.S)) {  // a piece's planes in one call
        parallel_spans(
            g,
            [&](int64_t c, int64_t s0, int64_t off, int64_t len) {
              normalize_planes(
                  x + off, y + off, len, g.S, s0, c, [&](int64_t ch) { return ch + 1 == g.C ? 0 : ch + 1; },
                  [&](int64_t ch) {
                    return ForwardCoeffs<float>{a.mean_hi[ch], a.mean_lo[ch], a.scale[ch], a.shift[ch]};
                  },
                  stream);
            },
            order);
        return;
      }
    }
#endif
    parallel_runs(
        g,
        [&](int64_t c, int64_t off, int64_t len) {
          normalize_run(x + off, y + off, len, a.mean_hi[c], a.mean_lo[c], a.scale[c], a.shift[c], stream);
        },
        order);
    return;
  }
  const opmath_t* __restrict hi = a.mean_hi.data();
  const opmath_t* __restrict lo = a.mean_lo.data();
  const opmath_t* __restrict sc = a.scale.data();
  const opmath_t* __restrict sh = a.shift.data();
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const bool folded = a.folded();
    auto span = [&](int64_t off, int64_t width, const auto& k) {
      normalize_rows_simd(x + off, y + off, width, k, folded, stream);
    };
    parallel_row_spans_of<scalar_t, opmath_t, 4>(g, {hi, lo, sc, sh}, span, order);
    return;
  }
#endif
  parallel_rows(
      g,
      [&](int64_t off) {
        const scalar_t* __restrict xs = x + off;
        scalar_t* __restrict ys = y + off;
        for (int64_t c = 0; c < g.C; ++c)
          ys[c] = static_cast<scalar_t>(((static_cast<opmath_t>(xs[c]) - hi[c]) - lo[c]) * sc[c] + sh[c]);
      },
      order);
}

// The fused per-channel paths take small channels in groups: the group's reductions, then its
// coefficients, then its elementwise passes. One channel at a time, each channel's reduction ->
// square root and division -> elementwise pass is a chain of latencies the core cannot overlap
// with the next channel's work (13% of a (4, 2048, 7, 7) bfloat16 training forward waited on the
// square root). A group holds at most kChannelGroupBytes of the tensors read, so that it is still
// in L1 when its elementwise pass reads it back (64 KiB groups, from L2, ran 0.85-0.91x on
// 512x28x28 float32); larger channels go one by one.
constexpr int64_t kMaxChannelGroup = 16;
constexpr int64_t kChannelGroupBytes = 16 << 10;

int64_t channel_group(const Geometry& g, size_t bytes_per_value) {
  const int64_t channel_bytes = std::max<int64_t>(1, g.rows() * static_cast<int64_t>(bytes_per_value));
  return std::clamp<int64_t>(kChannelGroupBytes / channel_bytes, 1, kMaxChannelGroup);
}

// Fused training passes, NC(D)HW, channels that go one at a time (channel_group of 1: more than
// half kChannelGroupBytes of the tensors read), pipelined in the SIMD builds: each thread sums a
// channel while, in the same loop, it runs the elementwise pass of the channel it summed before,
// and runs its last channel's pass alone at the end. One channel at a time (reduction, then
// elementwise pass) a thread either reads from memory or reads from cache and writes, never both
// at once. body(prev, c) sums channel c (prev: the thread's channel before, or -1 where c is its
// first), alone(c) runs c's elementwise pass. Results have the unpipelined path's bits: the loops
// sum the same vectors into the same chunks. Gains and their limits: docs/design.md,
// "Measurements".
struct PendingChannel {
  int64_t c = -1;
};

template <typename Body, typename Alone>
void pipelined_channels(const Geometry& g, Body&& body, Alone&& alone) {
  parallel_pieces_with<PendingChannel>(
      g.C, Sweep::kForward,
      [&](PendingChannel& prev, int64_t c) {
        body(prev.c, c);
        prev.c = c;
      },
      [&](PendingChannel& prev) {
        if (prev.c >= 0) alone(prev.c);
        store_fence();
      });
}

#ifdef BN_EXT_AVX2_INTRINSICS
// A training forward's statistics, pipelined with an elementwise pass: sum_run(off, len, shift,
// acc, kp, back) sums channel c's run at off (shifted_sums_run_simd's sums) while it runs the
// pass of the channel before (coefficients kp) over its run at off + back, and pass(kc, off, len)
// runs a channel's pass alone. The plain and the fused training forwards share it.
template <typename scalar_t, typename SumRun, typename Pass>
void train_pipelined_with(const scalar_t* x, const Geometry& g, const std::vector<double>& weight,
                          const std::vector<double>& bias, double eps, std::vector<double>& mean,
                          std::vector<double>& var, SumRun&& sum_run, Pass&& pass) {
  std::vector<double> shift(g.C);
  std::vector<ForwardCoeffs<float>> k(g.C);
  const ShiftedSquares<scalar_t> sum{x, shift.data(), g.C};
  const double count = static_cast<double>(g.rows()), inv_count = 1.0 / count;
  pipelined_channels(
      g,
      [&](int64_t prev, int64_t c) {
        shift[c] = channel_shift(x, g, c);
        double s1, s2;
        if (prev < 0) {
          channel_total(sum, g, c, &s1, &s2);
        } else {
          const int64_t back = (prev - c) * g.S;  // from channel c's element to prev's at the same (n, s)
          channel_total(sum, g, c, &s1, &s2, [&](int64_t off, int64_t len, LaneSums& acc) {
            sum_run(off, len, shift[c], acc, k[prev], back);
          });
        }
        finish_channel(shift[c], s1, s2, count, inv_count, &mean[c], &var[c]);
        k[c] = forward_coeffs<float>(mean[c], var[c], weight[c], bias[c], eps);
      },
      [&](int64_t c) {
        for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) { pass(k[c], off, len); });
      });
}

// The training forward, pipelined (shifted_sums_normalize_run).
template <typename scalar_t>
void train_pipelined(const scalar_t* x, scalar_t* y, const Geometry& g, const std::vector<double>& weight,
                     const std::vector<double>& bias, double eps, std::vector<double>& mean, std::vector<double>& var,
                     bool stream) {
  train_pipelined_with(
      x, g, weight, bias, eps, mean, var,
      [&](int64_t off, int64_t len, double shift, LaneSums& acc, const ForwardCoeffs<float>& kp, int64_t back) {
        shifted_sums_normalize_run(x + off, len, shift, acc, x + off + back, y + off + back, kp.mean_hi, kp.mean_lo,
                                   kp.scale, kp.shift, stream);
      },
      [&](const ForwardCoeffs<float>& kc, int64_t off, int64_t len) {
        normalize_run(x + off, y + off, len, kc.mean_hi, kc.mean_lo, kc.scale, kc.shift, stream);
      });
}
#endif

// A training forward over NC(D)HW channel groups of `group` channels: a group's statistics, then
// norm(c0, c1, k) over its channels [c0, c1) (k[c - c0] channel c's coefficients) while the
// group's values are still in cache. The plain and the fused training forwards share it, and with
// it their statistics' bits.
template <typename scalar_t, typename Norm>
void train_channel_groups(const scalar_t* x, const Geometry& g, int64_t group, const std::vector<double>& weight,
                          const std::vector<double>& bias, double eps, std::vector<double>& mean,
                          std::vector<double>& var, const Norm& norm) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<double> shift(g.C);  // each task sets its channels' shifts before it sums them
  const ShiftedSquares<scalar_t> sum{x, shift.data(), g.C};
  const double count = static_cast<double>(g.rows()), inv_count = 1.0 / count;
  parallel_pieces(
      ceil_div(g.C, group), Sweep::kForward,
      [&](int64_t p) {
        std::array<ForwardCoeffs<opmath_t>, kMaxChannelGroup> k;
        const int64_t c0 = p * group, c1 = std::min(g.C, c0 + group);
        for (int64_t c = c0; c < c1; ++c)
          channel_stats(x, g, sum, shift.data(), c, count, inv_count, &mean[c], &var[c]);
        // in a loop of their own, so the channels' square roots and divisions overlap
        for (int64_t c = c0; c < c1; ++c)
          k[c - c0] = forward_coeffs<opmath_t>(mean[c], var[c], weight[c], bias[c], eps);
        norm(c0, c1, k.data());
      },
      store_fence);
}

// fn(off, len, k[c - c0]) over every run of channels [c0, c1), channel by channel.
template <typename Coeffs, typename Fn>
inline void each_run_of_channels(const Geometry& g, int64_t c0, int64_t c1, const Coeffs* k, Fn&& fn) {
  for (int64_t c = c0; c < c1; ++c)
    for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) { fn(off, len, k[c - c0]); });
}

// Training forward, NC(D)HW, channels in groups (channel_group): statistics, then the
// elementwise passes while the data is still in cache.
template <typename scalar_t>
void train_per_channel(const scalar_t* x, scalar_t* y, const Geometry& g, const std::vector<double>& weight,
                       const std::vector<double>& bias, double eps, std::vector<double>& mean, std::vector<double>& var,
                       bool stream) {
  const int64_t group = channel_group(g, sizeof(scalar_t));
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (group == 1) {
      train_pipelined(x, y, g, weight, bias, eps, mean, var, stream);
      return;
    }
  }
#endif
  train_channel_groups(x, g, group, weight, bias, eps, mean, var, [&](int64_t c0, int64_t c1, const auto* k) {
#ifdef BN_EXT_AVX2_INTRINSICS
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (planes_in_one_call(g.S)) {  // a sample's planes of the group in one call
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t off = (n * g.C + c0) * g.S;
          normalize_planes(
              x + off, y + off, (c1 - c0) * g.S, g.S, 0, c0, [](int64_t ch) { return ch + 1; },
              [&](int64_t ch) { return k[ch - c0]; }, stream);
        }
        return;
      }
    }
#endif
    each_run_of_channels(g, c0, c1, k, [&](int64_t off, int64_t len, const auto& kc) {
      normalize_run(x + off, y + off, len, kc.mean_hi, kc.mean_lo, kc.scale, kc.shift, stream);
    });
  });
}
