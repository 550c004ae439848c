// gRPC glue for ferry.v1.GenerationService over a BatchScheduler.
//
// Generate validates the request (sizes of every repeated field, sampling parameters), turns a
// text prompt into ids with the model's tokenizer (FAILED_PRECONDITION without one), submits it
// and streams each token as the scheduler produces it, then one `finished` message; a job that
// failed (reason ERROR) then ends the call with its error's status code. The call's
// cancellation (client cancel, deadline, broken stream) cancels the request in the scheduler.
// Stop strings are matched on the decoded text; a match ends the request with reason STOP.
// Every wait is bounded: the handler polls for cancellation every 50 ms and gives up waiting
// for the scheduler's final event `finish_grace` after a cancellation.
// Threads: gRPC runs handlers concurrently; per-call state is shared with the scheduler's
// callbacks through a shared_ptr, so a handler may return before the scheduler's last callback.
#pragma once

#include <chrono>

#include "ferry/v1/generation.grpc.pb.h"
#include "runtime/model/tokenizer.h"
#include "runtime/scheduler/batch_scheduler.h"

namespace ferry::coordinator {

struct GenerationLimits {
  int max_prompt_ids = 1 << 20;
  int max_prompt_text_bytes = 4 << 20;
  int max_stop_token_ids = 64;
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  std::chrono::milliseconds finish_grace{10000};
};

class GenerationServiceImpl final : public ferry::v1::GenerationService::Service {
 public:
  // `scheduler` must outlive the service; `tokenizer` may be null (token ids only).
  GenerationServiceImpl(scheduler::BatchScheduler* scheduler, const model::Tokenizer* tokenizer,
                        GenerationLimits limits = {});

  grpc::Status Generate(grpc::ServerContext* context, const ferry::v1::GenerateRequest* request,
                        grpc::ServerWriter<ferry::v1::GenerateResponse>* writer) override;

 private:
  scheduler::BatchScheduler* const scheduler_;
  const model::Tokenizer* const tokenizer_;
  const GenerationLimits limits_;
};

// The longest prefix of `text` that ends on a whole UTF-8 character, with invalid bytes replaced
// by U+FFFD (protobuf strings must be valid UTF-8).
std::string CompleteUtf8Prefix(const std::string& text);

}  // namespace ferry::coordinator
