// CPU kernel loops, compiled once per instruction set: kernels_default.cpp (baseline x86-64),
// kernels_avx2.cpp (AVX2 + FMA) and kernels_avx512bf16.cpp (AVX2 loops with 16-wide AVX-512
// bodies in front), each wrapping this file in its own namespace
// (BN_EXT_CPU_ISA). batch_norm_kernel.cpp picks one at run time. Everything this file needs is
// included by the including file first, so that the ISA's target options apply to these loops
// only, never to shared inline code.
//
// Statistics: one sweep of shifted sums, sum(x - shift) and sum((x - shift)^2), where `shift` is
// the mean of the channel's first few elements. The SIMD builds sum short chunks (512 values in
// the AVX-512 build, 32 in the AVX2 one, or up to 32 channels-last rows) in float32 against the
// shift rounded to float32 and widen each chunk into the float64 sums, correcting for that
// rounding; the baseline sums in float64. With the shift near the mean the variance does not
// cancel (a float32 sum of squares of raw values would), and blocks merge by plain addition.
// Blocks have shape-only boundaries and are added in block order, so results are bitwise
// identical for any thread count, and for the fused and unfused paths.
//
// NC(D)HW tensors with enough channels run the training forward and backward per channel: the
// channel's reduction and then its elementwise pass, which reads the channel back from cache
// instead of memory (one read of x per pass over the tensor instead of two). In the AVX-512
// build, channels that go one at a time (channel_group) are pipelined: one loop sums a channel
// and runs the elementwise pass of the one before (pipelined_channels).

#ifndef BN_EXT_CPU_ISA
#error "define BN_EXT_CPU_ISA before including kernels.h"
#endif

namespace bn_ext {
namespace cpu {
namespace BN_EXT_CPU_ISA {
namespace {

using at::Tensor;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels-last reductions: at most kMaxRowBlocks blocks of whole rows.
struct RowBlocks {
  int64_t rows_per_block;
  int64_t blocks;
};

RowBlocks row_blocks(const Geometry& g) {
  RowBlocks rb;
  const int64_t rows = g.rows();
  const int64_t min_rows = std::max<int64_t>(1, kRowBlockMinElems / std::max<int64_t>(1, g.C));
  rb.rows_per_block = std::max(min_rows, ceil_div(rows, kMaxRowBlocks));
  rb.blocks = ceil_div(rows, rb.rows_per_block);
  return rb;
}

// fn(offset, len): contiguous runs of channel c with flat index in [start, end) (flat index =
// n * S + s), NC(D)HW layout.
template <typename Fn>
inline void for_each_run_of_channel(const Geometry& g, int64_t c, int64_t start, int64_t end, Fn&& fn) {
  if (start >= end) return;
  // one division per call, the later runs start their planes (a 64-bit division per run: a
  // (4, 2048, 7, 7) bfloat16 training forward took 129 us on one thread instead of 109)
  int64_t n = start / g.S;
  int64_t s = start - n * g.S;
  for (int64_t i = start; i < end; ++n, s = 0) {
    const int64_t len = std::min(end - i, g.S - s);
    fn((n * g.C + c) * g.S + s, len);
    i += len;
  }
}

// The order in which each thread walks its share of an elementwise pass. A pass that follows a
// reduction over the same tensors walks back (kBackward), a piece of about kElemGrain elements at
// a time, each piece ascending: the reduction's last lines are the ones still in cache (walking
// forward, each line read would evict the next one needed once the tensors outgrow the cache).
enum class Sweep { kForward, kBackward };

// Orders this thread's streaming stores (stream_output) before what follows: run at the end of
// each parallel task of an elementwise pass, whose output other threads read after the join.
inline void store_fence() {
#ifdef BN_EXT_AVX2_INTRINSICS
  _mm_sfence();
#endif
}

// ---- work sharing ------------------------------------------------------------------------------
// at::parallel_for gives each thread a fixed share, so a pass lasts as long as its slowest share.
// On a shared machine a thread often starts late (the pool's threads sleep when idle a while: after
// 1 ms idle, a (4, 64, 112, 112) bfloat16 training forward took 176 us instead of 117) or loses
// its core for a while to a neighbour, and the other thread then idles at the join.
// parallel_pieces starts every thread on the share parallel_for would give it, walked piece by
// piece in the pass's order, and a thread whose share is done takes pieces from the far end of the
// share with the most left (the end its owner reaches last). Which thread runs a piece never
// changes a result: every piece writes its own outputs, and reductions add their partials in a
// fixed order afterwards.

// A thread's share: pieces [first, last), packed in one word so that its owner (taking from one
// end) and a thief (taking from the other) claim pieces with one compare-and-swap each.
struct alignas(64) Share {
  std::atomic<uint64_t> range{0};
  static uint64_t pack(int64_t first, int64_t last) {
    return (static_cast<uint64_t>(first) << 32) | static_cast<uint64_t>(last);
  }
  int64_t left() const {
    const uint64_t v = range.load(std::memory_order_relaxed);
    return static_cast<int64_t>(v & 0xffffffffu) - static_cast<int64_t>(v >> 32);
  }
  // Claims the piece at the back (the last) or the front; false when none is left.
  bool take(bool back, int64_t* piece) {
    uint64_t v = range.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t first = static_cast<int64_t>(v >> 32), last = static_cast<int64_t>(v & 0xffffffffu);
      if (first >= last) return false;
      const uint64_t next = back ? pack(first, last - 1) : pack(first + 1, last);
      if (range.compare_exchange_weak(v, next, std::memory_order_relaxed)) {
        *piece = back ? last - 1 : first;
        return true;
      }
    }
  }
};

// body(state, piece) for every piece in [0, pieces), in parallel; each thread's share is walked in
// `order` (kBackward: its last piece first), with one State (value-initialised) per thread that
// the thread's pieces see in the order it runs them, and the thread ends with done(state)
// (store_fence, for the passes that stream their output; a pipelined pass's last channel).
template <typename State, typename Body, typename Done>
void parallel_pieces_with(int64_t pieces, Sweep order, Body&& body, Done&& done) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), pieces);
  if (threads <= 1 || at::in_parallel_region() || pieces >= (int64_t(1) << 31)) {
    State state{};
    if (order == Sweep::kForward) {
      for (int64_t p = 0; p < pieces; ++p) body(state, p);
    } else {
      for (int64_t p = pieces - 1; p >= 0; --p) body(state, p);
    }
    done(state);
    return;
  }
  std::vector<Share> shares(threads);
  const int64_t per = ceil_div(pieces, threads);
  for (int64_t t = 0; t < threads; ++t)
    shares[t].range.store(Share::pack(std::min(pieces, t * per), std::min(pieces, (t + 1) * per)));
  const bool owner_back = order == Sweep::kBackward;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    State state{};
    int64_t piece;
    for (int64_t t = begin; t < end; ++t)
      while (shares[t].take(owner_back, &piece)) body(state, piece);
    for (;;) {
      int64_t victim = -1, most = 0;
      for (int64_t t = 0; t < threads; ++t) {
        const int64_t left = shares[t].left();
        if (left > most) {
          most = left;
          victim = t;
        }
      }
      if (victim < 0) break;
      if (shares[victim].take(!owner_back, &piece)) body(state, piece);
    }
    done(state);
  });
}

struct NoState {};

// body(piece) for every piece, as parallel_pieces_with without a state.
template <typename Body, typename Done>
void parallel_pieces(int64_t pieces, Sweep order, Body&& body, Done&& done) {
  parallel_pieces_with<NoState>(pieces, order, [&](NoState&, int64_t p) { body(p); }, [&](NoState&) { done(); });
}

template <typename Body>
void parallel_pieces(int64_t pieces, Sweep order, Body&& body) {
  parallel_pieces(pieces, order, std::forward<Body>(body), [] {});
}

// fn(c, offset, len) over every element, NC(D)HW layout, in parallel.
template <typename Fn>
void parallel_runs(const Geometry& g, Fn&& fn, Sweep order = Sweep::kForward) {
  const int64_t numel = g.numel();
  parallel_pieces(ceil_div(numel, kElemGrain), order, [&](int64_t p) {
    const int64_t lo = p * kElemGrain, hi = std::min(numel, lo + kElemGrain);
    // one division per piece, not per run: planes of a few elements are common (7x7)
    int64_t plane = lo / g.S;
    int64_t c = plane % g.C;
    for (int64_t i = lo; i < hi; ++plane) {
      const int64_t run_end = std::min(hi, (plane + 1) * g.S);
      fn(c, i, run_end - i);
      i = run_end;
      if (++c == g.C) c = 0;
    }
  }, store_fence);
}

// fn(offset) for each row of C channels, channels-last layout, in parallel.
template <typename Fn>
void parallel_rows(const Geometry& g, Fn&& fn, Sweep order = Sweep::kForward) {
  const int64_t grain = std::max<int64_t>(1, kElemGrain / std::max<int64_t>(1, g.C));
  const int64_t rows = g.rows();
  parallel_pieces(ceil_div(rows, grain), order, [&](int64_t p) {
    for (int64_t r = p * grain; r < std::min(rows, (p + 1) * grain); ++r) fn(r * g.C);
  });
}

// Rows per span of the channels-last elementwise passes: spans of whole vectors (8 rows of a few
// channels where C % 8 != 0) and of at least kSpanValues values, so that rows of 32 or 64
// channels do not pay a call and its setup per 2-4 vectors (a (2, 32, 32, 32, 32) bfloat16
// elementwise forward took 2.8x as long channels-last as NC(D)HW one row at a time).
constexpr int64_t kSpanValues = 256;

