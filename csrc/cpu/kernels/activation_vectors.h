// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// The fused ops' loops over a vector width (Lanes8; the AVX-512 build runs Lanes16 first):
// activation.h's scalar formulas, operation for operation (fused multiply-adds where those write
// mul_add and nowhere else, the same comparisons and selects), so a vector and the scalar tail
// give the same bits and nothing depends on where a thread's range starts. Lanes8's
// compiler-vectorised counterparts ran at a third of the plain BatchNorm loops' speed (bfloat16
// loads and stores, the selects).

// 1.5 * 2^23: adding it rounds a float of magnitude below 2^22 to an integer (exp_basic).
constexpr float kRoundToInt = 12582912.0f;

#ifdef BN_EXT_AVX2_INTRINSICS

// What the activations need beyond Lanes8/Lanes16: ordered comparisons, selects, exp_basic's
// clamps (max and min return their second operand for NaN, as its comparisons do) and its 2^n.
struct ActOps8 {
  using L = Lanes8;
  using vec = __m256;
  using mask = __m256;
  static vec zero() { return _mm256_setzero_ps(); }
  static mask gt(vec a, vec b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static mask lt(vec a, vec b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static mask both(mask a, mask b) { return _mm256_and_ps(a, b); }
  static vec select(mask m, vec a, vec b) { return _mm256_blendv_ps(b, a, m); }  // m ? a : b
  static vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  static vec neg(vec a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static vec min(vec a, vec b) { return _mm256_min_ps(a, b); }
  // 2^n from f = n + kRoundToInt (n in f's low bits)
  static vec pow2_of_rounded(vec f) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(f), _mm256_set1_epi32(127)), 23));
  }
};
#ifndef BN_EXT_AVX512BF16
// ActOps8's operations on both halves of SplitBF16's vectors: the AVX2 build's bfloat16 runs.
struct ActOpsSplit {
  using L = SplitBF16;
  using vec = SplitBF16::vec;
  using mask = SplitBF16::vec;
  template <typename F>
  static vec each(vec a, vec b, F&& f) {
    return {f(a.even, b.even), f(a.odd, b.odd)};
  }
  static vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static mask gt(vec a, vec b) { return each(a, b, ActOps8::gt); }
  static mask lt(vec a, vec b) { return each(a, b, ActOps8::lt); }
  static mask both(mask a, mask b) { return each(a, b, ActOps8::both); }
  static vec select(mask m, vec a, vec b) {
    return {ActOps8::select(m.even, a.even, b.even), ActOps8::select(m.odd, a.odd, b.odd)};
  }
  static vec div(vec a, vec b) { return each(a, b, ActOps8::div); }
  static vec neg(vec a) { return {ActOps8::neg(a.even), ActOps8::neg(a.odd)}; }
  static vec max(vec a, vec b) { return each(a, b, ActOps8::max); }
  static vec min(vec a, vec b) { return each(a, b, ActOps8::min); }
  static vec pow2_of_rounded(vec f) { return {ActOps8::pow2_of_rounded(f.even), ActOps8::pow2_of_rounded(f.odd)}; }
};
#endif
#ifdef BN_EXT_AVX512BF16
struct ActOps16 {
  using L = Lanes16;
  using vec = __m512;
  using mask = __mmask16;
  static vec zero() { return _mm512_setzero_ps(); }
  static mask gt(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static mask lt(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static mask both(mask a, mask b) { return static_cast<mask>(a & b); }
  static vec select(mask m, vec a, vec b) { return _mm512_mask_blend_ps(m, b, a); }
  static vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  static vec neg(vec a) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
  }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  static vec min(vec a, vec b) { return _mm512_min_ps(a, b); }
  static vec pow2_of_rounded(vec f) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(f), _mm512_set1_epi32(127)), 23));
  }
};
#endif

