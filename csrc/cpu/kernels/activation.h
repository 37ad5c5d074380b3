// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// BatchNorm fused with an activation and an optional residual add: z = BN(x) + residual,
// y = act(z) in one elementwise pass; the backward recomputes z from x (and the residual) with
// the same expression, so it needs neither z nor a mask saved, and its dz = dy * act'(z) is
// what the residual's gradient is.
//
// The loops are plain C++ over the float (double) value, which each build's compiler vectorises
// for its instruction set; with -ffp-contract=off the vector body and the scalar tail compute
// the same bits, so results do not depend on where a thread's range starts.

// a * b + c, fused in the AVX2 and AVX-512 builds (one instruction, as their vector loops fuse
// the same ones) and not in the baseline build, where std::fma is a libm call (ten times the
// SiLU loops' time). So SiLU's bits are the same in the two SIMD builds, and the baseline's
// differ from theirs in the last places, as the plain BatchNorm's do.
template <typename T>
inline T mul_add(T a, T b, T c) {
#ifdef BN_EXT_AVX2_INTRINSICS
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// e^v from additions, multiplications, multiply-adds and bit patterns, not expf (a call in these
// loops, which stops their vectorisation; a vectorised expf could round differently from the
// scalar one). 2^n * e^r, n = v / ln 2 rounded to nearest, |r| <= ln 2 / 2, e^r by its Taylor
// series to r^7 (truncation below 2^-26 relative). v is clamped to [-87, 89]: 2^n stays a normal
// float up to v = 88.38, and from there n = 128 makes it (and the result) +inf, as e^v itself is
// from 88.72 on; so SiLU's -inf gives torch's NaN (-inf / inf), not -inf. NaN maps into the range
// (the callers' other operand carries it on). SiLU's passes wait on this chain, so it is kept
// short: n by adding 1.5 * 2^23 and subtracting it again (the sum's low bits are n, giving 2^n's
// exponent without a conversion), the polynomial by Estrin's scheme (four independent pairs)
// rather than Horner's, and its nine multiply-adds fused where the build has FMA (16 floating
// point operations there in place of 25).
inline float exp_basic(float v) {
  float k = v > -87.0f ? v : -87.0f;
  k = k < 89.0f ? k : 89.0f;
  const float f = mul_add(k, 1.44269504088896341f, kRoundToInt);
  const float n = f - kRoundToInt;
  // k - n ln 2 with ln 2 split in two; n * ln2_hi is exact
  const float r = mul_add(n, 2.12194440e-4f, mul_add(n, -0.693359375f, k));
  const float r2 = r * r;
  const float r4 = r2 * r2;
  const float p01 = 1.0f + r;
  const float p23 = mul_add(r, 1.0f / 6.0f, 0.5f);
  const float p45 = mul_add(r, 1.0f / 120.0f, 1.0f / 24.0f);
  const float p67 = mul_add(r, 1.0f / 5040.0f, 1.0f / 720.0f);
  const float p = mul_add(r4, mul_add(r2, p67, p45), mul_add(r2, p23, p01));
  const uint32_t bits = (std::bit_cast<uint32_t>(f) + 127u) << 23;
  return p * std::bit_cast<float>(bits);
}
inline double exp_basic(double v) { return std::exp(v); }

// act(z), matching torch's functions on NaN (it passes through) and at the kinks.
template <Act A, typename T>
inline T activate(T z, T slope) {
  if constexpr (A == Act::kRelu) return z < T(0) ? T(0) : z;
  if constexpr (A == Act::kRelu6) return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
  if constexpr (A == Act::kLeakyRelu) return z < T(0) ? z * slope : z;
  if constexpr (A == Act::kSilu) return z / (T(1) + exp_basic(-z));
  return z;
}

// Element loads and stores in opmath_t. bfloat16 by its bits (c10's conversions are calls the
// loops cannot vectorise): a load shifts them up, a store rounds to nearest even as c10 does,
// NaN to c10's 0x7FC0; the same bits either way.
template <typename T, typename scalar_t>
inline T load_value(scalar_t v) {
  return static_cast<T>(v);
}
template <>
inline float load_value<float, c10::BFloat16>(c10::BFloat16 v) {
  return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
}
template <typename scalar_t, typename T>
inline scalar_t store_value(T v) {
  return static_cast<scalar_t>(v);
}
template <>
inline c10::BFloat16 store_value<c10::BFloat16, float>(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// c ? a : b as a blend of bit patterns: straight-line code, which the vectorisers take inside
// the unrolled reduction loops too (a float ternary there stays a branch).
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & m) | (std::bit_cast<uint32_t>(b) & ~m));
}
inline double select(bool c, double a, double b) {
  const uint64_t m = uint64_t(0) - static_cast<uint64_t>(c);
  return std::bit_cast<double>((std::bit_cast<uint64_t>(a) & m) | (std::bit_cast<uint64_t>(b) & ~m));
}

// dy * act'(z), with torch's conventions at the kinks: ReLU's threshold_backward (z > 0),
// hardtanh's open interval for ReLU6, leaky_relu_backward (z > 0), silu_backward.
template <Act A, typename T>
inline T act_grad(T dy, T z, T slope) {
  if constexpr (A == Act::kRelu) return select(z > T(0), dy, T(0));
  if constexpr (A == Act::kRelu6) return select((z > T(0)) & (z < T(6)), dy, T(0));
  if constexpr (A == Act::kLeakyRelu) return select(z > T(0), dy, dy * slope);
  if constexpr (A == Act::kSilu) {
    const T s = T(1) / (T(1) + exp_basic(-z));
    return dy * (s * mul_add(z, T(1) - s, T(1)));
  }
  return dy;
}