int64_t rows_per_span(int64_t C) {
  const int64_t whole = (C % 8 == 0 || C >= kWideRowChannels) ? 1 : 8;
  return whole * std::max<int64_t>(1, kSpanValues / (whole * std::max<int64_t>(1, C)));
}

// fn(offset, width, arrays) over a channels-last tensor, in parallel: each span of rows_per_span(C)
// rows (width = rows * C values) in memory order, with the per-channel arrays tiled to the span's
// width; then the last rows (fewer than a span) one by one with the arrays as given. One span per
// call, in memory order: four spans a call (rows `width` apart), sharing each vector's
// coefficient loads, read out of order and ran slower (docs/design.md, "Measurements").
template <typename T, size_t K, typename Fn>
void parallel_row_spans(const Geometry& g, const std::array<const T*, K>& arrays, Fn&& fn,
                        Sweep order = Sweep::kForward) {
  const int64_t rows = rows_per_span(g.C);
  const int64_t width = rows * g.C;
  std::array<std::vector<T>, K> tiled;
  std::array<const T*, K> spans_arrays = arrays;
  if (rows > 1) {
    for (size_t k = 0; k < K; ++k) {
      tiled[k].resize(width);
      for (int64_t r = 0; r < rows; ++r) std::copy(arrays[k], arrays[k] + g.C, tiled[k].begin() + r * g.C);
      spans_arrays[k] = tiled[k].data();
    }
  }
  const int64_t spans = g.rows() / rows;
  const int64_t grain = std::max<int64_t>(1, kElemGrain / width);
  parallel_pieces(ceil_div(spans, grain), order, [&](int64_t p) {
    const int64_t hi = std::min(spans, (p + 1) * grain);
    for (int64_t r = p * grain; r < hi; ++r) fn(r * width, width, spans_arrays);
  }, store_fence);
  for (int64_t off = spans * width; off < g.numel(); off += g.C) fn(off, g.C, arrays);
}

// ---- statistics ------------------------------------------------------------------------------

#ifdef BN_EXT_AVX2_INTRINSICS
constexpr int64_t kRowsPerTile = 32;  // at most, summed in float32 per tile

inline bool aligned_to(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }

// Eight elements widened to float32 (the compiler does not vectorise the float -> double widening
// reductions below on its own, so the AVX2 build spells them out).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256d lo4(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi4(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

