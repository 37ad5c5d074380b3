// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// The elementwise formulas over a vector width (Lanes8, Lanes16), the stores that round to the
// storage type, and the SIMD normalising loops (runs, spans, the pipelined forward's loop).

#ifdef BN_EXT_AVX2_INTRINSICS
// Eight float32 values rounded to the storage type (round to nearest even, NaN kept quiet: the
// same results as c10's scalar conversions).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
#ifndef BN_EXT_AVX512BF16
// Eight float32 values rounded to bfloat16 (round to nearest even), each in the upper half of its
// 32-bit lane; NaNs are left to bf16_rounded.
inline __m256i bf16_rounded_finite(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
}
// The same with NaNs kept quiet (c10's 0x7FC0).
inline __m256i bf16_rounded(__m256 v) {
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(bf16_rounded_finite(v), _mm256_set1_epi32(0x7FC00000), nan);
}
// Whether a or b has a NaN lane. One test per sixteen values lets the rounding skip the blends
// where there is none: on Intel a blend by a vector mask is three micro-ops, and the rounding was
// half of the AVX2 build's bfloat16 normalising loop (docs/design.md, "Measurements").
inline bool any_nan(__m256 a, __m256 b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) != 0; }
// load16_split's two vectors rounded and stored back in place: the odd positions' upper halves
// blended over the even positions' shifted down (no lane-crossing pack).
inline __m256i bf16_joined(__m256 even, __m256 odd) {
  if (__builtin_expect(any_nan(even, odd), 0))
    return _mm256_blend_epi16(_mm256_srli_epi32(bf16_rounded(even), 16), bf16_rounded(odd), 0xAA);
  return _mm256_blend_epi16(_mm256_srli_epi32(bf16_rounded_finite(even), 16), bf16_rounded_finite(odd), 0xAA);
}
#endif
inline void store8(c10::BFloat16* p, __m256 v) {
#ifdef BN_EXT_AVX512BF16
  // one instruction: round to nearest even (NaNs stay NaN; their payload bits may differ from
  // c10's canonical 0x7FC0, which no comparison of values can see)
  const __m128bh h = _mm256_cvtneps_pbh(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<const __m128i&>(h));
#else
  const __m256i halves = _mm256_srli_epi32(any_nan(v, v) ? bf16_rounded(v) : bf16_rounded_finite(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(halves), _mm256_extracti128_si256(halves, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
#endif
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// store8's values, float32 with a streaming store where p is aligned for one (stream_output);
// 16-bit types with plain stores (8 of them are half a line; only the AVX2 build's elementwise
// loops store 8 at a time).
inline void stream8(float* p, __m256 v) {
  if (aligned_to(p, 32)) {
    _mm256_stream_ps(p, v);
  } else {
    store8(p, v);
  }
}
template <typename T>
inline void stream8(T* p, __m256 v) {
  store8(p, v);
}

// The AVX2 build's elementwise formulas use fused multiply-adds, in the vector body and the
// scalar tail alike, so where a thread's range splits a run cannot change any result.
inline float normalize_one(float x, float hi, float lo, float sc, float sh) { return std::fma((x - hi) - lo, sc, sh); }

// The elementwise loops are written once over a vector width L (Lanes8: AVX2, Lanes16: the
// AVX-512 build's bodies, run first) and a per-channel coefficient K: Broadcast (one channel's
// run, NC(D)HW) or PerLane (channels-last spans, one coefficient per position).
struct Lanes8 {
  using vec = __m256;
  static constexpr int64_t width = 8;
  template <typename T>
  static vec load(const T* p) {
    return load8(p);
  }
  template <typename T>
  static void store(T* p, vec v) {
    store8(p, v);
  }
  template <typename T>
  static void store_out(T* p, vec v, bool stream) {
    stream ? stream8(p, v) : store8(p, v);
  }
  static vec coef(const float* p) { return _mm256_loadu_ps(p); }
  static vec coef(float v) { return _mm256_set1_ps(v); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
};
#ifndef BN_EXT_AVX512BF16
// The AVX2 build's bfloat16 runs, sixteen values at a time as load16_split's even and odd halves
// (one coefficient for all: Broadcast only). Each value goes through the formulas Lanes8 applies,
// so the results have Lanes8's bits.
struct SplitBF16 {
  struct vec {
    __m256 even, odd;
  };
  static constexpr int64_t width = 16;
  static vec load(const c10::BFloat16* p) {
    vec v;
    load16_split(p, v.even, v.odd);
    return v;
  }
  // always inlined: GCC left store_out a call per 16 values in the pipelined training forward of
  // (4, 8, 32, 32, 32), a fifth of its time
  [[gnu::always_inline]] static void store(c10::BFloat16* p, vec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_joined(v.even, v.odd));
  }
  // sixteen bfloat16 values fill half a cache line: streamed where aligned for it
  [[gnu::always_inline]] static void store_out(c10::BFloat16* p, vec v, bool stream) {
    if (stream && aligned_to(p, 32)) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_joined(v.even, v.odd));
    } else {
      store(p, v);
    }
  }
  static vec coef(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
  static vec sub(vec a, vec b) { return {_mm256_sub_ps(a.even, b.even), _mm256_sub_ps(a.odd, b.odd)}; }
  static vec add(vec a, vec b) { return {_mm256_add_ps(a.even, b.even), _mm256_add_ps(a.odd, b.odd)}; }
  static vec mul(vec a, vec b) { return {_mm256_mul_ps(a.even, b.even), _mm256_mul_ps(a.odd, b.odd)}; }
  static vec fmadd(vec a, vec b, vec c) {
    return {_mm256_fmadd_ps(a.even, b.even, c.even), _mm256_fmadd_ps(a.odd, b.odd, c.odd)};
  }
};
#endif
#ifdef BN_EXT_AVX512BF16
struct Lanes16 {
  using vec = __m512;
  static constexpr int64_t width = 16;
  template <typename T>
  static vec load(const T* p) {
    return load16(p);
  }
  template <typename T>
  static void store(T* p, vec v) {
    store16(p, v);
  }
  template <typename T>
  static void store_out(T* p, vec v, bool stream) {
    stream ? stream16(p, v) : store16(p, v);
  }
  static vec coef(const float* p) { return _mm512_loadu_ps(p); }
  static vec coef(float v) { return _mm512_set1_ps(v); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
};
#endif

struct Broadcast {
  float v;
  template <typename L>
  typename L::vec at(int64_t) const {
    return L::coef(v);
  }
  float scalar(int64_t) const { return v; }
#ifdef BN_EXT_AVX512BF16
  __m512 first(int64_t, int64_t) const { return _mm512_set1_ps(v); }
#endif
};
struct PerLane {
  const float* p;
  template <typename L>
  typename L::vec at(int64_t i) const {
    return L::coef(p + i);
  }
  float scalar(int64_t i) const { return p[i]; }
#ifdef BN_EXT_AVX512BF16
  // the coefficients of positions [i, i + n), n < 16 (zeros in the other lanes)
  __m512 first(int64_t i, int64_t n) const { return _mm512_maskz_loadu_ps(first_lanes(n), p + i); }
#endif
};

#ifndef BN_EXT_AVX512BF16
// PerLane for the AVX2 build's bfloat16 channels-last spans, which then go 16 values at a time as
// SplitBF16's halves like NC(D)HW runs: the coefficients also in its order (split_even_odd, whole
// blocks of 16 from the span's start; the 8-wide loops and the tail read `p`).
struct PerLaneSplit {
  const float* p;
  const float* split;
  template <typename L>
  typename L::vec at(int64_t i) const {
    if constexpr (std::is_same_v<L, SplitBF16>) {
      return {_mm256_loadu_ps(split + i), _mm256_loadu_ps(split + i + 8)};
    } else {
      return L::coef(p + i);
    }
  }
  float scalar(int64_t i) const { return p[i]; }
};
// Whether K's coefficients come in a form SplitBF16's loops can take.
template <typename K>
constexpr bool kSplitCoefficients = std::is_same_v<K, Broadcast> || std::is_same_v<K, PerLaneSplit>;
#endif

// The two elementwise formulas over vectors of L, written once for the loops' bodies and the
// AVX-512 build's masked tails (which must give the bodies' bits: where vectors end cannot matter).
// x less its mean, the mean as a float32 pair hi + lo: (x - hi) - lo.
template <typename L>
inline typename L::vec centred(typename L::vec x, typename L::vec hi, typename L::vec lo) {
  return L::sub(L::sub(x, hi), lo);
}
// y = ((x - hi) - lo) * sc + sh.
template <typename L>
inline typename L::vec normalized(typename L::vec x, typename L::vec hi, typename L::vec lo, typename L::vec sc,
                                  typename L::vec sh) {
  return L::fmadd(centred<L>(x, hi, lo), sc, sh);
}
// Training's dx = kx * xc + (kd * dy + k0), xc being x less its mean (or x where the mean is
// folded into k0).
template <typename L>
inline typename L::vec centred_grad(typename L::vec kd, typename L::vec dy, typename L::vec kx, typename L::vec xc,
                                    typename L::vec k0) {
  return L::fmadd(kx, xc, L::fmadd(kd, dy, k0));
}

// y = ((x - hi) - lo) * sc + sh, or x * sc + sh where the mean is folded into the shift, for
// whole vectors of L of the n values from position i on. Returns where it stopped.
template <typename L, typename scalar_t, typename K>
inline int64_t normalize_vectors(const scalar_t* x, scalar_t* y, int64_t i, int64_t n, const K& hi, const K& lo,
                                 const K& sc, const K& sh, bool folded, bool stream) {
  for (; i + L::width <= n; i += L::width) {
    prefetch_ahead(x + i);
    const typename L::vec s = sc.template at<L>(i), t = sh.template at<L>(i);
    if (folded) {
      L::store_out(y + i, L::fmadd(L::load(x + i), s, t), stream);
      continue;
    }
    L::store_out(y + i, normalized<L>(L::load(x + i), hi.template at<L>(i), lo.template at<L>(i), s, t), stream);
  }
  return i;
}

// normalize_vectors, then the last values: one masked vector in the AVX-512 build, 8-wide vectors
// and scalar code in the AVX2 one (the same formula, so where vectors end cannot matter).
template <typename scalar_t, typename K>
inline void normalize_span(const scalar_t* x, scalar_t* y, int64_t n, const K& hi, const K& lo, const K& sc,
                           const K& sh, bool folded, bool stream) {
  int64_t i = 0;
#ifdef BN_EXT_AVX512BF16
  i = normalize_vectors<Lanes16>(x, y, i, n, hi, lo, sc, sh, folded, stream);
  if (i < n) {  // the last values, fewer than 16: one masked vector (7x7 planes end in one value)
    const int64_t m = n - i;
    store16_first(
        y + i,
        normalized<Lanes16>(load16_first(x + i, m), hi.first(i, m), lo.first(i, m), sc.first(i, m), sh.first(i, m)), m);
  }
  return;
#endif
#ifndef BN_EXT_AVX512BF16
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kSplitCoefficients<K>)
    i = normalize_vectors<SplitBF16>(x, y, i, n, hi, lo, sc, sh, folded, stream);
#endif
  i = normalize_vectors<Lanes8>(x, y, i, n, hi, lo, sc, sh, folded, stream);
  for (int64_t j = i; j < n; ++j)
    y[j] = static_cast<scalar_t>(
        normalize_one(static_cast<float>(x[j]), hi.scalar(j), lo.scalar(j), sc.scalar(j), sh.scalar(j)));
}

template <typename scalar_t>
inline void normalize_run_simd(const scalar_t* x, scalar_t* y, int64_t len, float hi, float lo, float sc, float sh,
                               bool stream) {
  // hi == lo == 0: the mean folded into the shift (forward_coeffs)
  normalize_span(x, y, len, Broadcast{hi}, Broadcast{lo}, Broadcast{sc}, Broadcast{sh}, hi == 0.0f && lo == 0.0f,
                 stream);
}

// A channel's four coefficients side by side, as the packed planes below gather them.
inline __m128 coeffs4(const ForwardCoeffs<float>& k) { return _mm_setr_ps(k.mean_hi, k.mean_lo, k.scale, k.shift); }

// The AVX2 build's NC(D)HW planes of 2 or 4 values (S), from channel c's plane s0 values in:
// 8 / S whole planes a vector, each lane with its plane's coefficients (as
// normalize_packed_planes below), the partial plane in front and what is left behind it one run
// at a time (normalize_run_simd). Run by run, a plane that short took the scalar loop and a call.
// normalized() gives normalize_one's bits in every lane, folded mean or not.
template <typename scalar_t, typename Next, typename Coeffs>
inline void normalize_planes8(const scalar_t* x, scalar_t* y, int64_t len, int64_t S, int64_t s0, int64_t c,
                              Next&& next, Coeffs&& k, bool stream) {
  int64_t i = 0;
  auto plane = [&] {
    const int64_t end = std::min(len, i + S - s0);
    s0 = 0;
    const auto q = k(c);
    normalize_run_simd(x + i, y + i, end - i, q.mean_hi, q.mean_lo, q.scale, q.shift, stream);
    i = end;
    c = next(c);
  };
  if (s0 != 0) plane();
  // lane l takes field f of plane l / S: float 4 * (l / S) + f of the planes' coefficients, four
  // planes (S = 2) in two vectors, the first two planes' in q0 and lanes 4 to 7 from q1
  const __m256i at_hi = S == 2 ? _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4) : _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i at_lo = _mm256_add_epi32(at_hi, one), at_sc = _mm256_add_epi32(at_lo, one),
                at_sh = _mm256_add_epi32(at_sc, one);
  for (; i + 8 <= len; i += 8) {
    const __m128 k0 = coeffs4(k(c));
    c = next(c);
    const __m256 q0 = _mm256_insertf128_ps(_mm256_castps128_ps256(k0), coeffs4(k(c)), 1);
    c = next(c);
    __m256 hi = _mm256_permutevar8x32_ps(q0, at_hi), lo = _mm256_permutevar8x32_ps(q0, at_lo),
           sc = _mm256_permutevar8x32_ps(q0, at_sc), sh = _mm256_permutevar8x32_ps(q0, at_sh);
    if (S == 2) {
      const __m128 k2 = coeffs4(k(c));
      c = next(c);
      const __m256 q1 = _mm256_insertf128_ps(_mm256_castps128_ps256(k2), coeffs4(k(c)), 1);
      c = next(c);
      hi = _mm256_blend_ps(hi, _mm256_permutevar8x32_ps(q1, at_hi), 0xF0);
      lo = _mm256_blend_ps(lo, _mm256_permutevar8x32_ps(q1, at_lo), 0xF0);
      sc = _mm256_blend_ps(sc, _mm256_permutevar8x32_ps(q1, at_sc), 0xF0);
      sh = _mm256_blend_ps(sh, _mm256_permutevar8x32_ps(q1, at_sh), 0xF0);
    }
    Lanes8::store_out(y + i, normalized<Lanes8>(load8(x + i), hi, lo, sc, sh), stream);
  }
  while (i < len) plane();
}

#ifdef BN_EXT_AVX512BF16
// kPlanes (2, 4 or 8) whole NC(D)HW planes a vector, as normalize_planes16 takes planes of
// 16 / kPlanes values from a plane's start: each lane with its plane's coefficients, the planes'
// four coefficients put side by side and spread by one permutation each. A masked vector a plane
// spent most of a 2 x 2 channel's elementwise pass on its set-up (coefficients, broadcasts, mask).
// normalized() with the mean folded (hi = lo = 0) computes what the folded multiply-add does, so
// every lane has the per-plane loop's bits. Returns where it stopped (fewer than 16 values left),
// c then the channel of the plane there.
template <int64_t kPlanes, typename scalar_t, typename Next, typename Coeffs>
inline int64_t normalize_packed_planes(const scalar_t* x, scalar_t* y, int64_t len, int64_t& c, Next&& next, Coeffs&& k,
                                       bool stream) {
  constexpr int kLog2S = kPlanes == 8 ? 1 : kPlanes == 4 ? 2 : 3;
  // lane l takes field f of plane l / S: float 4 * (l / S) + f of q[0] and q[1] (planes 4 to 7)
  const __m512i at_hi = _mm512_slli_epi32(
      _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), kLog2S), 2);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i at_lo = _mm512_add_epi32(at_hi, one), at_sc = _mm512_add_epi32(at_lo, one),
                at_sh = _mm512_add_epi32(at_sc, one);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512 q[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    [&]<int64_t... J>(std::integer_sequence<int64_t, J...>) {
      ((q[J / 4] = _mm512_insertf32x4(q[J / 4], coeffs4(k(c)), J % 4), c = next(c)), ...);
    }(std::make_integer_sequence<int64_t, kPlanes>{});
    const __m512 hi = _mm512_permutex2var_ps(q[0], at_hi, q[1]), lo = _mm512_permutex2var_ps(q[0], at_lo, q[1]),
                 sc = _mm512_permutex2var_ps(q[0], at_sc, q[1]), sh = _mm512_permutex2var_ps(q[0], at_sh, q[1]);
    prefetch_ahead(x + i);
    Lanes16::store_out(y + i, normalized<Lanes16>(load16(x + i), hi, lo, sc, sh), stream);
  }
  return i;
}