// Whether dz = dy * act'(z) is dy or zero, a value of the input's type: kept in a 16-bit
// gradient tensor, it reads back as the float dz it was.
template <Act A>
inline constexpr bool kDzIsDyOrZero = A == Act::kIdentity || A == Act::kRelu || A == Act::kRelu6;

// The forward's per-channel coefficients (Affine's) and the activation's slope. Every z below is
// ((x - hi) - lo) * sc + sh (+ residual), the one expression both directions compute.
template <typename opmath_t>
struct PreAct {
  const opmath_t *hi, *lo, *sc, *sh;
  opmath_t slope;
  bool folded = false;  // hi and lo all zero (every channel's mean folded into sh)
};

template <typename T>
inline T normalized(T x, T hi, T lo, T sc, T sh) {
  return ((x - hi) - lo) * sc + sh;
}

#ifdef BN_EXT_AVX2_INTRINSICS
// The vector loops' share of a span (activation_vectors.h): whole vectors from position 0 on,
// 16 wide first in the AVX-512 build, and in the AVX2 build's bfloat16 spans whose coefficients
// SplitBF16 can take (kSplitCoefs: Broadcast or PerLaneSplit); float32 arithmetic only (double
// stays scalar). Returns where the scalar loop takes over.
template <typename scalar_t, bool kSplitCoefs, typename Fn>
inline int64_t vector_share(Fn&& fn) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return 0;
  } else {
    int64_t i = 0;
#ifdef BN_EXT_AVX512BF16
    i = fn(ActOps16{}, i);
#else
    if constexpr (kSplitCoefs && std::is_same_v<scalar_t, c10::BFloat16>) i = fn(ActOpsSplit{}, i);
#endif
    return fn(ActOps8{}, i);
  }
}
#endif

// kSplit (kStep 1, the AVX2 build's bfloat16): `split` holds the four arrays in split_even_odd's
// order, and the spans go 16 values at a time
template <typename scalar_t, Act A, bool kRes, typename T, int64_t kStep, bool kSplit = false>
inline void act_forward_span(const scalar_t* __restrict xs, const scalar_t* __restrict rs, scalar_t* __restrict ys,
                             int64_t len, const T* hi, const T* lo, const T* sc, const T* sh, T slope, bool stream,
                             const T* const* split = nullptr, bool rows_folded = false) {
  int64_t i = 0;
#ifdef BN_EXT_AVX2_INTRINSICS
  // rows_folded: the caller's word for a span's positions; a run has one mean
  const bool folded = kStep == 0 ? *hi == T(0) && *lo == T(0) : rows_folded;
  i = vector_share<scalar_t, (kStep == 0 || kSplit)>([&](auto ops, int64_t from) {
    using O = decltype(ops);
    if constexpr (kStep == 0) {
      return act_forward_vectors<O, A, kRes>(xs, rs, ys, from, len, Broadcast{*hi}, Broadcast{*lo}, Broadcast{*sc},
                                             Broadcast{*sh}, slope, folded, stream);
#ifndef BN_EXT_AVX512BF16
    } else if constexpr (kSplit) {
      return act_forward_vectors<O, A, kRes>(xs, rs, ys, from, len, PerLaneSplit{hi, split[0]},
                                             PerLaneSplit{lo, split[1]}, PerLaneSplit{sc, split[2]},
                                             PerLaneSplit{sh, split[3]}, slope, folded, stream);
#endif
    } else {
      return act_forward_vectors<O, A, kRes>(xs, rs, ys, from, len, PerLane{hi}, PerLane{lo}, PerLane{sc}, PerLane{sh},
                                             slope, folded, stream);
    }
  });
#ifdef BN_EXT_AVX512BF16
  if constexpr (kStep == 0 && !std::is_same_v<scalar_t, double>) {
    if (i < len)
      act_forward_tail<A, kRes>(xs + i, kRes ? rs + i : nullptr, ys + i, len - i, *hi, *lo, *sc, *sh, slope, folded);
    return;
  }
#endif
#endif
  for (; i < len; ++i) {
    const int64_t j = kStep * i;
    T z = normalized(load_value<T>(xs[i]), hi[j], lo[j], sc[j], sh[j]);
    if constexpr (kRes) z += load_value<T>(rs[i]);
    ys[i] = store_value<scalar_t>(activate<A>(z, slope));
  }
}

// order: Sweep::kBackward after the statistics pass (its last reads are still in cache); stream:
// streaming stores for an output that does not fit in the cache (stream_output).
template <typename scalar_t, Act A, bool kRes>
void act_forward_kernel(const scalar_t* x, const scalar_t* res, scalar_t* y, const Geometry& g,
                        const PreAct<at::opmath_type<scalar_t>>& k, Sweep order, bool stream) {
  using T = at::opmath_type<scalar_t>;
  if (g.layout == Layout::kNCS) {
    parallel_runs(
        g,
        [&](int64_t c, int64_t off, int64_t len) {
          act_forward_span<scalar_t, A, kRes, T, 0>(x + off, kRes ? res + off : nullptr, y + off, len, k.hi + c,
                                                    k.lo + c, k.sc + c, k.sh + c, k.slope, stream);
        },
        order);
    return;
  }
  // spans of whole rows with the coefficients tiled to their width (rows of few channels)
  auto span = [&](int64_t off, int64_t width, const auto& c) {
    constexpr bool kSplit = std::tuple_size_v<std::decay_t<decltype(c)>> == 8;
    act_forward_span<scalar_t, A, kRes, T, 1, kSplit>(x + off, kRes ? res + off : nullptr, y + off, width, c[0], c[1],
                                                      c[2], c[3], k.slope, stream, kSplit ? c.data() + 4 : nullptr,
                                                      k.folded);
  };
  parallel_row_spans_of<scalar_t, T, 4>(g, {k.hi, k.lo, k.sc, k.sh}, span, order);
}

