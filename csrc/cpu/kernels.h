// CPU kernel loops, compiled once per instruction set: kernels_default.h (baseline x86-64),
// kernels_avx2.h (AVX2 + FMA) and kernels_avx512bf16.h (AVX2 loops with 16-wide AVX-512 bodies
// in front), each wrapping this file in its own namespace (BN_EXT_CPU_ISA), and each included by
// two units that compile one part of the entry points (BN_EXT_CPU_PART, kernels_common.h).
// batch_norm_kernel.cpp picks an instruction set at run time. Everything this file needs is
// included by the including file first, so that the ISA's target options apply to these loops
// only, never to shared inline code.
//
// Statistics: one sweep of shifted sums, sum(x - shift) and sum((x - shift)^2), where `shift` is
// the mean of the channel's first few elements. The SIMD builds sum short chunks (512 values in
// the AVX-512 build, 32 in the AVX2 one and 128 in its bfloat16 runs, or up to 32 channels-last
// rows) in float32 against the shift rounded to float32 and widen each chunk into the float64
// sums, correcting for that rounding; the baseline sums in float64. With the shift near the mean
// the variance does not cancel (a float32 sum of squares of raw values would), and blocks merge
// by plain addition.
// Blocks have shape-only boundaries and are added in block order, so results are bitwise
// identical for any thread count, and for the fused and unfused paths.
//
// NC(D)HW tensors with enough channels run the statistics, training forward and backward per
// channel: the channel's reduction and then its elementwise pass, which reads the channel back
// from cache instead of memory (one read of x per pass over the tensor instead of two); the
// statistics alone take whole channels a task (shift, sums, finish). In the SIMD builds,
// channels that go one at a time (channel_group) are pipelined: one loop sums a channel and runs
// the elementwise pass of the one before (pipelined_channels).

#if !defined(BN_EXT_CPU_ISA) || !defined(BN_EXT_CPU_PART)
#error "define BN_EXT_CPU_ISA and BN_EXT_CPU_PART before including kernels.h"
#endif

namespace bn_ext {
namespace cpu {
namespace BN_EXT_CPU_ISA {
namespace {

using at::Tensor;

// The loops, in the order each needs the one before; each part is included here, inside this
// namespace, and includes nothing itself.
#include "kernels/layout_walks.h"
#include "kernels/work_sharing.h"
#include "kernels/simd_loads.h"
#include "kernels/chunk_sums.h"
#include "kernels/channels_last_tiles.h"
#include "kernels/elementwise_vectors.h"
#include "kernels/rows_streamed.h"
#include "kernels/grad_input_vectors.h"
#include "kernels/run_sums.h"
#include "kernels/reductions.h"
#include "kernels/elementwise.h"
#include "kernels/backward.h"
#include "kernels/activation_vectors.h"
#include "kernels/activation.h"

}  // namespace

// ---- entry points (one set per instruction set) ------------------------------------------------

#if BN_EXT_CPU_PART == BN_EXT_CPU_PART_MAIN
void stats(const Tensor& x, const Geometry& g, std::vector<double>& mean, std::vector<double>& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_stats",
                                  [&] { stats_kernel(x.const_data_ptr<scalar_t>(), g, mean, var); });
}

void elemt(const Tensor& x, const Tensor& y, const Geometry& g, const std::vector<double>& mean,
           const std::vector<double>& var, const std::vector<double>& weight, const std::vector<double>& bias,
           double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_elemt", [&] {
    const Affine<at::opmath_type<scalar_t>> a(mean, var, weight, bias, eps);
    const bool stream = stream_output(g, 2, sizeof(scalar_t));  // x, y
    elemt_kernel(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, a, Sweep::kForward, stream);
  });
}

void train(const Tensor& x, const Tensor& y, const Geometry& g, const std::vector<double>& weight,
           const std::vector<double>& bias, double eps, std::vector<double>& mean, std::vector<double>& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_train", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool stream = stream_output(g, 2, sizeof(scalar_t));  // x, y
    if (per_channel(g)) {
      train_per_channel(xp, y.mutable_data_ptr<scalar_t>(), g, weight, bias, eps, mean, var, stream);
      return;
    }
    stats_kernel(xp, g, mean, var);
    const Affine<at::opmath_type<scalar_t>> a(mean, var, weight, bias, eps);
    elemt_kernel(xp, y.mutable_data_ptr<scalar_t>(), g, a, Sweep::kBackward, stream);
  });
}

std::vector<double> invstds(const std::vector<double>& var, double eps) { return invstd_vector(var, eps); }

void grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g, const std::vector<double>& mean,
               std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_reduce", [&] {
    grad_sums_kernel(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g, mean, sum_dy, sum_dy_xmu);
  });
}

void grad_input(const Tensor& dy, const Tensor& x, const Tensor& dx, const Geometry& g, bool training,
                const std::vector<double>& mean, const std::vector<double>& invstd, const std::vector<double>& weight,
                const std::vector<double>& sum_dy, const std::vector<double>& sum_dy_xmu, int64_t count) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    GradCoeffs<opmath_t> k(g.C);
    const double inv_count = 1.0 / static_cast<double>(count);
    for (int64_t c = 0; c < g.C; ++c)
      k.set(c, backward_coeffs_from_invstd<opmath_t>(mean[c], invstd[c], weight[c], sum_dy[c], sum_dy_xmu[c], inv_count,
                                                     training));
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const bool stream = stream_output(g, training ? 3 : 2, sizeof(scalar_t));  // dy, x (in training), dx
    // In training the gradient sums have just read dy and x (backward_train, or the
    // backward_reduce op before backward_elemt): walk back over what they left in cache.
    if (training) {
      grad_input_kernel<scalar_t, true>(dyp, xp, dxp, g, k, Sweep::kBackward, stream);
    } else {
      grad_input_kernel<scalar_t, false>(dyp, xp, dxp, g, k, Sweep::kForward, stream);
    }
  });
}

void backward_train(const Tensor& dy, const Tensor& x, const Tensor& dx, const Geometry& g,
                    const std::vector<double>& mean, const std::vector<double>& invstd,
                    const std::vector<double>& weight, std::vector<double>& sum_dy, std::vector<double>& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_backward_train", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (per_channel(g)) {
      const bool stream = stream_output(g, 3, sizeof(scalar_t));  // dy, x, dx
      backward_per_channel(dyp, xp, dx.mutable_data_ptr<scalar_t>(), g, mean, invstd, weight, sum_dy, sum_dy_xmu,
                           stream);
      return;
    }
    grad_sums_kernel(dyp, xp, g, mean, sum_dy, sum_dy_xmu);
    grad_input(dy, x, dx, g, /*training=*/true, mean, invstd, weight, sum_dy, sum_dy_xmu, g.rows());
  });
}

void act_forward(const Tensor& x, const Tensor& res, const Tensor& y, const Geometry& g,
                 const std::vector<double>& mean, const std::vector<double>& var, const std::vector<double>& weight,
                 const std::vector<double>& bias, double eps, Act act, double slope, bool after_stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_act_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Affine<opmath_t> a(mean, var, weight, bias, eps);
    const PreAct<opmath_t> k{
        a.mean_hi.data(), a.mean_lo.data(), a.scale.data(), a.shift.data(), static_cast<opmath_t>(slope), a.folded()};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool stream = stream_output(g, res.defined() ? 3 : 2, sizeof(scalar_t));  // x (, residual), y
    const Sweep order = after_stats ? Sweep::kBackward : Sweep::kForward;
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      if (res.defined()) {
        act_forward_kernel<scalar_t, A, true>(xp, res.const_data_ptr<scalar_t>(), yp, g, k, order, stream);
      } else {
        act_forward_kernel<scalar_t, A, false>(xp, nullptr, yp, g, k, order, stream);
      }
    });
  });
}

void act_train(const Tensor& x, const Tensor& res, const Tensor& y, const Geometry& g,
               const std::vector<double>& weight, const std::vector<double>& bias, double eps, Act act, double slope,
               std::vector<double>& mean, std::vector<double>& var) {
  if (!per_channel(g)) {
    stats(x, g, mean, var);
    act_forward(x, res, y, g, mean, var, weight, bias, eps, act, slope, /*after_stats=*/true);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_act_train", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool stream = stream_output(g, res.defined() ? 3 : 2, sizeof(scalar_t));  // x (, residual), y
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      if (res.defined()) {
        act_train_per_channel<scalar_t, A, true>(xp, res.const_data_ptr<scalar_t>(), yp, g, weight, bias, eps,
                                                 static_cast<opmath_t>(slope), mean, var, stream);
      } else {
        act_train_per_channel<scalar_t, A, false>(xp, nullptr, yp, g, weight, bias, eps, static_cast<opmath_t>(slope),
                                                  mean, var, stream);
      }
    });
  });
}

#endif  // BN_EXT_CPU_PART_MAIN