// exp_basic, lane by lane.
template <typename O>
inline typename O::vec exp_basic_vec(typename O::vec v) {
  using L = typename O::L;
  using vec = typename O::vec;
  const vec k = O::min(O::max(v, L::coef(-87.0f)), L::coef(89.0f));
  const vec f = L::fmadd(k, L::coef(1.44269504088896341f), L::coef(kRoundToInt));
  const vec n = L::sub(f, L::coef(kRoundToInt));
  const vec r = L::fmadd(n, L::coef(2.12194440e-4f), L::fmadd(n, L::coef(-0.693359375f), k));
  const vec r2 = L::mul(r, r);
  const vec r4 = L::mul(r2, r2);
  const vec p01 = L::add(L::coef(1.0f), r);
  const vec p23 = L::fmadd(r, L::coef(1.0f / 6.0f), L::coef(0.5f));
  const vec p45 = L::fmadd(r, L::coef(1.0f / 120.0f), L::coef(1.0f / 24.0f));
  const vec p67 = L::fmadd(r, L::coef(1.0f / 5040.0f), L::coef(1.0f / 720.0f));
  const vec p = L::fmadd(r4, L::fmadd(r2, p67, p45), L::fmadd(r2, p23, p01));
  return L::mul(p, O::pow2_of_rounded(f));
}

// activate<A>, lane by lane.
template <typename O, Act A>
inline typename O::vec activate_vec(typename O::vec z, typename O::vec slope) {
  using L = typename O::L;
  // max(0, z) and min(6, z) return z where it is NaN, and -0.0 for z = -0.0, as activate's
  // comparisons do; one instruction where a comparison and a blend were two
  if constexpr (A == Act::kRelu) return O::max(O::zero(), z);
  if constexpr (A == Act::kRelu6) return O::max(O::zero(), O::min(L::coef(6.0f), z));
  if constexpr (A == Act::kLeakyRelu) return O::select(O::lt(z, O::zero()), L::mul(z, slope), z);
  if constexpr (A == Act::kSilu) return O::div(z, L::add(L::coef(1.0f), exp_basic_vec<O>(O::neg(z))));
  return z;
}

// act_grad<A>, lane by lane.
template <typename O, Act A>
inline typename O::vec act_grad_vec(typename O::vec dy, typename O::vec z, typename O::vec slope) {
  using L = typename O::L;
  if constexpr (A == Act::kRelu) return O::select(O::gt(z, O::zero()), dy, O::zero());
  if constexpr (A == Act::kRelu6)
    return O::select(O::both(O::gt(z, O::zero()), O::lt(z, L::coef(6.0f))), dy, O::zero());
  if constexpr (A == Act::kLeakyRelu) return O::select(O::gt(z, O::zero()), dy, L::mul(dy, slope));
  if constexpr (A == Act::kSilu) {
    const typename O::vec one = L::coef(1.0f);
    const typename O::vec s = O::div(one, L::add(one, exp_basic_vec<O>(O::neg(z))));
    return L::mul(dy, L::mul(s, L::fmadd(z, L::sub(one, s), one)));
  }
  return dy;
}

// (x - hi) - lo at position i, or x itself where folded (hi = lo = 0 for every position: the mean
// folded into the shift, and x - 0 - 0 is x to the bit, -0.0 and NaN included): two operations
// fewer for the common case, the same bits as the scalar loop's formula either way.
template <typename L, typename K>
inline typename L::vec centred_unless(bool folded, typename L::vec xv, const K& hi, const K& lo, int64_t i) {
  return folded ? xv : L::sub(L::sub(xv, hi.template at<L>(i)), lo.template at<L>(i));
}

// normalized(x, ...) at position i, x's vector given.
template <typename L, typename K>
inline typename L::vec normalized_vec(typename L::vec xv, const K& hi, const K& lo, const K& sc, const K& sh,
                                      bool folded, int64_t i) {
  return L::add(L::mul(centred_unless<L>(folded, xv, hi, lo, i), sc.template at<L>(i)), sh.template at<L>(i));
}

// k_dy * dz (+ k_x * ((x - mean_hi) - mean_lo) + k_0 in training): dx at position i.
template <typename L, bool kTraining, typename K>
inline typename L::vec dx_vec(typename L::vec dz, typename L::vec xv, const K& kdy, const K& kx, const K& k0,
                              const K& mhi, const K& mlo, bool folded, int64_t i) {
  typename L::vec v = L::mul(kdy.template at<L>(i), dz);
  if constexpr (kTraining)
    v = L::add(v,
               L::add(L::mul(kx.template at<L>(i), centred_unless<L>(folded, xv, mhi, mlo, i)), k0.template at<L>(i)));
  return v;
}

