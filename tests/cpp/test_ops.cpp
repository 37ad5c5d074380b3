// C++ check of the CMake build: the bn_ext operators are registered by loading libbn_ext and
// agree with ATen's batch norm (float64, NCHW and channels-last, a running-stat update).
#include <torch/torch.h>

#include "bn_ext/ops.h"

#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const char* what) {
  const double err = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  if (!(err <= tol)) {
    std::printf("FAIL %s: max abs error %g > %g\n", what, err, tol);
    ++failures;
  } else {
    std::printf("ok   %s (max abs error %g)\n", what, err);
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  for (const bool channels_last : {false, true}) {
    at::Tensor x = torch::randn({4, 5, 7, 9}, torch::kDouble) * 2 + 3;
    if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor w = torch::rand({5}, torch::kDouble) + 0.5, b = torch::randn({5}, torch::kDouble);
    auto [y, mean, var] = bn_ext::ops::batch_norm_train(x, w, b, 1e-5);
    const at::Tensor rm0 = torch::zeros({5}, torch::kDouble), rv0 = torch::ones({5}, torch::kDouble);
    at::Tensor rm = rm0.clone(), rv = rv0.clone(), nbt = torch::zeros({}, torch::kLong);
    bn_ext::ops::batch_norm_update_running_stats(rm, rv, nbt, mean, var, 0.1, x.numel() / 5);
    at::Tensor erm = rm0.clone(), erv = rv0.clone();
    const at::Tensor expected = at::batch_norm(x, w, b, erm, erv, /*training=*/true, 0.1, 1e-5, false);
    const char* layout = channels_last ? "channels_last" : "contiguous";
    std::printf("layout %s\n", layout);
    expect_close(y, expected, 1e-10, "output vs at::batch_norm");
    expect_close(rm, erm, 1e-12, "running_mean");
    expect_close(rv, erv, 1e-12, "running_var");
    if (nbt.item<int64_t>() != 1) {
      std::printf("FAIL num_batches_tracked: %lld\n", static_cast<long long>(nbt.item<int64_t>()));
      ++failures;
    }
    if (channels_last && !y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      std::printf("FAIL output lost the channels_last format\n");
      ++failures;
    }
  }
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
