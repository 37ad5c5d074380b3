// Part of kernels.h, included inside the ISA's namespace: it includes nothing itself.
// The SIMD builds' loads, stores and horizontal sums (AVX2, and the AVX-512 build's 16-wide ones).

#ifdef BN_EXT_AVX2_INTRINSICS
constexpr int64_t kRowsPerTile = 32;  // at most, summed in float32 per tile

inline bool aligned_to(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }

// The loops that stream tensors from memory ask for what they will read kPrefetchBytes later. The
// hardware prefetchers stop at every 4 KiB page, and a 16-bit loop takes half a line a vector, so
// too few lines were in flight: from memory, (4, 64, 112, 112) bfloat16 backward ran in 0.61-0.63x
// its time with the prefetches (docs/design.md, "Measurements"). The address is formed as an
// integer: it may lie past the tensor's end, where a prefetch is harmless. Not on Zen 4
// (kPrefetchStreams).
constexpr uintptr_t kPrefetchBytes = 2048;
inline void prefetch_ahead(const void* p) {
  if (kPrefetchStreams)
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), _MM_HINT_T0);
}

// Eight elements widened to float32 (the compiler does not vectorise the float -> double widening
// reductions below on its own, so the AVX2 build spells them out).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// Sixteen bfloat16 values widened as two float32 vectors, the values at even positions and those
// at odd ones: one load, a shift and a mask, where two load8s take two loads, two lane-crossing
// widenings and two shifts (the AVX2 build's bfloat16 loops ran at 40% of their float32
// counterparts' speed).
inline void load16_split(const c10::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
}
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
  const __m128d sums =
      _mm_add_pd(_mm512_castpd512_pd128(quads), _mm256_castpd256_pd128(_mm512_extractf64x4_pd(quads, 1)));
  *sa = _mm_cvtsd_f64(sums);
  *sb = _mm_cvtsd_f64(_mm_unpackhi_pd(sums, sums));
}
// Values summed in float32 before widening, 16-wide loops: 16 terms per lane of each of the two
// pairs of chunk sums. Widening costs 10 instructions per chunk, so chunks are long enough for it
// to stay a small share of the sweep (docs/design.md, "Measurements").
constexpr int64_t kChunk16 = 512;
#endif
#endif  // BN_EXT_AVX2_INTRINSICS