// normalized(x, ...) (+ residual) at position i, coefficients from K (Broadcast or PerLane).
template <typename O, bool kRes, typename scalar_t, typename K>
inline typename O::vec pre_act_vec(const scalar_t* x, const scalar_t* res, int64_t i, const K& hi, const K& lo,
                                   const K& sc, const K& sh, bool folded, typename O::vec& xv) {
  using L = typename O::L;
  prefetch_ahead(x + i);
  if constexpr (kRes) prefetch_ahead(res + i);
  xv = L::load(x + i);
  typename O::vec z = normalized_vec<L>(xv, hi, lo, sc, sh, folded, i);
  if constexpr (kRes) z = L::add(z, L::load(res + i));
  return z;
}

// dz = dy * act'(z) at position i, z as pre_act_vec gives it (x's vector left in xv): the step
// every gradient loop below starts with.
template <typename O, Act A, bool kRes, typename scalar_t, typename K>
inline typename O::vec act_dz_vec(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t i, const K& hi,
                                  const K& lo, const K& sc, const K& sh, bool folded, typename O::vec s,
                                  typename O::vec& xv) {
  const typename O::vec z = pre_act_vec<O, kRes>(x, res, i, hi, lo, sc, sh, folded, xv);
  prefetch_ahead(dy + i);
  return act_grad_vec<O, A>(O::L::load(dy + i), z, s);
}

// y = act(z) for whole vectors from position i on; returns where it stopped.
template <typename O, Act A, bool kRes, typename scalar_t, typename K>
inline int64_t act_forward_vectors(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t i, int64_t n,
                                   const K& hi, const K& lo, const K& sc, const K& sh, float slope, bool folded,
                                   bool stream) {
  using L = typename O::L;
  const typename O::vec s = L::coef(slope);
  for (; i + L::width <= n; i += L::width) {
    typename O::vec xv;
    L::store_out(y + i, activate_vec<O, A>(pre_act_vec<O, kRes>(x, res, i, hi, lo, sc, sh, folded, xv), s), stream);
  }
  return i;
}

// dz = dy * act'(z), the residual's gradient and dx (activation.h's act_grad_span) for whole
// vectors from position i on; returns where it stopped.
template <typename O, Act A, bool kRes, bool kTraining, bool kDx, bool kDres, typename scalar_t, typename K>
inline int64_t act_grad_vectors(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx,
                                scalar_t* dres, int64_t i, int64_t n, const K& hi, const K& lo, const K& sc,
                                const K& sh, const K& kdy, const K& kx, const K& k0, const K& mhi, const K& mlo,
                                float slope, bool folded, bool stream) {
  using L = typename O::L;
  const typename O::vec s = L::coef(slope);
  for (; i + L::width <= n; i += L::width) {
    typename O::vec xv;
    const typename O::vec dz = act_dz_vec<O, A, kRes>(dy, x, res, i, hi, lo, sc, sh, folded, s, xv);
    if constexpr (kDres) L::store_out(dres + i, dz, stream);
    if constexpr (kDx) L::store_out(dx + i, dx_vec<L, kTraining>(dz, xv, kdy, kx, k0, mhi, mlo, folded, i), stream);
  }
  return i;
}

