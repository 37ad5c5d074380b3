// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// The reductions over a whole tensor: blocks, their parallel sweep and block-order merge,
// statistics and gradient sums in either layout.

// Statistics and the backward both reduce to two float64 sums per channel. A summand says how to
// add one NC(D)HW run of a channel, or rows of a channels-last tensor for every channel; the
// templates below own the blocking, the parallelism and the block-order merge for both.

// Channels-last rows [r0, r1), channels [c0, c1) (c0 a multiple of 16): tile(c, q0, q1, width) for
// each tile of kWideTileChannels and 16 (AVX-512 build) or kWideTile8Channels (AVX2), then 8
// channels, over chunks of at most kRowsPerTile rows (SIMD builds, non-double input). Returns the
// first channel it did not cover, which the caller finishes with scalar code. Which tile a
// channel falls in depends on C alone, never on [c0, c1) (channel_chunk cuts chunks in whole wide
// tiles).
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
    // The wide tiles use every line of a row they touch at once, so no line waits in L1 for a
    // later tile and the set limit does not bind: as many rows as the float32 sums take (the
    // narrower tiles of the last channels, if any, share this row count).
    if (C >= kWideTileChannels) rows = kRowsPerTile;
    const int64_t tiled = std::max(c0, std::min(c1, C / 8 * 8));
#ifdef BN_EXT_AVX512BF16
    const int64_t wide = std::max(c0, std::min(c1, C / 16 * 16));  // 16-channel tiles, then at most one of 8
#else
    // 32-channel tiles over rows of kWideTileChannels and more (chunks are whole 128s there)
    const int64_t wide =
        C >= kWideTileChannels ? std::max(c0, std::min(c1, C / kWideTile8Channels * kWideTile8Channels)) : c0;
#endif
    for (int64_t q0 = r0; q0 < r1; q0 += rows) {
      const int64_t q1 = std::min(r1, q0 + rows);
      int64_t c = c0;
#ifdef BN_EXT_AVX512BF16
      for (; c + kWideTileChannels <= wide; c += kWideTileChannels) tile(c, q0, q1, kWideTileChannels);
      for (; c < wide; c += 16) tile(c, q0, q1, 16);
#else
      for (; c < wide; c += kWideTile8Channels) tile(c, q0, q1, kWideTile8Channels);
#endif
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
  using Lanes = LaneSums;                   // a block's accumulators (block_sums)
  static constexpr bool kWideTiles = true;  // has 128-channel tiles (in_order_tiles)
  const scalar_t* x;
  const double* shift;
  int64_t C;
  bool streamed = false;  // channels-last rows one after another (shifted_sums_rows_streamed), not in tiles
  void run(int64_t c, int64_t off, int64_t len, LaneSums& acc) const { shifted_sums_run(x + off, len, shift[c], acc); }
#ifdef BN_EXT_AVX512BF16
  // Channel c's runs from flat index start to end, planes of fewer than 16 values (short_runs_lanes).
  void short_runs(const Geometry& g, int64_t c, int64_t start, int64_t end, LaneSums& acc) const {
    const __m512 shf16 = _mm512_set1_ps(static_cast<float>(shift[c]));
    short_runs_lanes(g, c, start, end, acc, [&](int64_t off, int64_t len, __m512& ga, __m512& gb) {
      add_shifted16(x + off, len, shf16, ga, gb);
    });
  }
#endif
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
#else
        if (width == kWideTile8Channels) return shifted_sums_tile32(x, C, c, q0, q1, shift, a, b);
#endif
        shifted_sums_tile8_simd(x, C, c, q0, q1, shift, a, b);
      }
#endif
    });
  }
};

// (sum(dy), sum(dy * (x - mean))) per channel.
template <typename scalar_t>
struct GradSums {
  using scalar_type = scalar_t;
  using Lanes = LaneSums;
  static constexpr bool kWideTiles = true;
  const scalar_t* dy;
  const scalar_t* x;
  const double* mean;
  int64_t C;
  bool streamed = false;  // channels-last rows one after another (grad_sums_rows_streamed), not in tiles
  void run(int64_t c, int64_t off, int64_t len, LaneSums& acc) const {
    grad_sums_run(dy + off, x + off, len, mean[c], acc);
  }
#ifdef BN_EXT_AVX512BF16
  // As ShiftedSquares::short_runs.
  void short_runs(const Geometry& g, int64_t c, int64_t start, int64_t end, LaneSums& acc) const {
    const __m512 zm = _mm512_set1_ps(static_cast<float>(mean[c]));
    short_runs_lanes(g, c, start, end, acc, [&](int64_t off, int64_t len, __m512& ga, __m512& gb) {
      add_grad16(dy + off, x + off, len, zm, ga, gb);
    });
  }
#endif
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
#else
        if (width == kWideTile8Channels) return grad_sums_tile32(dy, x, C, c, q0, q1, mean, a, b);
#endif
        grad_sums_tile8_simd(dy, x, C, c, q0, q1, mean, a, b);
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
  const int64_t split =
      std::min(ceil_div(kMinReductionTasksPerThread * at::get_num_threads(), blocks), g.C / kMinChunkChannels);
  // whole wide tiles where there are any, so that which tile a channel falls in (and so its sums'
  // float32 rounding) depends on C alone
  const int64_t unit = g.C >= kWideTileChannels ? kWideTileChannels : 16;
  return split <= 1 ? g.C : ceil_div(ceil_div(g.C, split), unit) * unit;
}

