#include "runtime/model/generate.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"

namespace ferry::model {
namespace {

absl::Status GenerateLoop(Decoder& decoder, kv::SequenceId seq, const std::vector<int32_t>& prompt,
                          const GenerateOptions& options,
                          const std::function<void(int, int32_t)>& on_token,
                          GenerateResult* result) {
  const ModelConfig& config = decoder.model().config;
  std::vector<int32_t> stops = options.stop_tokens;
  if (!options.ignore_eos) stops.insert(stops.end(), config.eos_token_ids.begin(),
                                        config.eos_token_ids.end());
  Sampler sampler(options.sampling);
  const auto start = std::chrono::steady_clock::now();
  std::vector<float> logits;
  SeqChunk chunk{seq, 0, prompt};
  FERRY_RETURN_IF_ERROR(decoder.Forward({&chunk, 1}, &logits));
  result->prefill_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  int64_t position = static_cast<int64_t>(prompt.size());
  result->finish_reason = "length";
  for (int i = 0; i < options.max_tokens; ++i) {
    if (i > 0) {
      const int32_t previous = result->tokens.back();
      chunk = SeqChunk{seq, position++, {&previous, 1}};
      FERRY_RETURN_IF_ERROR(decoder.Forward({&chunk, 1}, &logits));
    }
    const int32_t token = sampler.Sample(logits);
    result->tokens.push_back(token);
    if (on_token) on_token(i, token);
    if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
      result->finish_reason = "stop";
      break;
    }
  }
  result->last_logits = logits;
  result->total_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result->tokens_per_s = result->total_seconds > 0
                             ? static_cast<double>(result->tokens.size()) / result->total_seconds
                             : 0;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<GenerateResult> Generate(Decoder& decoder, kv::SequenceId seq,
                                        const std::vector<int32_t>& prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(int, int32_t)>& on_token) {
  if (prompt.empty()) return absl::InvalidArgumentError("generate: empty prompt");
  if (options.max_tokens < 0) return absl::InvalidArgumentError("generate: max_tokens < 0");
  FERRY_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  const int64_t needed = static_cast<int64_t>(prompt.size()) + options.max_tokens;
  if (needed > decoder.model().config.max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat(
        "generate: prompt (", prompt.size(), ") plus max tokens (", options.max_tokens,
        ") exceed max_position_embeddings ", decoder.model().config.max_position_embeddings));
  }
  GenerateResult result;
  if (options.max_tokens == 0) {
    result.finish_reason = "length";
    return result;
  }
  FERRY_RETURN_IF_ERROR(decoder.attention().AddSequence(seq));
  const absl::Status status = GenerateLoop(decoder, seq, prompt, options, on_token, &result);
  const absl::Status freed = decoder.attention().FreeSequence(seq);
  FERRY_RETURN_IF_ERROR(status);
  FERRY_RETURN_IF_ERROR(freed);
  return result;
}

}  // namespace ferry::model