// dz = dy * act'(z) and t = dz * (x - mean) of n elements of one channel.
template <Act A, bool kRes, typename scalar_t, typename T>
inline void act_grad_terms(const scalar_t* __restrict dy, const scalar_t* __restrict x, const scalar_t* __restrict res,
                           int64_t n, T hi, T lo, T sc, T sh, T slope, T mean, T* __restrict dz, T* __restrict t) {
  for (int64_t i = 0; i < n; ++i) {
    const T xv = load_value<T>(x[i]);
    T z = normalized(xv, hi, lo, sc, sh);
    if constexpr (kRes) z += load_value<T>(res[i]);
    const T d = act_grad<A>(load_value<T>(dy[i]), z, slope);
    dz[i] = d;
    t[i] = d * (xv - mean);
  }
}

// (sum(dz), sum(dz * (x - mean))) per channel, dz = dy * act'(z): a summand of channel_sums,
// which owns the blocking and the block-order merge (bitwise the same for any thread count).
// Channels-last rows of a few channels are summed several rows at a time as one wide row
// (widened); per-channel values are then looked up at position % C0.
template <typename scalar_t, Act A, bool kRes>
struct ActGradSums {
  using scalar_type = scalar_t;
  // no wide tiles: its rows go through row_terms' vector loop, where widened rows would go
  // through add(), a float64 value at a time
  static constexpr bool kWideTiles = false;
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* res;
  PreAct<opmath_t> k;
  const double* mean;
  int64_t C;   // row length (channels-last), which widened() multiplies
  int64_t C0;  // channels
  bool streamed = false;
  // where given, each dz is also stored there at its flat offset: in the input's type where that
  // holds dz exactly (the residual's gradient), else in opmath_t (SiLU's buffer)
  using keep_t = std::conditional_t<kDzIsDyOrZero<A>, scalar_t, opmath_t>;
  keep_t* keep = nullptr;
  // A block's sums: sixteen opmath_t lanes carried from run to run, widened into the double sums
  // every kChunk values and at the block's end. Widened at each run's end, a 7x7 plane's 49
  // values paid sixteen dependent float64 additions, which made a (4, 2048, 7, 7) ReLU backward
  // 1.7x the plain one.
  static constexpr int64_t kChunk = 512;  // values a widening: about 32 terms a lane
#ifdef BN_EXT_AVX2_INTRINSICS
  static constexpr bool kVectorLanes = !std::is_same_v<opmath_t, double>;
#else
  static constexpr bool kVectorLanes = false;
#endif
  // The sixteen lanes of one sum: vectors in the SIMD builds' float32 loops (SumLanes), which
  // stay in registers from run to run where a block's runs inline into one loop (the AVX-512
  // build); as an array, each run's loads of the lanes waited on the last run's stores.
  struct Sixteen {
    opmath_t v[16] = {};
    // as SumLanes::total: s_j = l_j + l_{j+8} in float64, then a fixed tree over the eight
    double total() const {
      double t[8];
      for (int j = 0; j < 8; ++j) t[j] = static_cast<double>(v[j]) + static_cast<double>(v[j + 8]);
      return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
    }
  };
#ifdef BN_EXT_AVX2_INTRINSICS
  using Lane16 = std::conditional_t<kVectorLanes, SumLanes, Sixteen>;
#else
  using Lane16 = Sixteen;
#endif
  struct Lanes {
    Lanes() {}  // user-provided, as SumLanes'
    double sa = 0, sb = 0;
    Lane16 a16, b16;
    int64_t pending = 0;  // values in a16 and b16
    int next = 0;         // the lane a run's next last value goes into: round the lanes, so each
                          // takes about kChunk / 16 terms however short the runs
    // the lanes into the double sums (total: a fixed tree a sum); rest: the channel's mean -
    // mean_t (below)
    void widen(double rest) {
      const double ta = a16.total(), tb = b16.total();
      a16 = Lane16{};
      b16 = Lane16{};
      sa += ta;
      sb += tb - rest * ta;
      pending = 0;
    }
  };
  // A run in chunks: dz and dz * (x - mean) summed into the lanes (whole vectors of 16 by the
  // vector loop, the rest one a lane from lane `next` on: in the SIMD builds by a permute, in the
  // baseline build through two buffers, a loop the compiler vectorises, activation and all).
  // The mean is taken rounded to opmath_t and the rounding put back in double:
  // sum(dz * (x - mean)) = sum(dz * (x - mean_t)) - (mean - mean_t) * sum(dz).
  [[gnu::always_inline]] void run(int64_t c, int64_t off, int64_t len, Lanes& acc) const {
    if (keep != nullptr) {
      run_keeping<true>(c, off, len, acc, keep + off);
    } else {
      run_keeping<false>(c, off, len, acc, nullptr);
    }
  }
  // run, with kKeep each dz also stored to keep[0, len)
  template <bool kKeep>
  [[gnu::always_inline]] void run_keeping(int64_t c, int64_t off, int64_t len, Lanes& acc, keep_t* keep) const {
    const opmath_t mt = static_cast<opmath_t>(mean[c]);
    const opmath_t hi = k.hi[c], lo = k.lo[c], sc = k.sc[c], sh = k.sh[c];
    [[maybe_unused]] const bool folded = hi == opmath_t(0) && lo == opmath_t(0);
    for (int64_t s0 = 0; s0 < len;) {
      if (acc.pending == kChunk) acc.widen(mean[c] - static_cast<double>(mt));
      const int64_t n = std::min(kChunk - acc.pending, len - s0);
      const scalar_t* dys = dy + off + s0;
      const scalar_t* xs = x + off + s0;
      const scalar_t* rs = kRes ? res + off + s0 : nullptr;
      keep_t* ks = kKeep ? keep + s0 : nullptr;
      if constexpr (kVectorLanes) {
#ifdef BN_EXT_AVX2_INTRINSICS
        const int64_t v =
            act_grad_sums16<A, kRes, kKeep>(dys, xs, rs, n, hi, lo, sc, sh, k.slope, mt, folded, acc.a16, acc.b16, ks);
        if (v < n)
          acc.next =
              act_grad_sums_rest<A, kRes>(dys + v, xs + v, kRes ? rs + v : nullptr, n - v, hi, lo, sc, sh, k.slope, mt,
                                          folded, acc.a16, acc.b16, kKeep ? ks + v : nullptr, acc.next);
#endif
      } else {
        opmath_t dzs[kChunk], ts[kChunk];
        act_grad_terms<A, kRes>(dys, xs, rs, n, hi, lo, sc, sh, k.slope, mt, dzs, ts);
        if constexpr (kKeep)
          for (int64_t j = 0; j < n; ++j) ks[j] = store_value<keep_t>(dzs[j]);
        opmath_t* a16 = acc.a16.v;
        opmath_t* b16 = acc.b16.v;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
#pragma GCC unroll 16
          for (int j = 0; j < 16; ++j) {
            a16[j] += dzs[i + j];
            b16[j] += ts[i + j];
          }
        }
        for (; i < n; ++i) {
          a16[acc.next] += dzs[i];
          b16[acc.next] += ts[i];
          acc.next = (acc.next + 1) & 15;
        }
      }
      acc.pending += n;
      s0 += n;
    }
  }
  void finish(int64_t c, Lanes& acc, double* a, double* b) const {
    acc.widen(mean[c] - static_cast<double>(static_cast<opmath_t>(mean[c])));
    *a = acc.sa;
    *b = acc.sb;
  }
  const double* per_channel() const { return mean; }
  ActGradSums widened(int64_t width, const double*) const {
    ActGradSums w = *this;
    w.C = width;
    return w;
  }
  void rows(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* __restrict a, double* __restrict b) const {
    if (C != C0) {  // widened rows: position c holds channel c % C0
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) add(r * C + c, c % C0, a + c, b + c);
      return;
    }
    if constexpr (std::is_same_v<opmath_t, double>) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) add(r * C + c, c, a + c, b + c);
    } else {
      const int64_t n = c1 - c0;
      std::vector<opmath_t> mt(n);
      for (int64_t j = 0; j < n; ++j) mt[j] = static_cast<opmath_t>(mean[c0 + j]);
      // Rows as the plain reductions' streamed rows take them (sweep_row_streams: kRowsAtOnce
      // in-order streams a quarter of the block apart; row after row, the sums pass read at half
      // their speed), into float32 sums per channel, then every kStreamRows rows into the float64
      // ones with the rounding of the mean (mt) put back: a float64 read-modify-write per value
      // held this loop, and a flush every 8 rows took a seventh of the pass.
      sweep_row_streams(
          c0, c1, r0, r1,
          [&](int64_t r, int64_t k, int64_t step, opmath_t* fa, opmath_t* fb) {
            if (k == kRowsAtOnce) {
              row_terms<kRowsAtOnce>(r * C + c0, step * C, c0, n, mt.data(), fa + c0, fb + c0);
            } else {
              row_terms<1>(r * C + c0, C, c0, n, mt.data(), fa + c0, fb + c0);
            }
          },
          [&](int64_t, const opmath_t* fa, const opmath_t* fb) {
            for (int64_t j = 0; j < n; ++j) {
              const double da = static_cast<double>(fa[c0 + j]);
              a[c0 + j] += da;
              b[c0 + j] += static_cast<double>(fb[c0 + j]) - (mean[c0 + j] - static_cast<double>(mt[j])) * da;
            }
          });
    }
  }
  // kRows rows' n values, `stride` values apart, from flat offset o (channels c0 on), row after
  // row: sa += dz, sb += dz * (x - mt).
  template <int kRows>
  void row_terms(int64_t o, int64_t stride, int64_t c0, int64_t n, const opmath_t* mt, opmath_t* __restrict sa,
                 opmath_t* __restrict sb) const {
    const opmath_t *hi = k.hi + c0, *lo = k.lo + c0, *sc = k.sc + c0, *sh = k.sh + c0;
    int64_t j0 = 0;
#ifdef BN_EXT_AVX2_INTRINSICS
    j0 = keep != nullptr
             ? act_grad_row_sums<A, kRes, true, kRows>(dy + o, x + o, kRes ? res + o : nullptr, stride, n, hi, lo, sc,
                                                       sh, k.slope, k.folded, mt, sa, sb, keep + o)
             : act_grad_row_sums<A, kRes, false, kRows>(dy + o, x + o, kRes ? res + o : nullptr, stride, n, hi, lo, sc,
                                                        sh, k.slope, k.folded, mt, sa, sb,
                                                        static_cast<keep_t*>(nullptr));
#endif
    for (int r = 0; r < kRows; ++r) {
      const scalar_t* __restrict dys = dy + o + r * stride;
      const scalar_t* __restrict xs = x + o + r * stride;
      const scalar_t* __restrict rs = kRes ? res + o + r * stride : nullptr;
      keep_t* ks = keep != nullptr ? keep + o + r * stride : nullptr;
      for (int64_t j = j0; j < n; ++j) {
        const opmath_t xv = load_value<opmath_t>(xs[j]);
        opmath_t z = normalized(xv, hi[j], lo[j], sc[j], sh[j]);
        if constexpr (kRes) z += load_value<opmath_t>(rs[j]);
        const opmath_t dz = act_grad<A>(load_value<opmath_t>(dys[j]), z, k.slope);
        if (ks != nullptr) ks[j] = store_value<keep_t>(dz);
        sa[j] += dz;
        sb[j] += dz * (xv - mt[j]);
      }
    }
  }
  void add(int64_t i, int64_t ch, double* a, double* b) const {
    const opmath_t xv = load_value<opmath_t>(x[i]);
    opmath_t z = normalized(xv, k.hi[ch], k.lo[ch], k.sc[ch], k.sh[ch]);
    if constexpr (kRes) z += load_value<opmath_t>(res[i]);
    const opmath_t dz = act_grad<A>(load_value<opmath_t>(dy[i]), z, k.slope);
    if (keep != nullptr) keep[i] = store_value<keep_t>(dz);
    const double d = static_cast<double>(dz);
    *a += d;
    *b += d * (static_cast<double>(xv) - mean[ch]);
  }
};

