// CUDA kernels for every bn_ext op.
//
// Reductions (statistics, backward sums) split each channel across many blocks when the channel
// is long, so the GPU fills even with C = 3; every block writes its partial result, and a small
// finalize kernel merges them per channel in block order (Welford/Chan merge for statistics).
// Block shapes and partition depend only on the tensor's shape, never on the device or timing,
// and there are no floating-point atomics: results are bitwise identical from run to run.
//
// Elementwise passes (forward, dx) walk the tensor flat, 16 bytes per thread per step where
// alignment allows, finding each element's channel with a multiply-shift division.
//
// Only c10/cuda headers are included (no cuBLAS/cuSPARSE headers), so a partial CUDA toolkit
// that has nvcc and the runtime headers is enough to build.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>

#include "bn_ext/checks.h"
#include "bn_ext/layout.h"
#include "bn_ext/math.h"

namespace bn_ext {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
// Reduction partition targets (shape-only, so results do not depend on the GPU model).
constexpr int64_t kTargetBlocks = 1024;      // blocks a reduction aims to spread over
constexpr int64_t kMinElemsPerBlock = 4096;  // below this a block is mostly launch overhead

// Elementwise arithmetic in float (double for double input), as PyTorch's CUDA kernels do.
template <typename scalar_t>
using acc_type = at::acc_type<scalar_t, /*is_cuda=*/true>;
// Reductions accumulate in double whatever the input: a memory-bound pass has FP64 throughput
// to spare on data-centre GPUs, and the statistics then match the CPU path's accuracy.
using red_t = double;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// SM count per device, asked of the driver once (it is on every elementwise launch's path).
int multiprocessors(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  int count = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (cached) cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

// n / d for n < 2^31 with a multiply-high and a shift (Granlund-Montgomery), d >= 1.
struct FastDiv32 {
  uint32_t d, magic, shift;
  explicit FastDiv32(uint32_t divisor) : d(divisor), shift(0) {
    while (shift < 32 && (uint64_t(1) << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
};

struct PlainDiv64 {
  uint64_t d;
  explicit PlainDiv64(uint64_t divisor) : d(divisor) {}
  __device__ __forceinline__ uint64_t div(uint64_t n) const { return n / d; }
};

// ---------------------------------------------------------------------------------------------
// Elementwise kernels. Coefficients are acc_t arrays laid out [k][C]:
//   forward:        mean_hi, mean_lo, scale, shift             (math.h, forward_coeffs)
//   backward:       mean_hi, mean_lo, k_dy, k_x, k_0           (math.h, backward_coeffs)

enum class Pass { kForward, kBackwardTrain, kBackwardEval };

// out[i, i + VEC) from a (and b, the backward's x) by the pass's formula, with coef(j, m) giving
// coefficient m of lane j's channel; both elementwise kernels below share it.
template <Pass kPass, typename scalar_t, typename acc_t, int VEC, typename index_t, typename Coef>
__device__ __forceinline__ void transform_vec(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                              scalar_t* __restrict__ out, index_t i, const Coef& coef) {
  const Vec<scalar_t, VEC> va = load_vec<scalar_t, VEC>(a + i);
  Vec<scalar_t, VEC> vb;
  if (kPass == Pass::kBackwardTrain) vb = load_vec<scalar_t, VEC>(b + i);
  Vec<scalar_t, VEC> vo;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t xa = static_cast<acc_t>(va.v[j]);
    acc_t r;
    if (kPass == Pass::kForward) {
      r = ((xa - coef(j, 0)) - coef(j, 1)) * coef(j, 2) + coef(j, 3);
    } else if (kPass == Pass::kBackwardTrain) {
      const acc_t xb = static_cast<acc_t>(vb.v[j]);
      r = coef(j, 2) * xa + coef(j, 3) * ((xb - coef(j, 0)) - coef(j, 1)) + coef(j, 4);
    } else {
      r = coef(j, 2) * xa;
    }
    vo.v[j] = static_cast<scalar_t>(r);
  }
  *reinterpret_cast<Vec<scalar_t, VEC>*>(out + i) = vo;
}

template <Pass kPass, typename scalar_t, typename acc_t, int VEC, bool kNSC, typename index_t, typename Div>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                       const acc_t* __restrict__ k, index_t C, Div by_inner, Div by_channels, index_t nvec) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const index_t i = v * VEC;
    // channel of element i: NC(D)HW (i / S) % C; channels-last i % C
    const index_t q = kNSC ? i : static_cast<index_t>(by_inner.div(i));
    const index_t c0 = q - static_cast<index_t>(by_channels.div(q)) * C;
    // a vector never crosses a plane (NCS) or a row (NSC)
    transform_vec<kPass, scalar_t, acc_t, VEC>(a, b, out, i,
                                               [&](int j, int m) { return k[m * C + (kNSC ? c0 + j : c0)]; });
  }
}

// Channels-last with the channel fixed per thread: thread t takes vector slot t % (C / VEC) of every
// row it visits and steps by a whole number of rows, so its VEC channels' coefficients are loaded
// once into registers instead of once per element (the flat kernel above loads 4-5 of them per
// element, which bounds it by load issue rather than DRAM for 2-byte types). Needs C / VEC <= the
// number of threads launched.
template <Pass kPass, typename scalar_t, typename acc_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    elementwise_nsc_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                           const acc_t* __restrict__ k, index_t C, index_t nvec) {
  const index_t slots = C / VEC;  // vectors per row
  const index_t threads = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t lanes = threads - threads % slots;  // a whole number of rows per step
  const index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= lanes) return;
  const index_t c0 = (t % slots) * VEC;
  acc_t kr[5][VEC];  // the pass's coefficients of this thread's VEC channels
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    kr[2][j] = k[2 * C + c0 + j];
    if (kPass != Pass::kBackwardEval) {
      kr[0][j] = k[c0 + j];
      kr[1][j] = k[C + c0 + j];
      kr[3][j] = k[3 * C + c0 + j];
    }
    if (kPass == Pass::kBackwardTrain) kr[4][j] = k[4 * C + c0 + j];
  }
  for (index_t v = t; v < nvec; v += lanes)
    transform_vec<kPass, scalar_t, acc_t, VEC>(a, b, out, v * VEC, [&](int j, int m) { return kr[m][j]; });
}

