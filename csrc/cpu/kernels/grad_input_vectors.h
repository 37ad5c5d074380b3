// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// The SIMD input-gradient loops (runs, spans, the pipelined backward's loop).

#ifdef BN_EXT_AVX2_INTRINSICS

template <bool kTraining>
inline float grad_one(float dy, float x, float kd, float kx, float k0, float hi, float lo) {
  return kTraining ? std::fma(kx, (x - hi) - lo, std::fma(kd, dy, k0)) : kd * dy;
}

// dx = kx * ((x - hi) - lo) + (kd * dy + k0) in training (kx * x + ... where the mean is folded
// into k0), kd * dy in eval, for whole vectors of L of the n values from position i on. Returns
// where it stopped.
template <typename L, bool kTraining, typename scalar_t, typename K>
inline int64_t grad_input_vectors(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t i, int64_t n,
                                  const K& kd, const K& kx, const K& k0, const K& hi, const K& lo, bool folded,
                                  bool stream) {
  for (; i + L::width <= n; i += L::width) {
    prefetch_ahead(dy + i);
    prefetch_ahead(x + i);
    const typename L::vec d = kd.template at<L>(i);
    if (!kTraining) {
      L::store_out(dx + i, L::mul(d, L::load(dy + i)), stream);
      continue;
    }
    const typename L::vec kxv = kx.template at<L>(i), k0v = k0.template at<L>(i);
    if (folded) {
      L::store_out(dx + i, centred_grad<L>(d, L::load(dy + i), kxv, L::load(x + i), k0v), stream);
      continue;
    }
    const typename L::vec xc = centred<L>(L::load(x + i), hi.template at<L>(i), lo.template at<L>(i));
    L::store_out(dx + i, centred_grad<L>(d, L::load(dy + i), kxv, xc, k0v), stream);
  }
  return i;
}

// grad_input_vectors, then the last values, as normalize_span.
template <bool kTraining, typename scalar_t, typename K>
inline void grad_input_span(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, const K& kd, const K& kx,
                            const K& k0, const K& hi, const K& lo, bool folded, bool stream) {
  int64_t i = 0;
#ifdef BN_EXT_AVX512BF16
  i = grad_input_vectors<Lanes16, kTraining>(dy, x, dx, i, n, kd, kx, k0, hi, lo, folded, stream);
  if (i < n) {  // the last values, fewer than 16: one masked vector
    const int64_t m = n - i;
    const __m512 d = kd.first(i, m), g = load16_first(dy + i, m);
    if constexpr (kTraining) {
      const __m512 xc = centred<Lanes16>(load16_first(x + i, m), hi.first(i, m), lo.first(i, m));
      store16_first(dx + i, centred_grad<Lanes16>(d, g, kx.first(i, m), xc, k0.first(i, m)), m);
    } else {
      store16_first(dx + i, _mm512_mul_ps(d, g), m);
    }
  }
  return;
#endif
#ifndef BN_EXT_AVX512BF16
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kSplitCoefficients<K>)
    i = grad_input_vectors<SplitBF16, kTraining>(dy, x, dx, i, n, kd, kx, k0, hi, lo, folded, stream);
#endif
  i = grad_input_vectors<Lanes8, kTraining>(dy, x, dx, i, n, kd, kx, k0, hi, lo, folded, stream);
  for (int64_t j = i; j < n; ++j)
    dx[j] = static_cast<scalar_t>(grad_one<kTraining>(static_cast<float>(dy[j]), static_cast<float>(x[j]), kd.scalar(j),
                                                      kx.scalar(j), k0.scalar(j), hi.scalar(j), lo.scalar(j)));
}

template <typename scalar_t, bool kTraining>
inline void grad_input_run_simd(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, float kd, float kx,
                                float k0, float hi, float lo, bool stream) {
  grad_input_span<kTraining>(dy, x, dx, len, Broadcast{kd}, Broadcast{kx}, Broadcast{k0}, Broadcast{hi}, Broadcast{lo},
                             hi == 0.0f && lo == 0.0f, stream);
}