// A run's last m values (fewer than a vector, after the whole vectors) as one vector, in place of the
// scalar loop: lanes past the run's end load zeros, the formulas above give the scalar loop's
// bits, and only the first m lanes are stored. The AVX-512 build takes a masked 16-wide vector
// in every fused pass: on 14 x 14 planes the scalar loop over the last four values had taken
// about a fifth of a fused pass's samples. The AVX2 build takes an 8-wide one in its gradient
// sums only (float32 by masked loads, 16-bit values inserted one by one; nothing read past the
// run): through a buffer, the vector load of the scalar loop's terms waited on the stores before
// it (store forwarding fails), a fifth of a (8, 1024, 7, 7) residual backward's sums pass.
#ifdef BN_EXT_AVX512BF16
using TailOps = ActOps16;
template <typename scalar_t>
inline __m512 load_first(const scalar_t* p, int64_t m) {
  return load16_first(p, m);
}
template <typename K>
inline void keep_first(K* p, __m512 v, int64_t m) {
  store16_first(p, v, m);
}
#else
using TailOps = ActOps8;
inline __m256i first8(int64_t m) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 load_first(const float* p, int64_t m) { return _mm256_maskload_ps(p, first8(m)); }
inline __m128i load_first_bits(const uint16_t* p, int64_t m) {
  __m128i h = _mm_setzero_si128();
  for (int64_t j = m - 1; j >= 0; --j) h = _mm_insert_epi16(_mm_slli_si128(h, 2), p[j], 0);
  return h;
}
inline __m256 load_first(const c10::BFloat16* p, int64_t m) {
  const __m128i h = load_first_bits(reinterpret_cast<const uint16_t*>(p), m);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load_first(const c10::Half* p, int64_t m) {
  return _mm256_cvtph_ps(load_first_bits(reinterpret_cast<const uint16_t*>(p), m));
}
inline void keep_first(float* p, __m256 v, int64_t m) { _mm256_maskstore_ps(p, first8(m), v); }
// 16-bit values kept (a dz that is dy or zero): rounded as store8 rounds, the first m copied
template <typename K>
inline void keep_first(K* p, __m256 v, int64_t m) {
  K buf[8];
  store8(buf, v);
  std::copy(buf, buf + m, p);
}
#endif
using TailVec = TailOps::vec;

// pre_act_vec of a run's last m values (x's vector left in xv).
template <bool kRes, typename scalar_t>
inline TailVec pre_act_tail(const scalar_t* x, const scalar_t* res, int64_t m, float hi, float lo, float sc, float sh,
                            bool folded, TailVec& xv) {
  using L = TailOps::L;
  xv = load_first(x, m);
  TailVec z = normalized_vec<L>(xv, Broadcast{hi}, Broadcast{lo}, Broadcast{sc}, Broadcast{sh}, folded, 0);
  if constexpr (kRes) z = L::add(z, load_first(res, m));
  return z;
}

// dz (and x's vector) of a run's last m values, as act_dz_vec.
template <Act A, bool kRes, typename scalar_t>
inline TailVec act_dz_tail(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t m, float hi, float lo,
                           float sc, float sh, float slope, bool folded, TailVec& xv) {
  const TailVec z = pre_act_tail<kRes>(x, res, m, hi, lo, sc, sh, folded, xv);
  return act_grad_vec<TailOps, A>(load_first(dy, m), z, TailOps::L::coef(slope));
}

// The gradient sums' terms (act_grad_terms') of a run's last m values, zero past the m-th: dz in d
// and dz * (x - mean) in t; where keep is given, dz stored there.
template <Act A, bool kRes, typename scalar_t, typename K>
inline void act_grad_terms_tail(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t m, float hi,
                                float lo, float sc, float sh, float slope, float mean, bool folded, TailVec& d,
                                TailVec& t, K* keep) {
  using L = TailOps::L;
  TailVec xv;
  d = act_dz_tail<A, kRes>(dy, x, res, m, hi, lo, sc, sh, slope, folded, xv);
  if (keep != nullptr) keep_first(keep, d, m);
  t = L::mul(d, L::sub(xv, L::coef(mean)));
}

#ifdef BN_EXT_AVX512BF16
// act_forward_vectors over a run's last m values.
template <Act A, bool kRes, typename scalar_t>
inline void act_forward_tail(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t m, float hi, float lo,
                             float sc, float sh, float slope, bool folded) {
  __m512 xv;
  const __m512 z = pre_act_tail<kRes>(x, res, m, hi, lo, sc, sh, folded, xv);
  store16_first(y, activate_vec<ActOps16, A>(z, Lanes16::coef(slope)), m);
}

// act_grad_vectors over a run's last m values; k: hi, lo, sc, sh, k_dy, k_x, k_0, mean_hi, mean_lo.
template <Act A, bool kRes, bool kTraining, bool kDx, bool kDres, typename scalar_t>
inline void act_grad_tail(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* dres,
                          int64_t m, const float* const (&k)[9], float slope, bool folded) {
  __m512 xv;
  const __m512 dz = act_dz_tail<A, kRes>(dy, x, res, m, *k[0], *k[1], *k[2], *k[3], slope, folded, xv);
  if constexpr (kDres) store16_first(dres, dz, m);
  if constexpr (kDx)
    store16_first(dx,
                  dx_vec<Lanes16, kTraining>(dz, xv, Broadcast{*k[4]}, Broadcast{*k[5]}, Broadcast{*k[6]},
                                             Broadcast{*k[7]}, Broadcast{*k[8]}, folded, 0),
                  m);
}
#endif

// Sixteen float32 lanes of one of ActGradSums' sums (lane j takes the j-th value of each whole
// vector of 16): one vector in the AVX-512 build, two in the AVX2 build. Sixteen lanes, not
// eight, so that the AVX-512 build adds each vector of terms once: adding its halves into eight
// lanes one after the other made the sums pass wait on two dependent additions a vector (the
// AVX2 build's two vectors are two independent chains).
struct SumLanes {
  // ((q0 + q2) + (q1 + q3)) of the four float64 values q_k = s_k + s_{k+4}: the end of total()
  static double total_of(__m256d q) {
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
    return _mm_cvtsd_f64(h) + _mm_cvtsd_f64(_mm_unpackhi_pd(h, h));
  }
#ifdef BN_EXT_AVX512BF16
  __m512 v;
  SumLanes() : v(_mm512_setzero_ps()) {}  // user-provided: built for the ISA (LaneSums)
  // in float64, s_j = l_j + l_{j+8}, then ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))
  double total() const {
    const __m512d s = _mm512_add_pd(_mm512_cvtps_pd(lower8(v)), _mm512_cvtps_pd(upper8(v)));
    return total_of(_mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd(s, 1)));
  }
#else
  __m256 lo, hi;  // lanes 0-7, 8-15
  SumLanes() : lo(_mm256_setzero_ps()), hi(_mm256_setzero_ps()) {}
  double total() const {
    // s_0..s_3 and s_4..s_7
    return total_of(_mm256_add_pd(_mm256_add_pd(lo4(lo), lo4(hi)), _mm256_add_pd(hi4(lo), hi4(hi))));
  }
#endif
};

