#include "runtime/scheduler/batch_scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "runtime/common/log.h"

namespace ferry::scheduler {
namespace {

double Milliseconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

// A failure that says the request's KV is gone or unreachable: the worker holding it died (the
// peer reset, became unreachable) or did not answer within its bound.
bool KvLostWithWorker(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable ||
         status.code() == absl::StatusCode::kDeadlineExceeded;
}

}  // namespace

BatchScheduler::BatchScheduler(model::Decoder& decoder, BatchSchedulerOptions options)
    : decoder_(decoder), options_(std::move(options)) {
  thread_ = std::thread([this] { Loop(); });
}

BatchScheduler::~BatchScheduler() { Stop(); }

absl::StatusOr<uint64_t> BatchScheduler::Submit(GenerationRequest request,
                                                GenerationCallbacks callbacks) {
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (static_cast<int64_t>(request.prompt.size()) > options_.max_prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has more than ",
                                                   options_.max_prompt_tokens, " tokens"));
  }
  const int vocab = decoder_.model().config.vocab_size;
  for (int32_t token : request.prompt) {
    if (token < 0 || token >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token ", token, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  if (request.max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be >= 1");
  const int64_t max_positions = decoder_.model().config.max_position_embeddings;
  if (max_positions > 0 &&
      static_cast<int64_t>(request.prompt.size()) + request.max_tokens > max_positions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", request.prompt.size(), ") + max_tokens (", request.max_tokens,
        ") exceeds the model's ", max_positions, " positions"));
  }
  if (absl::Status valid = model::ValidateSamplingParams(request.sampling); !valid.ok()) {
    return valid;
  }
  if (!callbacks.on_finish) return absl::InvalidArgumentError("on_finish is required");

  auto active = std::make_unique<Active>();
  active->request = std::move(request);
  active->callbacks = std::move(callbacks);
  active->sampler = std::make_unique<model::Sampler>(active->request.sampling);
  active->submitted = Clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_) return absl::UnavailableError("the scheduler is stopping");
  if (!accepting_) return absl::UnavailableError("shutting down: no new requests");
  if (static_cast<int>(queue_.size()) >= options_.max_queued) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the queue is full (", options_.max_queued, " requests)"));
  }
  active->id = next_id_++;
  ++stats_.submitted;
  const uint64_t id = active->id;
  queue_.push_back(std::move(active));
  wake_.notify_all();
  return id;
}

void BatchScheduler::Cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  cancelled_.insert(id);
  wake_.notify_all();
}

void BatchScheduler::StopAccepting() {
  std::lock_guard<std::mutex> lock(mutex_);
  accepting_ = false;
}

void BatchScheduler::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

size_t BatchScheduler::running() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return running_count_;
}

size_t BatchScheduler::queued() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size() + preempted_count_;
}

int64_t BatchScheduler::steps() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_.steps;
}

SchedulerStats BatchScheduler::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  SchedulerStats stats = stats_;
  stats.running = static_cast<int64_t>(running_count_);
  stats.waiting = static_cast<int64_t>(queue_.size() + preempted_count_);
  return stats;
}

void BatchScheduler::Finish(Active& active, FinishReason reason, const absl::Status& error) {
  if (active.added_to_attention) {
    ++finished_;  // its KV is freed: room for a preempted request
    if (absl::Status freed = decoder_.attention().FreeSequence(active.id); !freed.ok()) {
      FERRY_LOG_ERROR("request {}: freeing its kv failed: {}", active.id, freed.ToString());
    }
    active.added_to_attention = false;
  }
  const Clock::time_point now = Clock::now();
  GenerationTimings timings;
  const bool admitted = active.admitted != Clock::time_point();
  timings.queue_ms = Milliseconds((admitted ? active.admitted : now) - active.submitted);
  if (!active.generated.empty()) {
    timings.time_to_first_token_ms = Milliseconds(active.first_token - active.submitted);
  }
  timings.total_ms = Milliseconds(now - active.submitted);
  timings.prompt_tokens = static_cast<int>(active.request.prompt.size());
  timings.generated_tokens = static_cast<int>(active.generated.size());
  timings.kv_rebuilds = active.rebuilds;
  timings.preemptions = active.preemptions;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    switch (reason) {
      case FinishReason::kLength: ++stats_.finished_length; break;
      case FinishReason::kStop: ++stats_.finished_stop; break;
      case FinishReason::kCancelled: ++stats_.cancelled; break;
      case FinishReason::kError: ++stats_.failed; break;
    }
  }
  active.callbacks.on_finish(reason, error, timings);
}

