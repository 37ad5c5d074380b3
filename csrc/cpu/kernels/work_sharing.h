// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// Work sharing between threads: parallel_pieces and the loops over runs, rows and spans
// built on it.

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

// Values per piece of an NC(D)HW elementwise pass: about kElemGrain values' worth of work, each
// run counted with its fixed cost (kRunCostValues).
inline int64_t run_grain(const Geometry& g) { return std::max<int64_t>(1, kElemGrain * g.S / (g.S + kRunCostValues)); }

// fn(c, s0, offset, len) for each piece (run_grain) of an NC(D)HW tensor, in parallel: the
// piece's `len` elements from flat `offset`, which lies s0 values into a plane of
// channel c (the planes after it: channels c + 1, ..., wrapping to 0 at the next sample).
template <typename Fn>
void parallel_spans(const Geometry& g, Fn&& fn, Sweep order = Sweep::kForward) {
  const int64_t numel = g.numel(), grain = run_grain(g);
  parallel_pieces(
      ceil_div(numel, grain), order,
      [&](int64_t p) {
        const int64_t lo = p * grain, hi = std::min(numel, lo + grain);
        const int64_t plane = lo / g.S;
        fn(plane % g.C, lo - plane * g.S, lo, hi - lo);
      },
      store_fence);
}

// fn(c, offset, len) over every element, NC(D)HW layout, in parallel: each piece's runs in turn.
template <typename Fn>
void parallel_runs(const Geometry& g, Fn&& fn, Sweep order = Sweep::kForward) {
  parallel_spans(
      g,
      [&](int64_t c, int64_t s0, int64_t off, int64_t len) {
        for (int64_t i = off, end = off + len; i < end; s0 = 0) {
          const int64_t run_end = std::min(end, i - s0 + g.S);
          fn(c, i, run_end - i);
          i = run_end;
          if (++c == g.C) c = 0;
        }
      },
      order);
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

// `a`'s first n values in the order of SplitBF16's vectors: each whole block of 16 as its eight
// even positions, then its eight odd ones (the last n % 16 values are left out).
template <typename T>
std::vector<T> split_even_odd(const T* a, int64_t n) {
  std::vector<T> s(n / 16 * 16);
  for (int64_t b = 0; b + 16 <= n; b += 16) {
    for (int64_t j = 0; j < 8; ++j) {
      s[b + j] = a[b + 2 * j];
      s[b + 8 + j] = a[b + 2 * j + 1];
    }
  }
  return s;
}

// fn(offset, width, arrays) over a channels-last tensor, in parallel: each span of rows_per_span(C)
// rows (width = rows * C values) in memory order, with the per-channel arrays tiled to the span's
// width; then the last rows (fewer than a span) one by one with the arrays as given. One span per
// call, in memory order: four spans a call (rows `width` apart), sharing each vector's
// coefficient loads, read out of order and ran slower (docs/design.md, "Measurements").
// kSplit: `arrays` then holds 2 K pointers, the K arrays and after them each in
// split_even_odd's order (the blocks within the last rows' C values are the same as the span's).
template <typename T, size_t K, bool kSplit = false, typename Fn>
void parallel_row_spans(const Geometry& g, const std::array<const T*, K>& arrays, Fn&& fn,
                        Sweep order = Sweep::kForward) {
  constexpr size_t N = kSplit ? 2 * K : K;
  const int64_t rows = rows_per_span(g.C);
  const int64_t width = rows * g.C;
  std::array<std::vector<T>, K> tiled;
  std::array<std::vector<T>, kSplit ? K : 0> split;
  std::array<const T*, N> spans_arrays{}, rows_arrays{};
  for (size_t k = 0; k < K; ++k) {
    spans_arrays[k] = rows_arrays[k] = arrays[k];
    if (rows > 1) {
      tiled[k].resize(width);
      for (int64_t r = 0; r < rows; ++r) std::copy(arrays[k], arrays[k] + g.C, tiled[k].begin() + r * g.C);
      spans_arrays[k] = tiled[k].data();
    }
    if constexpr (kSplit) {
      split[k] = split_even_odd(spans_arrays[k], width);
      spans_arrays[K + k] = rows_arrays[K + k] = split[k].data();
    }
  }
  const int64_t spans = g.rows() / rows;
  const int64_t grain = std::max<int64_t>(1, kElemGrain / width);
  parallel_pieces(
      ceil_div(spans, grain), order,
      [&](int64_t p) {
        const int64_t hi = std::min(spans, (p + 1) * grain);
        for (int64_t r = p * grain; r < hi; ++r) fn(r * width, width, spans_arrays);
      },
      store_fence);
  for (int64_t off = spans * width; off < g.numel(); off += g.C) fn(off, g.C, rows_arrays);
}

// parallel_row_spans for spans of scalar_t values, with the arrays also in split_even_odd's order
// where its loops take them: the AVX2 build's bfloat16 (SplitBF16).
template <typename scalar_t, typename T, size_t K, typename Fn>
void parallel_row_spans_of(const Geometry& g, const std::array<const T*, K>& arrays, Fn&& fn, Sweep order) {
#if defined(BN_EXT_AVX2_INTRINSICS) && !defined(BN_EXT_AVX512BF16)
  constexpr bool kSplit = std::is_same_v<scalar_t, c10::BFloat16>;
#else
  constexpr bool kSplit = false;
#endif
  parallel_row_spans<T, K, kSplit>(g, arrays, std::forward<Fn>(fn), order);
}