// k: kd, kx, k0, hi, lo, and after them the same in split_even_odd's order (flattened as
// normalize_rows_simd, for the same reason)
template <bool kTraining, typename scalar_t, size_t N>
[[gnu::flatten]] inline void grad_input_rows_simd(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t width,
                                                  const std::array<const float*, N>& k, bool folded, bool stream) {
#ifndef BN_EXT_AVX512BF16
  if constexpr (N == 10) {
    grad_input_span<kTraining>(dy, x, dx, width, PerLaneSplit{k[0], k[5]}, PerLaneSplit{k[1], k[6]},
                               PerLaneSplit{k[2], k[7]}, PerLaneSplit{k[3], k[8]}, PerLaneSplit{k[4], k[9]}, folded,
                               stream);
    return;
  }
#endif
  grad_input_span<kTraining>(dy, x, dx, width, PerLane{k[0]}, PerLane{k[1]}, PerLane{k[2]}, PerLane{k[3]},
                             PerLane{k[4]}, folded, stream);
}

#ifdef BN_EXT_AVX512BF16
// The pipelined training backward's loop (backward_pipelined), as shifted_sums_normalize_run:
// one run of a channel's gradient sums, added as grad_sums_run_simd adds them (add_grad16/32), and
// in the same loop the input gradient of the run at the same (n, s) of the channel before it, a
// vector at a time by grad_input_span (grad_input_run_simd's, the training formula).
template <typename scalar_t>
inline void grad_sums_grad_input_run(const scalar_t* dy, const scalar_t* x, int64_t len, double mean, LaneSums& acc,
                                     const scalar_t* dyp, const scalar_t* xp, scalar_t* dxp,
                                     const BackwardCoeffs<float>& k, bool stream) {
  const __m512 zm = _mm512_set1_ps(static_cast<float>(mean));
  const bool folded = k.mean_hi == 0.0f && k.mean_lo == 0.0f;
  auto grad_input = [&](int64_t j, int64_t n) {
    grad_input_span<true>(dyp + j, xp + j, dxp + j, n, Broadcast{k.k_dy}, Broadcast{k.k_x}, Broadcast{k.k_0},
                          Broadcast{k.mean_hi}, Broadcast{k.mean_lo}, folded, stream);
  };
  chunked_lanes(
      len, acc,
      [&](int64_t j, int64_t n, __m512& fa, __m512& fb) {
        add_grad16(dy + j, x + j, n, zm, fa, fb);
        grad_input(j, n);  // n <= 16 values: one vector, or the masked last one
      },
      [&](int64_t j, __m512& fa, __m512& fb, __m512& ga, __m512& gb) {
        add_grad32(dy + j, x + j, zm, fa, fb, ga, gb);
        grad_input(j, 32);
      });
}
#else
// The AVX2 build's, as its shifted_sums_normalize_run: grad_sums_run_simd, the channel before's
// input gradient after each chunk.
template <typename scalar_t>
inline void grad_sums_grad_input_run(const scalar_t* dy, const scalar_t* x, int64_t len, double mean, LaneSums& acc,
                                     const scalar_t* dyp, const scalar_t* xp, scalar_t* dxp,
                                     const BackwardCoeffs<float>& k, bool stream) {
  const bool folded = k.mean_hi == 0.0f && k.mean_lo == 0.0f;
  grad_sums_run_simd(dy, x, len, mean, acc, [&](int64_t j, int64_t n) {
    grad_input_span<true>(dyp + j, xp + j, dxp + j, n, Broadcast{k.k_dy}, Broadcast{k.k_x}, Broadcast{k.k_0},
                          Broadcast{k.mean_hi}, Broadcast{k.mean_lo}, folded, stream);
  });
}
#endif
#endif