// Consecutive NC(D)HW planes normalised in one call: `len` values from x, the first s0 values into
// a plane of channel c, each plane followed by one of channel next(c); k(c) gives channel c's
// ForwardCoeffs<float>. Each plane goes as normalize_span takes a run (whole vectors, then one
// masked vector: the same bits), but inline: on planes of a few dozen values (7 x 7) a call per
// run, its prologue and its broadcasts weighed on the pass.
template <typename scalar_t, typename Next, typename Coeffs>
inline void normalize_planes16(const scalar_t* x, scalar_t* y, int64_t len, int64_t S, int64_t s0, int64_t c,
                               Next&& next, Coeffs&& k, bool stream) {
  int64_t i = 0;
  // the plane at i (s0 values into it at the start), channel c's; then c is the next plane's
  auto plane = [&] {
    const int64_t end = std::min(len, i + S - s0);
    s0 = 0;
    const auto q = k(c);
    const __m512 hi = _mm512_set1_ps(q.mean_hi), lo = _mm512_set1_ps(q.mean_lo), sc = _mm512_set1_ps(q.scale),
                 sh = _mm512_set1_ps(q.shift);
    const bool folded = q.mean_hi == 0.0f && q.mean_lo == 0.0f;
    auto out = [&](__m512 xv) { return folded ? Lanes16::fmadd(xv, sc, sh) : normalized<Lanes16>(xv, hi, lo, sc, sh); };
    for (; i + 16 <= end; i += 16) {
      prefetch_ahead(x + i);
      Lanes16::store_out(y + i, out(load16(x + i)), stream);
    }
    if (i < end) {
      store16_first(y + i, out(load16_first(x + i, end - i)), end - i);
      i = end;
    }
    c = next(c);
  };
  if (S == 2 || S == 4 || S == 8) {  // from the first whole plane on, 16 / S planes a vector
    if (s0 != 0) plane();
    if (S == 2) i += normalize_packed_planes<8>(x + i, y + i, len - i, c, next, k, stream);
    if (S == 4) i += normalize_packed_planes<4>(x + i, y + i, len - i, c, next, k, stream);
    if (S == 8) i += normalize_packed_planes<2>(x + i, y + i, len - i, c, next, k, stream);
  }
  while (i < len) plane();
}