// dx = k_dy * dz + k_x * ((x - mean_hi) - mean_lo) + k_0 (training; k_dy * dz in eval) and the
// residual's gradient dz, over `len` elements whose coefficients are at index `step * i` of the
// arrays (step 0: one channel's run; 1: a channels-last row). kDx, kDres: which are written.
// kSplit: as act_forward_span's, `split` holding the nine arrays in split_even_odd's order.
// Always inlined, so that a caller's loop over one channel's runs loads and broadcasts the
// coefficients once, not once a run (act_backward_per_channel).
template <Act A, bool kRes, bool kTraining, bool kDx, bool kDres, int64_t kStep, bool kSplit = false, typename scalar_t,
          typename T>
[[gnu::always_inline]] inline void act_grad_span(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                                 const scalar_t* __restrict res, scalar_t* __restrict dx,
                                                 scalar_t* __restrict dres, int64_t len, const T* __restrict hi,
                                                 const T* __restrict lo, const T* __restrict sc, const T* __restrict sh,
                                                 const T* __restrict kdy, const T* __restrict kx,
                                                 const T* __restrict k0, const T* __restrict mhi,
                                                 const T* __restrict mlo, T slope, bool stream,
                                                 const T* const* split = nullptr, bool rows_folded = false) {
  int64_t i = 0;
#ifdef BN_EXT_AVX2_INTRINSICS
  // as act_forward_span's, for both means (the forward's hi, lo and the backward's mhi, mlo)
  const bool folded = kStep == 0 ? *hi == T(0) && *lo == T(0) && *mhi == T(0) && *mlo == T(0) : rows_folded;
  i = vector_share<scalar_t, (kStep == 0 || kSplit)>([&](auto ops, int64_t from) {
    using O = decltype(ops);
    if constexpr (kStep == 0) {
      return act_grad_vectors<O, A, kRes, kTraining, kDx, kDres>(
          dy, x, res, dx, dres, from, len, Broadcast{*hi}, Broadcast{*lo}, Broadcast{*sc}, Broadcast{*sh},
          Broadcast{*kdy}, Broadcast{*kx}, Broadcast{*k0}, Broadcast{*mhi}, Broadcast{*mlo}, slope, folded, stream);
#ifndef BN_EXT_AVX512BF16
    } else if constexpr (kSplit) {
      return act_grad_vectors<O, A, kRes, kTraining, kDx, kDres>(
          dy, x, res, dx, dres, from, len, PerLaneSplit{hi, split[0]}, PerLaneSplit{lo, split[1]},
          PerLaneSplit{sc, split[2]}, PerLaneSplit{sh, split[3]}, PerLaneSplit{kdy, split[4]},
          PerLaneSplit{kx, split[5]}, PerLaneSplit{k0, split[6]}, PerLaneSplit{mhi, split[7]},
          PerLaneSplit{mlo, split[8]}, slope, folded, stream);
#endif
    } else {
      return act_grad_vectors<O, A, kRes, kTraining, kDx, kDres>(
          dy, x, res, dx, dres, from, len, PerLane{hi}, PerLane{lo}, PerLane{sc}, PerLane{sh}, PerLane{kdy},
          PerLane{kx}, PerLane{k0}, PerLane{mhi}, PerLane{mlo}, slope, folded, stream);
    }
  });
#ifdef BN_EXT_AVX512BF16
  if constexpr (kStep == 0 && !std::is_same_v<scalar_t, double>) {
    if (i < len)
      act_grad_tail<A, kRes, kTraining, kDx, kDres>(dy + i, x + i, kRes ? res + i : nullptr, kDx ? dx + i : nullptr,
                                                    kDres ? dres + i : nullptr, len - i,
                                                    {hi, lo, sc, sh, kdy, kx, k0, mhi, mlo}, slope, folded);
    return;
  }
#endif
#endif
  for (; i < len; ++i) {
    const int64_t j = kStep * i;
    const T xv = load_value<T>(x[i]);
    T z = normalized(xv, hi[j], lo[j], sc[j], sh[j]);
    if constexpr (kRes) z += load_value<T>(res[i]);
    const T dz = act_grad<A>(load_value<T>(dy[i]), z, slope);
    if constexpr (kDres) dres[i] = store_value<scalar_t>(dz);
    if constexpr (kDx) {
      T v = kdy[j] * dz;
      if constexpr (kTraining) v += kx[j] * ((xv - mhi[j]) - mlo[j]) + k0[j];
      dx[i] = store_value<scalar_t>(v);
    }
  }
}