template <Pass kPass, typename scalar_t, typename acc_t>
void launch_elementwise(const Geometry& g, const scalar_t* a, const scalar_t* b, scalar_t* out, const acc_t* k,
                        cudaStream_t stream, int device) {
  const int64_t numel = g.numel();
  if (numel == 0) return;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool nsc = g.layout == Layout::kNSC;
  const bool vec = (nsc ? g.C : g.S) % kVec == 0 && aligned16(a) && aligned16(out) &&
                   (kPass != Pass::kBackwardTrain || aligned16(b));
  const int64_t max_blocks = static_cast<int64_t>(multiprocessors(device)) * 16;
  auto run = [&](auto vec_tag, auto nsc_tag, auto index_tag, auto div) {
    constexpr int V = decltype(vec_tag)::value;
    constexpr bool N = decltype(nsc_tag)::value;
    using index_t = typename decltype(index_tag)::type;
    using Div = decltype(div);
    const int64_t nvec = numel / V;
    const int blocks = static_cast<int>(std::min(ceil_div(nvec, kThreads), max_blocks));
    if (N && g.C / V <= int64_t(blocks) * kThreads) {
      elementwise_nsc_kernel<kPass, scalar_t, acc_t, V, index_t><<<blocks, kThreads, 0, stream>>>(
          a, b, out, k, static_cast<index_t>(g.C), static_cast<index_t>(nvec));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    elementwise_kernel<kPass, scalar_t, acc_t, V, N, index_t, Div><<<blocks, kThreads, 0, stream>>>(
        a, b, out, k, static_cast<index_t>(g.C), Div(static_cast<index_t>(nsc ? 1 : g.S)),
        Div(static_cast<index_t>(g.C)), static_cast<index_t>(nvec));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using V1 = std::integral_constant<int, 1>;
  using VN = std::integral_constant<int, kVec>;
  using NSC = std::true_type;
  using NCS = std::false_type;
  struct I32 { using type = uint32_t; };
  struct I64 { using type = uint64_t; };
  const bool small = numel < (int64_t(1) << 31);
  const uint32_t one = 1;
  if (small) {
    const FastDiv32 d(one);
    if (vec) {
      nsc ? run(VN{}, NSC{}, I32{}, d) : run(VN{}, NCS{}, I32{}, d);
    } else {
      nsc ? run(V1{}, NSC{}, I32{}, d) : run(V1{}, NCS{}, I32{}, d);
    }
  } else {
    const PlainDiv64 d(one);
    if (vec) {
      nsc ? run(VN{}, NSC{}, I64{}, d) : run(VN{}, NCS{}, I64{}, d);
    } else {
      nsc ? run(V1{}, NSC{}, I64{}, d) : run(V1{}, NCS{}, I64{}, d);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions. A partial is three acc_t: (count, mean, M2) for statistics, (sum_dy, sum_dy_xmu, -)
// for the backward sums.

enum class Reduce { kStats, kGrad };

template <typename acc_t>
struct Partial {
  acc_t a, b, c;
};

template <Reduce kR, typename acc_t>
__device__ __forceinline__ Partial<acc_t> combine(const Partial<acc_t>& x, const Partial<acc_t>& y) {
  if (kR == Reduce::kStats) {
    const WelfordPartial<acc_t> m = welford_merge(WelfordPartial<acc_t>{x.a, x.b, x.c}, WelfordPartial<acc_t>{y.a, y.b, y.c});
    return {m.count, m.mean, m.m2};
  }
  return {x.a + y.a, x.b + y.b, acc_t(0)};
}

// Fold G values of one channel into a thread's partial: statistics merge the group's own
// (count, mean, M2) with one division; sums just add.
template <Reduce kR, int G, typename acc_t>
__device__ __forceinline__ void accumulate(Partial<acc_t>& s, const acc_t (&x)[G], const acc_t (&dy)[G], acc_t mean) {
  if (kR == Reduce::kStats) {
    acc_t sum = 0;
#pragma unroll
    for (int j = 0; j < G; ++j) sum += x[j];
    const acc_t gmean = sum * (acc_t(1) / G);
    acc_t gm2 = 0;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const acc_t d = x[j] - gmean;
      gm2 += d * d;
    }
    const acc_t n = s.a + acc_t(G);
    const acc_t delta = gmean - s.b;
    const acc_t share = acc_t(G) / n;
    s.b += delta * share;
    s.c += gm2 + delta * delta * s.a * share;
    s.a = n;
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j) {
      s.a += dy[j];
      s.b += dy[j] * (x[j] - mean);
    }
  }
}

template <Reduce kR, typename acc_t>
__device__ __forceinline__ Partial<acc_t> shfl_down(const Partial<acc_t>& p, int offset) {
  return {__shfl_down_sync(0xffffffffu, p.a, offset), __shfl_down_sync(0xffffffffu, p.b, offset),
          __shfl_down_sync(0xffffffffu, p.c, offset)};
}

// Fixed-shape tree over a 1-D block; the result is valid in thread 0.
template <Reduce kR, typename acc_t>
__device__ Partial<acc_t> block_reduce(Partial<acc_t> p) {
  __shared__ Partial<acc_t> warp_results[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) p = combine<kR>(p, shfl_down<kR>(p, offset));
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_results[warp] = p;
  __syncthreads();
  if (threadIdx.x == 0) {
    p = warp_results[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) p = combine<kR>(p, warp_results[w]);
  }
  return p;
}

// NC(D)HW: block (bx, by) reduces elements [bx * chunk, (bx + 1) * chunk) of channel by (flat
// index n * S + s). Planes at least a block's width long are walked plane by plane; shorter ones
// (S < kThreads * VEC: 7x7, 14x14, sequences) would leave most threads idle that way, so the block
// walks the chunk's flat index instead, each thread finding its vector's plane with a division
// (a vector never crosses a plane: S % VEC == 0). partials[c * gridDim.x + bx].
template <Reduce kR, typename scalar_t, typename acc_t, typename mean_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    reduce_ncs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const mean_t* __restrict__ mean,
                      int64_t C, int64_t S, int64_t M, int64_t chunk, FastDiv32 by_plane,
                      Partial<acc_t>* __restrict__ partials) {
  const bool short_planes = S < static_cast<int64_t>(blockDim.x) * VEC;
  const bool fast_div = M <= std::numeric_limits<int32_t>::max();
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
    const int64_t end = min(M, start + chunk);
    const acc_t m = kR == Reduce::kGrad ? static_cast<acc_t>(mean[c]) : acc_t(0);
    Partial<acc_t> p{0, 0, 0};
    auto visit = [&](int64_t base) {
      acc_t xv[VEC], gv[VEC];
      const Vec<scalar_t, VEC> vx = load_vec<scalar_t, VEC>(x + base);
#pragma unroll
      for (int t = 0; t < VEC; ++t) xv[t] = static_cast<acc_t>(vx.v[t]);
      if (kR == Reduce::kGrad) {
        const Vec<scalar_t, VEC> vg = load_vec<scalar_t, VEC>(dy + base);
#pragma unroll
        for (int t = 0; t < VEC; ++t) gv[t] = static_cast<acc_t>(vg.v[t]);
      }
      accumulate<kR, VEC>(p, xv, gv, m);
    };
    if (short_planes) {
      for (int64_t e = start + static_cast<int64_t>(threadIdx.x) * VEC; e < end;
           e += static_cast<int64_t>(blockDim.x) * VEC) {
        const int64_t n = fast_div ? static_cast<int64_t>(by_plane.div(static_cast<uint32_t>(e))) : e / S;
        visit((n * C + c) * S + (e - n * S));
      }
    } else {
      for (int64_t i = start; i < end;) {  // block-uniform loop over the planes this chunk touches
        const int64_t n = i / S;
        const int64_t s = i - n * S;
        const int64_t len = min(end - i, S - s);
        const int64_t base = (n * C + c) * S + s;
        for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < len; j += static_cast<int64_t>(blockDim.x) * VEC)
          visit(base + j);
        i += len;
      }
    }
    p = block_reduce<kR>(p);
    if (threadIdx.x == 0) partials[c * gridDim.x + blockIdx.x] = p;
    __syncthreads();  // warp_results is reused by the next channel
  }
}

