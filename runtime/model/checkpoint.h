// Loading a Hugging Face model folder: config.json plus model.safetensors, or shards listed in
// model.safetensors.index.json.
//
// Weights are converted to float32 at load, whatever the checkpoint's dtype (bf16, fp16, fp32):
// the CPU backend runs OpenBLAS sgemm, and fp32 arithmetic is what the parity tests compare with
// a float64 reference. That costs 2x the memory of a bf16 checkpoint; the CUDA backend keeps bf16.
// Before anything large is allocated every header is validated (safetensors.h) and every tensor
// the model needs is checked: present, a floating dtype (F32, F16, BF16), the shape the config
// implies. Tensors the model does not use (rotary inv_freq buffers, ...) are logged and skipped,
// or refused when options.strict. Errors: NOT_FOUND for missing files or tensors,
// INVALID_ARGUMENT for bad headers, dtypes or shapes; each message names the tensor.
// Layout after load (row-major, float32, HF's [out_features, in_features]):
//   embed (vocab, hidden); per layer wqkv (q_out + 2 kv_out, hidden) = q_proj;k_proj;v_proj
//   stacked, bqkv (q_out + 2 kv_out) or empty, wo (hidden, q_out), bo (hidden) or empty,
//   w_gate_up (2 * intermediate, hidden) = gate_proj;up_proj, w_down (hidden, intermediate),
//   norms (hidden); lm_head (vocab, hidden), empty when tied to embed.
// A loaded Model is immutable and may be shared by threads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/model_config.h"

namespace ferry::model {

struct LayerWeights {
  std::vector<float> input_norm;
  std::vector<float> wqkv;
  std::vector<float> bqkv;
  std::vector<float> wo;
  std::vector<float> bo;
  std::vector<float> post_norm;
  std::vector<float> w_gate_up;
  std::vector<float> w_down;
};

struct Model {
  ModelConfig config;
  std::vector<float> embed;
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;
  std::vector<float> lm_head;  // empty when tie_word_embeddings
  const float* lm_head_data() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
};

struct LoadOptions {
  bool strict = false;      // refuse tensors the model does not use
  bool show_progress = false;  // log progress per tenth of the bytes converted
};

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir,
                                                 const LoadOptions& options = {});

}  // namespace ferry::model