void BatchScheduler::ReleaseKvForRebuild(Active& active) {
  if (active.added_to_attention) {
    // Frees what survives; a dead worker's part is gone with it.
    if (absl::Status freed = decoder_.attention().FreeSequence(active.id); !freed.ok()) {
      FERRY_LOG_WARN("request {}: freeing its kv failed: {}", active.id, freed.ToString());
    }
    active.added_to_attention = false;
  }
  active.prompt_read = 0;
  active.rebuild.clear();
  if (!active.generated.empty()) {
    active.rebuild = active.request.prompt;
    active.rebuild.insert(active.rebuild.end(), active.generated.begin(),
                          active.generated.end() - 1);
  }
}

absl::Status BatchScheduler::RebuildKv(Active& active) {
  ReleaseKvForRebuild(active);
  FERRY_RETURN_IF_ERROR(decoder_.attention().AddSequence(active.id));
  active.added_to_attention = true;
  ++active.rebuilds;
  std::lock_guard<std::mutex> lock(mutex_);
  ++stats_.kv_rebuilds;
  return absl::OkStatus();
}

void BatchScheduler::Preempt(Active* active) {
  ReleaseKvForRebuild(*active);
  active->finished_before_preemption = finished_;
  ++active->preemptions;
  auto it = std::find_if(running_.begin(), running_.end(),
                         [&](const auto& a) { return a.get() == active; });
  // Oldest first: a request preempted again goes back before younger ones.
  auto at = std::find_if(preempted_.begin(), preempted_.end(),
                         [&](const auto& p) { return p->id > active->id; });
  preempted_.insert(at, std::move(*it));
  running_.erase(it);
  std::lock_guard<std::mutex> lock(mutex_);
  ++stats_.preemptions;
}

void BatchScheduler::Admit() {
  std::vector<std::unique_ptr<Active>> admitted;
  const bool room_freed =
      !preempted_.empty() && (running_.empty() ||
                              finished_ > preempted_.front()->finished_before_preemption);
  while (room_freed && !preempted_.empty() &&
         static_cast<int>(running_.size() + admitted.size()) < options_.max_running) {
    admitted.push_back(std::move(preempted_.front()));
    preempted_.pop_front();
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    while (preempted_.empty() && !queue_.empty() &&
           static_cast<int>(running_.size() + admitted.size()) < options_.max_running) {
      admitted.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
  }
  for (auto& active : admitted) {
    const bool resumed = active->admitted != Clock::time_point();
    if (!resumed) {
      active->admitted = Clock::now();
      const int64_t prompt = static_cast<int64_t>(active->request.prompt.size());
      const int64_t positions = prompt + active->request.max_tokens;
      if (absl::Status fits = decoder_.attention().CheckCapacity(positions); !fits.ok()) {
        Finish(*active, FinishReason::kError, fits);
        continue;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      stats_.prompt_tokens += prompt;
    }
    if (absl::Status added = decoder_.attention().AddSequence(active->id); !added.ok()) {
      FERRY_LOG_WARN("request {}: not admitted: {}", active->id, added.ToString());
      Finish(*active, FinishReason::kError, added);
      continue;
    }
    active->added_to_attention = true;
    if (resumed) FERRY_LOG_INFO("request {}: resumed after preemption", active->id);
    running_.push_back(std::move(active));
  }
}

void BatchScheduler::TakeCancellations() {
  std::vector<std::unique_ptr<Active>> cancelled_queued;
  std::set<uint64_t> cancelled;
  // Moves the cancelled requests of a waiting list into cancelled_queued.
  const auto take_cancelled = [&](std::deque<std::unique_ptr<Active>>& waiting) {
    for (auto it = waiting.begin(); it != waiting.end();) {
      if (cancelled.count((*it)->id)) {
        cancelled_queued.push_back(std::move(*it));
        it = waiting.erase(it);
      } else {
        ++it;
      }
    }
  };
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cancelled_.empty()) return;
    cancelled.swap(cancelled_);
    take_cancelled(queue_);
  }
  take_cancelled(preempted_);
  for (auto& active : cancelled_queued) Finish(*active, FinishReason::kCancelled, absl::OkStatus());
  for (auto& active : running_) {
    if (active && cancelled.count(active->id)) {
      Finish(*active, FinishReason::kCancelled, absl::OkStatus());
      active.reset();
    }
  }
  std::erase(running_, nullptr);
}