// Channels-last: threads along x take channels (coalesced rows), threads along y take rows;
// block (bx, by) covers channels [bx * TX, ...) over rows [by * rows_per_block, ...).
// partials[c * gridDim.y + by].
template <Reduce kR, typename scalar_t, typename acc_t, typename mean_t>
__global__ void __launch_bounds__(kThreads)
    reduce_nsc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const mean_t* __restrict__ mean,
                      int64_t R, int64_t C, int64_t rows_per_block, Partial<acc_t>* __restrict__ partials) {
  __shared__ Partial<acc_t> shared[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = min(R, r0 + rows_per_block);
  Partial<acc_t> p{0, 0, 0};
  if (c < C) {
    const acc_t m = kR == Reduce::kGrad ? static_cast<acc_t>(mean[c]) : acc_t(0);
    const int64_t ty = blockDim.y;
    int64_t r = r0 + threadIdx.y;
    for (; r + 3 * ty < r1; r += 4 * ty) {  // four rows in flight per thread
      acc_t xv[4], gv[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        xv[t] = static_cast<acc_t>(x[(r + t * ty) * C + c]);
        gv[t] = kR == Reduce::kGrad ? static_cast<acc_t>(dy[(r + t * ty) * C + c]) : acc_t(0);
      }
      accumulate<kR, 4>(p, xv, gv, m);
    }
    for (; r < r1; r += ty) {
      acc_t xv[1] = {static_cast<acc_t>(x[r * C + c])};
      acc_t gv[1] = {kR == Reduce::kGrad ? static_cast<acc_t>(dy[r * C + c]) : acc_t(0)};
      accumulate<kR, 1>(p, xv, gv, m);
    }
  }
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
  shared[slot] = p;
  __syncthreads();
  for (int offset = blockDim.y / 2; offset > 0; offset >>= 1) {  // fixed tree over rows
    if (static_cast<int>(threadIdx.y) < offset)
      shared[slot] = combine<kR>(shared[slot], shared[slot + offset * blockDim.x]);
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) partials[c * gridDim.y + blockIdx.y] = shared[threadIdx.x];
}

// Launches the reduction of x (and dy) into per-(channel, block) partials; returns them as a
// [C, parts, 3] float64 tensor.
template <Reduce kR, typename scalar_t, typename mean_t = acc_type<scalar_t>>
Tensor launch_reduce(const Geometry& g, const scalar_t* x, const scalar_t* dy, const mean_t* mean, const Tensor& like,
                     cudaStream_t stream) {
  using acc_t = red_t;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t rows = g.rows();
  if (g.layout == Layout::kNCS) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = g.S % kVec == 0 && aligned16(x) && (kR != Reduce::kGrad || aligned16(dy));
    const int64_t step = vec ? kVec : 1;
    int64_t parts = std::clamp<int64_t>(ceil_div(rows, kMinElemsPerBlock), 1, std::max<int64_t>(1, kTargetBlocks / g.C));
    parts = std::min<int64_t>(parts, 65535);
    const int64_t chunk = ceil_div(ceil_div(rows, parts), step) * step;  // whole vectors per block
    parts = ceil_div(rows, chunk);
    Tensor partials = at::empty({g.C, parts, 3}, like.options().dtype(acc_dtype));
    const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(std::min<int64_t>(g.C, 65535)));
    auto* out = reinterpret_cast<Partial<acc_t>*>(partials.mutable_data_ptr<acc_t>());
    // S fits 32 bits whenever the kernel divides with it (rows < 2^31 there)
    const FastDiv32 by_plane(static_cast<uint32_t>(std::min<int64_t>(g.S, std::numeric_limits<int32_t>::max())));
    if (vec) {
      reduce_ncs_kernel<kR, scalar_t, acc_t, mean_t, kVec><<<grid, kThreads, 0, stream>>>(
          x, dy, mean, g.C, g.S, rows, chunk, by_plane, out);
    } else {
      reduce_ncs_kernel<kR, scalar_t, acc_t, mean_t, 1><<<grid, kThreads, 0, stream>>>(
          x, dy, mean, g.C, g.S, rows, chunk, by_plane, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return partials;
  }
  int tx = 1;
  while (tx < 32 && tx < g.C) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t col_blocks = ceil_div(g.C, tx);
  TORCH_CHECK(col_blocks <= std::numeric_limits<int32_t>::max(), "bn_ext: input: too many channels (", g.C, ")");
  int64_t parts = std::clamp<int64_t>(ceil_div(rows, int64_t(ty) * 16), 1, std::max<int64_t>(1, kTargetBlocks / col_blocks));
  parts = std::min<int64_t>(parts, 65535);
  const int64_t rows_per_block = ceil_div(rows, parts);
  parts = ceil_div(rows, rows_per_block);
  Tensor partials = at::empty({g.C, parts, 3}, like.options().dtype(acc_dtype));
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(parts));
  const dim3 block(tx, ty);
  reduce_nsc_kernel<kR, scalar_t, acc_t, mean_t><<<grid, block, 0, stream>>>(
      x, dy, mean, rows, g.C, rows_per_block, reinterpret_cast<Partial<acc_t>*>(partials.mutable_data_ptr<acc_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// The statistics reduction reads no mean.
template <typename scalar_t>
const acc_type<scalar_t>* no_mean() {
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Per-channel kernels: merge partials in block order (in double), write statistics/sums and the
// elementwise coefficients. One thread per channel.

template <typename acc_t>
struct ChannelArgs {  // optional per-channel inputs (nullptr: weight 1, bias 0)
  const acc_t* weight;
  const acc_t* bias;
};

template <typename acc_t>
__device__ __forceinline__ double value_or(const acc_t* p, int64_t c, double fallback) {
  return p == nullptr ? fallback : static_cast<double>(p[c]);
}

// Merge channel c's partials with a fixed tree: thread t folds partials t, t + blockDim, ...
// in order, then the block tree combines the threads. One block per channel keeps the
// dependent chain short however many partials there are.
template <Reduce kR>
__device__ Partial<red_t> merge_partials(const Partial<red_t>* __restrict__ partials, int64_t c, int64_t parts) {
  Partial<red_t> p{0, 0, 0};
  for (int64_t b = threadIdx.x; b < parts; b += blockDim.x) p = combine<kR>(p, partials[c * parts + b]);
  return block_reduce<kR>(p);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finalize_stats_kernel(const Partial<red_t>* __restrict__ partials, int64_t C, int64_t parts,
                          acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out, ChannelArgs<acc_t> args,
                          double eps, acc_t* __restrict__ coeffs) {
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const Partial<red_t> acc = merge_partials<Reduce::kStats>(partials, c, parts);
    if (threadIdx.x == 0) {
      const double var = acc.a > 0 ? acc.c / acc.a : 0.0;
      mean_out[c] = static_cast<acc_t>(acc.b);
      var_out[c] = static_cast<acc_t>(var);
      if (coeffs != nullptr) {
        const auto k = forward_coeffs<acc_t>(acc.b, var, value_or(args.weight, c, 1.0), value_or(args.bias, c, 0.0), eps);
        coeffs[c] = k.mean_hi;
        coeffs[C + c] = k.mean_lo;
        coeffs[2 * C + c] = k.scale;
        coeffs[3 * C + c] = k.shift;
      }
    }
    __syncthreads();  // block_reduce's shared memory is reused for the next channel
  }
}

template <typename acc_t>
__global__ void forward_coeffs_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                      ChannelArgs<acc_t> args, int64_t C, double eps, acc_t* __restrict__ coeffs) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const auto k = forward_coeffs<acc_t>(mean[c], var[c], value_or(args.weight, c, 1.0), value_or(args.bias, c, 0.0), eps);
  coeffs[c] = k.mean_hi;
  coeffs[C + c] = k.mean_lo;
  coeffs[2 * C + c] = k.scale;
  coeffs[3 * C + c] = k.shift;
}

// Backward per channel: sums from partials (when given) or from sum_dy/sum_dy_xmu, then the dx
// coefficients and, when asked, grad_weight = sum_dy_xmu * invstd and grad_bias = sum_dy.
// One block per channel (see merge_partials).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_channel_kernel(const Partial<red_t>* __restrict__ partials, int64_t parts,
                            const acc_t* __restrict__ sum_dy_in, const acc_t* __restrict__ sum_dy_xmu_in,
                            const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                            const acc_t* __restrict__ weight, int64_t C, double eps, double count, bool training,
                            acc_t* __restrict__ sum_dy_out, acc_t* __restrict__ sum_dy_xmu_out,
                            acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias, acc_t* __restrict__ coeffs) {
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    double sdy = 0, sdx = 0;
    if (partials != nullptr) {
      const Partial<red_t> acc = merge_partials<Reduce::kGrad>(partials, c, parts);
      sdy = acc.a;
      sdx = acc.b;
    } else if (sum_dy_in != nullptr) {
      sdy = sum_dy_in[c];
      sdx = sum_dy_xmu_in[c];
    }
    if (threadIdx.x == 0) {
      if (sum_dy_out != nullptr) sum_dy_out[c] = static_cast<acc_t>(sdy);
      if (sum_dy_xmu_out != nullptr) sum_dy_xmu_out[c] = static_cast<acc_t>(sdx);
      const double v = static_cast<double>(var[c]);
      if (grad_weight != nullptr) grad_weight[c] = static_cast<acc_t>(sdx * invstd_from_var(v, eps));
      if (grad_bias != nullptr) grad_bias[c] = static_cast<acc_t>(sdy);
      if (coeffs != nullptr) {
        const auto k = backward_coeffs<acc_t>(static_cast<double>(mean[c]), v, value_or(weight, c, 1.0), sdy, sdx,
                                              eps, count, training);
        coeffs[c] = k.mean_hi;
        coeffs[C + c] = k.mean_lo;
        coeffs[2 * C + c] = k.k_dy;
        coeffs[3 * C + c] = k.k_x;
        coeffs[4 * C + c] = k.k_0;
      }
    }
    __syncthreads();
  }
}

