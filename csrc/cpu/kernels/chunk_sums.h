// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// Shifts, the per-block lane sums, and the SIMD loops that sum one NC(D)HW run in float32
// chunks widened into float64 (statistics and gradient sums).

// A shift must be finite: an Inf or NaN among the sampled values would turn every shifted value
// into NaN, where PyTorch's sums give the mean +-Inf. With no shift the sums carry them through.
inline double finite_or_zero(double shift) { return std::isfinite(shift) ? shift : 0.0; }

// Per-channel shift: the mean of the channel's first (up to) kShiftSamples elements.
// Channel c's, NC(D)HW layout.
template <typename scalar_t>
double channel_shift(const scalar_t* x, const Geometry& g, int64_t c) {
  const int64_t n = std::min<int64_t>(kShiftSamples, g.rows());
  if (n == 0) return 0.0;
#ifdef BN_EXT_AVX512BF16
  // One vector and a tree sum in float32 (any value near the mean serves as the shift; a chain of
  // 16 dependent float64 additions per channel cost 9% of a (4, 2048, 7, 7) bfloat16 training
  // forward, and 11% of a (4, 2048, 2, 2) float32 one with its four runs): planes of 16 or more
  // values in one load, smaller planes in a masked load a plane. Values near the float32 maximum
  // overflow that sum: those take the float64 loop below, as the other builds do.
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (n == kShiftSamples) {
      const scalar_t* p = x + c * g.S;
      __m512 v;
      if (g.S >= kShiftSamples) {
        v = load16(p);
      } else {
        v = _mm512_setzero_ps();
        for (int64_t k = 0; k < n; p += g.C * g.S) {
          const int64_t m = std::min(g.S, n - k);
          v = _mm512_add_ps(v, load16_first(p, m));
          k += m;
        }
      }
      const float s = _mm512_reduce_add_ps(v);
      if (std::isfinite(s)) return static_cast<double>(s) / static_cast<double>(n);
    }
  }
#elif defined(BN_EXT_AVX2_INTRINSICS)
  // planes of 16 or more: the same in two 8-wide vectors (16 dependent float64 additions are a
  // chain of about 60 cycles per channel, next to the 196 values of a (4, 2048, 7, 7) channel).
  // Smaller planes' values gathered into 16 floats for it measured no faster than the loop below.
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (n == kShiftSamples && g.S >= kShiftSamples) {
      const scalar_t* p = x + c * g.S;
      const __m256 v = _mm256_add_ps(load8(p), load8(p + 8));
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      const float s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
      if (std::isfinite(s)) return static_cast<double>(s) / static_cast<double>(n);
    }
  }
#endif
  double s = 0;
  for_each_run_of_channel(g, c, 0, n, [&](int64_t off, int64_t len) {
    for (int64_t i = 0; i < len; ++i) s += static_cast<double>(x[off + i]);
  });
  return finite_or_zero(s / static_cast<double>(n));
}

// Every channel's, either layout.
template <typename scalar_t>
std::vector<double> channel_shifts(const scalar_t* x, const Geometry& g) {
  std::vector<double> shift(g.C, 0.0);
  const int64_t n = std::min<int64_t>(kShiftSamples, g.rows());
  if (n == 0) return shift;
  if (g.layout == Layout::kNCS) {
    for (int64_t c = 0; c < g.C; ++c) shift[c] = channel_shift(x, g, c);
    return shift;
  }
  for (int64_t r = 0; r < n; ++r)  // row by row: the first n rows are contiguous
    for (int64_t c = 0; c < g.C; ++c) shift[c] += static_cast<double>(x[r * g.C + c]);
  for (double& v : shift) v = finite_or_zero(v / static_cast<double>(n));
  return shift;
}

