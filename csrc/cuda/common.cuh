// Shared by the CUDA units: launch constants, vector loads, fast division, the reduction partial
// and its block tree, and the launchers each unit defines for the others (explicitly instantiated
// there for the four input dtypes, so the units compile in parallel).
//
// Only c10/cuda headers are included (no cuBLAS/cuSPARSE headers), so a partial CUDA toolkit
// that has nvcc and the runtime headers is enough to build.
#pragma once

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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

enum class Pass { kForward, kBackwardTrain, kBackwardEval };

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
    const WelfordPartial<acc_t> m =
        welford_merge(WelfordPartial<acc_t>{x.a, x.b, x.c}, WelfordPartial<acc_t>{y.a, y.b, y.c});
    return {m.count, m.mean, m.m2};
  }
  return {x.a + y.a, x.b + y.b, acc_t(0)};
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

// ---------------------------------------------------------------------------------------------
// Launchers. Each writes into buffers the caller allocated, on the caller's stream.

// elementwise.cu: out = the pass's formula of a (and b, the backward's x) with coefficients k
// laid out [k][C] (forward: mean_hi, mean_lo, scale, shift; backward: mean_hi, mean_lo, k_dy,
// k_x, k_0; see math.h).
template <Pass kPass, typename scalar_t, typename acc_t>
void launch_elementwise(const Geometry& g, const scalar_t* a, const scalar_t* b, scalar_t* out, const acc_t* k,
                        cudaStream_t stream, int device);

// reduce.cu: per-(channel, block) partials of x (statistics) or of dy and dy * (x - mean) (kGrad),
// as a [C, parts, 3] float64 tensor.
template <Reduce kR, typename scalar_t, typename mean_t = acc_type<scalar_t>>
Tensor launch_reduce(const Geometry& g, const scalar_t* x, const scalar_t* dy, const mean_t* mean, const Tensor& like,
                     cudaStream_t stream);

// channel.cu: per-channel kernels, one thread or one block per channel.
template <typename acc_t>
struct ChannelArgs {  // optional per-channel inputs (nullptr: weight 1, bias 0)
  const acc_t* weight;
  const acc_t* bias;
};

template <typename acc_t>
void launch_finalize_stats(const Partial<red_t>* partials, int64_t C, int64_t parts, acc_t* mean_out, acc_t* var_out,
                           ChannelArgs<acc_t> args, double eps, acc_t* coeffs, cudaStream_t stream);

template <typename acc_t>
void launch_forward_coeffs(const acc_t* mean, const acc_t* var, ChannelArgs<acc_t> args, int64_t C, double eps,
                           acc_t* coeffs, cudaStream_t stream);

template <typename acc_t>
void launch_backward_channel(const Partial<red_t>* partials, int64_t parts, const acc_t* sum_dy_in,
                             const acc_t* sum_dy_xmu_in, const acc_t* mean, const acc_t* var, const acc_t* weight,
                             int64_t C, double eps, double count, bool training, acc_t* sum_dy_out,
                             acc_t* sum_dy_xmu_out, acc_t* grad_weight, acc_t* grad_bias, acc_t* coeffs,
                             cudaStream_t stream);

template <typename run_t, typename stat_t>
void launch_update_running_stats(run_t* running_mean, run_t* running_var, int64_t* num_batches_tracked,
                                 const stat_t* mean, const stat_t* var, int64_t C, bool has_momentum, double momentum,
                                 int64_t count, cudaStream_t stream);

template <typename run_t, typename stat_t>
void launch_gather_stats(const stat_t* stats, int64_t ranks, int64_t C, stat_t* mean_out, stat_t* var_out,
                         stat_t* count_out, run_t* running_mean, run_t* running_var, int64_t* num_batches_tracked,
                         bool has_momentum, double momentum, cudaStream_t stream);

// Instantiates a launcher template for every input dtype with its elementwise accumulation type.
#define BN_EXT_FOR_EACH_INPUT_TYPE(M) \
  M(double, double)                   \
  M(float, float)                     \
  M(at::Half, float)                  \
  M(at::BFloat16, float)

}  // namespace cuda
}  // namespace bn_ext