// Channel c's running stats blended towards a batch's mean and biased var over `count` elements.
template <typename run_t>
__device__ __forceinline__ void blend_running(run_t* __restrict__ running_mean, run_t* __restrict__ running_var,
                                              int64_t c, double mean, double var, int64_t count, double factor) {
  if (running_mean != nullptr)
    running_mean[c] = static_cast<run_t>(running_blend(static_cast<double>(running_mean[c]), mean, factor));
  if (running_var != nullptr)
    running_var[c] = static_cast<run_t>(
        running_blend(static_cast<double>(running_var[c]), unbiased_from_biased(var, count), factor));
}

// running stats += ..., num_batches_tracked += 1, all in one block so the counter is read once.
template <typename run_t, typename stat_t>
__global__ void update_running_stats_kernel(run_t* __restrict__ running_mean, run_t* __restrict__ running_var,
                                            int64_t* __restrict__ num_batches_tracked, const stat_t* __restrict__ mean,
                                            const stat_t* __restrict__ var, int64_t C, bool has_momentum,
                                            double momentum, int64_t count) {
  __shared__ double factor;
  if (threadIdx.x == 0) factor = count_batch(num_batches_tracked, has_momentum, momentum);
  __syncthreads();
  if (count == 0) return;  // an empty batch is counted but leaves the statistics alone
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    blend_running(running_mean, running_var, c, static_cast<double>(mean[c]), static_cast<double>(var[c]), count,
                  factor);
}