template <typename scalar_t, Act A, bool kRes, bool kTraining, bool kDx, bool kDres>
void act_grad_input_pass(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* dres,
                         const Geometry& g, const PreAct<at::opmath_type<scalar_t>>& k,
                         const GradCoeffs<at::opmath_type<scalar_t>>& q, bool stream) {
  using T = at::opmath_type<scalar_t>;
  const T *kdy = q.k_dy.data(), *kx = q.k_x.data(), *k0 = q.k_0.data(), *mhi = q.mean_hi.data(),
          *mlo = q.mean_lo.data();
  if (g.layout == Layout::kNCS) {
    parallel_runs(
        g,
        [&](int64_t c, int64_t off, int64_t len) {
          act_grad_span<A, kRes, kTraining, kDx, kDres, 0>(
              dy + off, x + off, kRes ? res + off : nullptr, kDx ? dx + off : nullptr, kDres ? dres + off : nullptr,
              len, k.hi + c, k.lo + c, k.sc + c, k.sh + c, kdy + c, kx + c, k0 + c, mhi + c, mlo + c, k.slope, stream);
        },
        Sweep::kBackward);
    return;
  }
  const bool folded = k.folded && q.folded();
  auto span = [&](int64_t off, int64_t width, const auto& c) {
    constexpr bool kSplit = std::tuple_size_v<std::decay_t<decltype(c)>> == 18;
    act_grad_span<A, kRes, kTraining, kDx, kDres, 1, kSplit>(
        dy + off, x + off, kRes ? res + off : nullptr, kDx ? dx + off : nullptr, kDres ? dres + off : nullptr, width,
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], k.slope, stream, kSplit ? c.data() + 9 : nullptr, folded);
  };
  parallel_row_spans_of<scalar_t, T, 9>(g, {k.hi, k.lo, k.sc, k.sh, kdy, kx, k0, mhi, mlo}, span, Sweep::kBackward);
}

