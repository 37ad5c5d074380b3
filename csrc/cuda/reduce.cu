// Reductions (statistics, backward sums). A long channel is split across many blocks so the GPU
// fills even with C = 3; every block writes its partial, and channel.cu merges them per channel
// in block order. The partition depends only on the tensor's shape, never on the device or
// timing, and there are no floating-point atomics: results are bitwise identical run to run.
#include "common.cuh"

namespace bn_ext {
namespace cuda {
namespace {

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

}  // namespace

// Launches the reduction of x (and dy) into per-(channel, block) partials; returns them as a
// [C, parts, 3] float64 tensor.
template <Reduce kR, typename scalar_t, typename mean_t>
Tensor launch_reduce(const Geometry& g, const scalar_t* x, const scalar_t* dy, const mean_t* mean, const Tensor& like,
                     cudaStream_t stream) {
  using acc_t = red_t;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t rows = g.rows();
  if (g.layout == Layout::kNCS) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = g.S % kVec == 0 && aligned16(x) && (kR != Reduce::kGrad || aligned16(dy));
    const int64_t step = vec ? kVec : 1;
    int64_t parts =
        std::clamp<int64_t>(ceil_div(rows, kMinElemsPerBlock), 1, std::max<int64_t>(1, kTargetBlocks / g.C));
    parts = std::min<int64_t>(parts, 65535);
    const int64_t chunk = ceil_div(ceil_div(rows, parts), step) * step;  // whole vectors per block
    parts = ceil_div(rows, chunk);
    Tensor partials = at::empty({g.C, parts, 3}, like.options().dtype(acc_dtype));
    const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(std::min<int64_t>(g.C, 65535)));
    auto* out = reinterpret_cast<Partial<acc_t>*>(partials.mutable_data_ptr<acc_t>());
    // S fits 32 bits whenever the kernel divides with it (rows < 2^31 there)
    const FastDiv32 by_plane(static_cast<uint32_t>(std::min<int64_t>(g.S, std::numeric_limits<int32_t>::max())));
    if (vec) {
      reduce_ncs_kernel<kR, scalar_t, acc_t, mean_t, kVec>
          <<<grid, kThreads, 0, stream>>>(x, dy, mean, g.C, g.S, rows, chunk, by_plane, out);
    } else {
      reduce_ncs_kernel<kR, scalar_t, acc_t, mean_t, 1>
          <<<grid, kThreads, 0, stream>>>(x, dy, mean, g.C, g.S, rows, chunk, by_plane, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return partials;
  }
  int tx = 1;
  while (tx < 32 && tx < g.C) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t col_blocks = ceil_div(g.C, tx);
  TORCH_CHECK(col_blocks <= std::numeric_limits<int32_t>::max(), "bn_ext: input: too many channels (", g.C, ")");
  int64_t parts =
      std::clamp<int64_t>(ceil_div(rows, int64_t(ty) * 16), 1, std::max<int64_t>(1, kTargetBlocks / col_blocks));
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

#define BN_EXT_INSTANTIATE(scalar_t, acc_t)                                                                         \
  template Tensor launch_reduce<Reduce::kStats, scalar_t, acc_t>(const Geometry&, const scalar_t*, const scalar_t*, \
                                                                 const acc_t*, const Tensor&, cudaStream_t);        \
  template Tensor launch_reduce<Reduce::kGrad, scalar_t, acc_t>(const Geometry&, const scalar_t*, const scalar_t*,  \
                                                                const acc_t*, const Tensor&, cudaStream_t);
BN_EXT_FOR_EACH_INPUT_TYPE(BN_EXT_INSTANTIATE)
#undef BN_EXT_INSTANTIATE

}  // namespace cuda
}  // namespace bn_ext
