// `ferry generate --coordinator=ADDR`: generation jobs over the coordinator's gRPC API.
//
// One request (the default): tokens stream to stdout as they arrive (text where the coordinator
// has a tokenizer, else ids), then a line with tokens/s and the time to the first token; with
// --json, one JSON object per token and a final one. With --requests M --concurrency N, M copies
// of the job run over N concurrent streams and a summary of latency and throughput is printed
// (and written as JSON with --json). Every call carries a deadline (timeout_s).
#pragma once

#include "absl/status/status.h"
#include "services/cli/model_commands.h"

namespace ferry::cli {

struct GenerateRemoteOptions {
  std::string coordinator = "127.0.0.1:50051";
  int concurrency = 1;
  int requests = 1;
  int timeout_s = 600;
};

// Uses the prompt, sampling, max_tokens, stop_ids, ignore_eos and json fields of `job`.
absl::Status RunGenerateRemote(const GenerateLocalOptions& job,
                               const GenerateRemoteOptions& remote);

}  // namespace ferry::cli
