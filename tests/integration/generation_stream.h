// Test helper: a Generate call read to its end, as a client sees it (tokens, finish message,
// final gRPC status), and the token-id request the daemon tests send.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "ferry/v1/generation.grpc.pb.h"
#include "gtest/gtest.h"

namespace ferry::testing {

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  ferry::v1::FinishReason reason = ferry::v1::FINISH_REASON_UNSPECIFIED;
  std::string error;  // the finish message's error, if any
  ferry::v1::GenerationTimings timings;  // the finish message's
};

// Greedy unless a temperature is given, end tokens ignored, so the length is exactly max_tokens
// unless the job fails.
inline ferry::v1::GenerateRequest TokenRequest(const std::vector<int32_t>& prompt,
                                               int max_tokens, float temperature = 0,
                                               uint64_t seed = 0) {
  ferry::v1::GenerateRequest request;
  for (int32_t id : prompt) request.mutable_prompt_token_ids()->add_ids(id);
  request.set_max_tokens(max_tokens);
  request.set_ignore_eos(true);
  request.mutable_sampling()->set_temperature(temperature);
  request.mutable_sampling()->set_seed(seed);
  return request;
}

// Reads the whole stream within `deadline`; on_token(count) runs after each token arrives.
inline StreamResult ReadGeneration(ferry::v1::GenerationService::Stub& stub,
                                   const ferry::v1::GenerateRequest& request,
                                   std::chrono::milliseconds deadline,
                                   const std::function<void(int)>& on_token = {}) {
  StreamResult result;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + deadline);
  auto reader = stub.Generate(&context, request);
  ferry::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    if (response.has_token()) {
      EXPECT_EQ(response.token().index(), static_cast<int>(result.tokens.size()));
      result.tokens.push_back(response.token().token_id());
      if (on_token) on_token(static_cast<int>(result.tokens.size()));
    } else if (response.has_finished()) {
      result.reason = response.finished().reason();
      result.error = response.finished().error_message();
      result.timings = response.finished().timings();
    }
  }
  result.status = reader->Finish();
  return result;
}

}  // namespace ferry::testing
