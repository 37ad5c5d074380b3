// How a kernel sees an (N, C, *spatial) tensor: N x C x S with S the product of the spatial
// sizes, in one of two dense layouts. Anything else is copied into one of them by the caller.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace bn_ext {

enum class Layout {
  kNCS,  // NC(D)HW contiguous: each (n, c) plane holds S contiguous elements
  kNSC,  // channels-last (NHWC, NDHWC, or a transposed (N, L, C) for 1d): C contiguous elements per row
};

struct Geometry {
  int64_t N;
  int64_t C;
  int64_t S;
  Layout layout;
  int64_t rows() const { return N * S; }  // elements per channel
  int64_t numel() const { return N * C * S; }
};

inline int64_t spatial_size(const at::Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// Strides of channels-last order: channel fastest, then spatial dims last to first, then batch.
// Size-1 dimensions may carry any stride, as in at::Tensor::is_contiguous.
inline bool is_nsc_dense(const at::Tensor& t) {
  int64_t expected = 1;
  auto step = [&](int64_t d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!step(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!step(d)) return false;
  }
  return step(0);
}

// The layout a kernel can read `t` in without a copy, or false. When both fit (C == 1 or
// S == 1), the element order is the same; pick the one whose inner loop is longer.
inline bool layout_of(const at::Tensor& t, Layout* out) {
  const bool ncs = t.is_contiguous();
  const bool nsc = is_nsc_dense(t);
  if (ncs && nsc) {
    *out = spatial_size(t) >= t.size(1) ? Layout::kNCS : Layout::kNSC;
    return true;
  }
  if (ncs) *out = Layout::kNCS;
  if (nsc) *out = Layout::kNSC;
  return ncs || nsc;
}

inline Geometry geometry_of(const at::Tensor& t, Layout layout) {
  return Geometry{t.size(0), t.size(1), spatial_size(t), layout};
}

// `t` in `layout`: `t` itself when it already is, else a copy (for channels-last, with the
// strides of `like`, a tensor already in that layout).
inline at::Tensor in_layout(const at::Tensor& t, Layout layout, const at::Tensor& like) {
  if (layout == Layout::kNCS) return t.contiguous();
  if (is_nsc_dense(t)) return t;
  at::Tensor copy = at::empty_like(like);
  copy.copy_(t);
  return copy;
}

// `t` (of `like`'s sizes) returned as an op output in `like`'s layout, as the fake kernels
// promise: `t` itself when it has `like`'s strides and is the op's own tensor, else a copy.
inline at::Tensor output_like(const at::Tensor& t, const at::Tensor& like, bool own = true) {
  if (own && t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

// What a kernel works on: every operand (all of `like`'s sizes) in one layout, and the output.
// The output takes the input's memory format (at::empty_like); when that is a dense layout the
// kernels cannot walk (an unusual permutation), they write a contiguous stand-in, copied back
// by finish().
struct Operands {
  Geometry g;
  at::Tensor result;               // what the op returns
  at::Tensor out;                  // what the kernel writes: `result` or its stand-in
  std::vector<at::Tensor> inputs;  // the operands, in the kernel's layout
};

inline Operands prepare(const at::Tensor& like, std::initializer_list<at::Tensor> operands, bool with_output) {
  Operands p;
  Layout layout = Layout::kNCS;
  at::Tensor ref = like;
  if (with_output) {
    p.result = at::empty_like(like);
    if (layout_of(p.result, &layout)) {
      p.out = p.result;
    } else {
      layout = Layout::kNCS;
      p.out = at::empty(like.sizes(), like.options());
    }
    ref = p.out;
  } else if (!layout_of(like, &layout)) {
    layout = Layout::kNCS;
  }
  for (const at::Tensor& t : operands) p.inputs.push_back(in_layout(t, layout, ref));
  p.g = geometry_of(like, layout);
  return p;
}

inline void finish(Operands& p) {
  if (!p.out.is_same(p.result)) p.result.copy_(p.out);
}

}  // namespace bn_ext
