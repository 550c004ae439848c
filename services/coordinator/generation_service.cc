#include "services/coordinator/generation_service.h"

#include <condition_variable>
#include <deque>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "services/common/grpc_status.h"

namespace ferry::coordinator {
namespace {

// What the scheduler's callbacks hand to the handler thread.
struct CallState {
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<int32_t> tokens;
  bool finished = false;
  scheduler::FinishReason reason = scheduler::FinishReason::kError;
  absl::Status error;
  scheduler::GenerationTimings timings;
};

ferry::v1::FinishReason ToProto(scheduler::FinishReason reason) {
  switch (reason) {
    case scheduler::FinishReason::kLength: return ferry::v1::FINISH_REASON_LENGTH;
    case scheduler::FinishReason::kStop: return ferry::v1::FINISH_REASON_STOP;
    case scheduler::FinishReason::kCancelled: return ferry::v1::FINISH_REASON_CANCELLED;
    case scheduler::FinishReason::kError: return ferry::v1::FINISH_REASON_ERROR;
  }
  return ferry::v1::FINISH_REASON_UNSPECIFIED;
}

grpc::Status Invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

// Bytes in a UTF-8 character that starts with `lead`, or 0 when `lead` cannot start one.
int Utf8Length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xc2 && lead <= 0xdf) return 2;
  if (lead >= 0xe0 && lead <= 0xef) return 3;
  if (lead >= 0xf0 && lead <= 0xf4) return 4;
  return 0;
}

}  // namespace

std::string CompleteUtf8Prefix(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const int length = Utf8Length(static_cast<unsigned char>(text[i]));
    if (length == 0) {
      out += "\xef\xbf\xbd";
      ++i;
      continue;
    }
    if (i + length > text.size()) {
      // A character cut at the end: it may complete with the next token.
      bool plausible = true;
      for (size_t j = i + 1; j < text.size(); ++j) {
        plausible &= (static_cast<unsigned char>(text[j]) & 0xc0) == 0x80;
      }
      if (plausible) break;
    }
    bool valid = i + length <= text.size();
    for (int j = 1; valid && j < length; ++j) {
      valid = (static_cast<unsigned char>(text[i + j]) & 0xc0) == 0x80;
    }
    if (!valid) {
      out += "\xef\xbf\xbd";
      ++i;
      continue;
    }
    out.append(text, i, length);
    i += length;
  }
  return out;
}

GenerationServiceImpl::GenerationServiceImpl(scheduler::BatchScheduler* scheduler,
                                             const model::Tokenizer* tokenizer,
                                             GenerationLimits limits)
    : scheduler_(scheduler), tokenizer_(tokenizer), limits_(limits) {}