// The input gradient (dx null: not asked for) and the residual's (dres null: none).
template <typename scalar_t, Act A, bool kRes, bool kTraining>
void act_grad_input_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* dres,
                           const Geometry& g, const PreAct<at::opmath_type<scalar_t>>& k,
                           const GradCoeffs<at::opmath_type<scalar_t>>& q, bool stream) {
  if constexpr (!kRes) {
    // Without a residual there is no residual gradient, and dx is asked for (else no pass runs).
    act_grad_input_pass<scalar_t, A, false, kTraining, true, false>(dy, x, res, dx, dres, g, k, q, stream);
  } else if (dx != nullptr && dres != nullptr) {
    act_grad_input_pass<scalar_t, A, kRes, kTraining, true, true>(dy, x, res, dx, dres, g, k, q, stream);
  } else if (dx != nullptr) {
    act_grad_input_pass<scalar_t, A, kRes, kTraining, true, false>(dy, x, res, dx, dres, g, k, q, stream);
  } else {
    act_grad_input_pass<scalar_t, A, kRes, kTraining, false, true>(dy, x, res, dx, dres, g, k, q, stream);
  }
}

// dx and the residual's gradient from kept dz values (ActGradSums::keep_t): the training formula of
// act_grad_span, operation for operation, coefficients at index kStep * i as there (kSplit: as
// act_grad_span's, `split` holding the five arrays in split_even_odd's order).
template <bool kDx, bool kDres, int64_t kStep, bool kSplit = false, typename K, typename scalar_t, typename T>
inline void dx_from_dz_span(const K* __restrict dz, const scalar_t* __restrict x, scalar_t* __restrict dx,
                            scalar_t* __restrict dres, int64_t len, const T* __restrict kdy, const T* __restrict kx,
                            const T* __restrict k0, const T* __restrict mhi, const T* __restrict mlo, bool stream,
                            const T* const* split = nullptr) {
  int64_t i = 0;
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    auto vectors = [&](auto lanes, const auto&... k) {
      return dx_from_dz_vectors<decltype(lanes), kDx, kDres>(dz, x, dx, dres, i, len, k..., stream);
    };
    auto each = [&](auto lanes) {
      if constexpr (kStep == 0) {
        return vectors(lanes, Broadcast{*kdy}, Broadcast{*kx}, Broadcast{*k0}, Broadcast{*mhi}, Broadcast{*mlo});
#ifndef BN_EXT_AVX512BF16
      } else if constexpr (kSplit && std::is_same_v<decltype(lanes), SplitBF16>) {
        return vectors(lanes, PerLaneSplit{kdy, split[0]}, PerLaneSplit{kx, split[1]}, PerLaneSplit{k0, split[2]},
                       PerLaneSplit{mhi, split[3]}, PerLaneSplit{mlo, split[4]});
#endif
      } else {
        return vectors(lanes, PerLane{kdy}, PerLane{kx}, PerLane{k0}, PerLane{mhi}, PerLane{mlo});
      }
    };
#ifdef BN_EXT_AVX512BF16
    i = each(Lanes16{});
#else
    // bfloat16 dz kept in the residual's gradient: 16 values a step as even and odd halves, as
    // act_grad_span's go (SplitBF16; the same bits)
    if constexpr ((kStep == 0 || kSplit) && std::is_same_v<K, c10::BFloat16> && std::is_same_v<scalar_t, c10::BFloat16>)
      i = each(SplitBF16{});
#endif
    i = each(Lanes8{});
  }
#endif
  for (; i < len; ++i) {
    const int64_t j = kStep * i;
    const T d = load_value<T>(dz[i]);
    if constexpr (kDres) dres[i] = store_value<scalar_t>(d);
    if constexpr (kDx) {
      T v = kdy[j] * d;
      v += kx[j] * ((load_value<T>(x[i]) - mhi[j]) - mlo[j]) + k0[j];
      dx[i] = store_value<scalar_t>(v);
    }
  }
}