#if BN_EXT_CPU_PART == BN_EXT_CPU_PART_ACT_BACKWARD
void act_backward(const Tensor& dy, const Tensor& x, const Tensor& res, const Tensor& dx, const Tensor& dres,
                  const Geometry& g, bool training, bool sums, const std::vector<double>& mean,
                  const std::vector<double>& invstd, const std::vector<double>& weight, const std::vector<double>& bias,
                  Act act, double slope, std::vector<double>& sum_dz, std::vector<double>& sum_dz_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_ext_act_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Affine<opmath_t> a(mean, invstd, weight, bias);
    const PreAct<opmath_t> k{
        a.mean_hi.data(), a.mean_lo.data(), a.scale.data(), a.shift.data(), static_cast<opmath_t>(slope), a.folded()};
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* drp = dres.defined() ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    TORCH_INTERNAL_ASSERT(rp != nullptr || drp == nullptr, "a residual gradient asked for without a residual");
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      auto run = [&](auto res_tag) {
        constexpr bool kRes = decltype(res_tag)::value;
        // dy, x (, residual) in, dx (, the residual's gradient) out
        const bool stream =
            stream_output(g, 2 + (rp != nullptr) + (dxp != nullptr) + (drp != nullptr), sizeof(scalar_t));
        if (training && sums && (dxp != nullptr || drp != nullptr) && per_channel(g)) {
          auto per_channel_pass = [&](auto dx_tag, auto dres_tag) {
            act_backward_per_channel<scalar_t, A, kRes, decltype(dx_tag)::value, decltype(dres_tag)::value>(
                dyp, xp, rp, dxp, drp, g, k, mean, invstd, weight, sum_dz, sum_dz_xmu, stream);
          };
          if constexpr (!kRes) {
            per_channel_pass(std::true_type{}, std::false_type{});  // no residual: dx only
          } else if (dxp != nullptr && drp != nullptr) {
            per_channel_pass(std::true_type{}, std::true_type{});
          } else if (dxp != nullptr) {
            per_channel_pass(std::true_type{}, std::false_type{});
          } else {
            per_channel_pass(std::false_type{}, std::true_type{});
          }
          return;
        }
        // dz kept from the sums for the dx pass, which then reads it and x where it would read dy,
        // x (and the residual) again and recompute the activation. Where the residual's gradient
        // is asked for and holds dz to the bit (opmath_t, or dz is dy or zero), that output
        // itself; else SiLU's (as act_backward_per_channel does), in a buffer that takes at most
        // half the last-level cache.
        using keep_t = typename ActGradSums<scalar_t, A, kRes>::keep_t;
        std::unique_ptr<opmath_t[]> buffer;
        keep_t* kept = nullptr;
        bool kept_in_dres = false;
        if (training && sums && (dxp != nullptr || drp != nullptr)) {
          if constexpr (std::is_same_v<keep_t, scalar_t>) {
            kept = drp;
            kept_in_dres = drp != nullptr;
          }
          if constexpr (A == Act::kSilu) {
            if (kept == nullptr && 2 * tensors_bytes(g, 1, sizeof(opmath_t)) <= last_level_cache_bytes()) {
              buffer.reset(new opmath_t[g.numel()]);
              kept = buffer.get();
            }
          }
        }
        if (sums) {
          ActGradSums<scalar_t, A, kRes> sum{dyp, xp, rp, k, mean.data(), g.C, g.C};
          sum.keep = kept;
          channel_sums(sum, g, sum_dz, sum_dz_xmu);
        }
        if (dxp == nullptr && drp == nullptr) return;
        GradCoeffs<opmath_t> q(g.C);
        const double inv_count = 1.0 / static_cast<double>(std::max<int64_t>(1, g.rows()));
        for (int64_t c = 0; c < g.C; ++c)
          q.set(c, backward_coeffs_from_invstd<opmath_t>(mean[c], invstd[c], weight[c], sum_dz[c], sum_dz_xmu[c],
                                                         inv_count, training));
        if (kept_in_dres) {
          if (dxp != nullptr) dx_from_kept_kernel(kept, xp, dxp, static_cast<scalar_t*>(nullptr), g, q, stream);
        } else if (kept != nullptr) {
          dx_from_kept_kernel(kept, xp, dxp, drp, g, q, stream);
        } else if (training) {
          act_grad_input_kernel<scalar_t, A, kRes, true>(dyp, xp, rp, dxp, drp, g, k, q, stream);
        } else {
          act_grad_input_kernel<scalar_t, A, kRes, false>(dyp, xp, rp, dxp, drp, g, k, q, stream);
        }
      };
      if (rp != nullptr) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
}

#endif  // BN_EXT_CPU_PART_ACT_BACKWARD

}  // namespace BN_EXT_CPU_ISA
}  // namespace cpu
}  // namespace bn_ext
