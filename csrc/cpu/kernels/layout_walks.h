// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// Walking a tensor's layout: channels-last row blocks, an NC(D)HW channel's runs, the
// order an elementwise pass walks its share in, and the fence after streaming stores.

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
