// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// Channels-last reductions over tiles of 8, 16, 32 (AVX2) or 128 (AVX-512) channels and a few rows.

#ifdef BN_EXT_AVX2_INTRINSICS
// Eight channels' float32 tile sums (fa of x - shf, fb of its squares, over `rows` rows, shf the
// shift rounded to float32) added into their float64 sums s1/s2: with rest = shift - float(shift),
// sum(x - shift) = sa - n * rest and sum((x - shift)^2) = sb - 2 * rest * sa + n * rest^2.
inline void add_tile8_sums(__m256 fa, __m256 fb, __m256 shf, const double* shift, int64_t rows, double* s1,
                           double* s2) {
  const __m256d n = _mm256_set1_pd(static_cast<double>(rows));
  const __m256d sa[2] = {lo4(fa), hi4(fa)}, sb[2] = {lo4(fb), hi4(fb)};
  const __m256d shf_d[2] = {lo4(shf), hi4(shf)};
  for (int h = 0; h < 2; ++h) {
    const __m256d rest = _mm256_sub_pd(_mm256_loadu_pd(shift + 4 * h), shf_d[h]);
    const __m256d nr = _mm256_mul_pd(n, rest);
    const __m256d a = _mm256_sub_pd(_mm256_add_pd(_mm256_loadu_pd(s1 + 4 * h), sa[h]), nr);
    __m256d b = _mm256_add_pd(_mm256_loadu_pd(s2 + 4 * h), sb[h]);
    b = _mm256_fnmadd_pd(_mm256_add_pd(rest, rest), sa[h], b);
    b = _mm256_fmadd_pd(nr, rest, b);
    _mm256_storeu_pd(s1 + 4 * h, a);
    _mm256_storeu_pd(s2 + 4 * h, b);
  }
}
// Eight per-channel float64 values rounded to float32.
inline __m256 narrow8(const double* p) {
  return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p)));
}

// Channels-last: add the shifted sums of channels [c, c + 8) over rows [r0, r1) into s1/s2.
// Callers pass a few rows at a time: rows are C elements apart, and more than a handful of such
// lines would thrash L1's sets. The few rows are summed in float32 against the shift rounded to
// float32 (x - shift is exact for values near the shift; a handful of terms per lane loses
// nothing measurable), then widened into the float64 sums with the rounding of the shift
// corrected: half the instructions of widening every element.
template <typename scalar_t>
inline void shifted_sums_tile8_simd(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                    const double* shift, double* s1, double* s2) {
  const __m256 shf = narrow8(shift + c);
  __m256 fa = _mm256_setzero_ps(), fb = fa;
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 d = _mm256_sub_ps(load8(x + r * C + c), shf);
    fa = _mm256_add_ps(fa, d);
    fb = _mm256_fmadd_ps(d, d, fb);
  }
  add_tile8_sums(fa, fb, shf, shift + c, r1 - r0, s1 + c, s2 + c);
}

// Eight channels' float32 gradient tile sums (fa of dy, fb of dy * (x - mf), mf the mean rounded
// to float32) added into their float64 sums with that rounding corrected:
// sum(dy * (x - mean)) = fb - (mean - mf) * fa.
inline void add_grad_tile8_sums(__m256 fa, __m256 fb, __m256 mf, const double* mean, double* sum_dy,
                                double* sum_dy_xmu) {
  const __m256d sa[2] = {lo4(fa), hi4(fa)}, sb[2] = {lo4(fb), hi4(fb)};
  const __m256d mf_d[2] = {lo4(mf), hi4(mf)};
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_pd(sum_dy + 4 * h, _mm256_add_pd(_mm256_loadu_pd(sum_dy + 4 * h), sa[h]));
    const __m256d b = _mm256_add_pd(_mm256_loadu_pd(sum_dy_xmu + 4 * h), sb[h]);
    const __m256d rest = _mm256_sub_pd(_mm256_loadu_pd(mean + 4 * h), mf_d[h]);
    _mm256_storeu_pd(sum_dy_xmu + 4 * h, _mm256_fnmadd_pd(rest, sa[h], b));
  }
}

