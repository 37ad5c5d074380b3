// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// Channels-last reductions that stream blocks of rows as in-order streams.

// Channels-last sums streamed row after row: each block of rows is read as kRowsAtOnce sequential
// streams per tensor, one per quarter of the block, which the prefetchers follow (the tiles walk
// many rows at once, a few hundred bytes of each). Per-channel float32 partial sums stay in L1 and
// are flushed into the float64 sums every kStreamRows rows.
// Channels [c0, n) (multiples of 8 for the vector loops below; the fused backward's
// ActGradSums::rows takes any): rows(r, k, step, fa, fb) adds rows r, r + step, ...
// (k of them, k <= kRowsAtOnce) into the partials (their channels [c0, n)), flush(rows, fa, fb)
// adds them, over `rows` rows, into the caller's sums.
constexpr int64_t kStreamRows = 32;
// Rows a streamed step adds at once, one from each stream: each vector of partials is loaded and
// stored once for them, not once a row (one row at a time, the partials' loads and stores
// outnumbered the data's and bound the loop to L1: 5 loads and 2 stores per 16 gradient values).
// Taking them from distant parts of the block keeps each stream in order: four consecutive rows
// at a time (four short runs, C values apart, then a jump), a standalone loop over 6.4 MB of
// 512 or 1024 channels, one thread, cache flushed, took 1.5-1.6x as long.
constexpr int64_t kRowsAtOnce = 4;

// The partials of channels [c0, n) live at their channel's index, and only the flushes' clears
// write zeros there: zero-initialised vectors had zeroed all n values once more per block and
// task (on 2048 channels of 7x7, 0.26 MB a call for a 0.8 MB bfloat16 tensor).
template <typename Rows, typename Flush>
inline void sweep_row_streams(int64_t c0, int64_t n, int64_t r0, int64_t r1, Rows&& rows, Flush&& flush) {
  const std::unique_ptr<float[]> fa(new float[n]), fb(new float[n]);
  auto clear = [&] {
    std::fill(fa.get() + c0, fa.get() + n, 0.0f);
    std::fill(fb.get() + c0, fb.get() + n, 0.0f);
  };
  const int64_t q = (r1 - r0) / kRowsAtOnce;  // rows per stream
  constexpr int64_t kStepsPerFlush = kStreamRows / kRowsAtOnce;
  for (int64_t i0 = 0; i0 < q; i0 += kStepsPerFlush) {
    const int64_t i1 = std::min(q, i0 + kStepsPerFlush);
    clear();
    for (int64_t i = i0; i < i1; ++i) rows(r0 + i, kRowsAtOnce, q, fa.get(), fb.get());
    flush(kRowsAtOnce * (i1 - i0), fa.get(), fb.get());
  }
  if (r0 + kRowsAtOnce * q < r1) {  // the last rows, fewer than kRowsAtOnce
    clear();
    for (int64_t r = r0 + kRowsAtOnce * q; r < r1; ++r) rows(r, 1, 1, fa.get(), fb.get());
    flush(r1 - r0 - kRowsAtOnce * q, fa.get(), fb.get());
  }
}

#ifdef BN_EXT_AVX2_INTRINSICS
// The float32 copy of a per-channel float64 array, channels [c0, n) at their index (the others
// left unset).
inline std::unique_ptr<float[]> rounded_to_float(const double* v, int64_t c0, int64_t n) {
  std::unique_ptr<float[]> f(new float[n]);
  for (int64_t c = c0; c < n; ++c) f[c] = static_cast<float>(v[c]);
  return f;
}