// One reduction block's two sums while its runs are added. The AVX-512 build keeps them as eight
// float64 lanes of widened float32 chunk sums (taken against the float32-rounded shift or mean),
// added across runs and reduced once, when the block finishes: a horizontal sum per run would
// cost more than a 7x7 plane's run itself. The float32 chunk sums (two pairs, f and g, taking
// alternate vectors, or a 32-value step's even and odd bfloat16 positions) carry over from one
// run to the next and are widened every kChunkVectors vectors and when the block finishes, not
// per run: four 49-value runs of a 7x7 channel widen once, not four times. The AVX2 build keeps
// four such float64 lanes (its float32 chunks stay within a run); the baseline build, and the
// last values of the AVX2 build's runs, sum into sa and sb.
struct LaneSums {
#ifdef BN_EXT_AVX512BF16
  __m512d a, b;
  __m512 fa, fb, ga, gb;
  int64_t vecs = 0;  // vectors added into f and g since they were last widened
  double n = 0;      // values in the lanes
  LaneSums()         // user-provided: built for AVX-512
      : a(_mm512_setzero_pd()), b(a), fa(_mm512_setzero_ps()), fb(fa), ga(fa), gb(fa) {}
  // The two lane sums with the pending float32 chunk sums widened in, each reduced to one value.
  // Field by field, not through a copy of the whole: a 64-byte load of the scalar fields that
  // the block had just stored one by one stalled each 7x7 channel's finish (store forwarding).
  void totals(double* A, double* B) const;
#elif defined(BN_EXT_AVX2_INTRINSICS)
  // float64 lanes of the runs' widened chunk sums, carried from run to run (two horizontal sums
  // per run made (4, 2048, 7, 7) statistics 1.15x as long)
  __m256d a, b;
  double n = 0;  // values in the lanes
  LaneSums() : a(_mm256_setzero_pd()), b(a) {}
  void totals(double* A, double* B) const {
    const __m256d zero = _mm256_setzero_pd();
    *A = hsum(a, zero, zero, zero);
    *B = hsum(b, zero, zero, zero);
  }
#endif
  double sa = 0, sb = 0;
};

// Float32 partial sums taken against a shift (or mean) rounded to float32, added into the float64
// sums against the exact one. With rest = shift - float(shift), over `count` values:
// sum(x - shift) = A - count * rest and sum((x - shift)^2) = B - 2 * rest * A + count * rest^2.
inline void add_shifted_sums(double A, double B, double count, double shift, double* s1, double* s2) {
  const double rest = shift - static_cast<double>(static_cast<float>(shift));
  *s1 += A - count * rest;
  *s2 += (B - 2.0 * rest * A) + count * rest * rest;
}
// sum(dy) = A and sum(dy * (x - mean)) = B - (mean - float(mean)) * A.
inline void add_grad_sums(double A, double B, double mean, double* sum_dy, double* sum_dy_xmu) {
  *sum_dy += A;
  *sum_dy_xmu += B - (mean - static_cast<double>(static_cast<float>(mean))) * A;
}

#ifdef BN_EXT_AVX2_INTRINSICS
#ifdef BN_EXT_AVX512BF16
inline void LaneSums::totals(double* A, double* B) const {
  hsum8_pair(widen_add(a, _mm512_add_ps(fa, ga)), widen_add(b, _mm512_add_ps(fb, gb)), A, B);
}

// Vectors summed in float32 before widening: at most this many terms in any lane of f and g.
constexpr int64_t kChunkVectors = kChunk16 / 16;

