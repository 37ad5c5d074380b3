// CPU kernels for every bn_ext op, parallelised with at::parallel_for (torch's own OpenMP pool,
// so torch.set_num_threads applies and no second OpenMP runtime is loaded).
//
// Reductions are split into blocks whose boundaries depend only on the shape, never on the
// thread count, and block partials are merged in block order: results are bitwise identical
// for any number of threads. Inside a block the statistics take two sweeps (sum, then squared
// deviations from the block mean) over data that the first sweep left in cache, and blocks are
// merged with Chan's formula, so memory is read once and large means do not cancel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "bn_ext/checks.h"
#include "bn_ext/layout.h"
#include "bn_ext/math.h"

namespace bn_ext {
namespace cpu {
namespace {

using at::Tensor;

// Elements of one channel per reduction block: 32 KiB of float32, so the second sweep of the
// statistics block reads from L1/L2.
constexpr int64_t kBlockElems = 8192;
// Elements per parallel chunk of the elementwise passes.
constexpr int64_t kElemGrain = 32768;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels-last reductions: at most kMaxRowBlocks blocks of whole rows (so per-block partials
// stay small however large C is), each swept in chunks of about kBlockElems elements. Both
// sizes depend on the shape alone.
constexpr int64_t kMaxRowBlocks = 64;

struct RowBlocks {
  int64_t rows_per_chunk;
  int64_t rows_per_block;  // a multiple of rows_per_chunk
  int64_t blocks;
};

RowBlocks row_blocks(const Geometry& g) {
  RowBlocks rb;
  const int64_t rows = g.rows();
  rb.rows_per_chunk = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(1, g.C));
  const int64_t chunks = ceil_div(rows, rb.rows_per_chunk);
  rb.rows_per_block = rb.rows_per_chunk * std::max<int64_t>(1, ceil_div(chunks, kMaxRowBlocks));
  rb.blocks = ceil_div(rows, rb.rows_per_block);
  return rb;
}

// A per-channel tensor of any floating dtype and stride, read into doubles (`fill` if undefined).
std::vector<double> channel_values(const Tensor& t, int64_t channels, double fill) {
  std::vector<double> out(channels, fill);
  if (!t.defined()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "channel_values", [&] {
    auto a = t.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<double>(a[c]);
  });
  return out;
}

void store_channel_values(const Tensor& t, const std::vector<double>& v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "store_channel_values", [&] {
    auto a = t.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < static_cast<int64_t>(v.size()); ++c) a[c] = static_cast<scalar_t>(v[c]);
  });
}

Tensor channel_tensor(const std::vector<double>& v, const Tensor& input, c10::ScalarType dtype) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())}, input.options().dtype(dtype));
  store_channel_values(t, v);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Loops over one layout.

// fn(c, offset, len): contiguous runs of channel c with flat per-channel index in [start, end)
// (flat index = n * S + s), NC(D)HW layout.
template <typename Fn>
inline void for_each_run_of_channel(const Geometry& g, int64_t c, int64_t start, int64_t end, Fn&& fn) {
  int64_t i = start;
  while (i < end) {
    const int64_t n = i / g.S;
    const int64_t s = i - n * g.S;
    const int64_t len = std::min(end - i, g.S - s);
    fn((n * g.C + c) * g.S + s, len);
    i += len;
  }
}

// fn(c, offset, len) over every element, NC(D)HW layout, in parallel.
template <typename Fn>
void parallel_runs(const Geometry& g, Fn&& fn) {
  at::parallel_for(0, g.numel(), kElemGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t plane = i / g.S;
      const int64_t run_end = std::min(end, (plane + 1) * g.S);
      fn(plane % g.C, i, run_end - i);
      i = run_end;
    }
  });
}

// fn(offset) for each row of C channels, channels-last layout, in parallel.
template <typename Fn>
void parallel_rows(const Geometry& g, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, kElemGrain / std::max<int64_t>(1, g.C));
  at::parallel_for(0, g.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r * g.C);
  });
}

