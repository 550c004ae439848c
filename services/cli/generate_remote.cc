#include "services/cli/generate_remote.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ferry/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "services/common/grpc_status.h"

namespace ferry::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct RunResult {
  absl::Status status;
  int tokens = 0;
  double seconds = 0;
  double first_token_seconds = 0;
  std::string finish_reason;
  int kv_rebuilds = 0;
  int preemptions = 0;
};

ferry::v1::GenerateRequest MakeRequest(const GenerateLocalOptions& job) {
  ferry::v1::GenerateRequest request;
  if (!job.prompt.empty()) {
    request.set_prompt_text(job.prompt);
  } else {
    for (int32_t id : job.prompt_ids) request.mutable_prompt_token_ids()->add_ids(id);
  }
  request.set_max_tokens(job.max_tokens);
  for (int32_t id : job.stop_ids) request.add_stop_token_ids(id);
  request.set_ignore_eos(job.ignore_eos);
  request.mutable_sampling()->set_temperature(static_cast<float>(job.temperature));
  request.mutable_sampling()->set_top_p(static_cast<float>(job.top_p));
  request.mutable_sampling()->set_top_k(job.top_k);
  request.mutable_sampling()->set_seed(job.seed);
  return request;
}

// Runs one stream; `print` echoes tokens as they come.
RunResult RunOne(ferry::v1::GenerationService::Stub& stub, const ferry::v1::GenerateRequest& request,
                 int timeout_s, bool print, bool json) {
  RunResult result;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
  const Clock::time_point start = Clock::now();
  auto reader = stub.Generate(&context, request);
  ferry::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    if (response.has_token()) {
      const ferry::v1::GeneratedToken& token = response.token();
      if (result.tokens++ == 0) {
        result.first_token_seconds = std::chrono::duration<double>(Clock::now() - start).count();
      }
      if (print && json) {
        std::printf("%s\n", nlohmann::json{{"index", token.index()},
                                           {"token_id", token.token_id()},
                                           {"text", token.text()}}
                                .dump()
                                .c_str());
      } else if (print) {
        if (!token.text().empty() || token.token_id() < 0) {
          std::printf("%s", token.text().c_str());
        } else {
          std::printf("%s%d", token.index() == 0 ? "" : " ", token.token_id());
        }
      }
      if (print) std::fflush(stdout);
    } else if (response.has_finished()) {
      result.finish_reason = ferry::v1::FinishReason_Name(response.finished().reason());
      result.kv_rebuilds = response.finished().timings().kv_rebuilds();
      result.preemptions = response.finished().timings().preemptions();
      if (!response.finished().error_message().empty()) {
        result.status = absl::InternalError(response.finished().error_message());
      }
    }
  }
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const grpc::Status status = reader->Finish();
  if (!status.ok()) result.status = services::FromGrpcStatus(status);
  return result;
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[std::min(values.size() - 1, static_cast<size_t>(p * values.size()))];
}

}  // namespace

absl::Status RunGenerateRemote(const GenerateLocalOptions& job,
                               const GenerateRemoteOptions& remote) {
  if (job.prompt.empty() && job.prompt_ids.empty()) {
    return absl::InvalidArgumentError("give --prompt or --prompt-ids");
  }
  auto stub = ferry::v1::GenerationService::NewStub(
      grpc::CreateChannel(remote.coordinator, grpc::InsecureChannelCredentials()));
  const ferry::v1::GenerateRequest request = MakeRequest(job);

  if (remote.requests == 1) {
    const RunResult result = RunOne(*stub, request, remote.timeout_s, true, job.json);
    if (!result.status.ok()) return result.status;
    if (job.json) {
      std::printf("%s\n", nlohmann::json{{"finish_reason", result.finish_reason},
                                         {"tokens", result.tokens},
                                         {"seconds", result.seconds},
                                         {"time_to_first_token_s", result.first_token_seconds},
                                         {"kv_rebuilds", result.kv_rebuilds},
                                         {"preemptions", result.preemptions}}
                              .dump()
                              .c_str());
    } else {
      std::printf("\n%d tokens in %.3f s: %.1f tokens/s (first token after %.3f s), finish: %s\n",
                  result.tokens, result.seconds, result.tokens / std::max(1e-9, result.seconds),
                  result.first_token_seconds, result.finish_reason.c_str());
      if (result.kv_rebuilds > 0 || result.preemptions > 0) {
        std::printf("its KV was rebuilt from its tokens: %d time(s) after a worker failed, %d "
                    "after a preemption (the KV was full)\n",
                    result.kv_rebuilds, result.preemptions);
      }
    }
    return absl::OkStatus();
  }

  std::vector<RunResult> results(remote.requests);
  std::atomic<int> next{0};
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < std::min(remote.concurrency, remote.requests); ++t) {
    threads.emplace_back([&] {
      for (int i = next++; i < remote.requests; i = next++) {
        results[i] = RunOne(*stub, request, remote.timeout_s, false, false);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> latency, first_token;
  int tokens = 0, failed = 0;
  absl::Status first_error;
  for (const RunResult& r : results) {
    if (!r.status.ok()) {
      if (failed++ == 0) first_error = r.status;
      continue;
    }
    latency.push_back(r.seconds);
    first_token.push_back(r.first_token_seconds);
    tokens += r.tokens;
  }
  const nlohmann::json summary = {
      {"requests", remote.requests},        {"concurrency", remote.concurrency},
      {"failed", failed},                   {"tokens", tokens},
      {"wall_s", wall},                     {"tokens_per_s", tokens / std::max(1e-9, wall)},
      {"latency_p50_s", Percentile(latency, 0.5)},
      {"latency_p99_s", Percentile(latency, 0.99)},
      {"ttft_p50_s", Percentile(first_token, 0.5)},
      {"ttft_p99_s", Percentile(first_token, 0.99)}};
  if (job.json) {
    std::printf("%s\n", summary.dump().c_str());
  } else {
    std::printf(
        "%d requests (%d failed) over %d streams in %.3f s: %d tokens, %.1f tokens/s\n"
        "latency p50 %.3f s, p99 %.3f s; first token p50 %.3f s, p99 %.3f s\n",
        remote.requests, failed, remote.concurrency, wall, tokens, tokens / std::max(1e-9, wall),
        Percentile(latency, 0.5), Percentile(latency, 0.99), Percentile(first_token, 0.5),
        Percentile(first_token, 0.99));
  }
  if (failed > 0) {
    return absl::Status(first_error.code(),
                        absl::StrCat(failed, " requests failed; first: ", first_error.message()));
  }
  return absl::OkStatus();
}

}  // namespace ferry::cli