// Values [0, len) of a run, the last vector masked: body(j, n, fa, fb) adds the vector at j, whose
// first n lanes are values (n = 16 but for the last), into the float32 chunk sums fa/fb (acc's f
// or g pair, alternately), widened into acc's lanes every kChunkVectors vectors; pair(j, fa, fb,
// ga, gb) adds the 32 values at j into both pairs, a vector's worth into each.
template <typename Body, typename Pair>
inline void chunked_lanes(int64_t len, LaneSums& acc, Body&& body, Pair&& pair) {
  // The float32 sums in locals, written back once: left in acc, which the body's output stores
  // may alias, GCC stored them to memory after every vector
  __m512 fa = acc.fa, fb = acc.fb, ga = acc.ga, gb = acc.gb;
  int64_t vecs = acc.vecs;
  auto added = [&](int64_t k) {
    if ((vecs += k) < kChunkVectors) return;
    acc.a = widen_add(acc.a, _mm512_add_ps(fa, ga));
    acc.b = widen_add(acc.b, _mm512_add_ps(fb, gb));
    fa = fb = ga = gb = _mm512_setzero_ps();
    vecs = 0;
  };
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    pair(j, fa, fb, ga, gb);
    added(2);
  }
  if (j + 16 <= len) {
    body(j, 16, fa, fb);
    j += 16;
    added(1);
  }
  if (j < len) {
    body(j, len - j, ga, gb);
    added(1);
  }
  acc.fa = fa;
  acc.fb = fb;
  acc.ga = ga;
  acc.gb = gb;
  acc.vecs = vecs;
  acc.n += static_cast<double>(len);
}
// chunked_lanes with each 32 values taken as two vectors in order, the first into f, the second
// into g.
template <typename Body>
inline void chunked_lanes(int64_t len, LaneSums& acc, Body&& body) {
  chunked_lanes(len, acc, body, [&](int64_t j, __m512& fa, __m512& fb, __m512& ga, __m512& gb) {
    body(j, 16, fa, fb);
    body(j + 16, 16, ga, gb);
  });
}

template <typename scalar_t>
inline __m512 load16_n(const scalar_t* p, int64_t n) {
  return n == 16 ? load16(p) : load16_first(p, n);
}

// One vector's terms (its first n lanes) added into a pair of float32 chunk sums, the bodies of
// chunked_lanes for the statistics (x - shf and its square) and the gradient sums (dy and
// dy * (x - mean_f)); the pipelined passes run the same bodies (shifted_sums_normalize_run,
// grad_sums_grad_input_run), so their sums have the plain loops' bits.
template <typename scalar_t>
inline void add_shifted16(const scalar_t* p, int64_t n, __m512 shf, __m512& fa, __m512& fb) {
  prefetch_ahead(p);
  const __m512 d = _mm512_maskz_sub_ps(first_lanes(n), load16_n(p, n), shf);
  fa = _mm512_add_ps(fa, d);
  fb = _mm512_fmadd_ps(d, d, fb);
}
template <typename scalar_t>
inline void add_grad16(const scalar_t* dy, const scalar_t* x, int64_t n, __m512 zm, __m512& fa, __m512& fb) {
  prefetch_ahead(dy);
  prefetch_ahead(x);
  const __m512 g = load16_n(dy, n);
  fa = _mm512_add_ps(fa, g);
  fb = _mm512_fmadd_ps(g, _mm512_maskz_sub_ps(first_lanes(n), load16_n(x, n), zm), fb);
}

// 32 bfloat16 values from one 64-byte load as float32, the even positions' (shifted up) and the
// odd positions' (masked): two instructions where two widening loads take four.
inline void load32_split(const c10::BFloat16* p, __m512& even, __m512& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
// The pair bodies of chunked_lanes for add_shifted16 and add_grad16: bfloat16 as load32_split's
// even positions into f and odd ones into g (the statistics' and gradient sums' bits differ from
// taking them in order, deterministically), other types as two vectors in order.
template <typename scalar_t>
inline void add_shifted32(const scalar_t* p, __m512 shf, __m512& fa, __m512& fb, __m512& ga, __m512& gb) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    prefetch_ahead(p);
    __m512 e, o;
    load32_split(p, e, o);
    const __m512 de = _mm512_sub_ps(e, shf), dd = _mm512_sub_ps(o, shf);
    fa = _mm512_add_ps(fa, de);
    fb = _mm512_fmadd_ps(de, de, fb);
    ga = _mm512_add_ps(ga, dd);
    gb = _mm512_fmadd_ps(dd, dd, gb);
  } else {
    add_shifted16(p, 16, shf, fa, fb);
    add_shifted16(p + 16, 16, shf, ga, gb);
  }
}
template <typename scalar_t>
inline void add_grad32(const scalar_t* dy, const scalar_t* x, __m512 zm, __m512& fa, __m512& fb, __m512& ga,
                       __m512& gb) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    prefetch_ahead(dy);
    prefetch_ahead(x);
    __m512 ge, go, xe, xo;
    load32_split(dy, ge, go);
    load32_split(x, xe, xo);
    fa = _mm512_add_ps(fa, ge);
    fb = _mm512_fmadd_ps(ge, _mm512_sub_ps(xe, zm), fb);
    ga = _mm512_add_ps(ga, go);
    gb = _mm512_fmadd_ps(go, _mm512_sub_ps(xo, zm), gb);
  } else {
    add_grad16(dy, x, 16, zm, fa, fb);
    add_grad16(dy + 16, x + 16, 16, zm, ga, gb);
  }
}

