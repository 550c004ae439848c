#include "services/cli/model_commands.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "nlohmann/json.hpp"
#include "runtime/common/log.h"
#include "runtime/model/attention_step.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/cuda_attention.h"
#include "runtime/model/cuda_decoder.h"
#include "runtime/model/decoder.h"
#include "runtime/model/generate.h"
#include "runtime/model/tokenizer.h"

namespace ferry::cli {

using ferry::model::Architecture;

absl::Status RunMakeTiny(MakeTinyFlags flags) {
  auto& o = flags.options;
  if (o.out_dir.empty()) return absl::InvalidArgumentError("make-tiny: --out is required");
  if (flags.arch == "llama") {
    o.arch = Architecture::kLlama;
  } else if (flags.arch == "mistral") {
    o.arch = Architecture::kMistral;
  } else if (flags.arch == "qwen2") {
    o.arch = Architecture::kQwen2;
  } else {
    return absl::InvalidArgumentError("make-tiny: --arch must be llama, mistral or qwen2");
  }
  if (!ParseDType(flags.dtype, &o.dtype)) {
    return absl::InvalidArgumentError("make-tiny: --dtype must be bf16, fp16 or fp32");
  }
  if (flags.rope != "default" && flags.rope != "llama3") {
    return absl::InvalidArgumentError("make-tiny: --rope must be default or llama3");
  }
  o.rope_llama3 = flags.rope == "llama3";
  if (flags.config_form != 4 && flags.config_form != 5) {
    return absl::InvalidArgumentError("make-tiny: --config-form must be 4 or 5");
  }
  o.transformers5_form = flags.config_form == 5;
  if (flags.attention != "softmax" && flags.attention != "linear") {
    return absl::InvalidArgumentError("make-tiny: --attention must be softmax or linear");
  }
  o.attention_kind = flags.attention == "linear" ? ferry::model::AttentionKind::kLinear
                                                 : ferry::model::AttentionKind::kSoftmax;
  if (!ferry::model::ParseLinearFeatureMap(flags.feature_map, &o.linear_feature_map)) {
    return absl::InvalidArgumentError("make-tiny: --feature-map must be 1+x, elu+1 or identity");
  }
  o.linear_normalize = !flags.unnormalized;
  FERRY_RETURN_IF_ERROR(ferry::model::WriteTinyCheckpoint(o));
  FERRY_LOG_INFO("make-tiny: wrote {}", o.out_dir);
  return absl::OkStatus();
}

absl::Status RunGenerateLocal(const GenerateLocalOptions& options) {
  if (options.model_dir.empty()) return absl::InvalidArgumentError("generate: --model is required");
  if (options.prompt.empty() == options.prompt_ids.empty()) {
    return absl::InvalidArgumentError("generate: give exactly one of --prompt and --prompt-ids");
  }
  ferry::model::LoadOptions load;
  load.strict = options.strict;
  load.show_progress = isatty(STDERR_FILENO);
  FERRY_ASSIGN_OR_RETURN(auto model, ferry::model::LoadModel(options.model_dir, load));
  const auto& config = model->config;

  std::unique_ptr<ferry::model::Tokenizer> tokenizer;
  std::vector<int32_t> prompt = options.prompt_ids;
  if (!options.prompt.empty()) {
    FERRY_ASSIGN_OR_RETURN(tokenizer, ferry::model::Tokenizer::LoadFromDir(options.model_dir));
    FERRY_ASSIGN_OR_RETURN(prompt, tokenizer->Encode(options.prompt, /*add_bos=*/true));
  } else {
    // Text out when a tokenizer is there; ids are enough otherwise.
    auto loaded = ferry::model::Tokenizer::LoadFromDir(options.model_dir);
    if (loaded.ok()) tokenizer = std::move(*loaded);
  }

  FERRY_ASSIGN_OR_RETURN(const int device, ferry::model::ParseComputeDevice(options.device));
  ferry::kv::KvCacheConfig kv;
  kv.num_layers = config.num_layers;
  kv.num_kv_heads = config.num_kv_heads;
  kv.head_dim = config.head_dim;
  const std::string kv_dtype = !options.kv_dtype.empty() ? options.kv_dtype
                               : device >= 0            ? "bf16"
                                                        : "fp32";
  if (!ParseDType(kv_dtype, &kv.dtype)) {
    return absl::InvalidArgumentError("generate: --kv-dtype must be fp32, bf16 or fp16");
  }
  kv.block_size = 64;
  const int64_t positions = static_cast<int64_t>(prompt.size()) + options.max_tokens;
  const int64_t blocks = (positions + kv.block_size - 1) / kv.block_size + 1;
  kv.capacity_bytes = blocks * ferry::kv::KvBlockBytes(kv);
  std::unique_ptr<ferry::model::AttentionStep> attention;
  std::unique_ptr<ferry::model::Decoder> decoder;
  const bool linear = config.attention_kind == ferry::model::AttentionKind::kLinear;
  if (device < 0) {
    ferry::model::InProcessAttentionOptions attn;
    attn.num_heads = config.num_heads;
    attn.kv = kv;
    if (linear) {  // one sequence's state
      attn.kv.capacity_bytes = ferry::kv::StateSlotBytes(
          {config.num_layers, config.num_kv_heads, config.head_dim,
           config.num_heads / config.num_kv_heads, 0});
    }
    attn.num_threads = options.threads;
    FERRY_ASSIGN_OR_RETURN(attention, ferry::model::CreateInProcessAttention(config, attn));
    decoder = std::make_unique<ferry::model::Decoder>(*model, *attention);
  } else {
    // The whole prompt is one prefill step, so it bounds the step's rows.
    const int step_rows = std::max<int>(1, static_cast<int>(prompt.size()));
    ferry::model::CudaAttentionOptions attn;
    attn.num_heads = config.num_heads;
    attn.kv = kv;
    attn.device = device;
    attn.max_step_rows = step_rows;
    attn.max_step_seqs = 1;
    FERRY_ASSIGN_OR_RETURN(attention, ferry::model::CreateCudaAttention(attn));
    ferry::model::CudaDecoderOptions dense;
    dense.device = device;
    if (!ParseDType(options.weight_dtype, &dense.weight_dtype) ||
        dense.weight_dtype == DType::kFloat16) {
      return absl::InvalidArgumentError("generate: --weight-dtype must be bf16 or fp32");
    }
    dense.max_rows = step_rows;
    dense.max_chunks = 1;
    FERRY_ASSIGN_OR_RETURN(decoder, ferry::model::CreateCudaDecoder(*model, *attention, dense));
  }

  ferry::model::GenerateOptions gen;
  gen.max_tokens = options.max_tokens;
  gen.sampling.temperature = options.temperature;
  gen.sampling.top_p = options.top_p;
  gen.sampling.top_k = options.top_k;
  gen.sampling.seed = options.seed;
  gen.ignore_eos = options.ignore_eos;
  gen.stop_tokens = options.stop_ids;

  // Text mode decodes everything generated so far and prints what is new: pieces that only
  // make sense in context (sentencepiece's leading spaces) come out right.
  std::vector<int32_t> generated;
  std::string printed;
  auto on_token = [&](int index, int32_t token) {
    if (options.json) {
      std::printf("%s\n", nlohmann::json{{"index", index}, {"token_id", token}}.dump().c_str());
    } else if (tokenizer != nullptr) {
      generated.push_back(token);
      std::string text = tokenizer->Decode(generated);
      if (text.compare(0, printed.size(), printed) == 0) {
        std::fputs(text.c_str() + printed.size(), stdout);
      } else {
        std::fputs(tokenizer->Decode({&token, 1}).c_str(), stdout);
      }
      printed = std::move(text);
    } else {
      std::printf("%s%d", index == 0 ? "" : " ", token);
    }
    std::fflush(stdout);
  };
  FERRY_ASSIGN_OR_RETURN(auto result, ferry::model::Generate(*decoder, 1, prompt, gen, on_token));
  if (options.json) {
    nlohmann::json final_line = {{"token_ids", result.tokens},
                                 {"finish_reason", result.finish_reason},
                                 {"tokens_per_s", result.tokens_per_s},
                                 {"prompt_tokens", prompt.size()},
                                 {"prefill_s", result.prefill_seconds}};
    std::printf("%s\n", final_line.dump().c_str());
  } else {
    std::printf("\n%zu tokens in %.3f s: %.1f tokens/s (prefill of %zu tokens %.3f s), finish: %s\n",
                result.tokens.size(), result.total_seconds, result.tokens_per_s, prompt.size(),
                result.prefill_seconds, result.finish_reason.c_str());
  }
  if (!options.dump_logits.empty()) {
    std::ofstream out(options.dump_logits, std::ios::trunc);
    out << nlohmann::json{{"prompt_ids", prompt},
                          {"token_ids", result.tokens},
                          {"last_logits", result.last_logits}}
               .dump()
        << "\n";
    if (!out) return absl::DataLossError(absl::StrCat("cannot write ", options.dump_logits));
  }
  return absl::OkStatus();
}

}  // namespace ferry::cli
