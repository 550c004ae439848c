// Tiny decoder checkpoints and attention options shared by the CPU decoder tests (tests/unit) and
// the CUDA ones (tests/gpu), so both backends run the same models.
//
// DecoderVariants: the four architectures both decoder tests cover (GQA Llama, Qwen2 with qkv
// bias, llama3 RoPE with q/k/v/o biases and tied embeddings, Mistral).
// MakeTinyDecoderModel: writes a random 2-layer checkpoint of `variant` (hidden 128, 4 q heads,
//   2 KV heads, head_dim 64 so q_out 256 != hidden, vocab 200, 256 positions) in `dtype` under
//   a temporary directory unique to (tag, variant, process) — ctest -j runs cases as parallel
//   processes — and loads it.
// FloatKvAttentionOptions: in-process attention options for `config` with an fp32 KV cache of
//   `blocks` blocks of 16 positions.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/attention_step.h"
#include "runtime/model/checkpoint.h"

namespace ferry::model::test {

struct DecoderVariant {
  const char* name;
  Architecture arch;
  bool llama3;
  bool bias;
  bool tied;
  AttentionKind attention = AttentionKind::kSoftmax;
  kernels::LinearFeatureMap feature_map = kernels::LinearFeatureMap::kOnePlusXMaxNorm;
};

std::vector<DecoderVariant> DecoderVariants();
// Two linear-attention variants (one per feature map) for the backends that run them (the CPU).
std::vector<DecoderVariant> LinearDecoderVariants();

absl::StatusOr<std::unique_ptr<Model>> MakeTinyDecoderModel(std::string_view tag,
                                                            const DecoderVariant& variant,
                                                            DType dtype, uint64_t seed);

InProcessAttentionOptions FloatKvAttentionOptions(const ModelConfig& config, int64_t blocks);

}  // namespace ferry::model::test