// Channels-last partials (per block k: C sums of a, then C of b) added into a and b in block
// order. Where there are many, threads take channel ranges: one thread reading every other
// thread's partials from their caches took 7 us of a 51 us (4, 2048, 7, 7) statistics.
inline void add_block_partials(const double* part, int64_t blocks, int64_t C, double* a, double* b) {
  auto add = [&](int64_t c0, int64_t c1) {
    double* __restrict pa = a;
    double* __restrict pb = b;
    for (int64_t k = 0; k < blocks; ++k) {
      const double* __restrict pk = part + k * C * 2;
      for (int64_t c = c0; c < c1; ++c) {
        pa[c] += pk[c];
        pb[c] += pk[C + c];
      }
    }
  };
  if (blocks * C < kParallelMergeValues) {
    add(0, C);
    return;
  }
  parallel_pieces(ceil_div(C, kMergeChannels), Sweep::kForward,
                  [&](int64_t p) { add(p * kMergeChannels, std::min(C, (p + 1) * kMergeChannels)); });
}

// NC(D)HW: the sums of block k of channel c (its flat elements [k * kBlockElems, ...)), each run
// added by run(offset, len, acc) (sum.run, or a loop that does more beside it).
template <typename Summand, typename Run>
inline void block_sums(const Summand& sum, const Geometry& g, int64_t c, int64_t k, double* a, double* b, Run&& run) {
  const int64_t start = k * kBlockElems;
  typename Summand::Lanes acc;
  for_each_run_of_channel(g, c, start, std::min(g.rows(), start + kBlockElems),
                          [&](int64_t off, int64_t len) { run(off, len, acc); });
  sum.finish(c, acc, a, b);
}
// Planes under this many values take a block's runs in one loop where the summand has it
// (short_runs: each run one masked 16-wide vector, the AVX-512 build).
constexpr int64_t kShortRunValues = 16;
template <typename Summand>
inline void block_sums(const Summand& sum, const Geometry& g, int64_t c, int64_t k, double* a, double* b) {
  if constexpr (!std::is_same_v<typename Summand::scalar_type, double> &&
                requires(typename Summand::Lanes& acc) { sum.short_runs(g, c, 0, 0, acc); }) {
    if (g.S < kShortRunValues) {  // the same sums, all the block's runs in one loop
      const int64_t start = k * kBlockElems;
      typename Summand::Lanes acc;
      sum.short_runs(g, c, start, std::min(g.rows(), start + kBlockElems), acc);
      sum.finish(c, acc, a, b);
      return;
    }
  }
  block_sums(sum, g, c, k, a, b, [&](int64_t off, int64_t len, auto& acc) { sum.run(c, off, len, acc); });
}

// NC(D)HW: channel c's sums, its blocks (block(k, &a_k, &b_k)) added in order (what
// channel_sums gives for c).
template <typename Block>
inline void add_channel_blocks(const Geometry& g, double* a, double* b, Block&& block) {
  const int64_t blocks = ceil_div(g.rows(), kBlockElems);
  double ta = 0, tb = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    double pa, pb;
    block(k, &pa, &pb);
    ta += pa;
    tb += pb;
  }
  *a = ta;
  *b = tb;
}
template <typename Summand, typename Run>
inline void channel_total(const Summand& sum, const Geometry& g, int64_t c, double* a, double* b, Run&& run) {
  add_channel_blocks(g, a, b, [&](int64_t k, double* pa, double* pb) { block_sums(sum, g, c, k, pa, pb, run); });
}
template <typename Summand>
inline void channel_total(const Summand& sum, const Geometry& g, int64_t c, double* a, double* b) {
  add_channel_blocks(g, a, b, [&](int64_t k, double* pa, double* pb) { block_sums(sum, g, c, k, pa, pb); });
}