// Sums with eight independent accumulators: the compiler vectorises them, and the order of
// additions is fixed by the code, so results do not depend on anything but the data.
template <typename scalar_t>
inline double sum_run(const scalar_t* p, int64_t len) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(p[i + j]);
  double tail = 0;
  for (; i < len; ++i) tail += static_cast<double>(p[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

template <typename scalar_t>
inline double squared_deviation_run(const scalar_t* p, int64_t len, double mean) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) {
      const double d = static_cast<double>(p[i + j]) - mean;
      acc[j] += d * d;
    }
  double tail = 0;
  for (; i < len; ++i) {
    const double d = static_cast<double>(p[i]) - mean;
    tail += d * d;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// sum(dy) and sum(dy * (x - mean)) over one run.
template <typename scalar_t>
inline void grad_sums_run(const scalar_t* dy, const scalar_t* x, int64_t len, double mean,
                          double* sum_dy, double* sum_dy_xmu) {
  double a[4] = {0, 0, 0, 0};
  double b[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= len; i += 4)
    for (int j = 0; j < 4; ++j) {
      const double g = static_cast<double>(dy[i + j]);
      a[j] += g;
      b[j] += g * (static_cast<double>(x[i + j]) - mean);
    }
  double ta = 0, tb = 0;
  for (; i < len; ++i) {
    const double g = static_cast<double>(dy[i]);
    ta += g;
    tb += g * (static_cast<double>(x[i]) - mean);
  }
  *sum_dy += ((a[0] + a[1]) + (a[2] + a[3])) + ta;
  *sum_dy_xmu += ((b[0] + b[1]) + (b[2] + b[3])) + tb;
}

// ---------------------------------------------------------------------------------------------
// Statistics.

void finish_stats(const std::vector<WelfordPartial<double>>& parts, int64_t channels, int64_t blocks,
                  int64_t block_stride, int64_t channel_stride, std::vector<double>& mean,
                  std::vector<double>& var) {
  at::parallel_for(0, channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      WelfordPartial<double> acc{0, 0, 0};
      for (int64_t k = 0; k < blocks; ++k) acc = welford_merge(acc, parts[k * block_stride + c * channel_stride]);
      mean[c] = acc.mean;
      var[c] = acc.count > 0 ? acc.m2 / acc.count : 0.0;
    }
  });
}

template <typename scalar_t>
void stats_kernel(const scalar_t* x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t rows = g.rows();
  if (g.layout == Layout::kNCS) {
    const int64_t blocks = ceil_div(rows, kBlockElems);
    std::vector<WelfordPartial<double>> parts(g.C * blocks);
    at::parallel_for(0, g.C * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / blocks;
        const int64_t start = (task % blocks) * kBlockElems;
        const int64_t stop = std::min(rows, start + kBlockElems);
        double sum = 0;
        for_each_run_of_channel(g, c, start, stop, [&](int64_t off, int64_t len) { sum += sum_run(x + off, len); });
        const double count = static_cast<double>(stop - start);
        const double block_mean = sum / count;
        double m2 = 0;
        for_each_run_of_channel(g, c, start, stop,
                                [&](int64_t off, int64_t len) { m2 += squared_deviation_run(x + off, len, block_mean); });
        parts[task] = {count, block_mean, m2};
      }
    });
    // parts[c * blocks + k]
    finish_stats(parts, g.C, blocks, /*block_stride=*/1, /*channel_stride=*/blocks, mean, var);
    return;
  }
  // Channels-last: a block is a run of whole rows, swept in cache-sized chunks whose two-sweep
  // statistics are merged into the block's. All channels of a chunk share its count, so the
  // merge is a few vectorisable multiply-adds per channel.
  const RowBlocks rb = row_blocks(g);
  std::vector<WelfordPartial<double>> parts(rb.blocks * g.C);
  at::parallel_for(0, rb.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mean_v(g.C), m2_v(g.C), chunk_mean(g.C), chunk_m2(g.C);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r_end = std::min(rows, (k + 1) * rb.rows_per_block);
      double count = 0;
      double* __restrict bm = mean_v.data();
      double* __restrict b2 = m2_v.data();
      double* __restrict s = chunk_mean.data();
      double* __restrict q = chunk_m2.data();
      for (int64_t r0 = k * rb.rows_per_block; r0 < r_end; r0 += rb.rows_per_chunk) {
        const int64_t r1 = std::min(r_end, r0 + rb.rows_per_chunk);
        std::fill(s, s + g.C, 0.0);
        std::fill(q, q + g.C, 0.0);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* __restrict row = x + r * g.C;
          for (int64_t c = 0; c < g.C; ++c) s[c] += static_cast<double>(row[c]);
        }
        const double n = static_cast<double>(r1 - r0);
        for (int64_t c = 0; c < g.C; ++c) s[c] /= n;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* __restrict row = x + r * g.C;
          for (int64_t c = 0; c < g.C; ++c) {
            const double d = static_cast<double>(row[c]) - s[c];
            q[c] += d * d;
          }
        }
        if (count == 0) {
          std::copy(s, s + g.C, bm);
          std::copy(q, q + g.C, b2);
        } else {  // welford_merge with counts shared by every channel
          const double total = count + n;
          const double share = n / total;
          const double cross = count * share;
          for (int64_t c = 0; c < g.C; ++c) {
            const double delta = s[c] - bm[c];
            bm[c] += delta * share;
            b2[c] += q[c] + delta * delta * cross;
          }
        }
        count += n;
      }
      for (int64_t c = 0; c < g.C; ++c) parts[k * g.C + c] = {count, bm[c], b2[c]};
    }
  });
  finish_stats(parts, g.C, rb.blocks, /*block_stride=*/g.C, /*channel_stride=*/1, mean, var);
}

