// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// The backward: input-gradient passes and the per-channel training backward.

template <typename scalar_t>
void grad_sums_kernel(const scalar_t* dy, const scalar_t* x, const Geometry& g, const std::vector<double>& mean,
                      std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  const bool streamed = g.layout == Layout::kNSC && should_stream_rows<scalar_t>(g, 2);
  channel_sums(GradSums<scalar_t>{dy, x, mean.data(), g.C, streamed}, g, sum_dy, sum_dy_xmu);
}

template <typename opmath_t>
struct GradCoeffs {
  std::vector<opmath_t> k_dy, k_x, k_0, mean_hi, mean_lo;
  explicit GradCoeffs(int64_t channels)
      : k_dy(channels), k_x(channels), k_0(channels), mean_hi(channels), mean_lo(channels) {}
  void set(int64_t c, const BackwardCoeffs<opmath_t>& k) {
    k_dy[c] = k.k_dy;
    k_x[c] = k.k_x;
    k_0[c] = k.k_0;
    mean_hi[c] = k.mean_hi;
    mean_lo[c] = k.mean_lo;
  }
  bool folded() const { return mean_folded(mean_hi, mean_lo); }
};

template <typename scalar_t, typename opmath_t, bool kTraining>
inline void grad_input_run(const scalar_t* __restrict dy, const scalar_t* __restrict x, scalar_t* __restrict dx,
                           int64_t len, const BackwardCoeffs<opmath_t>& k, bool stream) {
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    grad_input_run_simd<scalar_t, kTraining>(dy, x, dx, len, k.k_dy, k.k_x, k.k_0, k.mean_hi, k.mean_lo, stream);
    return;
  }
#endif
  for (int64_t i = 0; i < len; ++i) {
    opmath_t v = k.k_dy * static_cast<opmath_t>(dy[i]);
    if (kTraining) v += k.k_x * ((static_cast<opmath_t>(x[i]) - k.mean_hi) - k.mean_lo) + k.k_0;
    dx[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool kTraining>
void grad_input_kernel(const scalar_t* __restrict dy, const scalar_t* __restrict x, scalar_t* __restrict dx,
                       const Geometry& g, const GradCoeffs<at::opmath_type<scalar_t>>& k, Sweep order, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (g.layout == Layout::kNCS) {
    parallel_runs(
        g,
        [&](int64_t c, int64_t off, int64_t len) {
          const BackwardCoeffs<opmath_t> kc{k.k_dy[c], k.k_x[c], k.k_0[c], k.mean_hi[c], k.mean_lo[c]};
          grad_input_run<scalar_t, opmath_t, kTraining>(dy + off, x + off, dx + off, len, kc, stream);
        },
        order);
    return;
  }
  const opmath_t* __restrict kd = k.k_dy.data();
  const opmath_t* __restrict kx = k.k_x.data();
  const opmath_t* __restrict k0 = k.k_0.data();
  const opmath_t* __restrict hi = k.mean_hi.data();
  const opmath_t* __restrict lo = k.mean_lo.data();
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const bool folded = k.folded();
    auto span = [&](int64_t off, int64_t width, const auto& c) {
      grad_input_rows_simd<kTraining>(dy + off, x + off, dx + off, width, c, folded, stream);
    };
    parallel_row_spans_of<scalar_t, opmath_t, 5>(g, {kd, kx, k0, hi, lo}, span, order);
    return;
  }
#endif
  parallel_rows(
      g,
      [&](int64_t off) {
        const scalar_t* __restrict dys = dy + off;
        const scalar_t* __restrict xs = x + off;
        scalar_t* __restrict dxs = dx + off;
        for (int64_t c = 0; c < g.C; ++c) {
          opmath_t v = kd[c] * static_cast<opmath_t>(dys[c]);
          if (kTraining) v += kx[c] * ((static_cast<opmath_t>(xs[c]) - hi[c]) - lo[c]) + k0[c];
          dxs[c] = static_cast<scalar_t>(v);
        }
      },
      order);
}

#ifdef BN_EXT_AVX2_INTRINSICS
// The training backward, pipelined (grad_sums_grad_input_run).
template <typename scalar_t>
void backward_pipelined(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                        const std::vector<double>& mean, const std::vector<double>& invstd,
                        const std::vector<double>& weight, std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu,
                        bool stream) {
  const GradSums<scalar_t> sum{dy, x, mean.data(), g.C};
  std::vector<BackwardCoeffs<float>> k(g.C);
  const double inv_count = 1.0 / static_cast<double>(g.rows());
  pipelined_channels(
      g,
      [&](int64_t prev, int64_t c) {
        if (prev < 0) {
          channel_total(sum, g, c, &sum_dy[c], &sum_dy_xmu[c]);
        } else {
          const int64_t back = (prev - c) * g.S;
          const BackwardCoeffs<float>& kp = k[prev];
          channel_total(sum, g, c, &sum_dy[c], &sum_dy_xmu[c], [&](int64_t off, int64_t len, LaneSums& acc) {
            grad_sums_grad_input_run(dy + off, x + off, len, mean[c], acc, dy + off + back, x + off + back,
                                     dx + off + back, kp, stream);
          });
        }
        k[c] = backward_coeffs_from_invstd<float>(mean[c], invstd[c], weight[c], sum_dy[c], sum_dy_xmu[c], inv_count,
                                                  /*training=*/true);
      },
      [&](int64_t c) {
        for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) {
          grad_input_run<scalar_t, float, true>(dy + off, x + off, dx + off, len, k[c], stream);
        });
      });
}
#endif

// Fused training backward, NC(D)HW, channels in groups (channel_group): the sums, then dx.
template <typename scalar_t>
void backward_per_channel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                          const std::vector<double>& mean, const std::vector<double>& invstd,
                          const std::vector<double>& weight, std::vector<double>& sum_dy,
                          std::vector<double>& sum_dy_xmu, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t group = channel_group(g, 2 * sizeof(scalar_t));
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (group == 1) {
      backward_pipelined(dy, x, dx, g, mean, invstd, weight, sum_dy, sum_dy_xmu, stream);
      return;
    }
  }
#endif
  const GradSums<scalar_t> sum{dy, x, mean.data(), g.C};
  const double inv_count = 1.0 / static_cast<double>(g.rows());  // what backward_coeffs takes per channel
  parallel_pieces(
      ceil_div(g.C, group), Sweep::kForward,
      [&](int64_t p) {
        std::array<BackwardCoeffs<opmath_t>, kMaxChannelGroup> k;
        const int64_t c0 = p * group, c1 = std::min(g.C, c0 + group);
        for (int64_t c = c0; c < c1; ++c) channel_total(sum, g, c, &sum_dy[c], &sum_dy_xmu[c]);
        for (int64_t c = c0; c < c1; ++c)
          k[c - c0] = backward_coeffs_from_invstd<opmath_t>(mean[c], invstd[c], weight[c], sum_dy[c], sum_dy_xmu[c],
                                                            inv_count, /*training=*/true);
        for (int64_t c = c0; c < c1; ++c) {
          const auto& kc = k[c - c0];
          for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) {
            grad_input_run<scalar_t, opmath_t, true>(dy + off, x + off, dx + off, len, kc, stream);
          });
        }
      },
      store_fence);
}