// Fixed-order horizontal sum of four accumulators.
inline double hsum(__m256d a0, __m256d a1, __m256d a2, __m256d a3) {
  alignas(32) double v[4];
  _mm256_store_pd(v, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  return (v[0] + v[1]) + (v[2] + v[3]);
}

#ifdef BN_EXT_AVX512BF16
// The AVX-512 build's 16-wide loads and stores (bfloat16 rounded by vcvtneps2bf16, as store8).
// The reduction loops below start with a 16-wide body and finish with the 8-wide one; the
// elementwise loops finish with one masked 16-wide vector.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// The mask of the first n (<= 16) lanes.
inline __mmask16 first_lanes(int64_t n) { return __mmask16((1u << n) - 1); }
// The first n (< 16) values, zeros in the other lanes.
inline __m512 load16_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline __m512 load16_first(const c10::BFloat16* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(first_lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_first(const c10::Half* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), p));
}
// The first n (< 16) lanes of v stored, as store16 would (the AVX-512 build's elementwise tails).
inline void store16_first(float* p, __m512 v, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
inline void store16_first(c10::BFloat16* p, __m512 v, int64_t n) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(p, first_lanes(n), reinterpret_cast<const __m256i&>(h));
}
inline void store16_first(c10::Half* p, __m512 v, int64_t n) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<const __m256i&>(h));
}
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// store16's values written with a streaming store where p is aligned for one (stream_output).
inline void stream16(float* p, __m512 v) {
  if (aligned_to(p, 64)) {
    _mm512_stream_ps(p, v);
  } else {
    store16(p, v);
  }
}
inline void stream16(c10::BFloat16* p, __m512 v) {
  if (!aligned_to(p, 32)) return store16(p, v);
  const __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<const __m256i&>(h));
}
inline void stream16(c10::Half* p, __m512 v) {
  if (!aligned_to(p, 32)) return store16(p, v);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline __m256 lower8(__m512 v) { return _mm512_castps512_ps256(v); }
inline __m256 upper8(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
// Sixteen float64 values rounded to float32 in one vector.
inline __m512 narrow16(__m512d lo, __m512d hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),
                                             _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1));
}
// Sixteen float32 sums widened and added into eight float64 lanes.
inline __m512d widen_add(__m512d acc, __m512 v) {
  return _mm512_add_pd(acc, _mm512_add_pd(_mm512_cvtps_pd(lower8(v)), _mm512_cvtps_pd(upper8(v))));
}
// The lanes of a and of b, each summed ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)), both in
// one chain of registers: the per-block finish of many small channels (2048 of 7x7) spent 14% of
// a training forward storing each vector and adding its lanes back one by one.
inline void hsum8_pair(__m512d a, __m512d b, double* sa, double* sb) {
  // lanes a0+a1, b0+b1, a2+a3, b2+b3, a4+a5, b4+b5, a6+a7, b6+b7
  const __m512d pairs = _mm512_add_pd(_mm512_unpacklo_pd(a, b), _mm512_unpackhi_pd(a, b));
  // lanes 0, 1: (a0+a1)+(a2+a3), (b0+b1)+(b2+b3); lanes 4, 5: the same of the upper four
  const __m512d quads = _mm512_add_pd(pairs, _mm512_permutex_pd(pairs, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m128d sums = _mm_add_pd(_mm512_castpd512_pd128(quads),
                                  _mm256_castpd256_pd128(_mm512_extractf64x4_pd(quads, 1)));
  *sa = _mm_cvtsd_f64(sums);
  *sb = _mm_cvtsd_f64(_mm_unpackhi_pd(sums, sums));
}
// Values summed in float32 before widening, 16-wide loops: 16 terms per lane of each of the two
// pairs of chunk sums. Widening costs 10 instructions per chunk, so chunks are long enough for it
// to stay a small share of the sweep (docs/design.md, "Measurements").
constexpr int64_t kChunk16 = 512;
#endif
#endif  // BN_EXT_AVX2_INTRINSICS

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
  // planes of 16 or more: one vector and a tree sum in float32 (any value near the mean serves as
  // the shift; a chain of 16 dependent float64 additions per channel cost 9% of a (4, 2048, 7, 7)
  // bfloat16 training forward). Values near the float32 maximum overflow that sum: those take
  // the float64 loop below, as the other builds do.
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (n == kShiftSamples && g.S >= kShiftSamples) {
      const float s = _mm512_reduce_add_ps(load16(x + c * g.S));
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
// alternate vectors) carry over from one run to the next and are widened every kChunkVectors
// vectors and when the block finishes, not per run: four 49-value runs of a 7x7 channel widen
// once, not four times. The other builds sum into sa and sb.
struct LaneSums {
#ifdef BN_EXT_AVX512BF16
  __m512d a, b;
  __m512 fa, fb, ga, gb;
  int64_t vecs = 0;  // vectors added into f and g since they were last widened
  double n = 0;      // values in the lanes
  LaneSums()  // user-provided: built for AVX-512
      : a(_mm512_setzero_pd()), b(a), fa(_mm512_setzero_ps()), fb(fa), ga(fa), gb(fa) {}
  void widen();
  // The sums with the pending float32 chunk sums widened in.
  LaneSums flushed() const {
    LaneSums t = *this;
    t.widen();
    return t;
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
inline void LaneSums::widen() {
  a = widen_add(a, _mm512_add_ps(fa, ga));
  b = widen_add(b, _mm512_add_ps(fb, gb));
  fa = fb = ga = gb = _mm512_setzero_ps();
  vecs = 0;
}

// Vectors summed in float32 before widening: at most this many terms in any lane of f and g.
constexpr int64_t kChunkVectors = kChunk16 / 16;

// Values [0, len) of a run, the last vector masked: body(j, n, fa, fb) adds the vector at j, whose
// first n lanes are values (n = 16 but for the last), into the float32 chunk sums fa/fb (acc's f
// or g pair, alternately), widened into acc's lanes every kChunkVectors vectors.
template <typename Body>
inline void chunked_lanes(int64_t len, LaneSums& acc, Body&& body) {
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    body(j, 16, acc.fa, acc.fb);
    body(j + 16, 16, acc.ga, acc.gb);
    if ((acc.vecs += 2) >= kChunkVectors) acc.widen();
  }
  if (j + 16 <= len) {
    body(j, 16, acc.fa, acc.fb);
    j += 16;
    if (++acc.vecs >= kChunkVectors) acc.widen();
  }
  if (j < len) {
    body(j, len - j, acc.ga, acc.gb);
    if (++acc.vecs >= kChunkVectors) acc.widen();
  }
  acc.n += static_cast<double>(len);
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
  const __m512 d = _mm512_maskz_sub_ps(first_lanes(n), load16_n(p, n), shf);
  fa = _mm512_add_ps(fa, d);
  fb = _mm512_fmadd_ps(d, d, fb);
}
template <typename scalar_t>
inline void add_grad16(const scalar_t* dy, const scalar_t* x, int64_t n, __m512 zm, __m512& fa, __m512& fb) {
  const __m512 g = load16_n(dy, n);
  fa = _mm512_add_ps(fa, g);
  fb = _mm512_fmadd_ps(g, _mm512_maskz_sub_ps(first_lanes(n), load16_n(x, n), zm), fb);
}
#endif

template <typename scalar_t>
inline void shifted_sums_run_avx2(const scalar_t* p, int64_t len, double shift, LaneSums& acc) {
#ifdef BN_EXT_AVX512BF16
  // (x - shift_f) and its square in float32 chunks; finish_shifted corrects for the rounding
  const __m512 shf = _mm512_set1_ps(static_cast<float>(shift));
  chunked_lanes(len, acc,
                [&](int64_t j, int64_t n, __m512& fa, __m512& fb) { add_shifted16(p + j, n, shf, fa, fb); });
  return;
#endif
  double* s1 = &acc.sa;
  double* s2 = &acc.sb;
  const __m256d sh = _mm256_set1_pd(shift);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + 16 <= len; i += 16) {
      const __m256 v = load8(p + i), w = load8(p + i + 8);
      const __m256d d0 = _mm256_sub_pd(lo4(v), sh), d1 = _mm256_sub_pd(hi4(v), sh);
      const __m256d d2 = _mm256_sub_pd(lo4(w), sh), d3 = _mm256_sub_pd(hi4(w), sh);
      a0 = _mm256_add_pd(a0, d0);
      a1 = _mm256_add_pd(a1, d1);
      a2 = _mm256_add_pd(a2, d2);
      a3 = _mm256_add_pd(a3, d3);
      b0 = _mm256_fmadd_pd(d0, d0, b0);
      b1 = _mm256_fmadd_pd(d1, d1, b1);
      b2 = _mm256_fmadd_pd(d2, d2, b2);
      b3 = _mm256_fmadd_pd(d3, d3, b3);
    }
  } else {
    // bfloat16/float16 carry 8/11 significant bits: chunks of 32 values are summed in float32
    // (x - shift is exact there for values near the shift, and 4 terms per lane lose nothing
    // measurable), then widened into the float64 accumulators.
    const __m256 shf = _mm256_set1_ps(static_cast<float>(shift));
    const double shift_rest = shift - static_cast<double>(static_cast<float>(shift));
    const __m256d rest = _mm256_set1_pd(shift_rest);
    for (; i + 32 <= len; i += 32) {
      __m256 fa = _mm256_setzero_ps(), fb = fa;
#pragma GCC unroll 4
      for (int j = 0; j < 32; j += 8) {
        const __m256 d = _mm256_sub_ps(load8(p + i + j), shf);
        fa = _mm256_add_ps(fa, d);
        fb = _mm256_fmadd_ps(d, d, fb);
      }
      // 32 values: sum(x - shift) = sum(x - shf) - 32 * rest; sum((x - shift)^2) =
      // sum((x - shf)^2) - 2 * rest * sum(x - shf) + 32 * rest^2 (rest is below float32's ulp)
      const __m256d sa = _mm256_add_pd(lo4(fa), hi4(fa));
      const __m256d sb = _mm256_add_pd(lo4(fb), hi4(fb));
      a0 = _mm256_add_pd(a0, sa);
      b0 = _mm256_add_pd(b0, sb);
      b1 = _mm256_fnmadd_pd(_mm256_add_pd(rest, rest), sa, b1);
    }
    const double n = static_cast<double>(i);
    a1 = _mm256_set_pd(0, 0, 0, -n * shift_rest);
    b2 = _mm256_set_pd(0, 0, 0, n * shift_rest * shift_rest);
  }
  double ta = 0, tb = 0;
  for (; i < len; ++i) {
    const double d = static_cast<double>(static_cast<float>(p[i])) - shift;
    ta += d;
    tb += d * d;
  }
  *s1 += hsum(a0, a1, a2, a3) + ta;
  *s2 += hsum(b0, b1, b2, b3) + tb;
}

// sum(dy) and sum(dy * (x - mean)) over one run: chunks of 32 values in float32 against the mean
// rounded to float32 (x - mean_f is exact near the mean), widened into float64 per chunk, with
// the rounding of the mean corrected: sum(dy * (x - mean)) = sum(dy * (x - mean_f)) - rest * sum(dy).
template <typename scalar_t>
inline void grad_sums_run_avx2(const scalar_t* dy, const scalar_t* x, int64_t len, double mean, LaneSums& acc) {
#ifdef BN_EXT_AVX512BF16
  // dy and dy * (x - mean_f) in float32 chunks; finish_grad corrects for the rounding of the mean
  const __m512 zm = _mm512_set1_ps(static_cast<float>(mean));
  chunked_lanes(len, acc,
                [&](int64_t j, int64_t n, __m512& fa, __m512& fb) { add_grad16(dy + j, x + j, n, zm, fa, fb); });
  return;
#endif
  double* sum_dy = &acc.sa;
  double* sum_dy_xmu = &acc.sb;
  const __m256 mf = _mm256_set1_ps(static_cast<float>(mean));
  const double rest = mean - static_cast<double>(static_cast<float>(mean));
  __m256d a0 = _mm256_setzero_pd(), b0 = a0;
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m256 fa = _mm256_setzero_ps(), fb = fa;
#pragma GCC unroll 4
    for (int j = 0; j < 32; j += 8) {
      const __m256 g = load8(dy + i + j);
      fa = _mm256_add_ps(fa, g);
      fb = _mm256_fmadd_ps(g, _mm256_sub_ps(load8(x + i + j), mf), fb);
    }
    a0 = _mm256_add_pd(a0, _mm256_add_pd(lo4(fa), hi4(fa)));
    b0 = _mm256_add_pd(b0, _mm256_add_pd(lo4(fb), hi4(fb)));
  }
  const __m256d zero = _mm256_setzero_pd();
  double ta = 0, tb = 0;
  for (; i < len; ++i) {
    const double gv = static_cast<double>(static_cast<float>(dy[i]));
    ta += gv;
    tb += gv * (static_cast<double>(static_cast<float>(x[i])) - mean);
  }
  const double sa = hsum(a0, zero, zero, zero);
  *sum_dy += sa + ta;
  *sum_dy_xmu += (hsum(b0, zero, zero, zero) - rest * sa) + tb;
}

// Channels-last: add the shifted sums of channels [c, c + 8) over rows [r0, r1) into s1/s2.
// Callers pass a few rows at a time: rows are C elements apart, and more than a handful of such
// lines would thrash L1's sets. The few rows are summed in float32 against the shift rounded to
// float32 (x - shift is exact for values near the shift; a handful of terms per lane loses
// nothing measurable), then widened into the float64 sums with the rounding of the shift
// corrected: half the instructions of widening every element.
template <typename scalar_t>
inline void shifted_sums_tile8_avx2(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                    const double* shift, double* s1, double* s2) {
  const __m256d sh0 = _mm256_loadu_pd(shift + c), sh1 = _mm256_loadu_pd(shift + c + 4);
  const __m256 shf = _mm256_set_m128(_mm256_cvtpd_ps(sh1), _mm256_cvtpd_ps(sh0));
  __m256 fa = _mm256_setzero_ps(), fb = fa;
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 d = _mm256_sub_ps(load8(x + r * C + c), shf);
    fa = _mm256_add_ps(fa, d);
    fb = _mm256_fmadd_ps(d, d, fb);
  }
  // with rest = shift - float(shift): sum(x - shift) = sa - n * rest and
  // sum((x - shift)^2) = sb - 2 * rest * sa + n * rest^2
  const __m256d n = _mm256_set1_pd(static_cast<double>(r1 - r0));
  const __m256d sa[2] = {lo4(fa), hi4(fa)}, sb[2] = {lo4(fb), hi4(fb)};
  const __m256d rest[2] = {_mm256_sub_pd(sh0, lo4(shf)), _mm256_sub_pd(sh1, hi4(shf))};
  for (int h = 0; h < 2; ++h) {
    const __m256d nr = _mm256_mul_pd(n, rest[h]);
    const __m256d a = _mm256_sub_pd(_mm256_add_pd(_mm256_loadu_pd(s1 + c + 4 * h), sa[h]), nr);
    __m256d b = _mm256_add_pd(_mm256_loadu_pd(s2 + c + 4 * h), sb[h]);
    b = _mm256_fnmadd_pd(_mm256_add_pd(rest[h], rest[h]), sa[h], b);
    b = _mm256_fmadd_pd(nr, rest[h], b);
    _mm256_storeu_pd(s1 + c + 4 * h, a);
    _mm256_storeu_pd(s2 + c + 4 * h, b);
  }
}

// sum(dy) and sum(dy * (x - mean)) of channels [c, c + 8) over rows [r0, r1), summed in float32
// against the mean rounded to float32 and widened once, as shifted_sums_tile8_avx2 does.
template <typename scalar_t>
inline void grad_sums_tile8_avx2(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                 const double* mean, double* sum_dy, double* sum_dy_xmu) {
  const __m256d m0 = _mm256_loadu_pd(mean + c), m1 = _mm256_loadu_pd(mean + c + 4);
  const __m256 mf = _mm256_set_m128(_mm256_cvtpd_ps(m1), _mm256_cvtpd_ps(m0));
  __m256 fa = _mm256_setzero_ps(), fb = fa;
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 g = load8(dy + r * C + c);
    fa = _mm256_add_ps(fa, g);
    fb = _mm256_fmadd_ps(g, _mm256_sub_ps(load8(x + r * C + c), mf), fb);
  }
  const __m256d sa[2] = {lo4(fa), hi4(fa)}, sb[2] = {lo4(fb), hi4(fb)};
  const __m256d rest[2] = {_mm256_sub_pd(m0, lo4(mf)), _mm256_sub_pd(m1, hi4(mf))};
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_pd(sum_dy + c + 4 * h, _mm256_add_pd(_mm256_loadu_pd(sum_dy + c + 4 * h), sa[h]));
    const __m256d b = _mm256_add_pd(_mm256_loadu_pd(sum_dy_xmu + c + 4 * h), sb[h]);
    _mm256_storeu_pd(sum_dy_xmu + c + 4 * h, _mm256_fnmadd_pd(rest[h], sa[h], b));
  }
}

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