bool BatchScheduler::Step() {
  // Decode rows first, so that reading long prompts never stalls generation.
  struct Part {
    Active* owner;
    bool prefill;
    int64_t tokens;
  };
  std::vector<model::SeqChunk> chunks;
  std::vector<Part> parts;
  int64_t budget = options_.step_token_budget;
  for (auto& active : running_) {
    const int64_t prompt = static_cast<int64_t>(active->request.prompt.size());
    if (!active->rebuild.empty() || active->prompt_read < prompt || budget <= 0) continue;
    chunks.push_back({active->id, prompt + static_cast<int64_t>(active->generated.size()) - 1,
                      std::span<const int32_t>(&active->generated.back(), 1)});
    parts.push_back({active.get(), false, 1});
    --budget;
  }
  for (auto& active : running_) {
    const std::vector<int32_t>& to_read = active->ToRead();
    const int64_t remaining = static_cast<int64_t>(to_read.size()) - active->prompt_read;
    if (remaining <= 0) continue;
    const int64_t n = std::min<int64_t>({remaining, options_.prefill_chunk_tokens, budget});
    if (n <= 0) break;
    chunks.push_back({active->id, active->prompt_read,
                      std::span<const int32_t>(to_read.data() + active->prompt_read,
                                               static_cast<size_t>(n))});
    parts.push_back({active.get(), true, n});
    budget -= n;
  }
  if (chunks.empty()) return false;

  std::vector<float> logits;
  const absl::Status status = decoder_.Forward(chunks, &logits);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.steps;
  }
  if (!status.ok()) {
    // The decoder aborted the step: every sequence's KV is as before it, so the step can be
    // retried without the requests the failure belongs to.
    std::vector<Active*> failing;
    const std::vector<kv::SequenceId>& culprits = decoder_.failed_sequences();
    for (const Part& part : parts) {
      const bool culprit =
          std::find(culprits.begin(), culprits.end(), part.owner->id) != culprits.end();
      if (culprit && std::find(failing.begin(), failing.end(), part.owner) == failing.end()) {
        failing.push_back(part.owner);
      }
    }
    const bool tied_to_sequences = !failing.empty();
    if (failing.empty() && status.code() == absl::StatusCode::kResourceExhausted &&
        parts.size() > 1) {
      // Not tied to a sequence: the most recently admitted request gives way.
      Active* newest = parts[0].owner;
      for (const Part& part : parts) newest = part.owner->id > newest->id ? part.owner : newest;
      failing.push_back(newest);
    }
    if (failing.empty()) {
      for (const Part& part : parts) {
        if (std::find(failing.begin(), failing.end(), part.owner) == failing.end()) {
          failing.push_back(part.owner);
        }
      }
    }
    // Preempted only while another request runs: its end frees the room this one waits for
    // (alone, it would be admitted again into the same full KV).
    if (!tied_to_sequences && status.code() == absl::StatusCode::kResourceExhausted &&
        failing.size() == 1 && running_.size() > 1 && options_.preempt_when_kv_full) {
      FERRY_LOG_WARN("request {}: {}; preempted until a running request finishes, then its kv "
                     "is rebuilt from its tokens",
                     failing[0]->id, status.ToString());
      Preempt(failing[0]);
      return true;
    }
    const bool others_continue = failing.size() < running_.size();
    for (Active* active : failing) {
      if (tied_to_sequences && KvLostWithWorker(status) &&
          active->rebuilds < options_.max_kv_rebuilds) {
        const absl::Status rebuilt = RebuildKv(*active);
        if (rebuilt.ok()) {
          FERRY_LOG_WARN("request {}: {}; rebuilding its kv from its {} tokens", active->id,
                         status.ToString(),
                         active->request.prompt.size() + active->generated.size());
          continue;
        }
        FERRY_LOG_WARN("request {}: rebuilding its kv failed: {}", active->id,
                       rebuilt.ToString());
      }
      FERRY_LOG_WARN("request {}: {}{}", active->id, status.ToString(),
                     others_continue ? "; the others continue" : "");
      Finish(*active, FinishReason::kError, status);
      std::erase_if(running_, [&](const auto& a) { return a.get() == active; });
    }
    return true;
  }

  const int vocab = decoder_.model().config.vocab_size;
  std::vector<Active*> finished;
  for (size_t i = 0; i < parts.size(); ++i) {
    Active& active = *parts[i].owner;
    if (parts[i].prefill) {
      active.prompt_read += parts[i].tokens;
      if (active.prompt_read < static_cast<int64_t>(active.ToRead().size())) continue;
      if (!active.rebuild.empty()) {
        // Its KV is whole again up to the last generated token, which the next step decodes;
        // the token these logits predict was sampled before the loss.
        FERRY_LOG_INFO("request {}: kv rebuilt ({} positions)", active.id, active.prompt_read);
        active.rebuild.clear();
        active.prompt_read = static_cast<int64_t>(active.request.prompt.size());
        continue;
      }
    }
    const int32_t token = active.sampler->Sample(
        std::span<const float>(logits.data() + i * static_cast<size_t>(vocab), vocab));
    if (active.generated.empty()) active.first_token = Clock::now();
    active.generated.push_back(token);
    {
      // Counted before the callbacks, so that whoever sees a token or a finish sees it counted.
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.generated_tokens;
    }
    if (active.callbacks.on_token) {
      active.callbacks.on_token(static_cast<int>(active.generated.size()) - 1, token);
    }
    const auto& stops = active.request.stop_tokens;
    const auto& eos = options_.eos_token_ids;
    const bool stop = std::find(stops.begin(), stops.end(), token) != stops.end() ||
                      (!active.request.ignore_eos &&
                       std::find(eos.begin(), eos.end(), token) != eos.end());
    if (stop) {
      Finish(active, FinishReason::kStop, absl::OkStatus());
      finished.push_back(&active);
    } else if (static_cast<int>(active.generated.size()) >= active.request.max_tokens) {
      Finish(active, FinishReason::kLength, absl::OkStatus());
      finished.push_back(&active);
    }
  }
  std::erase_if(running_, [&](const auto& a) {
    return std::find(finished.begin(), finished.end(), a.get()) != finished.end();
  });
  return true;
}

void BatchScheduler::Loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] {
        return stopping_ || !queue_.empty() || !running_.empty() || !preempted_.empty() ||
               !cancelled_.empty();
      });
      if (stopping_) break;
    }
    Admit();
    TakeCancellations();
    Step();
    std::lock_guard<std::mutex> lock(mutex_);
    running_count_ = running_.size();
    preempted_count_ = preempted_.size();
  }
  // Shutting down: nothing more will run.
  std::deque<std::unique_ptr<Active>> queued;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queued.swap(queue_);
  }
  const absl::Status stopping = absl::UnavailableError("the scheduler stopped");
  for (auto& active : running_) Finish(*active, FinishReason::kCancelled, stopping);
  for (auto& active : preempted_) Finish(*active, FinishReason::kCancelled, stopping);
  for (auto& active : queued) Finish(*active, FinishReason::kCancelled, stopping);
  running_.clear();
  preempted_.clear();
  std::lock_guard<std::mutex> lock(mutex_);
  running_count_ = 0;
  preempted_count_ = 0;
}

}  // namespace ferry::scheduler