#ifndef BN_EXT_AVX512BF16
// Sixteen lanes in position order (lo: lanes 0-7, hi: 8-15) as the lanes of the even positions
// (0, 2, ..., 14) and of the odd ones, and back: SplitBF16's arrangement of them.
inline __m256 even_lanes(__m256 lo, __m256 hi) {
  const __m256 e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));  // 0 2 8 10 | 4 6 12 14
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
}
inline __m256 odd_lanes(__m256 lo, __m256 hi) {
  const __m256 o = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));  // 1 3 9 11 | 5 7 13 15
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}
inline void position_lanes(__m256 even, __m256 odd, __m256& lo, __m256& hi) {
  const __m256 l = _mm256_unpacklo_ps(even, odd);  // 0 1 2 3 | 8 9 10 11
  const __m256 h = _mm256_unpackhi_ps(even, odd);  // 4 5 6 7 | 12 13 14 15
  lo = _mm256_permute2f128_ps(l, h, 0x20);
  hi = _mm256_permute2f128_ps(l, h, 0x31);
}
#endif

// The gradient sums' terms over n values of one channel (ActGradSums::run's chunk): the sums of
// dz and of dz * (x - mean) added into the sixteen lanes of a and b, whole vectors of 16 from
// position 0, as the scalar loop it replaces; returns how many values were taken. kKeep: each dz
// is also stored to keep[i] (float32, or the input's type where dz is dy or zero). The lanes are
// copied in and out: where the caller's stay in memory, the loop's loads may alias them, and each
// step stored them back.
template <Act A, bool kRes, bool kKeep, typename scalar_t, typename K>
inline int64_t act_grad_sums16(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t n, float hi,
                               float lo, float sc, float sh, float slope, float mean, bool folded, SumLanes& a_io,
                               SumLanes& b_io, K* keep) {
  const Broadcast bh{hi}, bl{lo}, bs{sc}, bt{sh};
  int64_t i = 0;
#ifdef BN_EXT_AVX512BF16
  using L = Lanes16;
  const __m512 s = L::coef(slope), m = L::coef(mean);
  __m512 a = a_io.v, b = b_io.v;
  for (; i + 16 <= n; i += 16) {
    __m512 xv;
    const __m512 dz = act_dz_vec<ActOps16, A, kRes>(dy, x, res, i, bh, bl, bs, bt, folded, s, xv);
    if constexpr (kKeep) L::store(keep + i, dz);
    a = L::add(a, dz);
    b = L::add(b, L::mul(dz, L::sub(xv, m)));
  }
  a_io.v = a;
  b_io.v = b;
#else
  using L = Lanes8;
  const __m256 s = L::coef(slope), m = L::coef(mean);
  __m256 a0 = a_io.lo, a1 = a_io.hi, b0 = b_io.lo, b1 = b_io.hi;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && (!kKeep || std::is_same_v<K, c10::BFloat16>)) {
    // bfloat16 as SplitBF16's even and odd positions (one load and no lane-crossing widening per
    // 16 values): the lanes of the even positions and those of the odd ones, the same sixteen
    // sums in another arrangement, back in position order at the end
    using S = SplitBF16;
    __m256 ae = even_lanes(a0, a1), ao = odd_lanes(a0, a1), be = even_lanes(b0, b1), bo = odd_lanes(b0, b1);
    const S::vec ss = S::coef(slope), ms = S::coef(mean);
    for (; i + 16 <= n; i += 16) {
      S::vec xv;
      const S::vec dz = act_dz_vec<ActOpsSplit, A, kRes>(dy, x, res, i, bh, bl, bs, bt, folded, ss, xv);
      if constexpr (kKeep) S::store(keep + i, dz);
      const S::vec t = S::mul(dz, S::sub(xv, ms));
      ae = L::add(ae, dz.even);
      ao = L::add(ao, dz.odd);
      be = L::add(be, t.even);
      bo = L::add(bo, t.odd);
    }
    position_lanes(ae, ao, a0, a1);
    position_lanes(be, bo, b0, b1);
  }
  for (; i + 16 <= n; i += 16) {
    __m256 x0, x1;
    const __m256 d0 = act_dz_vec<ActOps8, A, kRes>(dy, x, res, i, bh, bl, bs, bt, folded, s, x0);
    const __m256 d1 = act_dz_vec<ActOps8, A, kRes>(dy, x, res, i + 8, bh, bl, bs, bt, folded, s, x1);
    if constexpr (kKeep) {
      L::store(keep + i, d0);
      L::store(keep + i + 8, d1);
    }
    a0 = L::add(a0, d0);
    a1 = L::add(a1, d1);
    b0 = L::add(b0, L::mul(d0, L::sub(x0, m)));
    b1 = L::add(b1, L::mul(d1, L::sub(x1, m)));
  }
  a_io.lo = a0;
  a_io.hi = a1;
  b_io.lo = b0;
  b_io.hi = b1;