// Planes of fewer than 16 values: a block's runs of channel c, from flat index start to end,
// each added as chunked_lanes adds a run that short (body(off, len, ga, gb): its one masked
// vector into the g pair), with the same widenings, so the same bits; in one loop, the chunk sums
// in registers. Run by run, each 2 x 2 plane also paid a call, the shift's conversion and the
// chunk sums' loads and stores through acc.
template <typename Body>
inline void short_runs_lanes(const Geometry& g, int64_t c, int64_t start, int64_t end, LaneSums& acc, Body&& body) {
  __m512 ga = acc.ga, gb = acc.gb;
  int64_t vecs = acc.vecs;
  double n = acc.n;
  for_each_run_of_channel(g, c, start, end, [&](int64_t off, int64_t len) {
    body(off, len, ga, gb);
    n += static_cast<double>(len);
    if (++vecs < kChunkVectors) return;
    acc.a = widen_add(acc.a, _mm512_add_ps(acc.fa, ga));
    acc.b = widen_add(acc.b, _mm512_add_ps(acc.fb, gb));
    acc.fa = acc.fb = ga = gb = _mm512_setzero_ps();
    vecs = 0;
  });
  acc.ga = ga;
  acc.gb = gb;
  acc.vecs = vecs;
  acc.n = n;
}
#endif

// bfloat16 values per float32 chunk in the AVX2 build's statistics: each chunk ends in a chain of
// additions and widenings that its loop waits on, so chunks are as long as precision allows (256
// rather than 128 took a sixth off the statistics' time). They are taken 32 a step (two
// load16_splits) into two sets of even/odd sums, 8 terms per lane of each and 32 once the four
// are added, as in the AVX-512 build's chunks (kChunk16). A run's last chunk may be shorter.
constexpr int64_t kSplitChunk = 256;
constexpr int64_t kSplitStep = 32;

// One set of a chunk's float32 sums over load16_split's halves: a (the terms) and b (their
// squares), each for the even and the odd half.
struct SplitSums {
  __m256 ae, ao, be, bo;
  SplitSums() : ae(_mm256_setzero_ps()), ao(ae), be(ae), bo(ae) {}  // user-provided: built for AVX2
  void add_squares(__m256 de, __m256 do_) {
    ae = _mm256_add_ps(ae, de);
    ao = _mm256_add_ps(ao, do_);
    be = _mm256_fmadd_ps(de, de, be);
    bo = _mm256_fmadd_ps(do_, do_, bo);
  }
  static __m256 sum_a(const SplitSums& f, const SplitSums& g) {
    return _mm256_add_ps(_mm256_add_ps(f.ae, f.ao), _mm256_add_ps(g.ae, g.ao));
  }
  static __m256 sum_b(const SplitSums& f, const SplitSums& g) {
    return _mm256_add_ps(_mm256_add_ps(f.be, f.bo), _mm256_add_ps(g.be, g.bo));
  }
};

// The AVX2 build's run sums take a companion, called as also(j, n) after the values [j, j + n) of
// the run are summed (whole chunks, then the rest): the pipelined passes run the channel before's
// elementwise pass there, between the chunks, with the plain loops' sums.
struct NoCompanion {
  void operator()(int64_t, int64_t) const {}
};