void compute_stats(const Tensor& x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  mean.assign(g.C, 0.0);
  var.assign(g.C, 0.0);
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_stats",
                                  [&] { stats_kernel(x.const_data_ptr<scalar_t>(), g, mean, var); });
}

// ---------------------------------------------------------------------------------------------
// Elementwise forward: y = ((x - mean_hi) - mean_lo) * scale + shift (math.h, forward_coeffs).

// Per-channel coefficients as arrays, so the channels-last loop vectorises over C.
template <typename opmath_t>
struct Affine {
  std::vector<opmath_t> mean_hi, mean_lo, scale, shift;
};

template <typename opmath_t>
Affine<opmath_t> forward_affine(const std::vector<double>& mean, const std::vector<double>& var,
                                const std::vector<double>& weight, const std::vector<double>& bias, double eps) {
  const int64_t channels = static_cast<int64_t>(mean.size());
  Affine<opmath_t> a;
  for (auto* v : {&a.mean_hi, &a.mean_lo, &a.scale, &a.shift}) v->resize(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const auto k = forward_coeffs<opmath_t>(mean[c], var[c], weight[c], bias[c], eps);
    a.mean_hi[c] = k.mean_hi;
    a.mean_lo[c] = k.mean_lo;
    a.scale[c] = k.scale;
    a.shift[c] = k.shift;
  }
  return a;
}

template <typename scalar_t>
void elemt_kernel(const scalar_t* __restrict x, scalar_t* __restrict y, const Geometry& g,
                  const Affine<at::opmath_type<scalar_t>>& a) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (g.layout == Layout::kNCS) {
    parallel_runs(g, [&](int64_t c, int64_t off, int64_t len) {
      const opmath_t hi = a.mean_hi[c], lo = a.mean_lo[c], sc = a.scale[c], sh = a.shift[c];
      const scalar_t* __restrict xs = x + off;
      scalar_t* __restrict ys = y + off;
      for (int64_t i = 0; i < len; ++i)
        ys[i] = static_cast<scalar_t>(((static_cast<opmath_t>(xs[i]) - hi) - lo) * sc + sh);
    });
    return;
  }
  const opmath_t* __restrict hi = a.mean_hi.data();
  const opmath_t* __restrict lo = a.mean_lo.data();
  const opmath_t* __restrict sc = a.scale.data();
  const opmath_t* __restrict sh = a.shift.data();
  parallel_rows(g, [&](int64_t off) {
    const scalar_t* __restrict xs = x + off;
    scalar_t* __restrict ys = y + off;
    for (int64_t c = 0; c < g.C; ++c)
      ys[c] = static_cast<scalar_t>(((static_cast<opmath_t>(xs[c]) - hi[c]) - lo[c]) * sc[c] + sh[c]);
  });
}