#endif

// Whether NC(D)HW planes of S values run a piece's (or a sample's group's) planes in one call,
// normalize_planes: every plane size in the AVX-512 build (normalize_planes16), planes of 2 or 4
// values in the AVX2 build (normalize_planes8); otherwise a call a run (normalize_run).
inline bool planes_in_one_call(int64_t S) {
#ifdef BN_EXT_AVX512BF16
  (void)S;
  return true;
#else
  return S == 2 || S == 4;
#endif
}
template <typename scalar_t, typename Next, typename Coeffs>
inline void normalize_planes(const scalar_t* x, scalar_t* y, int64_t len, int64_t S, int64_t s0, int64_t c, Next&& next,
                             Coeffs&& k, bool stream) {
#ifdef BN_EXT_AVX512BF16
  normalize_planes16(x, y, len, S, s0, c, next, k, stream);
#else
  normalize_planes8(x, y, len, S, s0, c, next, k, stream);
#endif
}

#ifdef BN_EXT_AVX512BF16
// The pipelined training forward's loop (train_pipelined): one run of a channel's shifted sums,
// added as shifted_sums_run_simd adds them (add_shifted16/32 into the same chunk sums, so the same
// bits), and in the same loop the run at the same (n, s) of the channel before it, whose
// statistics are done, normalised a vector at a time by normalize_span (normalize_run_simd's).
// The run summed comes from memory while the one normalised comes from cache and its output goes
// out: both directions of memory traffic at once, where a reduction and then an elementwise pass
// take turns.
template <typename scalar_t>
inline void shifted_sums_normalize_run(const scalar_t* x, int64_t len, double shift, LaneSums& acc, const scalar_t* xp,
                                       scalar_t* yp, float hi, float lo, float sc, float sh, bool stream) {
  const __m512 shf = _mm512_set1_ps(static_cast<float>(shift));
  const bool folded = hi == 0.0f && lo == 0.0f;
  auto normalize = [&](int64_t j, int64_t n) {
    normalize_span(xp + j, yp + j, n, Broadcast{hi}, Broadcast{lo}, Broadcast{sc}, Broadcast{sh}, folded, stream);
  };
  chunked_lanes(
      len, acc,
      [&](int64_t j, int64_t n, __m512& fa, __m512& fb) {
        add_shifted16(x + j, n, shf, fa, fb);
        normalize(j, n);  // n <= 16 values: one vector, or the masked last one
      },
      [&](int64_t j, __m512& fa, __m512& fb, __m512& ga, __m512& gb) {
        add_shifted32(x + j, shf, fa, fb, ga, gb);
        normalize(j, 32);
      });
}
#else
// The AVX2 build's: shifted_sums_run_simd over the run, normalising the same span of the channel
// before after each chunk it sums (16 to 128 values at a time).
template <typename scalar_t>
inline void shifted_sums_normalize_run(const scalar_t* x, int64_t len, double shift, LaneSums& acc, const scalar_t* xp,
                                       scalar_t* yp, float hi, float lo, float sc, float sh, bool stream) {
  const bool folded = hi == 0.0f && lo == 0.0f;
  shifted_sums_run_simd(x, len, shift, acc, [&](int64_t j, int64_t n) {
    normalize_span(xp + j, yp + j, n, Broadcast{hi}, Broadcast{lo}, Broadcast{sc}, Broadcast{sh}, folded, stream);
  });
}
#endif

// Channels-last: a span of `width` values, one coefficient per position: k holds hi, lo, sc, sh,
// and after them (parallel_row_spans' kSplit) the same in split_even_odd's order. Flattened: GCC
// kept the AVX2 build's bfloat16 rounding (bf16_joined) a call per 16 values here otherwise.
template <typename scalar_t, size_t N>
[[gnu::flatten]] inline void normalize_rows_simd(const scalar_t* x, scalar_t* y, int64_t width,
                                                 const std::array<const float*, N>& k, bool folded, bool stream) {
#ifndef BN_EXT_AVX512BF16
  if constexpr (N == 8) {
    normalize_span(x, y, width, PerLaneSplit{k[0], k[4]}, PerLaneSplit{k[1], k[5]}, PerLaneSplit{k[2], k[6]},
                   PerLaneSplit{k[3], k[7]}, folded, stream);
    return;
  }
#endif
  normalize_span(x, y, width, PerLane{k[0]}, PerLane{k[1]}, PerLane{k[2]}, PerLane{k[3]}, folded, stream);
}
#endif  // BN_EXT_AVX2_INTRINSICS