// The training dx pass from dz values kept in a tensor-sized buffer or the residual's gradient
// (act_backward).
template <typename scalar_t, bool kDx, bool kDres, typename K>
void dx_from_kept_pass(const K* kept, const scalar_t* x, scalar_t* dx, scalar_t* dres, const Geometry& g,
                       const GradCoeffs<at::opmath_type<scalar_t>>& q, bool stream) {
  using T = at::opmath_type<scalar_t>;
  const T *kdy = q.k_dy.data(), *kx = q.k_x.data(), *k0 = q.k_0.data(), *mhi = q.mean_hi.data(),
          *mlo = q.mean_lo.data();
  if (g.layout == Layout::kNCS) {
    parallel_runs(
        g,
        [&](int64_t c, int64_t off, int64_t len) {
          dx_from_dz_span<kDx, kDres, 0>(kept + off, x + off, kDx ? dx + off : nullptr, kDres ? dres + off : nullptr,
                                         len, kdy + c, kx + c, k0 + c, mhi + c, mlo + c, stream);
        },
        Sweep::kBackward);
    return;
  }
  auto span = [&](int64_t off, int64_t width, const auto& c) {
    constexpr bool kSplit = std::tuple_size_v<std::decay_t<decltype(c)>> == 10;
    dx_from_dz_span<kDx, kDres, 1, kSplit>(kept + off, x + off, kDx ? dx + off : nullptr, kDres ? dres + off : nullptr,
                                           width, c[0], c[1], c[2], c[3], c[4], stream,
                                           kSplit ? c.data() + 5 : nullptr);
  };
  if constexpr (std::is_same_v<K, scalar_t>) {  // dz in the residual's gradient: split where bfloat16
    parallel_row_spans_of<scalar_t, T, 5>(g, {kdy, kx, k0, mhi, mlo}, span, Sweep::kBackward);
  } else {
    parallel_row_spans<T, 5>(g, {kdy, kx, k0, mhi, mlo}, span, Sweep::kBackward);
  }
}

template <typename scalar_t, typename K>
void dx_from_kept_kernel(const K* kept, const scalar_t* x, scalar_t* dx, scalar_t* dres, const Geometry& g,
                         const GradCoeffs<at::opmath_type<scalar_t>>& q, bool stream) {
  if (dx != nullptr && dres != nullptr) {
    dx_from_kept_pass<scalar_t, true, true>(kept, x, dx, dres, g, q, stream);
  } else if (dx != nullptr) {
    dx_from_kept_pass<scalar_t, true, false>(kept, x, dx, dres, g, q, stream);
  } else {
    dx_from_kept_pass<scalar_t, false, true>(kept, x, dx, dres, g, q, stream);
  }
}

#if defined(BN_EXT_AVX2_INTRINSICS) && !defined(BN_EXT_AVX512BF16)
// The AVX2 build's fused training forward over channels that go one at a time, pipelined as the
// plain one is (pipelined_channels): a channel's statistics, and between their chunks the
// elementwise pass of the channel before over the same span; the same bits as the channel groups'
// passes. Not SiLU, whose pass is bound by its arithmetic rather than by memory.
template <typename scalar_t, Act A, bool kRes>
void act_train_pipelined(const scalar_t* x, const scalar_t* res, scalar_t* y, const Geometry& g,
                         const std::vector<double>& weight, const std::vector<double>& bias, double eps, float slope,
                         std::vector<double>& mean, std::vector<double>& var, bool stream) {
  auto pass = [&](const ForwardCoeffs<float>& kc, int64_t off, int64_t len) {
    act_forward_span<scalar_t, A, kRes, float, 0>(x + off, kRes ? res + off : nullptr, y + off, len, &kc.mean_hi,
                                                  &kc.mean_lo, &kc.scale, &kc.shift, slope, stream);
  };
  train_pipelined_with(
      x, g, weight, bias, eps, mean, var,
      [&](int64_t off, int64_t len, double shift, LaneSums& acc, const ForwardCoeffs<float>& kp, int64_t back) {
        shifted_sums_run_simd(x + off, len, shift, acc, [&](int64_t j, int64_t n) { pass(kp, off + back + j, n); });
      },
      pass);
}
#endif

// The fused op's training passes per channel group (NC(D)HW with per_channel(g)), as
// train_per_channel and backward_per_channel do for the plain BatchNorm: a group's sums, then
// its elementwise pass while its values are still in cache. Bitwise what the whole-tensor passes
// give (channel_total is channel_sums' order; a span's vectors and tail compute the same bits).
template <typename scalar_t, Act A, bool kRes>
void act_train_per_channel(const scalar_t* x, const scalar_t* res, scalar_t* y, const Geometry& g,
                           const std::vector<double>& weight, const std::vector<double>& bias, double eps,
                           at::opmath_type<scalar_t> slope, std::vector<double>& mean, std::vector<double>& var,
                           bool stream) {
  using T = at::opmath_type<scalar_t>;
  const int64_t group = channel_group(g, (kRes ? 2 : 1) * sizeof(scalar_t));
#if defined(BN_EXT_AVX2_INTRINSICS) && !defined(BN_EXT_AVX512BF16)
  if constexpr (!std::is_same_v<scalar_t, double> && A != Act::kSilu) {
    if (group == 1) {
      act_train_pipelined<scalar_t, A, kRes>(x, res, y, g, weight, bias, eps, slope, mean, var, stream);
      return;
    }
  }
#endif
  train_channel_groups(x, g, group, weight, bias, eps, mean, var, [&](int64_t c0, int64_t c1, const auto* kg) {
    each_run_of_channels(g, c0, c1, kg, [&](int64_t off, int64_t len, const auto& k) {
      act_forward_span<scalar_t, A, kRes, T, 0>(x + off, kRes ? res + off : nullptr, y + off, len, &k.mean_hi,
                                                &k.mean_lo, &k.scale, &k.shift, slope, stream);
    });
  });
}