// Rows [0, k) (`stride` values apart) of sum(dy) and sum(dy * (x - mean_f)) into fa/fb, channels
// [c, n) in vectors of L.
template <typename L, typename scalar_t>
inline int64_t grad_sums_row_vectors(const scalar_t* g, const scalar_t* xr, int64_t stride, int64_t k, int64_t c,
                                     int64_t n, const float* mf, float* fa, float* fb) {
  for (; c + L::width <= n; c += L::width) {
    typename L::vec a = L::coef(fa + c), b = L::coef(fb + c);
    const typename L::vec m = L::coef(mf + c);
    for (int64_t r = 0; r < k; ++r) {
      prefetch_ahead(g + r * stride + c);
      prefetch_ahead(xr + r * stride + c);
      const typename L::vec gv = L::load(g + r * stride + c);
      a = L::add(a, gv);
      b = L::fmadd(gv, L::sub(L::load(xr + r * stride + c), m), b);
    }
    L::store(fa + c, a);
    L::store(fb + c, b);
  }
  return c;
}

// Gradient sums, with the rounding of the mean to float32 corrected at each flush.
template <typename scalar_t>
inline void grad_sums_rows_streamed(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c0, int64_t n, int64_t r0,
                                    int64_t r1, const double* mean, double* sum_dy, double* sum_dy_xmu) {
  const std::unique_ptr<float[]> mf = rounded_to_float(mean, c0, n);
  sweep_row_streams(
      c0, n, r0, r1,
      [&](int64_t r, int64_t k, int64_t step, float* fa, float* fb) {
        int64_t c = c0;
#ifdef BN_EXT_AVX512BF16
        c = grad_sums_row_vectors<Lanes16>(dy + r * C, x + r * C, step * C, k, c, n, mf.get(), fa, fb);
#endif
        grad_sums_row_vectors<Lanes8>(dy + r * C, x + r * C, step * C, k, c, n, mf.get(), fa, fb);
      },
      [&](int64_t, const float* fa, const float* fb) {
        for (int64_t c = c0; c < n; ++c) add_grad_sums(fa[c], fb[c], mean[c], &sum_dy[c], &sum_dy_xmu[c]);
      });
}

// Rows [0, k) (`stride` values apart) of sum(x - shift_f) and sum((x - shift_f)^2) into fa/fb,
// channels [c, n) in vectors of L.
template <typename L, typename scalar_t>
inline int64_t shifted_sums_row_vectors(const scalar_t* xr, int64_t stride, int64_t k, int64_t c, int64_t n,
                                        const float* sf, float* fa, float* fb) {
  for (; c + L::width <= n; c += L::width) {
    typename L::vec a = L::coef(fa + c), b = L::coef(fb + c);
    const typename L::vec s = L::coef(sf + c);
    for (int64_t r = 0; r < k; ++r) {
      prefetch_ahead(xr + r * stride + c);
      const typename L::vec d = L::sub(L::load(xr + r * stride + c), s);
      a = L::add(a, d);
      b = L::fmadd(d, d, b);
    }
    L::store(fa + c, a);
    L::store(fb + c, b);
  }
  return c;
}

// Shifted sums, with the rounding of the shift to float32 corrected at each flush.
template <typename scalar_t>
inline void shifted_sums_rows_streamed(const scalar_t* x, int64_t C, int64_t c0, int64_t n, int64_t r0, int64_t r1,
                                       const double* shift, double* s1, double* s2) {
  const std::unique_ptr<float[]> sf = rounded_to_float(shift, c0, n);
  sweep_row_streams(
      c0, n, r0, r1,
      [&](int64_t r, int64_t k, int64_t step, float* fa, float* fb) {
        int64_t c = c0;
#ifdef BN_EXT_AVX512BF16
        c = shifted_sums_row_vectors<Lanes16>(x + r * C, step * C, k, c, n, sf.get(), fa, fb);
#endif
        shifted_sums_row_vectors<Lanes8>(x + r * C, step * C, k, c, n, sf.get(), fa, fb);
      },
      [&](int64_t rows, const float* fa, const float* fb) {
        for (int64_t c = c0; c < n; ++c)
          add_shifted_sums(fa[c], fb[c], static_cast<double>(rows), shift[c], &s1[c], &s2[c]);
      });
}
#endif  // BN_EXT_AVX2_INTRINSICS