// shifted_sums_tile8_avx2 for channels [c, c + 16), 16-wide.
template <typename scalar_t>
inline void shifted_sums_tile16(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                const double* shift, double* s1, double* s2) {
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
// tile can take as many rows as the float32 sums allow (for_each_tile8).
template <typename scalar_t>
inline void shifted_sums_tile128(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                 const double* shift, double* s1, double* s2) {
  constexpr int V = kWideTileChannels / 16;
  __m512 shf[V], fa[V] = {}, fb[V] = {};
  narrow_lanes<V>(shift + c, shf);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C + c;
    for (int v = 0; v < V; ++v) {
      const __m512 d = _mm512_sub_ps(load16(row + 16 * v), shf[v]);
      fa[v] = _mm512_add_ps(fa[v], d);
      fb[v] = _mm512_fmadd_ps(d, d, fb[v]);
    }
  }
  for (int v = 0; v < V; ++v)
    add_tile16_sums(fa[v], fb[v], shf[v], shift + c + 16 * v, r1 - r0, s1 + c + 16 * v, s2 + c + 16 * v);
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

// grad_sums_tile8_avx2 for channels [c, c + 16), 16-wide.
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
// shifted_sums_tile128; a lane's arithmetic is the same as in grad_sums_tile16).
template <typename scalar_t>
inline void grad_sums_tile128(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                              const double* mean, double* sum_dy, double* sum_dy_xmu) {
  constexpr int V = kWideTileChannels / 16;
  __m512 mf[V], fa[V] = {}, fb[V] = {};
  narrow_lanes<V>(mean + c, mf);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* g = dy + r * C + c;
    const scalar_t* xr = x + r * C + c;
    for (int v = 0; v < V; ++v) {
      const __m512 gv = load16(g + 16 * v);
      fa[v] = _mm512_add_ps(fa[v], gv);
      fb[v] = _mm512_fmadd_ps(gv, _mm512_sub_ps(load16(xr + 16 * v), mf[v]), fb[v]);
    }
  }
  for (int v = 0; v < V; ++v)
    add_grad_tile16_sums(fa[v], fb[v], mf[v], mean + c + 16 * v, sum_dy + c + 16 * v, sum_dy_xmu + c + 16 * v);
}
#endif

// Eight float32 values rounded to the storage type (round to nearest even, NaN kept quiet: the
// same results as c10's scalar conversions).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
#ifdef BN_EXT_AVX512BF16
  // one instruction: round to nearest even (NaNs stay NaN; their payload bits may differ from
  // c10's canonical 0x7FC0, which no comparison of values can see)
  const __m128bh h = _mm256_cvtneps_pbh(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<const __m128i&>(h));
#else
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), nan);
  const __m256i halves = _mm256_srli_epi32(rounded, 16);
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
  static vec load(const T* p) { return load8(p); }
  template <typename T>
  static void store(T* p, vec v) { store8(p, v); }
  template <typename T>
  static void store_out(T* p, vec v, bool stream) { stream ? stream8(p, v) : store8(p, v); }
  static vec coef(const float* p) { return _mm256_loadu_ps(p); }
  static vec coef(float v) { return _mm256_set1_ps(v); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
};
#ifdef BN_EXT_AVX512BF16
struct Lanes16 {
  using vec = __m512;
  static constexpr int64_t width = 16;
  template <typename T>
  static vec load(const T* p) { return load16(p); }
  template <typename T>
  static void store(T* p, vec v) { store16(p, v); }
  template <typename T>
  static void store_out(T* p, vec v, bool stream) { stream ? stream16(p, v) : store16(p, v); }
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
  typename L::vec at(int64_t) const { return L::coef(v); }
  float scalar(int64_t) const { return v; }
#ifdef BN_EXT_AVX512BF16
  __m512 first(int64_t, int64_t) const { return _mm512_set1_ps(v); }
#endif
};
struct PerLane {
  const float* p;
  template <typename L>
  typename L::vec at(int64_t i) const { return L::coef(p + i); }
  float scalar(int64_t i) const { return p[i]; }
#ifdef BN_EXT_AVX512BF16
  // the coefficients of positions [i, i + n), n < 16 (zeros in the other lanes)
  __m512 first(int64_t i, int64_t n) const { return _mm512_maskz_loadu_ps(first_lanes(n), p + i); }
#endif
};

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
    store16_first(y + i, normalized<Lanes16>(load16_first(x + i, m), hi.first(i, m), lo.first(i, m), sc.first(i, m),
                                             sh.first(i, m)), m);
  }
  return;
#endif
  i = normalize_vectors<Lanes8>(x, y, i, n, hi, lo, sc, sh, folded, stream);
  for (int64_t j = i; j < n; ++j)
    y[j] = static_cast<scalar_t>(
        normalize_one(static_cast<float>(x[j]), hi.scalar(j), lo.scalar(j), sc.scalar(j), sh.scalar(j)));
}

template <typename scalar_t>
inline void normalize_run_avx2(const scalar_t* x, scalar_t* y, int64_t len, float hi, float lo, float sc, float sh,
                               bool stream) {
  // hi == lo == 0: the mean folded into the shift (forward_coeffs)
  normalize_span(x, y, len, Broadcast{hi}, Broadcast{lo}, Broadcast{sc}, Broadcast{sh}, hi == 0.0f && lo == 0.0f,
                 stream);
}

#ifdef BN_EXT_AVX512BF16
// The pipelined training forward's loop (train_pipelined): one run of a channel's shifted sums,
// added as shifted_sums_run_avx2 adds them (add_shifted16 into the same chunk sums, so the same
// bits), and in the same loop the run at the same (n, s) of the channel before it, whose
// statistics are done, normalised a vector at a time by normalize_span (normalize_run_avx2's).
// The run summed comes from memory while the one normalised comes from cache and its output goes
// out: both directions of memory traffic at once, where a reduction and then an elementwise pass
// take turns.
template <typename scalar_t>
inline void shifted_sums_normalize_run(const scalar_t* x, int64_t len, double shift, LaneSums& acc,
                                       const scalar_t* xp, scalar_t* yp, float hi, float lo, float sc, float sh,
                                       bool stream) {
  const __m512 shf = _mm512_set1_ps(static_cast<float>(shift));
  const bool folded = hi == 0.0f && lo == 0.0f;
  chunked_lanes(len, acc, [&](int64_t j, int64_t n, __m512& fa, __m512& fb) {
    add_shifted16(x + j, n, shf, fa, fb);
    // n <= 16 values: one vector, or the masked last one
    normalize_span(xp + j, yp + j, n, Broadcast{hi}, Broadcast{lo}, Broadcast{sc}, Broadcast{sh}, folded, stream);
  });
}
#endif

// Channels-last: a span of `width` values, one coefficient per position.
template <typename scalar_t>
inline void normalize_rows_avx2(const scalar_t* x, scalar_t* y, int64_t width, const float* hi, const float* lo,
                                const float* sc, const float* sh, bool folded, bool stream) {
  normalize_span(x, y, width, PerLane{hi}, PerLane{lo}, PerLane{sc}, PerLane{sh}, folded, stream);
}

// Channels-last sums streamed row after row: each block of rows is read as kRowsAtOnce sequential
// streams per tensor, one per quarter of the block, which the prefetchers follow (the tiles walk
// many rows at once, a few hundred bytes of each). Per-channel float32 partial sums stay in L1 and
// are flushed into the float64 sums every kStreamRows rows.
// Channels [c0, n), both multiples of 8: rows(r, k, step, fa, fb) adds rows r, r + step, ...
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

template <typename Rows, typename Flush>
inline void rows_streamed(int64_t c0, int64_t n, int64_t r0, int64_t r1, Rows&& rows, Flush&& flush) {
  std::vector<float> fa(n), fb(n);
  auto clear = [&] {
    std::fill(fa.begin() + c0, fa.end(), 0.0f);
    std::fill(fb.begin() + c0, fb.end(), 0.0f);
  };
  const int64_t q = (r1 - r0) / kRowsAtOnce;  // rows per stream
  constexpr int64_t kStepsPerFlush = kStreamRows / kRowsAtOnce;
  for (int64_t i0 = 0; i0 < q; i0 += kStepsPerFlush) {
    const int64_t i1 = std::min(q, i0 + kStepsPerFlush);
    clear();
    for (int64_t i = i0; i < i1; ++i) rows(r0 + i, kRowsAtOnce, q, fa.data(), fb.data());
    flush(kRowsAtOnce * (i1 - i0), fa.data(), fb.data());
  }
  if (r0 + kRowsAtOnce * q < r1) {  // the last rows, fewer than kRowsAtOnce
    clear();
    for (int64_t r = r0 + kRowsAtOnce * q; r < r1; ++r) rows(r, 1, 1, fa.data(), fb.data());
    flush(r1 - r0 - kRowsAtOnce * q, fa.data(), fb.data());
  }
}