#endif
  return i;
}

// Adds t's first m values into lanes next, next + 1, ... (mod 16) of `lanes`, as a scalar loop
// would (m <= 16 in the AVX-512 build, <= 8 in the AVX2 build): a permute, an add and a blend a
// vector; the other lanes keep their bits (no -0.0 + 0.0).
#ifdef BN_EXT_AVX512BF16
inline void add_into_lanes(SumLanes& lanes, __m512 t, int64_t m, int next) {
  const __m512i pos =
      _mm512_and_si512(_mm512_sub_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(next)),
                       _mm512_set1_epi32(15));  // lane j takes t[pos[j]] if pos[j] < m
  const __mmask16 take = _mm512_cmplt_epi32_mask(pos, _mm512_set1_epi32(static_cast<int>(m)));
  lanes.v = _mm512_mask_add_ps(lanes.v, take, lanes.v, _mm512_permutexvar_ps(pos, t));
}
#else
inline void add_into_half(__m256& half, __m256 t, int64_t m, int next, int first_lane) {
  const __m256i pos = _mm256_and_si256(
      _mm256_sub_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(next - first_lane)),
      _mm256_set1_epi32(15));  // lane j takes t[pos[j]] if pos[j] < m (<= 8)
  const __m256 take = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), pos));
  half = _mm256_blendv_ps(half, _mm256_add_ps(half, _mm256_permutevar8x32_ps(t, pos)), take);
}
inline void add_into_lanes(SumLanes& lanes, __m256 t, int64_t m, int next) {
  add_into_half(lanes.lo, t, m, next, 0);
  add_into_half(lanes.hi, t, m, next, 8);
}
#endif

// A chunk's last r (< 16) values after act_grad_sums16's vectors, one a lane from lane `next` on
// (mod 16; each lane takes at most one): the sums' terms as act_grad_terms_tail gives them,
// keep as there. Returns the lane the next value goes into.
template <Act A, bool kRes, typename scalar_t, typename K>
inline int act_grad_sums_rest(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t r, float hi, float lo,
                              float sc, float sh, float slope, float mean, bool folded, SumLanes& a, SumLanes& b,
                              K* keep, int next) {
  for (int64_t j = 0; j < r; j += TailOps::L::width) {
    const int64_t m = std::min<int64_t>(TailOps::L::width, r - j);
    TailVec d, t;
    act_grad_terms_tail<A, kRes>(dy + j, x + j, kRes ? res + j : nullptr, m, hi, lo, sc, sh, slope, mean, folded, d, t,
                                 keep != nullptr ? keep + j : nullptr);
    add_into_lanes(a, d, m, next);
    add_into_lanes(b, t, m, next);
    next = static_cast<int>((next + m) & 15);
  }
  return next;
}