// SiLU's derivative (an exponential and a division a value) costs more than a read from cache:
// its sums pass keeps each dz (one channel group's worth a thread, in opmath_t) for the dx pass,
// where the other activations compute theirs again.
template <typename scalar_t, Act A, bool kRes, bool kDx, bool kDres>
void act_backward_per_channel(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* dres,
                              const Geometry& g, const PreAct<at::opmath_type<scalar_t>>& k,
                              const std::vector<double>& mean, const std::vector<double>& invstd,
                              const std::vector<double>& weight, std::vector<double>& sum_dz,
                              std::vector<double>& sum_dz_xmu, bool stream) {
  using T = at::opmath_type<scalar_t>;
  // dz kept from the sums for the dx pass: in the residual's gradient where that is asked for and
  // holds dz to the bit (type T, or dz is dy or zero; the dx pass then reads it and x, not dy, x
  // and the residual), else SiLU's, in a buffer of the group's values
  using Sums = ActGradSums<scalar_t, A, kRes>;
  using keep_t = typename Sums::keep_t;
  constexpr bool kKeepInDres = kDres && std::is_same_v<keep_t, scalar_t>;
  constexpr bool kKeep = kKeepInDres || A == Act::kSilu;
  const int64_t group = channel_group(g, (kRes ? 3 : 2) * sizeof(scalar_t));
  const Sums sum{dy, x, res, k, mean.data(), g.C, g.C};
  const int64_t rows = g.rows();
  const double inv_count = 1.0 / static_cast<double>(rows);
  // where the run at flat offset `off` starts within channel c's values
  auto in_channel = [&](int64_t c, int64_t off) {
    const int64_t n = off / (g.C * g.S);
    return n * g.S + (off - (n * g.C + c) * g.S);
  };
  parallel_pieces_with<std::vector<T>>(
      ceil_div(g.C, group), Sweep::kForward,
      [&](std::vector<T>& kept, int64_t p) {
        std::array<BackwardCoeffs<T>, kMaxChannelGroup> q;
        const int64_t c0 = p * group, c1 = std::min(g.C, c0 + group);
        if constexpr (kKeep && !kKeepInDres) kept.resize(static_cast<size_t>((c1 - c0) * rows));
        // where channel c's run at flat offset off keeps its dz
        auto keep_at = [&](int64_t c, int64_t off) -> keep_t* {
          if constexpr (kKeepInDres) {
            return dres + off;
          } else if constexpr (std::is_same_v<keep_t, T>) {
            return kept.data() + (c - c0) * rows + in_channel(c, off);
          } else {
            return nullptr;  // not kept
          }
        };
        for (int64_t c = c0; c < c1; ++c) {
          if constexpr (kKeep) {
            channel_total(sum, g, c, &sum_dz[c], &sum_dz_xmu[c], [&](int64_t off, int64_t len, auto& acc) {
              sum.template run_keeping<true>(c, off, len, acc, keep_at(c, off));
            });
          } else {
            channel_total(sum, g, c, &sum_dz[c], &sum_dz_xmu[c]);
          }
        }
        for (int64_t c = c0; c < c1; ++c)  // apart from the sums, as train_channel_groups does
          q[c - c0] = backward_coeffs_from_invstd<T>(mean[c], invstd[c], weight[c], sum_dz[c], sum_dz_xmu[c], inv_count,
                                                     /*training=*/true);
        for (int64_t c = c0; c < c1; ++c) {
          // the coefficients as locals: read through pointers into the arrays, every run loaded
          // them again after the stores to dx, which may alias them (a third of a (8, 2048, 4, 4)
          // ReLU backward went to a call and nine loads and broadcasts a 16-value run)
          const BackwardCoeffs<T> qc = q[c - c0];
          const T kc[4] = {k.hi[c], k.lo[c], k.sc[c], k.sh[c]};
          for_each_run_of_channel(g, c, 0, rows, [&](int64_t off, int64_t len) {
            scalar_t* dxs = kDx ? dx + off : nullptr;
            scalar_t* drs = kDres ? dres + off : nullptr;
            if constexpr (kKeepInDres) {
              if constexpr (kDx)
                dx_from_dz_span<true, false, 0>(keep_at(c, off), x + off, dxs, drs, len, &qc.k_dy, &qc.k_x, &qc.k_0,
                                                &qc.mean_hi, &qc.mean_lo, stream);
            } else if constexpr (kKeep) {
              dx_from_dz_span<kDx, kDres, 0>(keep_at(c, off), x + off, dxs, drs, len, &qc.k_dy, &qc.k_x, &qc.k_0,
                                             &qc.mean_hi, &qc.mean_lo, stream);
            } else {
              act_grad_span<A, kRes, true, kDx, kDres, 0>(dy + off, x + off, kRes ? res + off : nullptr, dxs, drs, len,
                                                          kc, kc + 1, kc + 2, kc + 3, &qc.k_dy, &qc.k_x, &qc.k_0,
                                                          &qc.mean_hi, &qc.mean_lo, k.slope, stream);
            }
          });
        }
      },
      [](std::vector<T>&) { store_fence(); });
}

// Calls fn(std::integral_constant<Act, A>{}) for the runtime activation.
template <typename Fn>
inline void dispatch_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::kIdentity:
      return fn(std::integral_constant<Act, Act::kIdentity>{});
    case Act::kRelu:
      return fn(std::integral_constant<Act, Act::kRelu>{});
    case Act::kRelu6:
      return fn(std::integral_constant<Act, Act::kRelu6>{});
    case Act::kLeakyRelu:
      return fn(std::integral_constant<Act, Act::kLeakyRelu>{});
    case Act::kSilu:
      return fn(std::integral_constant<Act, Act::kSilu>{});
  }
}