grpc::Status GenerationServiceImpl::Generate(
    grpc::ServerContext* context, const ferry::v1::GenerateRequest* request,
    grpc::ServerWriter<ferry::v1::GenerateResponse>* writer) {
  scheduler::GenerationRequest job;
  switch (request->prompt_case()) {
    case ferry::v1::GenerateRequest::kPromptTokenIds:
      if (request->prompt_token_ids().ids_size() > limits_.max_prompt_ids) {
        return Invalid(absl::StrCat("prompt_token_ids has more than ", limits_.max_prompt_ids,
                                    " ids"));
      }
      job.prompt.assign(request->prompt_token_ids().ids().begin(),
                        request->prompt_token_ids().ids().end());
      break;
    case ferry::v1::GenerateRequest::kPromptText: {
      if (static_cast<int>(request->prompt_text().size()) > limits_.max_prompt_text_bytes) {
        return Invalid(absl::StrCat("prompt_text is longer than ", limits_.max_prompt_text_bytes,
                                    " bytes"));
      }
      if (tokenizer_ == nullptr) {
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                            "the model has no tokenizer: send prompt_token_ids");
      }
      auto ids = tokenizer_->Encode(request->prompt_text(), /*add_bos=*/true);
      if (!ids.ok()) return services::ToGrpcStatus(ids.status());
      job.prompt = std::move(*ids);
      break;
    }
    default:
      return Invalid("a prompt (prompt_text or prompt_token_ids) is required");
  }
  if (request->stop_token_ids_size() > limits_.max_stop_token_ids) {
    return Invalid(absl::StrCat("more than ", limits_.max_stop_token_ids, " stop_token_ids"));
  }
  if (request->stop_strings_size() > limits_.max_stop_strings) {
    return Invalid(absl::StrCat("more than ", limits_.max_stop_strings, " stop_strings"));
  }
  for (const std::string& stop : request->stop_strings()) {
    if (stop.empty() || static_cast<int>(stop.size()) > limits_.max_stop_string_bytes) {
      return Invalid(absl::StrCat("stop strings must have 1 to ", limits_.max_stop_string_bytes,
                                  " bytes"));
    }
  }
  if (request->stop_strings_size() > 0 && tokenizer_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "stop_strings need a tokenizer");
  }
  job.max_tokens = request->max_tokens();
  job.stop_tokens.assign(request->stop_token_ids().begin(), request->stop_token_ids().end());
  job.ignore_eos = request->ignore_eos();
  job.sampling.temperature = request->sampling().temperature();
  job.sampling.top_k = request->sampling().top_k();
  job.sampling.top_p = request->sampling().top_p() > 0 ? request->sampling().top_p() : 1.0;
  job.sampling.seed = request->sampling().seed();

  auto state = std::make_shared<CallState>();
  scheduler::GenerationCallbacks callbacks;
  callbacks.on_token = [state](int, int32_t token) {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->tokens.push_back(token);
    state->changed.notify_all();
  };
  callbacks.on_finish = [state](scheduler::FinishReason reason, const absl::Status& error,
                                const scheduler::GenerationTimings& timings) {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->finished = true;
    state->reason = reason;
    state->error = error;
    state->timings = timings;
    state->changed.notify_all();
  };
  absl::StatusOr<uint64_t> id = scheduler_->Submit(std::move(job), std::move(callbacks));
  if (!id.ok()) return services::ToGrpcStatus(id.status());

  std::vector<int32_t> generated;
  std::string emitted_text;
  bool cancel_sent = false;
  bool stopped_by_string = false;
  std::chrono::steady_clock::time_point cancel_time;
  auto cancel = [&] {
    if (cancel_sent) return;
    scheduler_->Cancel(*id);
    cancel_sent = true;
    cancel_time = std::chrono::steady_clock::now();
  };
  while (true) {
    std::deque<int32_t> tokens;
    bool finished = false;
    {
      std::unique_lock<std::mutex> lock(state->mutex);
      state->changed.wait_for(lock, std::chrono::milliseconds(50),
                              [&] { return state->finished || !state->tokens.empty(); });
      tokens.swap(state->tokens);
      finished = state->finished;
    }
    if (context->IsCancelled()) cancel();
    for (int32_t token : tokens) {
      if (stopped_by_string) break;
      generated.push_back(token);
      ferry::v1::GenerateResponse response;
      ferry::v1::GeneratedToken* out = response.mutable_token();
      out->set_index(static_cast<int>(generated.size()) - 1);
      out->set_token_id(token);
      if (tokenizer_ != nullptr) {
        const std::string text = CompleteUtf8Prefix(tokenizer_->Decode(generated));
        if (text.size() >= emitted_text.size()) {
          out->set_text(text.substr(emitted_text.size()));
          emitted_text = text;
        }
        for (const std::string& stop : request->stop_strings()) {
          if (emitted_text.find(stop) != std::string::npos) stopped_by_string = true;
        }
      }
      if (!cancel_sent && !writer->Write(response)) cancel();  // the client went away
      if (stopped_by_string) cancel();
    }
    if (finished) break;
    if (cancel_sent && std::chrono::steady_clock::now() - cancel_time > limits_.finish_grace) {
      return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    }
  }

  std::lock_guard<std::mutex> lock(state->mutex);
  if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
  ferry::v1::GenerateResponse response;
  ferry::v1::GenerationFinished* finished = response.mutable_finished();
  finished->set_reason(stopped_by_string ? ferry::v1::FINISH_REASON_STOP : ToProto(state->reason));
  if (!state->error.ok()) finished->set_error_message(state->error.ToString());
  ferry::v1::GenerationTimings* timings = finished->mutable_timings();
  timings->set_queue_ms(state->timings.queue_ms);
  timings->set_time_to_first_token_ms(state->timings.time_to_first_token_ms);
  timings->set_total_ms(state->timings.total_ms);
  timings->set_prompt_tokens(state->timings.prompt_tokens);
  timings->set_generated_tokens(static_cast<int>(generated.size()));
  timings->set_kv_rebuilds(state->timings.kv_rebuilds);
  timings->set_preemptions(state->timings.preemptions);
  writer->Write(response);
  // A job that failed ends the call with its error's code (e.g. RESOURCE_EXHAUSTED when its KV
  // cannot fit, UNAVAILABLE when the worker holding it died), after the finish message.
  if (!stopped_by_string && state->reason == scheduler::FinishReason::kError &&
      !state->error.ok()) {
    return services::ToGrpcStatus(state->error);
  }
  return grpc::Status::OK;
}

}  // namespace ferry::coordinator