// dx = k_dy * dz + k_x * ((x - mean_hi) - mean_lo) + k_0 and the residual's gradient dz from the
// dz values the sums pass kept (act_grad_span's training formula without the activation), for
// whole vectors from position i on, coefficients from K (Broadcast or PerLane); returns where it
// stopped.
template <typename L, bool kDx, bool kDres, typename D, typename scalar_t, typename K>
inline int64_t dx_from_dz_vectors(const D* dz, const scalar_t* x, scalar_t* dx, scalar_t* dres, int64_t i, int64_t n,
                                  const K& kdy, const K& kx, const K& k0, const K& hi, const K& lo, bool stream) {
  for (; i + L::width <= n; i += L::width) {
    const typename L::vec d = L::load(dz + i);
    if constexpr (kDres) L::store_out(dres + i, d, stream);
    if constexpr (kDx) {
      const typename L::vec xm = L::sub(L::sub(L::load(x + i), hi.template at<L>(i)), lo.template at<L>(i));
      L::store_out(
          dx + i,
          L::add(L::mul(kdy.template at<L>(i), d), L::add(L::mul(kx.template at<L>(i), xm), k0.template at<L>(i))),
          stream);
    }
  }
  return i;
}

// ActGradSums::row_terms' vector loop over n channels of kRows channels-last rows (`stride` values
// apart): sa[c] += dz, sb[c] += dz * (x - mt[c]) in float32, row after row, O's width of channels
// at a time (from channel c on) as the scalar loop does; returns where it stopped. kKeep: each dz
// is also stored to keep[c] (keep[stride + c], ...). Several rows a step load and store the sums
// once for all and give the scheduler several exponentials' chains at once.
template <typename O, Act A, bool kRes, bool kKeep, int kRows, typename scalar_t, typename K>
inline int64_t act_grad_row_sums_of(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t stride,
                                    int64_t c, int64_t n, const float* hi, const float* lo, const float* sc,
                                    const float* sh, float slope, bool folded, const float* mt, float* sa, float* sb,
                                    K* keep) {
  using L = typename O::L;
  const PerLane ph{hi}, pl{lo}, ps{sc}, pt{sh};
  const typename O::vec s = L::coef(slope);
  for (; c + L::width <= n; c += L::width) {
    typename O::vec a = L::load(sa + c), b = L::load(sb + c);
    const typename O::vec m = L::load(mt + c);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const int64_t o = r * stride;
      typename O::vec xv;
      const typename O::vec dz =
          act_dz_vec<O, A, kRes>(dy + o, x + o, kRes ? res + o : res, c, ph, pl, ps, pt, folded, s, xv);
      if constexpr (kKeep) L::store(keep + o + c, dz);
      a = L::add(a, dz);
      b = L::add(b, L::mul(dz, L::sub(xv, m)));
    }
    L::store(sa + c, a);
    L::store(sb + c, b);
  }
  return c;
}

// The same, 16 channels at a time first in the AVX-512 build (each channel's sums take the same
// terms in the same order whatever the width: the same bits).
template <Act A, bool kRes, bool kKeep, int kRows, typename scalar_t, typename K>
inline int64_t act_grad_row_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t stride, int64_t n,
                                 const float* hi, const float* lo, const float* sc, const float* sh, float slope,
                                 bool folded, const float* mt, float* sa, float* sb, K* keep) {
  int64_t c = 0;
#ifdef BN_EXT_AVX512BF16
  c = act_grad_row_sums_of<ActOps16, A, kRes, kKeep, kRows>(dy, x, res, stride, c, n, hi, lo, sc, sh, slope, folded, mt,
                                                            sa, sb, keep);
#endif
  return act_grad_row_sums_of<ActOps8, A, kRes, kKeep, kRows>(dy, x, res, stride, c, n, hi, lo, sc, sh, slope, folded,
                                                              mt, sa, sb, keep);
}

#endif  // BN_EXT_AVX2_INTRINSICS