template <typename scalar_t, typename Also = NoCompanion>
inline void shifted_sums_run_simd(const scalar_t* p, int64_t len, double shift, LaneSums& acc, Also&& also = {}) {
#ifdef BN_EXT_AVX512BF16
  // (x - shift_f) and its square in float32 chunks; finish_shifted corrects for the rounding
  const __m512 shf16 = _mm512_set1_ps(static_cast<float>(shift));
  chunked_lanes(
      len, acc, [&](int64_t j, int64_t n, __m512& fa, __m512& fb) { add_shifted16(p + j, n, shf16, fa, fb); },
      [&](int64_t j, __m512& fa, __m512& fb, __m512& ga, __m512& gb) { add_shifted32(p + j, shf16, fa, fb, ga, gb); });
#else
  // The lanes in locals, written back once (chunked_lanes' reason)
  __m256d a0 = acc.a, b0 = acc.b;
  int64_t i = 0;
  // Chunks of 32 values are summed in float32 (4 terms per lane lose nothing measurable; x - shift
  // is exact for bfloat16/float16 values near the shift and one rounding for float32, as in the
  // AVX-512 build's chunks), then widened into the float64 lanes: half the instructions of
  // widening every value. The lanes hold sums against shf; finish_shifted corrects for its
  // rounding (add_shifted_sums).
  const __m256 shf = _mm256_set1_ps(static_cast<float>(shift));
  auto widen = [&](__m256 fa, __m256 fb) {
    a0 = _mm256_add_pd(a0, _mm256_add_pd(lo4(fa), hi4(fa)));
    b0 = _mm256_add_pd(b0, _mm256_add_pd(lo4(fb), hi4(fb)));
  };
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    while (i + kSplitStep <= len) {
      const int64_t n = std::min(kSplitChunk, (len - i) / kSplitStep * kSplitStep);
      SplitSums f, g;
      for (int64_t j = i; j < i + n; j += kSplitStep) {
        prefetch_ahead(p + j);
        __m256 e, o;
        load16_split(p + j, e, o);
        f.add_squares(_mm256_sub_ps(e, shf), _mm256_sub_ps(o, shf));
        load16_split(p + j + 16, e, o);
        g.add_squares(_mm256_sub_ps(e, shf), _mm256_sub_ps(o, shf));
      }
      widen(SplitSums::sum_a(f, g), SplitSums::sum_b(f, g));
      also(i, n);
      i += n;
    }
  }
  for (; i + 32 <= len; i += 32) {
    prefetch_ahead(p + i);
    __m256 fa = _mm256_setzero_ps(), fb = fa;
#pragma GCC unroll 4
    for (int j = 0; j < 32; j += 8) {
      const __m256 d = _mm256_sub_ps(load8(p + i + j), shf);
      fa = _mm256_add_ps(fa, d);
      fb = _mm256_fmadd_ps(d, d, fb);
    }
    widen(fa, fb);
    also(i, 32);
  }
  if (i + 8 <= len) {  // the rest's whole vectors as one more chunk: a 7x7 plane is 32 + 16 + 1
    const int64_t from = i;
    __m256 fa = _mm256_setzero_ps(), fb = fa;
    for (; i + 8 <= len; i += 8) {
      const __m256 d = _mm256_sub_ps(load8(p + i), shf);
      fa = _mm256_add_ps(fa, d);
      fb = _mm256_fmadd_ps(d, d, fb);
    }
    widen(fa, fb);
    also(from, i - from);
  }
  acc.a = a0;
  acc.b = b0;
  acc.n += static_cast<double>(i);
  if (i < len) also(i, len - i);
  double ta = 0, tb = 0;  // the last values, against the exact shift
  for (; i < len; ++i) {
    const double d = static_cast<double>(static_cast<float>(p[i])) - shift;
    ta += d;
    tb += d * d;
  }
  acc.sa += ta;
  acc.sb += tb;
#endif
}