// SyncBatchNorm's merge of the gathered per-rank rows, and the running-stat update over the total
// count, in one block (the counter is read once; C is at most a few thousand).
template <typename run_t, typename stat_t>
__global__ void gather_stats_kernel(const stat_t* __restrict__ stats, int64_t ranks, int64_t C,
                                    stat_t* __restrict__ mean_out, stat_t* __restrict__ var_out,
                                    stat_t* __restrict__ count_out, run_t* __restrict__ running_mean,
                                    run_t* __restrict__ running_var, int64_t* __restrict__ num_batches_tracked,
                                    bool has_momentum, double momentum) {
  __shared__ double factor;
  __shared__ double total;
  if (threadIdx.x == 0) {
    factor = count_batch(num_batches_tracked, has_momentum, momentum);
    total = total_rank_count(stats, ranks, C);
    *count_out = static_cast<stat_t>(total);
  }
  __syncthreads();
  const int64_t count = llround(total);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const WelfordPartial<double> acc = merge_rank_rows(stats, ranks, C, c);
    const double var = acc.count > 0.0 ? acc.m2 / acc.count : 0.0;
    mean_out[c] = static_cast<stat_t>(acc.mean);
    var_out[c] = static_cast<stat_t>(var);
    if (count > 0) blend_running(running_mean, running_var, c, acc.mean, var, count, factor);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct Context {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  int device;
  explicit Context(const Tensor& t)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()),
        device(t.device().index()) {}
};