// The float32 copy of a per-channel float64 array, channels [c0, n).
inline std::vector<float> rounded_to_float(const double* v, int64_t c0, int64_t n) {
  std::vector<float> f(n);
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
inline void grad_sums_rows_streamed(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c0, int64_t n,
                                    int64_t r0, int64_t r1, const double* mean, double* sum_dy, double* sum_dy_xmu) {
  const std::vector<float> mf = rounded_to_float(mean, c0, n);
  rows_streamed(c0, n, r0, r1, [&](int64_t r, int64_t k, int64_t step, float* fa, float* fb) {
    int64_t c = c0;
#ifdef BN_EXT_AVX512BF16
    c = grad_sums_row_vectors<Lanes16>(dy + r * C, x + r * C, step * C, k, c, n, mf.data(), fa, fb);
#endif
    grad_sums_row_vectors<Lanes8>(dy + r * C, x + r * C, step * C, k, c, n, mf.data(), fa, fb);
  }, [&](int64_t, const float* fa, const float* fb) {
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
  const std::vector<float> sf = rounded_to_float(shift, c0, n);
  rows_streamed(c0, n, r0, r1, [&](int64_t r, int64_t k, int64_t step, float* fa, float* fb) {
    int64_t c = c0;
#ifdef BN_EXT_AVX512BF16
    c = shifted_sums_row_vectors<Lanes16>(x + r * C, step * C, k, c, n, sf.data(), fa, fb);
#endif
    shifted_sums_row_vectors<Lanes8>(x + r * C, step * C, k, c, n, sf.data(), fa, fb);
  }, [&](int64_t rows, const float* fa, const float* fb) {
    for (int64_t c = c0; c < n; ++c)
      add_shifted_sums(fa[c], fb[c], static_cast<double>(rows), shift[c], &s1[c], &s2[c]);
  });
}

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
  i = grad_input_vectors<Lanes8, kTraining>(dy, x, dx, i, n, kd, kx, k0, hi, lo, folded, stream);
  for (int64_t j = i; j < n; ++j)
    dx[j] = static_cast<scalar_t>(grad_one<kTraining>(static_cast<float>(dy[j]), static_cast<float>(x[j]),
                                                      kd.scalar(j), kx.scalar(j), k0.scalar(j), hi.scalar(j),
                                                      lo.scalar(j)));
}

template <typename scalar_t, bool kTraining>
inline void grad_input_run_avx2(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, float kd, float kx,
                                float k0, float hi, float lo, bool stream) {
  grad_input_span<kTraining>(dy, x, dx, len, Broadcast{kd}, Broadcast{kx}, Broadcast{k0}, Broadcast{hi},
                             Broadcast{lo}, hi == 0.0f && lo == 0.0f, stream);
}

template <typename scalar_t, bool kTraining>
inline void grad_input_rows_avx2(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t width,
                                 const float* kd, const float* kx, const float* k0, const float* hi, const float* lo,
                                 bool folded, bool stream) {
  grad_input_span<kTraining>(dy, x, dx, width, PerLane{kd}, PerLane{kx}, PerLane{k0}, PerLane{hi}, PerLane{lo}, folded,
                             stream);
}

#ifdef BN_EXT_AVX512BF16
// The pipelined training backward's loop (backward_pipelined), as shifted_sums_normalize_run:
// one run of a channel's gradient sums, added as grad_sums_run_avx2 adds them (add_grad16), and
// in the same loop the input gradient of the run at the same (n, s) of the channel before it, a
// vector at a time by grad_input_span (grad_input_run_avx2's, the training formula).
template <typename scalar_t>
inline void grad_sums_grad_input_run(const scalar_t* dy, const scalar_t* x, int64_t len, double mean, LaneSums& acc,
                                     const scalar_t* dyp, const scalar_t* xp, scalar_t* dxp,
                                     const BackwardCoeffs<float>& k, bool stream) {
  const __m512 zm = _mm512_set1_ps(static_cast<float>(mean));
  const bool folded = k.mean_hi == 0.0f && k.mean_lo == 0.0f;
  chunked_lanes(len, acc, [&](int64_t j, int64_t n, __m512& fa, __m512& fb) {
    add_grad16(dy + j, x + j, n, zm, fa, fb);
    // n <= 16 values: one vector, or the masked last one
    grad_input_span<true>(dyp + j, xp + j, dxp + j, n, Broadcast{k.k_dy}, Broadcast{k.k_x}, Broadcast{k.k_0},
                          Broadcast{k.mean_hi}, Broadcast{k.mean_lo}, folded, stream);
  });
}
#endif
#endif

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
    shifted_sums_run_avx2(p, len, shift, acc);
    return;
  }
#endif
  two_sums_run(len, [&](int64_t i, double* u, double* v) {
    const double d = static_cast<double>(p[i]) - shift;
    *u = d;
    *v = d * d;
  }, &acc.sa, &acc.sb);
}

// A block's shifted sums from its LaneSums (the lanes hold sums against the float32 shift).
inline void finish_shifted(const LaneSums& acc, double shift, double* s1, double* s2) {
  *s1 = acc.sa;
  *s2 = acc.sb;
#ifdef BN_EXT_AVX512BF16
  const LaneSums t = acc.flushed();
  double A, B;
  hsum8_pair(t.a, t.b, &A, &B);
  add_shifted_sums(A, B, t.n, shift, s1, s2);
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
    grad_sums_run_avx2(dy, x, len, mean, acc);
    return;
  }
#endif
  two_sums_run(len, [&](int64_t i, double* u, double* v) {
    const double g = static_cast<double>(dy[i]);
    *u = g;
    *v = g * (static_cast<double>(x[i]) - mean);
  }, &acc.sa, &acc.sb);
}

// A block's gradient sums from its LaneSums (the lanes hold sum(dy) and sum(dy * (x - mean_f))).
inline void finish_grad(const LaneSums& acc, double mean, double* sum_dy, double* sum_dy_xmu) {
  *sum_dy = acc.sa;
  *sum_dy_xmu = acc.sb;
#ifdef BN_EXT_AVX512BF16
  const LaneSums t = acc.flushed();
  double A, B;
  hsum8_pair(t.a, t.b, &A, &B);
  add_grad_sums(A, B, mean, sum_dy, sum_dy_xmu);
#else
  (void)mean;
#endif
}

// ---- per-channel reductions ---------------------------------------------------------------------
// Statistics and the backward both reduce to two float64 sums per channel. A summand says how to
// add one NC(D)HW run of a channel, or rows of a channels-last tensor for every channel; the
// templates below own the blocking, the parallelism and the block-order merge for both.

// Channels-last rows [r0, r1), channels [c0, c1) (c0 a multiple of 16): tile(c, q0, q1, width) for
// each tile of kWideTileChannels (AVX-512 build), 16 or 8 channels over chunks of at most
// kRowsPerTile rows (AVX2 builds, non-double input). Returns the first channel it did not cover,
// which the caller finishes with scalar code. Which tile a channel falls in depends on C alone,
// never on [c0, c1) (channel_chunk cuts chunks in whole wide tiles).
template <typename scalar_t, int64_t kStreams, typename Tile>
inline int64_t for_each_tile8(int64_t C, int64_t c0, int64_t c1, int64_t r0, int64_t r1, Tile&& tile) {
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    // Rows per chunk: as many as keep at most 8 lines per L1 set in flight over all tensors
    // read. Lines 4 KiB apart share a set, so rows C * sizeof apart alias every `period` rows
    // (C = 1024 floats: every row; C = 64 floats: every 16th).
    const int64_t row_bytes = C * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t period = 4096 / std::gcd<int64_t>(row_bytes, 4096);
    int64_t rows = std::clamp<int64_t>(8 * period / kStreams, 1, kRowsPerTile);
#ifdef BN_EXT_AVX512BF16
    // The wide tiles use every line of a row they touch at once, so no line waits in L1 for a
    // later tile and the set limit does not bind: as many rows as the float32 sums take (the
    // 16-channel tiles of the last channels, if any, share this row count).
    if (C >= kWideTileChannels) rows = kRowsPerTile;
#endif
    const int64_t tiled = std::max(c0, std::min(c1, C / 8 * 8));
#ifdef BN_EXT_AVX512BF16
    const int64_t wide = std::max(c0, std::min(c1, C / 16 * 16));  // 16-channel tiles, then at most one of 8
#else
    const int64_t wide = c0;
#endif
    for (int64_t q0 = r0; q0 < r1; q0 += rows) {
      const int64_t q1 = std::min(r1, q0 + rows);
      int64_t c = c0;
#ifdef BN_EXT_AVX512BF16
      for (; c + kWideTileChannels <= wide; c += kWideTileChannels) tile(c, q0, q1, kWideTileChannels);
#endif
      for (; c < wide; c += 16) tile(c, q0, q1, 16);
      for (int64_t c = wide; c < tiled; c += 8) tile(c, q0, q1, 8);
    }
    return tiled;
  }
#endif
  return c0;
}

