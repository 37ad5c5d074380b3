// What the CPU kernel loops (kernels.h) need, and their entry points, declared once for each
// instruction-set variant. batch_norm_kernel.cpp calls them through cpu_kernels().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bn_ext/activation.h"
#include "bn_ext/layout.h"
#include "bn_ext/math.h"

namespace bn_ext {
namespace cpu {

// Elements of one channel per reduction block (NC(D)HW); shape-only, so results never depend
// on the thread count.
constexpr int64_t kBlockElems = 8192;
// Channels-last reductions use at most this many blocks of rows, each of at least this many
// elements, so that per-block partials (2 doubles per channel) stay small next to the input.
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kRowBlockMinElems = 65536;
// Channels-last reductions split the channels as well when there are fewer than this many row
// blocks per thread, into chunks of at least kMinChunkChannels channels.
constexpr int64_t kMinReductionTasksPerThread = 8;
constexpr int64_t kMinChunkChannels = 128;
// Channels-last reductions add their per-block partials in parallel, kMergeChannels channels a
// piece, from kParallelMergeValues partials (blocks x channels) up.
constexpr int64_t kParallelMergeValues = 8192;
constexpr int64_t kMergeChannels = 256;
// Elements per parallel chunk of the elementwise passes.
constexpr int64_t kElemGrain = 32768;
// What an NC(D)HW run (a plane) or a reduction block costs beyond its values, in values: pieces
// of kElemGrain values of 2 x 2 planes held 8192 runs, so a (4, 2048, 2, 2) tensor was one
// piece and one thread's work.
constexpr int64_t kRunCostValues = 64;
// Elements averaged into each channel's shift for the shifted sums.
constexpr int64_t kShiftSamples = 16;
// Channels-last rows with fewer channels than this, and not a multiple of 8, are walked 8 rows at
// a time (one row of 8 * C values) by the reductions and the elementwise forward.
constexpr int64_t kWideRowChannels = 64;
// Channels of the AVX-512 build's wide channels-last reduction tiles (8 vectors of 16; statistics
// and gradient sums), and the unit of the channel chunks of reductions over at least that many.
constexpr int64_t kWideTileChannels = 128;
// The AVX2 build's (4 vectors of 8), over rows of at least kWideTileChannels channels.
constexpr int64_t kWideTile8Channels = 32;
// Channels-last reductions (statistics, gradient sums) stream their rows (instead of tiling them)
// when they read more than this (twice this machine's L2s: beyond the L2, tiles that read a few
// hundred bytes of each row at a time run slower than in-order streams; should_stream_rows in
// kernels.h) and rows are wide enough for the per-row loop to pay.
constexpr int64_t kStreamedReadBytes = int64_t(4) << 20;
constexpr int64_t kStreamedMinChannels = 64;
// The elementwise passes write their output with non-temporal (streaming) stores when what the
// op reads and writes together fills the last-level cache or more: the output could not stay
// cached through the op anyway (the cache holds other data too), and streaming skips reading
// each output line in before writing it (a third of an elementwise pass's traffic). Below that
// size the output stays in cache for the next layer to read, and plain stores win. `>=`, not `>`:
// tensors that exactly fill the cache cannot keep the output either (docs/design.md,
// "Measurements").
int64_t last_level_cache_bytes();

// Whether the SIMD loops that stream tensors prefetch ahead (simd_loads.h's prefetch_ahead): on
// every CPU but AMD's with AVX-512 (Zen 4), where the loops ran faster without; BN_EXT_PREFETCH=1
// or =0 overrides. Set once, before any op runs (docs/design.md, "Measurements").
extern const bool kPrefetchStreams;

// The bytes of `tensors` tensors of g's shape, elem_size bytes an element.
inline int64_t tensors_bytes(const Geometry& g, int64_t tensors, size_t elem_size) {
  return tensors * g.numel() * static_cast<int64_t>(elem_size);
}
// Whether an op that reads and writes `tensors` such tensors streams its output.
inline bool stream_output(const Geometry& g, int64_t tensors, size_t elem_size) {
  return tensors_bytes(g, tensors, elem_size) >= last_level_cache_bytes();
}

// NC(D)HW training passes go per channel (reduction, then the elementwise pass from cache) when
// there are at least this many channels per thread; below, work is split within channels.
constexpr int64_t kPerChannelMinTasksPerThread = 4;

// Each instruction set's loops compile in two units so that a two-job build runs them side by
// side: the fused backward (its activation x dtype x residual x outputs instantiations take two
// thirds of the time) and everything else. kernels_<isa>.h gives the unit its ISA's options.
#define BN_EXT_CPU_PART_MAIN 1
#define BN_EXT_CPU_PART_ACT_BACKWARD 2

#define BN_EXT_DECLARE_CPU_KERNELS                                                                                     \
  void stats(const at::Tensor& x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var);             \
  void elemt(const at::Tensor& x, const at::Tensor& y, const Geometry& g, const std::vector<double>& mean,             \
             const std::vector<double>& var, const std::vector<double>& weight, const std::vector<double>& bias,       \
             double eps);                                                                                              \
  void train(const at::Tensor& x, const at::Tensor& y, const Geometry& g, const std::vector<double>& weight,           \
             const std::vector<double>& bias, double eps, std::vector<double>& mean, std::vector<double>& var);        \
  void grad_sums(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const std::vector<double>& mean,        \
                 std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu);                                        \
  void grad_input(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const Geometry& g, bool training,   \
                  const std::vector<double>& mean, const std::vector<double>& invstd,                                  \
                  const std::vector<double>& weight, const std::vector<double>& sum_dy,                                \
                  const std::vector<double>& sum_dy_xmu, int64_t count);                                               \
  void backward_train(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const Geometry& g,              \
                      const std::vector<double>& mean, const std::vector<double>& invstd,                              \
                      const std::vector<double>& weight, std::vector<double>& sum_dy,                                  \
                      std::vector<double>& sum_dy_xmu);                                                                \
  std::vector<double> invstds(const std::vector<double>& var, double eps);                                             \
  void act_forward(const at::Tensor& x, const at::Tensor& res, const at::Tensor& y, const Geometry& g,                 \
                   const std::vector<double>& mean, const std::vector<double>& var, const std::vector<double>& weight, \
                   const std::vector<double>& bias, double eps, Act act, double slope, bool after_stats);              \
  void act_train(const at::Tensor& x, const at::Tensor& res, const at::Tensor& y, const Geometry& g,                   \
                 const std::vector<double>& weight, const std::vector<double>& bias, double eps, Act act,              \
                 double slope, std::vector<double>& mean, std::vector<double>& var);                                   \
  void act_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& res, const at::Tensor& dx,            \
                    const at::Tensor& dres, const Geometry& g, bool training, bool sums,                               \
                    const std::vector<double>& mean, const std::vector<double>& invstd,                                \
                    const std::vector<double>& weight, const std::vector<double>& bias, Act act, double slope,         \
                    std::vector<double>& sum_dz, std::vector<double>& sum_dz_xmu);

namespace isa_default {
BN_EXT_DECLARE_CPU_KERNELS
}
namespace isa_avx2 {
BN_EXT_DECLARE_CPU_KERNELS
}
namespace isa_avx512bf16 {
BN_EXT_DECLARE_CPU_KERNELS
}

struct Kernels {
  const char* name;
  decltype(&isa_default::stats) stats;
  decltype(&isa_default::elemt) elemt;
  decltype(&isa_default::train) train;
  decltype(&isa_default::grad_sums) grad_sums;
  decltype(&isa_default::grad_input) grad_input;
  decltype(&isa_default::backward_train) backward_train;
  decltype(&isa_default::invstds) invstds;  // 1 / sqrt(var + eps) per channel, invstd_from_var's bits
  decltype(&isa_default::act_forward) act_forward;
  decltype(&isa_default::act_train) act_train;  // statistics (mean, var sized C) and act_forward
  decltype(&isa_default::act_backward) act_backward;
};

// The variant for this CPU: AVX2+FMA where supported, with AVX-512 BF16 conversions where those
// exist too; BN_EXT_CPU_ISA=default (or =avx2) caps the choice.
const Kernels& cpu_kernels();

}  // namespace cpu
}  // namespace bn_ext