// A per-channel tensor as a contiguous acc-typed tensor (itself when it already is).
Tensor as_acc(const Tensor& t, c10::ScalarType acc) { return t.to(acc).contiguous(); }

Tensor as_acc(const c10::optional<Tensor>& t, c10::ScalarType acc) {
  return t.has_value() && t->defined() ? as_acc(*t, acc) : Tensor();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// One thread per channel / one block per channel.
unsigned channel_blocks(int64_t C) { return static_cast<unsigned>(std::max<int64_t>(1, ceil_div(C, kThreads))); }
unsigned channel_grid(int64_t C) { return static_cast<unsigned>(std::clamp<int64_t>(C, 1, 65535)); }

// A per-channel result: filled by a kernel when there is data, zeros for an empty input.
Tensor stat_tensor(const Geometry& g, const Tensor& input, c10::ScalarType dtype) {
  return g.numel() > 0 ? at::empty({g.C}, input.options().dtype(dtype)) : at::zeros({g.C}, input.options().dtype(dtype));
}

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input, c10::optional<c10::ScalarType> dtype) {
  const auto dt = check_stats_args(input, dtype);
  Context ctx(input);
  Operands p = prepare(input, {input}, /*with_output=*/false);
  Tensor mean = stat_tensor(p.g, input, dt);
  Tensor var = stat_tensor(p.g, input, dt);
  if (p.g.numel() == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_stats_cuda", [&] {
    Tensor partials = launch_reduce<Reduce::kStats, scalar_t>(p.g, p.inputs[0].const_data_ptr<scalar_t>(), nullptr,
                                                                no_mean<scalar_t>(), input, ctx.stream);
    const auto* parts = reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>());
    // The statistics come out in their own dtype: float32, or float64 when asked (or for float64 input).
    AT_DISPATCH_FLOATING_TYPES(dt, "bn_ext_stats_cuda_out", [&] {
      finalize_stats_kernel<scalar_t><<<channel_grid(p.g.C), kThreads, 0, ctx.stream>>>(
          parts, p.g.C, partials.size(1), mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>(),
          ChannelArgs<scalar_t>{nullptr, nullptr}, 0.0, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, var};
}

Tensor batch_norm_elemt(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                        const Tensor& mean, const Tensor& var, double eps) {
  check_elemt_args(input, weight, bias, mean, var, eps);
  Context ctx(input);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  if (p.g.numel() == 0) return p.result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_elemt_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), b = as_acc(bias, acc), m = as_acc(mean, acc), v = as_acc(var, acc);
    Tensor coeffs = at::empty({4, p.g.C}, input.options().dtype(acc));
    forward_coeffs_kernel<acc_t><<<channel_blocks(p.g.C), kThreads, 0, ctx.stream>>>(
        m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), ChannelArgs<acc_t>{ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b)},
        p.g.C, eps, coeffs.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_elementwise<Pass::kForward, scalar_t, acc_t>(p.g, p.inputs[0].const_data_ptr<scalar_t>(), nullptr,
                                                         p.out.mutable_data_ptr<scalar_t>(), coeffs.const_data_ptr<acc_t>(),
                                                         ctx.stream, ctx.device);
  });
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias, double eps) {
  check_train_args(input, weight, bias, eps);
  Context ctx(input);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  const auto dt = stat_dtype(input.scalar_type());
  Tensor mean = stat_tensor(p.g, input, dt);
  Tensor var = stat_tensor(p.g, input, dt);
  if (p.g.numel() == 0) return {p.result, mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_train_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), b = as_acc(bias, acc);
    const scalar_t* x = p.inputs[0].const_data_ptr<scalar_t>();
    Tensor partials = launch_reduce<Reduce::kStats, scalar_t>(p.g, x, nullptr, no_mean<scalar_t>(), input, ctx.stream);
    Tensor coeffs = at::empty({4, p.g.C}, input.options().dtype(acc));
    finalize_stats_kernel<acc_t><<<channel_grid(p.g.C), kThreads, 0, ctx.stream>>>(
        reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>()), p.g.C, partials.size(1),
        mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
        ChannelArgs<acc_t>{ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b)}, eps, coeffs.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_elementwise<Pass::kForward, scalar_t, acc_t>(p.g, x, nullptr, p.out.mutable_data_ptr<scalar_t>(),
                                                         coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
  });
  finish(p);
  return {p.result, mean, var};
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  check_backward_reduce_args(grad_out, input, mean);
  Context ctx(input);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/false);
  const auto dt = stat_dtype(input.scalar_type());
  Tensor sum_dy = stat_tensor(p.g, input, dt);
  Tensor sum_dy_xmu = stat_tensor(p.g, input, dt);
  if (p.g.numel() == 0) return {sum_dy, sum_dy_xmu};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_backward_reduce_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Tensor m = as_acc(mean, c10::CppTypeToScalarType<acc_t>::value);
    Tensor partials = launch_reduce<Reduce::kGrad, scalar_t>(p.g, p.inputs[1].const_data_ptr<scalar_t>(),
                                                               p.inputs[0].const_data_ptr<scalar_t>(),
                                                               m.const_data_ptr<acc_t>(), input, ctx.stream);
    // var is only read for grad_weight and coefficients, neither asked for here: pass the mean
    backward_channel_kernel<acc_t><<<channel_grid(p.g.C), kThreads, 0, ctx.stream>>>(
        reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>()), partials.size(1), nullptr, nullptr,
        m.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(), nullptr, p.g.C, 0.0, 1.0, true,
        sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>(), nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight,
                                 const Tensor& mean, const Tensor& var, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xmu, double eps, int64_t count) {
  check_backward_elemt_args(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, count);
  Context ctx(input);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/true);
  if (p.g.numel() == 0) return p.result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_backward_elemt_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), m = as_acc(mean, acc), v = as_acc(var, acc);
    const Tensor sdy = as_acc(sum_dy, acc), sdx = as_acc(sum_dy_xmu, acc);
    Tensor coeffs = at::empty({5, p.g.C}, input.options().dtype(acc));
    backward_channel_kernel<acc_t><<<channel_grid(p.g.C), kThreads, 0, ctx.stream>>>(
        nullptr, 0, sdy.const_data_ptr<acc_t>(), sdx.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(),
        v.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(w), p.g.C, eps, static_cast<double>(count), true, nullptr,
        nullptr, nullptr, nullptr, coeffs.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_elementwise<Pass::kBackwardTrain, scalar_t, acc_t>(
        p.g, p.inputs[0].const_data_ptr<scalar_t>(), p.inputs[1].const_data_ptr<scalar_t>(),
        p.out.mutable_data_ptr<scalar_t>(), coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
  });
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const c10::optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& var, double eps, bool training,
                                                       std::array<bool, 3> output_mask) {
  check_backward_args(grad_out, input, weight, mean, var, eps);
  Context ctx(input);
  const bool need_sums = training ? output_mask[0] || output_mask[1] || output_mask[2] : output_mask[1] || output_mask[2];
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/output_mask[0]);
  const int64_t C = p.g.C;
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : stat_dtype(input.scalar_type());
  Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_ext_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor w = as_acc(weight, acc), m = as_acc(mean, acc), v = as_acc(var, acc);
    Tensor gw = output_mask[1] ? stat_tensor(p.g, input, acc) : Tensor();
    Tensor gb = output_mask[2] ? stat_tensor(p.g, input, acc) : Tensor();
    if (p.g.numel() > 0) {
      Tensor partials;
      if (need_sums) {
        partials = launch_reduce<Reduce::kGrad, scalar_t>(p.g, p.inputs[1].const_data_ptr<scalar_t>(),
                                                          p.inputs[0].const_data_ptr<scalar_t>(),
                                                          m.const_data_ptr<acc_t>(), input, ctx.stream);
      }
      Tensor coeffs = output_mask[0] ? at::empty({5, C}, input.options().dtype(acc)) : Tensor();
      backward_channel_kernel<acc_t><<<channel_grid(C), kThreads, 0, ctx.stream>>>(
          need_sums ? reinterpret_cast<const Partial<red_t>*>(partials.const_data_ptr<red_t>()) : nullptr,
          need_sums ? partials.size(1) : 0, nullptr, nullptr, m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(),
          ptr_or_null<acc_t>(w), C, eps, static_cast<double>(p.g.rows()), training, nullptr, nullptr,
          mutable_ptr_or_null<acc_t>(gw), mutable_ptr_or_null<acc_t>(gb), mutable_ptr_or_null<acc_t>(coeffs));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (output_mask[0]) {
        const scalar_t* dy = p.inputs[0].const_data_ptr<scalar_t>();
        const scalar_t* x = p.inputs[1].const_data_ptr<scalar_t>();
        if (training) {
          launch_elementwise<Pass::kBackwardTrain, scalar_t, acc_t>(p.g, dy, x, p.out.mutable_data_ptr<scalar_t>(),
                                                                    coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
        } else {
          launch_elementwise<Pass::kBackwardEval, scalar_t, acc_t>(p.g, dy, nullptr, p.out.mutable_data_ptr<scalar_t>(),
                                                                   coeffs.const_data_ptr<acc_t>(), ctx.stream, ctx.device);
        }
      }
    }
    grad_weight = output_mask[1] ? gw.to(param_dtype) : at::empty({0}, input.options().dtype(param_dtype));
    grad_bias = output_mask[2] ? gb.to(param_dtype) : at::empty({0}, input.options().dtype(param_dtype));
  });
  Tensor grad_input;
  if (output_mask[0]) {
    finish(p);
    grad_input = p.result;
  } else {
    grad_input = at::empty({0}, input.options());
  }
  return {grad_input, grad_weight, grad_bias};
}

