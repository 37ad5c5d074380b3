// The activations of the fused ops (batch_norm_act*), named in their schemas by a string.
#pragma once

#include <c10/util/Exception.h>

#include <string>

namespace bn_ext {

enum class Act : int { kIdentity, kRelu, kRelu6, kLeakyRelu, kSilu };

inline Act parse_activation(const std::string& name, const char* op) {
  if (name == "identity") return Act::kIdentity;
  if (name == "relu") return Act::kRelu;
  if (name == "relu6") return Act::kRelu6;
  if (name == "leaky_relu") return Act::kLeakyRelu;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK(false, op,
              ": activation: expected one of \"identity\", \"relu\", \"relu6\", \"leaky_relu\", \"silu\", got \"", name,
              "\"");
}

}  // namespace bn_ext
