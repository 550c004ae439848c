// One request's generation on an in-process Decoder: prefill the prompt, then decode token by
// token with a Sampler until an end token or max_tokens.
//
// max_tokens counts new tokens. Generation stops after a token in stop_tokens or, unless
// ignore_eos, after one of the model's eos ids; that token is included in the output (as
// transformers' generate does). finish_reason: "stop" (an end token) or "length".
// on_token(index, token) runs on the calling thread as each token is chosen. The sequence id is
// added to the decoder's attention step and freed before returning (also on error).
// tokens_per_s counts new tokens over the whole call (prefill included).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/decoder.h"
#include "runtime/model/sampler.h"

namespace ferry::model {

struct GenerateOptions {
  int max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_tokens;
  bool ignore_eos = false;
};

struct GenerateResult {
  std::vector<int32_t> tokens;
  std::string finish_reason;
  double prefill_seconds = 0;
  double total_seconds = 0;
  double tokens_per_s = 0;
  std::vector<float> last_logits;  // logits that chose the last token (for parity checks)
};

absl::StatusOr<GenerateResult> Generate(Decoder& decoder, kv::SequenceId seq,
                                        const std::vector<int32_t>& prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(int, int32_t)>& on_token = {});

}  // namespace ferry::model