// sum(dy) and sum(dy * (x - mean)) of channels [c, c + 8) over rows [r0, r1), summed in float32
// against the mean rounded to float32 and widened once, as shifted_sums_tile8_simd does.
template <typename scalar_t>
inline void grad_sums_tile8_simd(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                 const double* mean, double* sum_dy, double* sum_dy_xmu) {
  const __m256 mf = narrow8(mean + c);
  __m256 fa = _mm256_setzero_ps(), fb = fa;
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 g = load8(dy + r * C + c);
    fa = _mm256_add_ps(fa, g);
    fb = _mm256_fmadd_ps(g, _mm256_sub_ps(load8(x + r * C + c), mf), fb);
  }
  add_grad_tile8_sums(fa, fb, mf, mean + c, sum_dy + c, sum_dy_xmu + c);
}

#ifndef BN_EXT_AVX512BF16
// Channels [c, c + kWideTile8Channels) as 4 vectors side by side (the AVX2 build, C >=
// kWideTileChannels), as the AVX-512 build's 128-channel tiles: each row's lines are used at once,
// so a tile takes kRowsPerTile rows, where 8-channel tiles over rows 4 KiB apart took 8 (the L1
// set limit) and widened their sums every 8 rows. A lane's arithmetic is tile8's.
template <typename scalar_t>
inline void shifted_sums_tile32(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1, const double* shift,
                                double* s1, double* s2) {
  constexpr int V = kWideTile8Channels / 8;
  __m256 shf[V], fa[V] = {}, fb[V] = {};
  for (int v = 0; v < V; ++v) shf[v] = narrow8(shift + c + 8 * v);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C + c;
    for (int v = 0; v < V; ++v) {
      const __m256 d = _mm256_sub_ps(load8(row + 8 * v), shf[v]);
      fa[v] = _mm256_add_ps(fa[v], d);
      fb[v] = _mm256_fmadd_ps(d, d, fb[v]);
    }
  }
  for (int v = 0; v < V; ++v)
    add_tile8_sums(fa[v], fb[v], shf[v], shift + c + 8 * v, r1 - r0, s1 + c + 8 * v, s2 + c + 8 * v);
}

// grad_sums_tile8_simd for channels [c, c + kWideTile8Channels), as shifted_sums_tile32.
template <typename scalar_t>
inline void grad_sums_tile32(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                             const double* mean, double* sum_dy, double* sum_dy_xmu) {
  constexpr int V = kWideTile8Channels / 8;
  __m256 mf[V], fa[V] = {}, fb[V] = {};
  for (int v = 0; v < V; ++v) mf[v] = narrow8(mean + c + 8 * v);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* g = dy + r * C + c;
    const scalar_t* xr = x + r * C + c;
    for (int v = 0; v < V; ++v) {
      const __m256 gv = load8(g + 8 * v);
      fa[v] = _mm256_add_ps(fa[v], gv);
      fb[v] = _mm256_fmadd_ps(gv, _mm256_sub_ps(load8(xr + 8 * v), mf[v]), fb[v]);
    }
  }
  for (int v = 0; v < V; ++v)
    add_grad_tile8_sums(fa[v], fb[v], mf[v], mean + c + 8 * v, sum_dy + c + 8 * v, sum_dy_xmu + c + 8 * v);
}
#endif

#ifdef BN_EXT_AVX512BF16
// Sixteen channels' float32 tile sums (fa of x - shf, fb of its squares, over `rows` rows, shf the
// shift rounded to float32) added into their float64 sums s1/s2 with that rounding corrected.
inline void add_tile16_sums(__m512 fa, __m512 fb, __m512 shf, const double* shift, int64_t rows, double* s1,
                            double* s2) {
  const __m512d n = _mm512_set1_pd(static_cast<double>(rows));
  const __m512d sa[2] = {_mm512_cvtps_pd(lower8(fa)), _mm512_cvtps_pd(upper8(fa))};
  const __m512d sb[2] = {_mm512_cvtps_pd(lower8(fb)), _mm512_cvtps_pd(upper8(fb))};
  const __m512d shf_d[2] = {_mm512_cvtps_pd(lower8(shf)), _mm512_cvtps_pd(upper8(shf))};
  for (int h = 0; h < 2; ++h) {
    const __m512d rest = _mm512_sub_pd(_mm512_loadu_pd(shift + 8 * h), shf_d[h]);
    const __m512d nr = _mm512_mul_pd(n, rest);
    const __m512d a = _mm512_sub_pd(_mm512_add_pd(_mm512_loadu_pd(s1 + 8 * h), sa[h]), nr);
    __m512d b = _mm512_add_pd(_mm512_loadu_pd(s2 + 8 * h), sb[h]);
    b = _mm512_fnmadd_pd(_mm512_add_pd(rest, rest), sa[h], b);
    b = _mm512_fmadd_pd(nr, rest, b);
    _mm512_storeu_pd(s1 + 8 * h, a);
    _mm512_storeu_pd(s2 + 8 * h, b);
  }
}

