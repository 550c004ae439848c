// `ferry model make-tiny` and `ferry generate --local`: the CLI's model commands. main.cc parses
// the flags into these option structs; these functions do the work and return a status whose
// message the CLI prints. Output: tokens on stdout as they come (or JSON lines with --json), logs
// on stderr.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "runtime/model/tiny_checkpoint.h"

namespace ferry::cli {

struct MakeTinyFlags {
  ferry::model::TinyCheckpointOptions options;
  std::string arch = "llama";   // llama | mistral | qwen2
  std::string dtype = "bf16";   // bf16 | fp16 | fp32
  std::string rope = "default"; // default | llama3
  int config_form = 5;          // transformers key form: 4 or 5
  std::string attention = "softmax";  // softmax | linear
  std::string feature_map = "1+x";    // linear: 1+x | elu+1 | identity (with --unnormalized)
  bool unnormalized = false;          // linear: no denominator
};
absl::Status RunMakeTiny(MakeTinyFlags flags);

struct GenerateLocalOptions {
  std::string model_dir;
  std::string prompt;
  std::vector<int32_t> prompt_ids;
  int max_tokens = 16;
  double temperature = 0.0;
  double top_p = 1.0;
  int top_k = 0;
  uint64_t seed = 0;
  bool ignore_eos = false;
  std::vector<int32_t> stop_ids;
  bool json = false;
  bool strict = false;
  int threads = 1;
  std::string device = "cpu";      // cpu | cuda | cuda:N: where the model runs
  std::string weight_dtype = "bf16";  // CUDA only: bf16 | fp32 (the CPU backend is fp32)
  std::string kv_dtype;            // fp32 | bf16 | fp16; empty: fp32 on the CPU, bf16 on CUDA
  std::string dump_logits;        // write the logits that chose the last token (JSON) here
};
absl::Status RunGenerateLocal(const GenerateLocalOptions& options);

}  // namespace ferry::cli
