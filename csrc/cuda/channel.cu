// Per-channel kernels: merge a reduction's partials in block order (in double), write the
// statistics or sums and the elementwise coefficients; blend the running statistics; merge
// SyncBatchNorm's per-rank rows.
#include "common.cuh"

namespace bn_ext {
namespace cuda {
namespace {

// One thread per channel / one block per channel.
unsigned channel_blocks(int64_t C) { return static_cast<unsigned>(std::max<int64_t>(1, ceil_div(C, kThreads))); }
unsigned channel_grid(int64_t C) { return static_cast<unsigned>(std::clamp<int64_t>(C, 1, 65535)); }

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
        const auto k =
            forward_coeffs<acc_t>(acc.b, var, value_or(args.weight, c, 1.0), value_or(args.bias, c, 0.0), eps);
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
  const auto k =
      forward_coeffs<acc_t>(mean[c], var[c], value_or(args.weight, c, 1.0), value_or(args.bias, c, 0.0), eps);
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
                            acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias,
                            acc_t* __restrict__ coeffs) {
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
        const auto k = backward_coeffs<acc_t>(static_cast<double>(mean[c]), v, value_or(weight, c, 1.0), sdy, sdx, eps,
                                              count, training);
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

}  // namespace

template <typename acc_t>
void launch_finalize_stats(const Partial<red_t>* partials, int64_t C, int64_t parts, acc_t* mean_out, acc_t* var_out,
                           ChannelArgs<acc_t> args, double eps, acc_t* coeffs, cudaStream_t stream) {
  finalize_stats_kernel<acc_t>
      <<<channel_grid(C), kThreads, 0, stream>>>(partials, C, parts, mean_out, var_out, args, eps, coeffs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_forward_coeffs(const acc_t* mean, const acc_t* var, ChannelArgs<acc_t> args, int64_t C, double eps,
                           acc_t* coeffs, cudaStream_t stream) {
  forward_coeffs_kernel<acc_t><<<channel_blocks(C), kThreads, 0, stream>>>(mean, var, args, C, eps, coeffs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_backward_channel(const Partial<red_t>* partials, int64_t parts, const acc_t* sum_dy_in,
                             const acc_t* sum_dy_xmu_in, const acc_t* mean, const acc_t* var, const acc_t* weight,
                             int64_t C, double eps, double count, bool training, acc_t* sum_dy_out,
                             acc_t* sum_dy_xmu_out, acc_t* grad_weight, acc_t* grad_bias, acc_t* coeffs,
                             cudaStream_t stream) {
  backward_channel_kernel<acc_t><<<channel_grid(C), kThreads, 0, stream>>>(
      partials, parts, sum_dy_in, sum_dy_xmu_in, mean, var, weight, C, eps, count, training, sum_dy_out, sum_dy_xmu_out,
      grad_weight, grad_bias, coeffs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename run_t, typename stat_t>
void launch_update_running_stats(run_t* running_mean, run_t* running_var, int64_t* num_batches_tracked,
                                 const stat_t* mean, const stat_t* var, int64_t C, bool has_momentum, double momentum,
                                 int64_t count, cudaStream_t stream) {
  update_running_stats_kernel<run_t, stat_t><<<1, kThreads, 0, stream>>>(running_mean, running_var, num_batches_tracked,
                                                                         mean, var, C, has_momentum, momentum, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename run_t, typename stat_t>
void launch_gather_stats(const stat_t* stats, int64_t ranks, int64_t C, stat_t* mean_out, stat_t* var_out,
                         stat_t* count_out, run_t* running_mean, run_t* running_var, int64_t* num_batches_tracked,
                         bool has_momentum, double momentum, cudaStream_t stream) {
  gather_stats_kernel<run_t, stat_t><<<1, kThreads, 0, stream>>>(stats, ranks, C, mean_out, var_out, count_out,
                                                                 running_mean, running_var, num_batches_tracked,
                                                                 has_momentum, momentum);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Statistics and coefficients come in float32 or float64.
#define BN_EXT_INSTANTIATE_ACC(acc_t)                                                                                 \
  template void launch_finalize_stats<acc_t>(const Partial<red_t>*, int64_t, int64_t, acc_t*, acc_t*,                 \
                                             ChannelArgs<acc_t>, double, acc_t*, cudaStream_t);                       \
  template void launch_forward_coeffs<acc_t>(const acc_t*, const acc_t*, ChannelArgs<acc_t>, int64_t, double, acc_t*, \
                                             cudaStream_t);                                                           \
  template void launch_backward_channel<acc_t>(const Partial<red_t>*, int64_t, const acc_t*, const acc_t*,            \
                                               const acc_t*, const acc_t*, const acc_t*, int64_t, double, double,     \
                                               bool, acc_t*, acc_t*, acc_t*, acc_t*, acc_t*, cudaStream_t);
BN_EXT_INSTANTIATE_ACC(float)
BN_EXT_INSTANTIATE_ACC(double)
#undef BN_EXT_INSTANTIATE_ACC

// Running buffers come in any floating dtype; batch statistics in any (an update) or float32 /
// float64 (SyncBatchNorm's gathered table).
#define BN_EXT_INSTANTIATE_UPDATE(run_t, stat_t)                                                                   \
  template void launch_update_running_stats<run_t, stat_t>(run_t*, run_t*, int64_t*, const stat_t*, const stat_t*, \
                                                           int64_t, bool, double, int64_t, cudaStream_t);
#define BN_EXT_INSTANTIATE_GATHER(run_t, stat_t)                                                                       \
  template void launch_gather_stats<run_t, stat_t>(const stat_t*, int64_t, int64_t, stat_t*, stat_t*, stat_t*, run_t*, \
                                                   run_t*, int64_t*, bool, double, cudaStream_t);
#define BN_EXT_INSTANTIATE_RUN(run_t, unused)    \
  BN_EXT_INSTANTIATE_UPDATE(run_t, double)       \
  BN_EXT_INSTANTIATE_UPDATE(run_t, float)        \
  BN_EXT_INSTANTIATE_UPDATE(run_t, at::Half)     \
  BN_EXT_INSTANTIATE_UPDATE(run_t, at::BFloat16) \
  BN_EXT_INSTANTIATE_GATHER(run_t, double)       \
  BN_EXT_INSTANTIATE_GATHER(run_t, float)
BN_EXT_FOR_EACH_INPUT_TYPE(BN_EXT_INSTANTIATE_RUN)
#undef BN_EXT_INSTANTIATE_RUN
#undef BN_EXT_INSTANTIATE_GATHER
#undef BN_EXT_INSTANTIATE_UPDATE

}  // namespace cuda
}  // namespace bn_ext