void apply_elemt(const Tensor& x, const Tensor& y, const Geometry& g, const std::vector<double>& mean,
                 const std::vector<double>& var, const std::vector<double>& weight,
                 const std::vector<double>& bias, double eps) {
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_elemt", [&] {
    const auto a = forward_affine<at::opmath_type<scalar_t>>(mean, var, weight, bias, eps);
    elemt_kernel(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, a);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t>
void grad_sums_kernel(const scalar_t* dy, const scalar_t* x, const Geometry& g, const std::vector<double>& mean,
                      std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  const int64_t rows = g.rows();
  if (g.layout == Layout::kNCS) {
    const int64_t blocks = ceil_div(rows, kBlockElems);
    std::vector<double> part_dy(g.C * blocks), part_dy_xmu(g.C * blocks);
    at::parallel_for(0, g.C * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / blocks;
        const int64_t start = (task % blocks) * kBlockElems;
        double a = 0, b = 0;
        for_each_run_of_channel(g, c, start, std::min(rows, start + kBlockElems), [&](int64_t off, int64_t len) {
          grad_sums_run(dy + off, x + off, len, mean[c], &a, &b);
        });
        part_dy[task] = a;
        part_dy_xmu[task] = b;
      }
    });
    for (int64_t c = 0; c < g.C; ++c) {
      double a = 0, b = 0;
      for (int64_t k = 0; k < blocks; ++k) {
        a += part_dy[c * blocks + k];
        b += part_dy_xmu[c * blocks + k];
      }
      sum_dy[c] = a;
      sum_dy_xmu[c] = b;
    }
    return;
  }
  const RowBlocks rb = row_blocks(g);
  const int64_t blocks = rb.blocks;
  std::vector<double> part_dy(blocks * g.C, 0.0), part_dy_xmu(blocks * g.C, 0.0);
  const double* __restrict m = mean.data();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      double* __restrict a = part_dy.data() + k * g.C;
      double* __restrict b = part_dy_xmu.data() + k * g.C;
      const int64_t r1 = std::min(rows, (k + 1) * rb.rows_per_block);
      for (int64_t r = k * rb.rows_per_block; r < r1; ++r) {
        const scalar_t* __restrict dyr = dy + r * g.C;
        const scalar_t* __restrict xr = x + r * g.C;
        for (int64_t c = 0; c < g.C; ++c) {
          const double gv = static_cast<double>(dyr[c]);
          a[c] += gv;
          b[c] += gv * (static_cast<double>(xr[c]) - m[c]);
        }
      }
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    double a = 0, b = 0;
    for (int64_t k = 0; k < blocks; ++k) {
      a += part_dy[k * g.C + c];
      b += part_dy_xmu[k * g.C + c];
    }
    sum_dy[c] = a;
    sum_dy_xmu[c] = b;
  }
}

void compute_grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g, const std::vector<double>& mean,
                       std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  sum_dy.assign(g.C, 0.0);
  sum_dy_xmu.assign(g.C, 0.0);
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_reduce", [&] {
    grad_sums_kernel(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g, mean, sum_dy, sum_dy_xmu);
  });
}

// dx = k_dy * dy + k_x * ((x - mean_hi) - mean_lo) + k_0 (math.h, backward_coeffs); eval mode
// has k_x = k_0 = 0 and does not read x.
template <typename opmath_t>
struct GradCoeffs {
  std::vector<opmath_t> k_dy, k_x, k_0, mean_hi, mean_lo;
};

template <typename scalar_t, bool kTraining>
void grad_input_kernel(const scalar_t* __restrict dy, const scalar_t* __restrict x, scalar_t* __restrict dx,
                       const Geometry& g, const GradCoeffs<at::opmath_type<scalar_t>>& k) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (g.layout == Layout::kNCS) {
    parallel_runs(g, [&](int64_t c, int64_t off, int64_t len) {
      const opmath_t kd = k.k_dy[c], kx = k.k_x[c], k0 = k.k_0[c], hi = k.mean_hi[c], lo = k.mean_lo[c];
      const scalar_t* __restrict dys = dy + off;
      const scalar_t* __restrict xs = x + off;
      scalar_t* __restrict dxs = dx + off;
      for (int64_t i = 0; i < len; ++i) {
        opmath_t v = kd * static_cast<opmath_t>(dys[i]);
        if (kTraining) v += kx * ((static_cast<opmath_t>(xs[i]) - hi) - lo) + k0;
        dxs[i] = static_cast<scalar_t>(v);
      }
    });
    return;
  }
  const opmath_t* __restrict kd = k.k_dy.data();
  const opmath_t* __restrict kx = k.k_x.data();
  const opmath_t* __restrict k0 = k.k_0.data();
  const opmath_t* __restrict hi = k.mean_hi.data();
  const opmath_t* __restrict lo = k.mean_lo.data();
  parallel_rows(g, [&](int64_t off) {
    const scalar_t* __restrict dys = dy + off;
    const scalar_t* __restrict xs = x + off;
    scalar_t* __restrict dxs = dx + off;
    for (int64_t c = 0; c < g.C; ++c) {
      opmath_t v = kd[c] * static_cast<opmath_t>(dys[c]);
      if (kTraining) v += kx[c] * ((static_cast<opmath_t>(xs[c]) - hi[c]) - lo[c]) + k0[c];
      dxs[c] = static_cast<scalar_t>(v);
    }
  });
}