// (sum(x - shift), sum((x - shift)^2)) per channel.
template <typename scalar_t>
struct ShiftedSquares {
  using scalar_type = scalar_t;
  const scalar_t* x;
  const double* shift;
  int64_t C;
  bool streamed = false;  // channels-last rows one after another (shifted_sums_rows_streamed), not in tiles
  void run(int64_t c, int64_t off, int64_t len, LaneSums& acc) const { shifted_sums_run(x + off, len, shift[c], acc); }
  void finish(int64_t c, const LaneSums& acc, double* a, double* b) const { finish_shifted(acc, shift[c], a, b); }
  const double* per_channel() const { return shift; }
  ShiftedSquares widened(int64_t width, const double* tiled) const { return {x, tiled, width, streamed}; }
  // Channels [c0, returned) of rows [r0, r1) streamed row by row (SIMD builds, non-double input).
  int64_t stream_rows(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* a, double* b) const {
#ifdef BN_EXT_AVX2_INTRINSICS
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const int64_t n = std::max(c0, std::min(c1, C / 8 * 8));
      shifted_sums_rows_streamed(x, C, c0, n, r0, r1, shift, a, b);
      return n;
    }
#endif
    return c0;
  }
  // Rows [r0, r1) of channels [c0, c1), added into a and b.
  void rows(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* __restrict a, double* __restrict b) const {
    const int64_t c_begin = streamed ? stream_rows(r0, r1, c0, c1, a, b) : tile_rows(r0, r1, c0, c1, a, b);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict row = x + r * C;
      for (int64_t c = c_begin; c < c1; ++c) {
        const double d = static_cast<double>(row[c]) - shift[c];
        a[c] += d;
        b[c] += d * d;
      }
    }
  }
  // Channels [c0, returned) of rows [r0, r1) in register tiles of kWideTileChannels (AVX-512), 16 or 8 channels.
  int64_t tile_rows(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* a, double* b) const {
    return for_each_tile8<scalar_t, 1>(C, c0, c1, r0, r1, [&](int64_t c, int64_t q0, int64_t q1, int width) {
#ifdef BN_EXT_AVX2_INTRINSICS
      if constexpr (!std::is_same_v<scalar_t, double>) {
#ifdef BN_EXT_AVX512BF16
        if (width == kWideTileChannels) return shifted_sums_tile128(x, C, c, q0, q1, shift, a, b);
        if (width == 16) return shifted_sums_tile16(x, C, c, q0, q1, shift, a, b);
#endif
        shifted_sums_tile8_avx2(x, C, c, q0, q1, shift, a, b);
      }
#endif
    });
  }
};

// (sum(dy), sum(dy * (x - mean))) per channel.
template <typename scalar_t>
struct GradSums {
  using scalar_type = scalar_t;
  const scalar_t* dy;
  const scalar_t* x;
  const double* mean;
  int64_t C;
  bool streamed = false;  // channels-last rows one after another (grad_sums_rows_streamed), not in tiles
  void run(int64_t c, int64_t off, int64_t len, LaneSums& acc) const {
    grad_sums_run(dy + off, x + off, len, mean[c], acc);
  }
  void finish(int64_t c, const LaneSums& acc, double* a, double* b) const { finish_grad(acc, mean[c], a, b); }
  const double* per_channel() const { return mean; }
  GradSums widened(int64_t width, const double* tiled) const { return {dy, x, tiled, width, streamed}; }
  // Channels [c0, returned) of rows [r0, r1) streamed row by row (SIMD builds, non-double input).
  int64_t stream_rows(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* a, double* b) const {
#ifdef BN_EXT_AVX2_INTRINSICS
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const int64_t n = std::max(c0, std::min(c1, C / 8 * 8));
      grad_sums_rows_streamed(dy, x, C, c0, n, r0, r1, mean, a, b);
      return n;
    }
#endif
    return c0;
  }
  // Rows [r0, r1) of channels [c0, c1), added into a and b.
  void rows(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* __restrict a, double* __restrict b) const {
    const int64_t c_begin = streamed ? stream_rows(r0, r1, c0, c1, a, b) : tile_rows(r0, r1, c0, c1, a, b);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict dyr = dy + r * C;
      const scalar_t* __restrict xr = x + r * C;
      for (int64_t c = c_begin; c < c1; ++c) {
        const double gv = static_cast<double>(dyr[c]);
        a[c] += gv;
        b[c] += gv * (static_cast<double>(xr[c]) - mean[c]);
      }
    }
  }
  // Channels [c0, returned) of rows [r0, r1) in register tiles of kWideTileChannels (AVX-512), 16 or 8 channels.
  int64_t tile_rows(int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* a, double* b) const {
    return for_each_tile8<scalar_t, 2>(C, c0, c1, r0, r1, [&](int64_t c, int64_t q0, int64_t q1, int width) {
#ifdef BN_EXT_AVX2_INTRINSICS
      if constexpr (!std::is_same_v<scalar_t, double>) {
#ifdef BN_EXT_AVX512BF16
        if (width == kWideTileChannels) return grad_sums_tile128(dy, x, C, c, q0, q1, mean, a, b);
        if (width == 16) return grad_sums_tile16(dy, x, C, c, q0, q1, mean, a, b);
#endif
        grad_sums_tile8_avx2(dy, x, C, c, q0, q1, mean, a, b);
      }
#endif
    });
  }
};

// Whether the AVX-512 build sums channels-last rows of C channels in memory order, in wide tiles
// (kWideTileChannels) of whole rows: C = 128, or 64 summed two rows at a time as one row of 128
// (channel_sums). 16-channel tiles over rows of 64 channels read every fourth line (float32),
// rows of 32 every other one; from memory (6.4-19 MB, cache flushed) the statistics of 64 and
// 128 channels took 1.4-1.6x the time of a sum of x in order, 1.8-2.9x in 16-channel tiles or
// streamed; 32 channels ran about the same either way, so they keep the 16-channel tiles.
template <typename scalar_t>
constexpr bool in_order_tiles(int64_t C) {
#ifdef BN_EXT_AVX512BF16
  return !std::is_same_v<scalar_t, double> && C >= 64 && kWideTileChannels % C == 0;
#else
  return false;
#endif
}

// Channels-last reductions: channels per task. With few row blocks for the threads (many channels,
// few rows: 2048 channels of 7x7) the channels split too, into chunks of whole 16-channel tiles
// and of at least kMinChunkChannels, so that the threads get even shares. Results do not depend on
// it: a channel's sums over a block are the same whatever chunk it falls in.
int64_t channel_chunk(const Geometry& g, int64_t blocks) {
  const int64_t split = std::min(ceil_div(kMinReductionTasksPerThread * at::get_num_threads(), blocks),
                                 g.C / kMinChunkChannels);
  // whole wide tiles where there are any, so that which tile a channel falls in (and so its sums'
  // float32 rounding) depends on C alone
  const int64_t unit = g.C >= kWideTileChannels ? kWideTileChannels : 16;
  return split <= 1 ? g.C : ceil_div(ceil_div(g.C, split), unit) * unit;
}

// NC(D)HW: the sums of block k of channel c (its flat elements [k * kBlockElems, ...)), each run
// added by run(offset, len, acc) (sum.run, or a loop that does more beside it).
template <typename Summand, typename Run>
inline void block_sums(const Summand& sum, const Geometry& g, int64_t c, int64_t k, double* a, double* b,
                       Run&& run) {
  const int64_t start = k * kBlockElems;
  LaneSums acc;
  for_each_run_of_channel(g, c, start, std::min(g.rows(), start + kBlockElems),
                          [&](int64_t off, int64_t len) { run(off, len, acc); });
  sum.finish(c, acc, a, b);
}
template <typename Summand>
inline void block_sums(const Summand& sum, const Geometry& g, int64_t c, int64_t k, double* a, double* b) {
  block_sums(sum, g, c, k, a, b, [&](int64_t off, int64_t len, LaneSums& acc) { sum.run(c, off, len, acc); });
}

// NC(D)HW: channel c's sums, its blocks added in order (what channel_sums gives for c).
template <typename Summand, typename Run>
inline void channel_total(const Summand& sum, const Geometry& g, int64_t c, double* a, double* b, Run&& run) {
  const int64_t blocks = ceil_div(g.rows(), kBlockElems);
  double ta = 0, tb = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    double pa, pb;
    block_sums(sum, g, c, k, &pa, &pb, run);
    ta += pa;
    tb += pb;
  }
  *a = ta;
  *b = tb;
}
template <typename Summand>
inline void channel_total(const Summand& sum, const Geometry& g, int64_t c, double* a, double* b) {
  channel_total(sum, g, c, a, b, [&](int64_t off, int64_t len, LaneSums& acc) { sum.run(c, off, len, acc); });
}