// shifted_sums_tile8_simd for channels [c, c + 16), 16-wide.
template <typename scalar_t>
inline void shifted_sums_tile16(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1, const double* shift,
                                double* s1, double* s2) {
  const __m512 shf = narrow16(_mm512_loadu_pd(shift + c), _mm512_loadu_pd(shift + c + 8));
  // even and odd rows into two pairs of sums: one chain of dependent FMAs would set the pace
  __m512 fa = _mm512_setzero_ps(), fb = fa, ga = fa, gb = fa;
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    const __m512 d = _mm512_sub_ps(load16(x + r * C + c), shf);
    const __m512 e = _mm512_sub_ps(load16(x + (r + 1) * C + c), shf);
    fa = _mm512_add_ps(fa, d);
    fb = _mm512_fmadd_ps(d, d, fb);
    ga = _mm512_add_ps(ga, e);
    gb = _mm512_fmadd_ps(e, e, gb);
  }
  if (r < r1) {
    const __m512 d = _mm512_sub_ps(load16(x + r * C + c), shf);
    fa = _mm512_add_ps(fa, d);
    fb = _mm512_fmadd_ps(d, d, fb);
  }
  add_tile16_sums(_mm512_add_ps(fa, ga), _mm512_add_ps(fb, gb), shf, shift + c, r1 - r0, s1 + c, s2 + c);
}

// V vectors of 16 per-channel float64 values (shifts or means), each rounded to float32.
template <int V>
inline void narrow_lanes(const double* p, __m512* out) {
  for (int v = 0; v < V; ++v) out[v] = narrow16(_mm512_loadu_pd(p + 16 * v), _mm512_loadu_pd(p + 16 * v + 8));
}

// Channels [c, c + kWideTileChannels) as 8 vectors side by side (AVX-512, C >= 128):
// each row gives 8 independent chains of sums, and every line it touches is used at once, so the
// tile can take as many rows as the float32 sums allow (for_each_tile8). kStream: the rows are the
// tile's alone (C = kWideTileChannels), one after another, so their loads are prefetched as a
// run's are (rows of more channels are read a few lines at a time, where that measured no gain).
template <bool kStream, typename scalar_t>
inline void shifted_sums_tile128_of(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                    const double* shift, double* s1, double* s2) {
  constexpr int V = kWideTileChannels / 16;
  __m512 shf[V], fa[V] = {}, fb[V] = {};
  narrow_lanes<V>(shift + c, shf);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C + c;
    for (int v = 0; v < V; ++v) {
      if constexpr (kStream) prefetch_ahead(row + 16 * v);
      const __m512 d = _mm512_sub_ps(load16(row + 16 * v), shf[v]);
      fa[v] = _mm512_add_ps(fa[v], d);
      fb[v] = _mm512_fmadd_ps(d, d, fb[v]);
    }
  }
  for (int v = 0; v < V; ++v)
    add_tile16_sums(fa[v], fb[v], shf[v], shift + c + 16 * v, r1 - r0, s1 + c + 16 * v, s2 + c + 16 * v);
}
template <typename scalar_t>
inline void shifted_sums_tile128(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1, const double* shift,
                                 double* s1, double* s2) {
  if (C == kWideTileChannels) return shifted_sums_tile128_of<true>(x, C, c, r0, r1, shift, s1, s2);
  shifted_sums_tile128_of<false>(x, C, c, r0, r1, shift, s1, s2);
}