// training: sums and count describe the batch the statistics came from.
void apply_grad_input(const Tensor& dy, const Tensor& x, const Tensor& dx, const Geometry& g, bool training,
                      const std::vector<double>& mean, const std::vector<double>& var,
                      const std::vector<double>& weight, const std::vector<double>& sum_dy,
                      const std::vector<double>& sum_dy_xmu, double eps, int64_t count) {
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    GradCoeffs<opmath_t> k;
    for (auto* v : {&k.k_dy, &k.k_x, &k.k_0, &k.mean_hi, &k.mean_lo}) v->resize(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      const auto kc = backward_coeffs<opmath_t>(mean[c], var[c], weight[c], sum_dy[c], sum_dy_xmu[c], eps,
                                                static_cast<double>(count), training);
      k.k_dy[c] = kc.k_dy;
      k.k_x[c] = kc.k_x;
      k.k_0[c] = kc.k_0;
      k.mean_hi[c] = kc.mean_hi;
      k.mean_lo[c] = kc.mean_lo;
    }
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    if (training) {
      grad_input_kernel<scalar_t, true>(dyp, xp, dxp, g, k);
    } else {
      grad_input_kernel<scalar_t, false>(dyp, xp, dxp, g, k);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Ops.

Tensor defined_or_empty(const c10::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_stats_args(input);
  Operands p = prepare(input, {input}, /*with_output=*/false);
  std::vector<double> mean, var;
  compute_stats(p.inputs[0], p.g, mean, var);
  const auto dt = stat_dtype(input.scalar_type());
  return {channel_tensor(mean, input, dt), channel_tensor(var, input, dt)};
}

Tensor batch_norm_elemt(const Tensor& input, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                        const Tensor& mean, const Tensor& var, double eps) {
  check_elemt_args(input, weight, bias, mean, var, eps);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  const int64_t C = p.g.C;
  apply_elemt(p.inputs[0], p.out, p.g, channel_values(mean, C, 0.0), channel_values(var, C, 0.0),
              channel_values(defined_or_empty(weight), C, 1.0), channel_values(defined_or_empty(bias), C, 0.0), eps);
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias, double eps) {
  check_train_args(input, weight, bias, eps);
  Operands p = prepare(input, {input}, /*with_output=*/true);
  const int64_t C = p.g.C;
  std::vector<double> mean, var;
  compute_stats(p.inputs[0], p.g, mean, var);
  // Normalise with the statistics in double; return them rounded to the stat dtype.
  apply_elemt(p.inputs[0], p.out, p.g, mean, var, channel_values(defined_or_empty(weight), C, 1.0),
              channel_values(defined_or_empty(bias), C, 0.0), eps);
  finish(p);
  const auto dt = stat_dtype(input.scalar_type());
  return {p.result, channel_tensor(mean, input, dt), channel_tensor(var, input, dt)};
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input, const Tensor& mean) {
  check_backward_reduce_args(grad_out, input, mean);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/false);
  std::vector<double> sum_dy, sum_dy_xmu;
  compute_grad_sums(p.inputs[0], p.inputs[1], p.g, channel_values(mean, p.g.C, 0.0), sum_dy, sum_dy_xmu);
  const auto dt = stat_dtype(input.scalar_type());
  return {channel_tensor(sum_dy, input, dt), channel_tensor(sum_dy_xmu, input, dt)};
}

Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const c10::optional<Tensor>& weight,
                                 const Tensor& mean, const Tensor& var, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xmu, double eps, int64_t count) {
  check_backward_elemt_args(grad_out, input, weight, mean, var, sum_dy, sum_dy_xmu, eps, count);
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/true);
  const int64_t C = p.g.C;
  apply_grad_input(p.inputs[0], p.inputs[1], p.out, p.g, /*training=*/true, channel_values(mean, C, 0.0),
                   channel_values(var, C, 0.0), channel_values(defined_or_empty(weight), C, 1.0),
                   channel_values(sum_dy, C, 0.0), channel_values(sum_dy_xmu, C, 0.0), eps, count);
  finish(p);
  return p.result;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const c10::optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& var, double eps, bool training,
                                                       std::array<bool, 3> output_mask) {
  check_backward_args(grad_out, input, weight, mean, var, eps);
  const bool need_sums = training ? output_mask[0] || output_mask[1] || output_mask[2]
                                  : output_mask[1] || output_mask[2];
  Operands p = prepare(input, {grad_out, input}, /*with_output=*/output_mask[0]);
  const int64_t C = p.g.C;
  const Tensor w = defined_or_empty(weight);
  const std::vector<double> mean_v = channel_values(mean, C, 0.0);
  const std::vector<double> var_v = channel_values(var, C, 0.0);
  std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
  if (need_sums) compute_grad_sums(p.inputs[0], p.inputs[1], p.g, mean_v, sum_dy, sum_dy_xmu);

  const auto param_dtype = w.defined() ? w.scalar_type() : stat_dtype(input.scalar_type());
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    apply_grad_input(p.inputs[0], p.inputs[1], p.out, p.g, training, mean_v, var_v, channel_values(w, C, 1.0), sum_dy,
                     sum_dy_xmu, eps, p.g.rows());
    finish(p);
    grad_input = p.result;
  } else {
    grad_input = at::empty({0}, input.options());
  }
  if (output_mask[1]) {
    std::vector<double> gw(C);
    for (int64_t c = 0; c < C; ++c) gw[c] = sum_dy_xmu[c] * invstd_from_var(var_v[c], eps);
    grad_weight = channel_tensor(gw, input, param_dtype);
  } else {
    grad_weight = at::empty({0}, input.options().dtype(param_dtype));
  }
  grad_bias = output_mask[2] ? channel_tensor(sum_dy, input, param_dtype) : at::empty({0}, input.options().dtype(param_dtype));
  return {grad_input, grad_weight, grad_bias};
}