// Every channel's sums: blocks in parallel, then added in block order.
template <typename Summand>
void channel_sums(const Summand& sum, const Geometry& g, std::vector<double>& a, std::vector<double>& b) {
  std::fill(a.begin(), a.end(), 0.0);
  std::fill(b.begin(), b.end(), 0.0);
  if (g.layout == Layout::kNCS) {
    const int64_t blocks = ceil_div(g.rows(), kBlockElems);
    const int64_t tasks = g.C * blocks;
    // pieces of whole blocks and about kElemGrain elements: a 7x7 channel's block is 196 values
    const int64_t per_piece = std::max<int64_t>(1, kElemGrain / std::min(g.rows(), kBlockElems));
    std::vector<double> part(tasks * 2);
    parallel_pieces(ceil_div(tasks, per_piece), Sweep::kForward, [&](int64_t p) {
      for (int64_t task = p * per_piece; task < std::min(tasks, (p + 1) * per_piece); ++task)
        block_sums(sum, g, task / blocks, task % blocks, &part[2 * task], &part[2 * task + 1]);
    });
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t k = 0; k < blocks; ++k) {
        a[c] += part[2 * (c * blocks + k)];
        b[c] += part[2 * (c * blocks + k) + 1];
      }
    }
    return;
  }
  // Channels-last: a block is a run of rows, accumulated for every channel at once.
  // Rows of a few channels are too short for the 8-channel tiles: sum k rows at a time as one row
  // of k * C positions (per-channel values tiled), then fold position p into channel p % C. Rows
  // of 64 channels go two at a time where that makes one wide tile per row (in_order_tiles).
  int64_t rows_at_once = g.C % 8 != 0 && g.C < kWideRowChannels ? 8 : 1;
  if (in_order_tiles<typename Summand::scalar_type>(g.C) && g.C < kWideTileChannels)
    rows_at_once = kWideTileChannels / g.C;
  if (rows_at_once > 1 && g.rows() >= rows_at_once) {
    const int64_t width = rows_at_once * g.C;
    std::vector<double> tiled(width);
    for (int64_t i = 0; i < width; ++i) tiled[i] = sum.per_channel()[i % g.C];
    Geometry wide = g;
    wide.N = g.rows() / rows_at_once;
    wide.S = 1;
    wide.C = width;
    std::vector<double> wa(width), wb(width);
    channel_sums(sum.widened(width, tiled.data()), wide, wa, wb);
    for (int64_t i = 0; i < width; ++i) {
      a[i % g.C] += wa[i];
      b[i % g.C] += wb[i];
    }
    std::vector<double> ta(g.C, 0.0), tb(g.C, 0.0);  // the last rows, fewer than rows_at_once
    sum.rows(wide.N * rows_at_once, g.rows(), 0, g.C, ta.data(), tb.data());
    for (int64_t c = 0; c < g.C; ++c) {
      a[c] += ta[c];
      b[c] += tb[c];
    }
    return;
  }
  const RowBlocks rb = row_blocks(g);
  const int64_t chunk = channel_chunk(g, rb.blocks);
  const int64_t chunks = ceil_div(g.C, chunk);
  std::vector<double> part(rb.blocks * g.C * 2, 0.0);
  parallel_pieces(rb.blocks * chunks, Sweep::kForward, [&](int64_t task) {
    const int64_t k = task / chunks, c0 = task % chunks * chunk;
    double* pa = part.data() + k * g.C * 2;
    sum.rows(k * rb.rows_per_block, std::min(g.rows(), (k + 1) * rb.rows_per_block), c0, std::min(g.C, c0 + chunk),
             pa, pa + g.C);
  });
  for (int64_t k = 0; k < rb.blocks; ++k) {  // block order, contiguous reads
    const double* pk = part.data() + k * g.C * 2;
    for (int64_t c = 0; c < g.C; ++c) {
      a[c] += pk[c];
      b[c] += pk[g.C + c];
    }
  }
}

// Whether a channels-last reduction reading `tensors` tensors streams its rows (rows_streamed)
// rather than tiling them: when it reads more than the L2s hold, and rows are wide enough for the
// per-row loop to pay. The tiles read a few hundred bytes of each row at a time, which from memory
// runs well below the speed of reading the same bytes in order; the streamed rows read each
// tensor as four in-order streams. Below the threshold the tiles win, and tiles that read in
// order (in_order_tiles) never stream (docs/design.md, "Measurements").
template <typename scalar_t>
bool streamed_rows(const Geometry& g, int64_t tensors) {
  return tensors_bytes(g, tensors, sizeof(scalar_t)) > kStreamedReadBytes && g.C >= kStreamedMinChannels &&
         !in_order_tiles<scalar_t>(g.C);
}

template <typename scalar_t>
void stats_kernel(const scalar_t* x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  const std::vector<double> shift = channel_shifts(x, g);
  std::vector<double> s1(g.C), s2(g.C);
  const bool streamed = g.layout == Layout::kNSC && streamed_rows<scalar_t>(g, 1);
  channel_sums(ShiftedSquares<scalar_t>{x, shift.data(), g.C, streamed}, g, s1, s2);
  const double count = static_cast<double>(g.rows()), inv_count = 1.0 / count;
  for (int64_t c = 0; c < g.C; ++c)
    finish_channel(shift[c], s1[c], s2[c], count, inv_count, &mean[c], &var[c]);
}

// ---- elementwise forward -----------------------------------------------------------------------

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
      : mean_hi(mean.size()), mean_lo(mean.size()), scale(mean.size()), shift(mean.size()) {
    const std::vector<double> invstd = invstd_vector(var, eps);
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
    normalize_run_avx2(x, y, len, hi, lo, sc, sh, stream);
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
    parallel_runs(g, [&](int64_t c, int64_t off, int64_t len) {
      normalize_run(x + off, y + off, len, a.mean_hi[c], a.mean_lo[c], a.scale[c], a.shift[c], stream);
    }, order);
    return;
  }
  const opmath_t* __restrict hi = a.mean_hi.data();
  const opmath_t* __restrict lo = a.mean_lo.data();
  const opmath_t* __restrict sc = a.scale.data();
  const opmath_t* __restrict sh = a.shift.data();
#ifdef BN_EXT_AVX2_INTRINSICS
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const bool folded = a.folded();
    parallel_row_spans<opmath_t, 4>(g, {hi, lo, sc, sh}, [&](int64_t off, int64_t width, const auto& k) {
      normalize_rows_avx2(x + off, y + off, width, k[0], k[1], k[2], k[3], folded, stream);
    }, order);
    return;
  }
#endif
  parallel_rows(g, [&](int64_t off) {
    const scalar_t* __restrict xs = x + off;
    scalar_t* __restrict ys = y + off;
    for (int64_t c = 0; c < g.C; ++c)
      ys[c] = static_cast<scalar_t>(((static_cast<opmath_t>(xs[c]) - hi[c]) - lo[c]) * sc[c] + sh[c]);
  }, order);
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
// half kChannelGroupBytes of the tensors read), pipelined in the AVX-512 build: each thread sums a
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
  parallel_pieces_with<PendingChannel>(g.C, Sweep::kForward, [&](PendingChannel& prev, int64_t c) {
    body(prev.c, c);
    prev.c = c;
  }, [&](PendingChannel& prev) {
    if (prev.c >= 0) alone(prev.c);
    store_fence();
  });
}

#ifdef BN_EXT_AVX512BF16
// The training forward, pipelined (shifted_sums_normalize_run).
template <typename scalar_t>
void train_pipelined(const scalar_t* x, scalar_t* y, const Geometry& g, const std::vector<double>& weight,
                     const std::vector<double>& bias, double eps, std::vector<double>& mean,
                     std::vector<double>& var, bool stream) {
  std::vector<double> shift(g.C);
  std::vector<ForwardCoeffs<float>> k(g.C);
  const ShiftedSquares<scalar_t> sum{x, shift.data(), g.C};
  const double count = static_cast<double>(g.rows()), inv_count = 1.0 / count;
  pipelined_channels(g, [&](int64_t prev, int64_t c) {
    shift[c] = channel_shift(x, g, c);
    double s1, s2;
    if (prev < 0) {
      channel_total(sum, g, c, &s1, &s2);
    } else {
      const int64_t back = (prev - c) * g.S;  // from channel c's element to prev's at the same (n, s)
      const ForwardCoeffs<float>& kp = k[prev];
      channel_total(sum, g, c, &s1, &s2, [&](int64_t off, int64_t len, LaneSums& acc) {
        shifted_sums_normalize_run(x + off, len, shift[c], acc, x + off + back, y + off + back, kp.mean_hi,
                                   kp.mean_lo, kp.scale, kp.shift, stream);
      });
    }
    finish_channel(shift[c], s1, s2, count, inv_count, &mean[c], &var[c]);
    k[c] = forward_coeffs<float>(mean[c], var[c], weight[c], bias[c], eps);
  }, [&](int64_t c) {
    for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) {
      normalize_run(x + off, y + off, len, k[c].mean_hi, k[c].mean_lo, k[c].scale, k[c].shift, stream);
    });
  });
}
#endif

// Fused training forward, NC(D)HW, channels in groups (channel_group): statistics, then the
// elementwise passes while the data is still in cache.
template <typename scalar_t>
void train_per_channel(const scalar_t* x, scalar_t* y, const Geometry& g, const std::vector<double>& weight,
                       const std::vector<double>& bias, double eps, std::vector<double>& mean,
                       std::vector<double>& var, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t group = channel_group(g, sizeof(scalar_t));
#ifdef BN_EXT_AVX512BF16
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (group == 1) {
      train_pipelined(x, y, g, weight, bias, eps, mean, var, stream);
      return;
    }
  }
#endif
  std::vector<double> shift(g.C);  // each task sets its channels' shifts before it sums them
  const ShiftedSquares<scalar_t> sum{x, shift.data(), g.C};
  const double count = static_cast<double>(g.rows()), inv_count = 1.0 / count;
  parallel_pieces(ceil_div(g.C, group), Sweep::kForward, [&](int64_t p) {
    std::array<ForwardCoeffs<opmath_t>, kMaxChannelGroup> k;
    const int64_t c0 = p * group, c1 = std::min(g.C, c0 + group);
    for (int64_t c = c0; c < c1; ++c) {
      shift[c] = channel_shift(x, g, c);
      double s1, s2;
      channel_total(sum, g, c, &s1, &s2);
      finish_channel(shift[c], s1, s2, count, inv_count, &mean[c], &var[c]);
    }
    for (int64_t c = c0; c < c1; ++c) k[c - c0] = forward_coeffs<opmath_t>(mean[c], var[c], weight[c], bias[c], eps);
    for (int64_t c = c0; c < c1; ++c) {
      const auto& kc = k[c - c0];
      for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) {
        normalize_run(x + off, y + off, len, kc.mean_hi, kc.mean_lo, kc.scale, kc.shift, stream);
      });
    }
  }, store_fence);
}