// The running buffers of an update, as contiguous tensors for its kernel; write_back() copies
// into buffers that were not contiguous.
struct RunningBuffers {
  Tensor mean, var, counter, mean_c, var_c;
  c10::ScalarType dtype;
  RunningBuffers(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                 const c10::optional<Tensor>& num_batches_tracked, const char* op)
      : mean(running_mean.has_value() ? *running_mean : Tensor()),
        var(running_var.has_value() ? *running_var : Tensor()),
        counter(num_batches_tracked.has_value() ? *num_batches_tracked : Tensor()) {
    TORCH_CHECK(!mean.defined() || !var.defined() || mean.scalar_type() == var.scalar_type(), op,
                ": running_var: expected dtype ", mean.scalar_type(), " (running_mean's), got ", var.scalar_type());
    mean_c = mean.defined() ? mean.contiguous() : Tensor();
    var_c = var.defined() ? var.contiguous() : Tensor();
    dtype = mean.defined() ? mean.scalar_type() : (var.defined() ? var.scalar_type() : at::kFloat);
  }
  int64_t* counter_ptr() const { return counter.defined() ? counter.mutable_data_ptr<int64_t>() : nullptr; }
  void write_back() const {
    if (mean.defined() && !mean_c.is_same(mean)) mean.copy_(mean_c);
    if (var.defined() && !var_c.is_same(var)) var.copy_(var_c);
  }
};