void batch_norm_update_running_stats(const c10::optional<Tensor>& running_mean,
                                     const c10::optional<Tensor>& running_var,
                                     const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                                     const Tensor& var, c10::optional<double> momentum, int64_t count) {
  check_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  // Every check has passed: from here on nothing can fail half-way.
  double factor = momentum.value_or(0.0);
  if (has_nbt) {
    int64_t* n = num_batches_tracked->mutable_data_ptr<int64_t>();
    *n += 1;
    if (!momentum.has_value()) factor = 1.0 / static_cast<double>(*n);
  }
  if (count == 0) return;  // an empty batch is counted but leaves the statistics alone, as in PyTorch
  const int64_t C = mean.numel();
  const std::vector<double> mean_v = channel_values(mean, C, 0.0);
  const std::vector<double> var_v = channel_values(var, C, 0.0);
  if (running_mean.has_value() && running_mean->defined()) {
    std::vector<double> rm = channel_values(*running_mean, C, 0.0);
    for (int64_t c = 0; c < C; ++c) rm[c] = running_blend(rm[c], mean_v[c], factor);
    store_channel_values(*running_mean, rm);
  }
  if (running_var.has_value() && running_var->defined()) {
    std::vector<double> rv = channel_values(*running_var, C, 0.0);
    for (int64_t c = 0; c < C; ++c) rv[c] = running_blend(rv[c], unbiased_from_biased(var_v[c], count), factor);
    store_channel_values(*running_var, rv);
  }
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(bn_ext, CPU, m) {
  m.impl("batch_norm_stats", &cpu::batch_norm_stats);
  m.impl("batch_norm_elemt", &cpu::batch_norm_elemt);
  m.impl("batch_norm_train", &cpu::batch_norm_train);
  m.impl("batch_norm_backward_reduce", &cpu::batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &cpu::batch_norm_backward_elemt);
  m.impl("batch_norm_backward", &cpu::batch_norm_backward);
  m.impl("batch_norm_update_running_stats", &cpu::batch_norm_update_running_stats);
}

}  // namespace bn_ext