// ---- backward ----------------------------------------------------------------------------------

template <typename scalar_t>
void grad_sums_kernel(const scalar_t* dy, const scalar_t* x, const Geometry& g, const std::vector<double>& mean,
                      std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  const bool streamed = g.layout == Layout::kNSC && streamed_rows<scalar_t>(g, 2);
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
    grad_input_run_avx2<scalar_t, kTraining>(dy, x, dx, len, k.k_dy, k.k_x, k.k_0, k.mean_hi, k.mean_lo, stream);
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
    parallel_runs(g, [&](int64_t c, int64_t off, int64_t len) {
      const BackwardCoeffs<opmath_t> kc{k.k_dy[c], k.k_x[c], k.k_0[c], k.mean_hi[c], k.mean_lo[c]};
      grad_input_run<scalar_t, opmath_t, kTraining>(dy + off, x + off, dx + off, len, kc, stream);
    }, order);
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
    parallel_row_spans<opmath_t, 5>(g, {kd, kx, k0, hi, lo}, [&](int64_t off, int64_t width, const auto& c) {
      grad_input_rows_avx2<scalar_t, kTraining>(dy + off, x + off, dx + off, width, c[0], c[1], c[2], c[3], c[4], folded,
                                                stream);
    }, order);
    return;
  }
#endif
  parallel_rows(g, [&](int64_t off) {
    const scalar_t* __restrict dys = dy + off;
    const scalar_t* __restrict xs = x + off;
    scalar_t* __restrict dxs = dx + off;
    for (int64_t c = 0; c < g.C; ++c) {
      opmath_t v = kd[c] * static_cast<opmath_t>(dys[c]);
      if (kTraining) v += kx[c] * ((static_cast<opmath_t>(xs[c]) - hi[c]) - lo[c]) + k0[c];
      dxs[c] = static_cast<scalar_t>(v);
    }
  }, order);
}

#ifdef BN_EXT_AVX512BF16
// The training backward, pipelined (grad_sums_grad_input_run).
template <typename scalar_t>
void backward_pipelined(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                        const std::vector<double>& mean, const std::vector<double>& var,
                        const std::vector<double>& weight, double eps, std::vector<double>& sum_dy,
                        std::vector<double>& sum_dy_xmu, bool stream) {
  const GradSums<scalar_t> sum{dy, x, mean.data(), g.C};
  std::vector<BackwardCoeffs<float>> k(g.C);
  const double inv_count = 1.0 / static_cast<double>(g.rows());
  pipelined_channels(g, [&](int64_t prev, int64_t c) {
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
    k[c] = backward_coeffs_from_invstd<float>(mean[c], invstd_from_var(var[c], eps), weight[c], sum_dy[c],
                                              sum_dy_xmu[c], inv_count, /*training=*/true);
  }, [&](int64_t c) {
    for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) {
      grad_input_run<scalar_t, float, true>(dy + off, x + off, dx + off, len, k[c], stream);
    });
  });
}
#endif

// Fused training backward, NC(D)HW, channels in groups (channel_group): the sums, then dx.
template <typename scalar_t>
void backward_per_channel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                          const std::vector<double>& mean, const std::vector<double>& var,
                          const std::vector<double>& weight, double eps, std::vector<double>& sum_dy,
                          std::vector<double>& sum_dy_xmu, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t group = channel_group(g, 2 * sizeof(scalar_t));
#ifdef BN_EXT_AVX512BF16
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (group == 1) {
      backward_pipelined(dy, x, dx, g, mean, var, weight, eps, sum_dy, sum_dy_xmu, stream);
      return;
    }
  }
#endif
  const GradSums<scalar_t> sum{dy, x, mean.data(), g.C};
  const double inv_count = 1.0 / static_cast<double>(g.rows());  // what backward_coeffs takes per channel
  parallel_pieces(ceil_div(g.C, group), Sweep::kForward, [&](int64_t p) {
    std::array<BackwardCoeffs<opmath_t>, kMaxChannelGroup> k;
    const int64_t c0 = p * group, c1 = std::min(g.C, c0 + group);
    for (int64_t c = c0; c < c1; ++c) channel_total(sum, g, c, &sum_dy[c], &sum_dy_xmu[c]);
    for (int64_t c = c0; c < c1; ++c)
      k[c - c0] = backward_coeffs_from_invstd<opmath_t>(mean[c], invstd_from_var(var[c], eps), weight[c], sum_dy[c],
                                                        sum_dy_xmu[c], inv_count, /*training=*/true);
    for (int64_t c = c0; c < c1; ++c) {
      const auto& kc = k[c - c0];
      for_each_run_of_channel(g, c, 0, g.rows(), [&](int64_t off, int64_t len) {
        grad_input_run<scalar_t, opmath_t, true>(dy + off, x + off, dx + off, len, kc, stream);
      });
    }
  }, store_fence);
}

// The fused per-channel path pays off when channels keep every thread busy.
bool per_channel(const Geometry& g) {
  return g.layout == Layout::kNCS && g.C >= kPerChannelMinTasksPerThread * at::get_num_threads();
}

}  // namespace

// ---- entry points (one set per instruction set) ------------------------------------------------

void stats(const Tensor& x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_stats",
                                  [&] { stats_kernel(x.const_data_ptr<scalar_t>(), g, mean, var); });
}

void elemt(const Tensor& x, const Tensor& y, const Geometry& g, const std::vector<double>& mean,
           const std::vector<double>& var, const std::vector<double>& weight, const std::vector<double>& bias,
           double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_elemt", [&] {
    const Affine<at::opmath_type<scalar_t>> a(mean, var, weight, bias, eps);
    const bool stream = stream_output(g, 2, sizeof(scalar_t));  // x, y
    elemt_kernel(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, a, Sweep::kForward, stream);
  });
}

void train(const Tensor& x, const Tensor& y, const Geometry& g, const std::vector<double>& weight,
           const std::vector<double>& bias, double eps, std::vector<double>& mean, std::vector<double>& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_train", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool stream = stream_output(g, 2, sizeof(scalar_t));  // x, y
    if (per_channel(g)) {
      train_per_channel(xp, y.mutable_data_ptr<scalar_t>(), g, weight, bias, eps, mean, var, stream);
      return;
    }
    stats_kernel(xp, g, mean, var);
    const Affine<at::opmath_type<scalar_t>> a(mean, var, weight, bias, eps);
    elemt_kernel(xp, y.mutable_data_ptr<scalar_t>(), g, a, Sweep::kBackward, stream);
  });
}

std::vector<double> invstds(const std::vector<double>& var, double eps) { return invstd_vector(var, eps); }

void grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g, const std::vector<double>& mean,
               std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_reduce", [&] {
    grad_sums_kernel(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g, mean, sum_dy, sum_dy_xmu);
  });
}

void grad_input(const Tensor& dy, const Tensor& x, const Tensor& dx, const Geometry& g, bool training,
                const std::vector<double>& mean, const std::vector<double>& var, const std::vector<double>& weight,
                const std::vector<double>& sum_dy, const std::vector<double>& sum_dy_xmu, double eps, int64_t count) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    GradCoeffs<opmath_t> k(g.C);
    const std::vector<double> invstd = invstd_vector(var, eps);
    const double inv_count = 1.0 / static_cast<double>(count);
    for (int64_t c = 0; c < g.C; ++c)
      k.set(c, backward_coeffs_from_invstd<opmath_t>(mean[c], invstd[c], weight[c], sum_dy[c], sum_dy_xmu[c],
                                                     inv_count, training));
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const bool stream = stream_output(g, training ? 3 : 2, sizeof(scalar_t));  // dy, x (in training), dx
    // In training the gradient sums have just read dy and x (backward_train, or the
    // backward_reduce op before backward_elemt): walk back over what they left in cache.
    if (training) {
      grad_input_kernel<scalar_t, true>(dyp, xp, dxp, g, k, Sweep::kBackward, stream);
    } else {
      grad_input_kernel<scalar_t, false>(dyp, xp, dxp, g, k, Sweep::kForward, stream);
    }
  });
}

void backward_train(const Tensor& dy, const Tensor& x, const Tensor& dx, const Geometry& g,
                    const std::vector<double>& mean, const std::vector<double>& var, const std::vector<double>& weight,
                    double eps, std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_train", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (per_channel(g)) {
      const bool stream = stream_output(g, 3, sizeof(scalar_t));  // dy, x, dx
      backward_per_channel(dyp, xp, dx.mutable_data_ptr<scalar_t>(), g, mean, var, weight, eps, sum_dy, sum_dy_xmu,
                           stream);
      return;
    }
    grad_sums_kernel(dyp, xp, g, mean, sum_dy, sum_dy_xmu);
    grad_input(dy, x, dx, g, /*training=*/true, mean, var, weight, sum_dy, sum_dy_xmu, eps, g.rows());
  });
}

}  // namespace BN_EXT_CPU_ISA
}  // namespace cpu
}  // namespace bn_ext