void batch_norm_update_running_stats(const c10::optional<Tensor>& running_mean,
                                     const c10::optional<Tensor>& running_var,
                                     const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                                     const Tensor& var, c10::optional<double> momentum, int64_t count) {
  check_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
  const RunningBuffers run(running_mean, running_var, num_batches_tracked, "bn_ext.batch_norm_update_running_stats");
  Context ctx(mean);
  const Tensor m = mean.contiguous(), v = var.to(mean.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run.dtype, "bn_ext_update_running_stats_cuda", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "bn_ext_update_running_stats_cuda", [&] {
      update_running_stats_kernel<run_t, scalar_t><<<1, kThreads, 0, ctx.stream>>>(
          mutable_ptr_or_null<run_t>(run.mean_c), mutable_ptr_or_null<run_t>(run.var_c), run.counter_ptr(),
          m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), m.numel(), momentum.has_value(),
          momentum.value_or(0.0), count);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  run.write_back();
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_gather_stats(const Tensor& stats,
                                                           const c10::optional<Tensor>& running_mean,
                                                           const c10::optional<Tensor>& running_var,
                                                           const c10::optional<Tensor>& num_batches_tracked,
                                                           c10::optional<double> momentum) {
  const int64_t C = check_gather_stats(stats, running_mean, running_var, num_batches_tracked, momentum);
  const RunningBuffers run(running_mean, running_var, num_batches_tracked, "bn_ext.batch_norm_gather_stats");
  Context ctx(stats);
  const Tensor table = stats.contiguous();
  Tensor mean = at::empty({C}, stats.options());
  Tensor var = at::empty({C}, stats.options());
  Tensor count = at::empty({1}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run.dtype, "bn_ext_gather_stats_cuda", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "bn_ext_gather_stats_cuda", [&] {
      gather_stats_kernel<run_t, scalar_t><<<1, kThreads, 0, ctx.stream>>>(
          table.const_data_ptr<scalar_t>(), table.size(0), C, mean.mutable_data_ptr<scalar_t>(),
          var.mutable_data_ptr<scalar_t>(), count.mutable_data_ptr<scalar_t>(), mutable_ptr_or_null<run_t>(run.mean_c),
          mutable_ptr_or_null<run_t>(run.var_c), run.counter_ptr(), momentum.has_value(), momentum.value_or(0.0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  run.write_back();
  return {mean, var, count};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bn_ext, CUDA, m) {
  m.impl("batch_norm_stats", &cuda::batch_norm_stats);
  m.impl("batch_norm_elemt", &cuda::batch_norm_elemt);
  m.impl("batch_norm_train", &cuda::batch_norm_train);
  m.impl("batch_norm_backward_reduce", &cuda::batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &cuda::batch_norm_backward_elemt);
  m.impl("batch_norm_backward", &cuda::batch_norm_backward);
  m.impl("batch_norm_update_running_stats", &cuda::batch_norm_update_running_stats);
  m.impl("batch_norm_gather_stats", &cuda::batch_norm_gather_stats);
}

}  // namespace bn_ext