// sum(dy) and sum(dy * (x - mean)) over one run: chunks of 32 values (128 of bfloat16) in
// float32 against the mean rounded to float32 (x - mean_f is exact near the mean), widened into
// float64 per chunk, with the rounding of the mean corrected:
// sum(dy * (x - mean)) = sum(dy * (x - mean_f)) - rest * sum(dy).
template <typename scalar_t, typename Also = NoCompanion>
inline void grad_sums_run_simd(const scalar_t* dy, const scalar_t* x, int64_t len, double mean, LaneSums& acc,
                               Also&& also = {}) {
#ifdef BN_EXT_AVX512BF16
  // dy and dy * (x - mean_f) in float32 chunks; finish_grad corrects for the rounding of the mean
  const __m512 zm = _mm512_set1_ps(static_cast<float>(mean));
  chunked_lanes(
      len, acc, [&](int64_t j, int64_t n, __m512& fa, __m512& fb) { add_grad16(dy + j, x + j, n, zm, fa, fb); },
      [&](int64_t j, __m512& fa, __m512& fb, __m512& ga, __m512& gb) {
        add_grad32(dy + j, x + j, zm, fa, fb, ga, gb);
      });
#else
  // dy and dy * (x - mean_f) into the lanes (finish_grad corrects for the rounding of the mean)
  const __m256 mf = _mm256_set1_ps(static_cast<float>(mean));
  __m256d a0 = acc.a, b0 = acc.b;
  auto widen = [&](__m256 fa, __m256 fb) {  // a float32 chunk's sums into the float64 ones
    a0 = _mm256_add_pd(a0, _mm256_add_pd(lo4(fa), hi4(fa)));
    b0 = _mm256_add_pd(b0, _mm256_add_pd(lo4(fb), hi4(fb)));
  };
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // chunks of 128 values, 16 at a time: 8 terms per lane of each of the four sums (a second
    // set of sums, as the statistics take, spilled registers next to the pipelined pass's
    // coefficients and ran slower; so did unrolling all 8 steps, where GCC kept each step's dy
    // on the stack for the end of the chunk)
    constexpr int64_t kGradChunk = 128;
    for (; i + kGradChunk <= len; i += kGradChunk) {
      __m256 fa = _mm256_setzero_ps(), fb = fa, ga = fa, gb = fa;
#pragma GCC unroll 4
      for (int j = 0; j < kGradChunk; j += 16) {
        prefetch_ahead(dy + i + j);
        prefetch_ahead(x + i + j);
        __m256 ge, go, xe, xo;
        load16_split(dy + i + j, ge, go);
        load16_split(x + i + j, xe, xo);
        fa = _mm256_add_ps(fa, ge);
        fb = _mm256_fmadd_ps(ge, _mm256_sub_ps(xe, mf), fb);
        ga = _mm256_add_ps(ga, go);
        gb = _mm256_fmadd_ps(go, _mm256_sub_ps(xo, mf), gb);
      }
      widen(_mm256_add_ps(fa, ga), _mm256_add_ps(fb, gb));
      also(i, kGradChunk);
    }
  }
  for (; i + 32 <= len; i += 32) {
    __m256 fa = _mm256_setzero_ps(), fb = fa;
#pragma GCC unroll 4
    for (int j = 0; j < 32; j += 8) {
      prefetch_ahead(dy + i + j);
      prefetch_ahead(x + i + j);
      const __m256 g = load8(dy + i + j);
      fa = _mm256_add_ps(fa, g);
      fb = _mm256_fmadd_ps(g, _mm256_sub_ps(load8(x + i + j), mf), fb);
    }
    widen(fa, fb);
    also(i, 32);
  }
  if (i + 8 <= len) {  // as shifted_sums_run_simd's last chunk
    const int64_t from = i;
    __m256 fa = _mm256_setzero_ps(), fb = fa;
    for (; i + 8 <= len; i += 8) {
      const __m256 g = load8(dy + i);
      fa = _mm256_add_ps(fa, g);
      fb = _mm256_fmadd_ps(g, _mm256_sub_ps(load8(x + i), mf), fb);
    }
    widen(fa, fb);
    also(from, i - from);
  }
  acc.a = a0;
  acc.b = b0;
  if (i < len) also(i, len - i);
  double ta = 0, tb = 0;  // the last values, against the exact mean
  for (; i < len; ++i) {
    const double gv = static_cast<double>(static_cast<float>(dy[i]));
    ta += gv;
    tb += gv * (static_cast<double>(static_cast<float>(x[i])) - mean);
  }
  acc.sa += ta;
  acc.sb += tb;
#endif
}
#endif  // BN_EXT_AVX2_INTRINSICS
