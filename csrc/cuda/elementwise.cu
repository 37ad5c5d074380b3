// Elementwise passes (forward, dx): the tensor walked flat, 16 bytes per thread per step where
// alignment allows, each element's channel found with a multiply-shift division; channels-last
// with few enough channels keeps each thread on fixed channels instead.
#include "common.cuh"

namespace bn_ext {
namespace cuda {
namespace {

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

}  // namespace

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
      elementwise_nsc_kernel<kPass, scalar_t, acc_t, V, index_t>
          <<<blocks, kThreads, 0, stream>>>(a, b, out, k, static_cast<index_t>(g.C), static_cast<index_t>(nvec));
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
  struct I32 {
    using type = uint32_t;
  };
  struct I64 {
    using type = uint64_t;
  };
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

#define BN_EXT_INSTANTIATE(scalar_t, acc_t)                                                                            \
  template void launch_elementwise<Pass::kForward, scalar_t, acc_t>(const Geometry&, const scalar_t*, const scalar_t*, \
                                                                    scalar_t*, const acc_t*, cudaStream_t, int);       \
  template void launch_elementwise<Pass::kBackwardTrain, scalar_t, acc_t>(                                             \
      const Geometry&, const scalar_t*, const scalar_t*, scalar_t*, const acc_t*, cudaStream_t, int);                  \
  template void launch_elementwise<Pass::kBackwardEval, scalar_t, acc_t>(                                              \
      const Geometry&, const scalar_t*, const scalar_t*, scalar_t*, const acc_t*, cudaStream_t, int);
BN_EXT_FOR_EACH_INPUT_TYPE(BN_EXT_INSTANTIATE)
#undef BN_EXT_INSTANTIATE

}  // namespace cuda
}  // namespace bn_ext