// Every channel's sums: blocks in parallel, then added in block order.
template <typename Summand>
void channel_sums(const Summand& sum, const Geometry& g, std::vector<double>& a, std::vector<double>& b) {
  std::fill(a.begin(), a.end(), 0.0);
  std::fill(b.begin(), b.end(), 0.0);
  if (g.layout == Layout::kNCS) {
    const int64_t blocks = ceil_div(g.rows(), kBlockElems);
    const int64_t tasks = g.C * blocks;
    // pieces of whole blocks and about kElemGrain elements' worth of work, each block counted
    // with its fixed cost: a 7x7 channel's block is 196 values, a 2x2 one's 16
    const int64_t per_piece = std::max<int64_t>(1, kElemGrain / (std::min(g.rows(), kBlockElems) + kRunCostValues));
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
  if (Summand::kWideTiles && in_order_tiles<typename Summand::scalar_type>(g.C) && g.C < kWideTileChannels)
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
  // each task zeroes its own partials (left uninitialised here), in its thread's cache
  const std::unique_ptr<double[]> part(new double[rb.blocks * g.C * 2]);
  parallel_pieces(rb.blocks * chunks, Sweep::kForward, [&](int64_t task) {
    const int64_t k = task / chunks, c0 = task % chunks * chunk, c1 = std::min(g.C, c0 + chunk);
    double* pa = part.get() + k * g.C * 2;
    std::fill(pa + c0, pa + c1, 0.0);
    std::fill(pa + g.C + c0, pa + g.C + c1, 0.0);
    sum.rows(k * rb.rows_per_block, std::min(g.rows(), (k + 1) * rb.rows_per_block), c0, c1, pa, pa + g.C);
  });
  add_block_partials(part.get(), rb.blocks, g.C, a.data(), b.data());
}

// Whether a channels-last reduction reading `tensors` tensors streams its rows (sweep_row_streams)
// rather than tiling them: when it reads more than the L2s hold, and rows are wide enough for the
// per-row loop to pay. The tiles read a few hundred bytes of each row at a time, which from memory
// runs well below the speed of reading the same bytes in order; the streamed rows read each
// tensor as four in-order streams. Below the threshold the tiles win, and tiles that read in
// order (in_order_tiles) never stream (docs/design.md, "Measurements").
template <typename scalar_t>
bool should_stream_rows(const Geometry& g, int64_t tensors) {
  if (g.C < kStreamedMinChannels || in_order_tiles<scalar_t>(g.C)) return false;
#if defined(BN_EXT_AVX2_INTRINSICS) && !defined(BN_EXT_AVX512BF16)
  // The AVX2 build's tiles take bfloat16 8 channels (16 bytes) of a row at a time, each widened
  // with a lane-crossing instruction; its streamed rows were the faster at every size measured,
  // from 0.2 MB (in L2) up.
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return true;
#endif
  return tensors_bytes(g, tensors, sizeof(scalar_t)) > kStreamedReadBytes;
}

// The per-channel paths pay off when channels keep every thread busy.
bool per_channel(const Geometry& g) {
  return g.layout == Layout::kNCS && g.C >= kPerChannelMinTasksPerThread * at::get_num_threads();
}

// Channel c's statistics on their own, NC(D)HW: its shift (into shift[c], where `sum` reads it),
// its sums in channel_sums' order (channel_total) and their finish over count values. The
// statistics op and the grouped training forward both take it, and with it the same bits.
template <typename scalar_t>
inline void channel_stats(const scalar_t* x, const Geometry& g, const ShiftedSquares<scalar_t>& sum, double* shift,
                          int64_t c, double count, double inv_count, double* mean, double* var) {
  shift[c] = channel_shift(x, g, c);
  double s1, s2;
  channel_total(sum, g, c, &s1, &s2);
  finish_channel(shift[c], s1, s2, count, inv_count, mean, var);
}

// Statistics of NC(D)HW channels that keep every thread busy: each task takes whole channels,
// their shifts, sums and finish, with channel_sums' bits (channel_total). Shifts and finish on the
// calling thread took a third of its time on (4, 2048, 2, 2) while the other threads waited.
template <typename scalar_t>
void stats_per_channel(const scalar_t* x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  std::vector<double> shift(g.C);  // each task sets its channels' shifts before it sums them
  const ShiftedSquares<scalar_t> sum{x, shift.data(), g.C};
  const double count = static_cast<double>(g.rows()), inv_count = 1.0 / count;
  // about kElemGrain values a piece, and at least kPerChannelMinTasksPerThread pieces a thread
  const int64_t per_piece = std::clamp<int64_t>(kElemGrain / (g.rows() + kRunCostValues), 1,
                                                g.C / (kPerChannelMinTasksPerThread * at::get_num_threads()));
  parallel_pieces(ceil_div(g.C, per_piece), Sweep::kForward, [&](int64_t p) {
    for (int64_t c = p * per_piece; c < std::min(g.C, (p + 1) * per_piece); ++c)
      channel_stats(x, g, sum, shift.data(), c, count, inv_count, &mean[c], &var[c]);
  });
}

template <typename scalar_t>
void stats_kernel(const scalar_t* x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  if (per_channel(g)) {
    stats_per_channel(x, g, mean, var);
    return;
  }
  const std::vector<double> shift = channel_shifts(x, g);
  std::vector<double> s1(g.C), s2(g.C);
  const bool streamed = g.layout == Layout::kNSC && should_stream_rows<scalar_t>(g, 1);
  channel_sums(ShiftedSquares<scalar_t>{x, shift.data(), g.C, streamed}, g, s1, s2);
  const double count = static_cast<double>(g.rows()), inv_count = 1.0 / count;
  for (int64_t c = 0; c < g.C; ++c) finish_channel(shift[c], s1[c], s2[c], count, inv_count, &mean[c], &var[c]);
}