// Sixteen channels' float32 gradient tile sums (fa of dy, fb of dy * (x - mf), mf the mean rounded
// to float32) added into their float64 sums with that rounding corrected.
inline void add_grad_tile16_sums(__m512 fa, __m512 fb, __m512 mf, const double* mean, double* sum_dy,
                                 double* sum_dy_xmu) {
  const __m512d sa[2] = {_mm512_cvtps_pd(lower8(fa)), _mm512_cvtps_pd(upper8(fa))};
  const __m512d sb[2] = {_mm512_cvtps_pd(lower8(fb)), _mm512_cvtps_pd(upper8(fb))};
  const __m512d mf_d[2] = {_mm512_cvtps_pd(lower8(mf)), _mm512_cvtps_pd(upper8(mf))};
  for (int h = 0; h < 2; ++h) {
    _mm512_storeu_pd(sum_dy + 8 * h, _mm512_add_pd(_mm512_loadu_pd(sum_dy + 8 * h), sa[h]));
    const __m512d b = _mm512_add_pd(_mm512_loadu_pd(sum_dy_xmu + 8 * h), sb[h]);
    const __m512d rest = _mm512_sub_pd(_mm512_loadu_pd(mean + 8 * h), mf_d[h]);
    _mm512_storeu_pd(sum_dy_xmu + 8 * h, _mm512_fnmadd_pd(rest, sa[h], b));
  }
}

// grad_sums_tile8_simd for channels [c, c + 16), 16-wide.
template <typename scalar_t>
inline void grad_sums_tile16(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                             const double* mean, double* sum_dy, double* sum_dy_xmu) {
  const __m512 mf = narrow16(_mm512_loadu_pd(mean + c), _mm512_loadu_pd(mean + c + 8));
  __m512 fa = _mm512_setzero_ps(), fb = fa;
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 g = load16(dy + r * C + c);
    fa = _mm512_add_ps(fa, g);
    fb = _mm512_fmadd_ps(g, _mm512_sub_ps(load16(x + r * C + c), mf), fb);
  }
  add_grad_tile16_sums(fa, fb, mf, mean + c, sum_dy + c, sum_dy_xmu + c);
}

// grad_sums_tile16 for channels [c, c + kWideTileChannels), 8 vectors side by side (as
// shifted_sums_tile128_of, kStream too; a lane's arithmetic is the same as in grad_sums_tile16).
template <bool kStream, typename scalar_t>
inline void grad_sums_tile128_of(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                 const double* mean, double* sum_dy, double* sum_dy_xmu) {
  constexpr int V = kWideTileChannels / 16;
  __m512 mf[V], fa[V] = {}, fb[V] = {};
  narrow_lanes<V>(mean + c, mf);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* g = dy + r * C + c;
    const scalar_t* xr = x + r * C + c;
    for (int v = 0; v < V; ++v) {
      if constexpr (kStream) {
        prefetch_ahead(g + 16 * v);
        prefetch_ahead(xr + 16 * v);
      }
      const __m512 gv = load16(g + 16 * v);
      fa[v] = _mm512_add_ps(fa[v], gv);
      fb[v] = _mm512_fmadd_ps(gv, _mm512_sub_ps(load16(xr + 16 * v), mf[v]), fb[v]);
    }
  }
  for (int v = 0; v < V; ++v)
    add_grad_tile16_sums(fa[v], fb[v], mf[v], mean + c + 16 * v, sum_dy + c + 16 * v, sum_dy_xmu + c + 16 * v);
}
template <typename scalar_t>
inline void grad_sums_tile128(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                              const double* mean, double* sum_dy, double* sum_dy_xmu) {
  if (C == kWideTileChannels) return grad_sums_tile128_of<true>(dy, x, C, c, r0, r1, mean, sum_dy, sum_dy_xmu);
  grad_sums_tile128_of<false>(dy, x, C, c, r0, r1, mean, sum_dy, sum_dy_xmu);
}
#endif
#endif  // BN_EXT_AVX2_INTRINSICS
