// Continuous batching of generation requests over one Decoder.
//
// Submit() queues a request; the scheduler thread admits queued requests at step boundaries (up
// to max_running), and each step runs one Decoder::Forward over a mixed batch: one decode row
// for every sequence that is generating, then prefill chunks of the prompts still being read,
// at most prefill_chunk_tokens per sequence and step_token_budget rows in all, so a long prompt
// is read over several steps and never stalls the others' decoding. Tokens are sampled per
// request (its own Sampler and seed) and delivered through the request's callbacks as they come.
// A request finishes on max_tokens (LENGTH), a stop token or, unless ignore_eos, an end token of
// the model (STOP, the token included), on Cancel (CANCELLED) or on an error (ERROR). Its KV is
// freed when it finishes, whatever the reason.
// A request whose prompt plus max_tokens could never fit in the KV capacity fails at admission
// with RESOURCE_EXHAUSTED (AttentionStep::CheckCapacity). A failed step has been aborted by the
// decoder (every sequence's KV as before the step, on every worker); the requests its failure
// belongs to (Decoder::failed_sequences: their KV did not fit, or was on a worker that failed)
// finish with ERROR and that status, freeing their KV everywhere, and the others run on in the
// next step. Except when the failure says the request's KV was lost with a worker (UNAVAILABLE
// or DEADLINE_EXCEEDED: the worker died or did not answer in time): then, up to
// max_kv_rebuilds times per request, its KV is freed everywhere and rebuilt from its tokens,
// which the scheduler keeps: it reads the prompt and every generated token but the last again as
// prefill chunks (wherever placement now puts them), samples nothing for them, and goes on
// decoding from the last token, so its Sampler continues where it was: the tokens are those it
// would have had, up to any rounding difference between reading a token in a prefill chunk and
// in a decode row (none on the CPU paths: the tests compare the tokens).
// A RESOURCE_EXHAUSTED not tied to sequences (the KV is full) makes the step's most recently
// admitted request give way: with preempt_when_kv_full (the default) and other requests running,
// it is preempted, its KV freed and its tokens kept; it is admitted again, before any new
// request, once a running request has finished, and its KV rebuilt from its tokens as above.
// Otherwise it fails. Any other untied failure fails every request of the step.
// Threads: Submit and Cancel may be called from any thread. Callbacks run on the scheduler
// thread: keep them short (push to a queue). The Decoder is used only by the scheduler thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/decoder.h"
#include "runtime/model/sampler.h"

namespace ferry::scheduler {

enum class FinishReason { kLength, kStop, kCancelled, kError };

struct GenerationRequest {
  std::vector<int32_t> prompt;
  model::SamplingParams sampling;
  int max_tokens = 16;
  std::vector<int32_t> stop_tokens;
  bool ignore_eos = false;
};

struct GenerationTimings {
  double queue_ms = 0;
  double time_to_first_token_ms = 0;
  double total_ms = 0;
  int prompt_tokens = 0;
  int generated_tokens = 0;
  int kv_rebuilds = 0;  // after worker losses
  int preemptions = 0;  // when the KV was full
};

// What the scheduler has done since it started, and its load now (for metrics).
struct SchedulerStats {
  int64_t submitted = 0;  // accepted by Submit
  int64_t finished_length = 0;
  int64_t finished_stop = 0;
  int64_t cancelled = 0;
  int64_t failed = 0;
  int64_t prompt_tokens = 0;  // of admitted requests
  int64_t generated_tokens = 0;
  int64_t kv_rebuilds = 0;  // after worker losses
  int64_t preemptions = 0;  // when the KV was full
  int64_t steps = 0;
  int64_t running = 0;
  int64_t waiting = 0;  // queued or preempted
};

struct GenerationCallbacks {
  std::function<void(int index, int32_t token)> on_token;
  // Called exactly once, last.
  std::function<void(FinishReason reason, const absl::Status& error,
                     const GenerationTimings& timings)>
      on_finish;
};

struct BatchSchedulerOptions {
  int max_running = 64;
  int max_queued = 4096;
  int prefill_chunk_tokens = 256;
  int step_token_budget = 512;
  std::vector<int32_t> eos_token_ids;
  int64_t max_prompt_tokens = 1 << 20;
  // Times one request's KV may be rebuilt after worker losses before it fails (0: it fails at
  // the first loss).
  int max_kv_rebuilds = 2;
  // When the KV is full: true, the newest request waits for room (preempted, then rebuilt);
  // false, it fails with RESOURCE_EXHAUSTED.
  bool preempt_when_kv_full = true;
};

class BatchScheduler {
 public:
  // `decoder` must outlive the scheduler. Starts the scheduler thread.
  BatchScheduler(model::Decoder& decoder, BatchSchedulerOptions options);
  ~BatchScheduler();  // Stop()s

  // Validates and queues; returns the request id. INVALID_ARGUMENT for bad requests,
  // RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE after Stop.
  absl::StatusOr<uint64_t> Submit(GenerationRequest request, GenerationCallbacks callbacks);
  // Finishes the request as CANCELLED at the next step boundary; unknown ids are ignored.
  void Cancel(uint64_t id);
  // From now on Submit refuses new requests (UNAVAILABLE); those accepted run on. For a graceful
  // shutdown: stop accepting, wait (bounded) until running() and queued() are 0, then Stop().
  void StopAccepting();
  // Cancels everything, finishes the step in progress and joins the thread.
  void Stop();

  size_t running() const;
  size_t queued() const;  // waiting to be admitted, preempted ones included
  int64_t steps() const;
  SchedulerStats stats() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Active {
    uint64_t id = 0;
    GenerationRequest request;
    GenerationCallbacks callbacks;
    std::unique_ptr<model::Sampler> sampler;
    int64_t prompt_read = 0;  // tokens of ToRead() already in the KV cache
    std::vector<int32_t> generated;
    // While its KV is rebuilt: the prompt and every generated token but the last; else empty.
    std::vector<int32_t> rebuild;
    int rebuilds = 0;
    int preemptions = 0;
    int64_t finished_before_preemption = -1;  // finished_ when preempted
    // What prefill chunks read: the prompt, or while rebuilding the tokens to read again.
    const std::vector<int32_t>& ToRead() const {
      return rebuild.empty() ? request.prompt : rebuild;
    }
    bool added_to_attention = false;
    Clock::time_point submitted, admitted, first_token;
  };

  void Loop();
  // One decoder step over the running requests; returns false when there was nothing to do.
  bool Step();
  void Finish(Active& active, FinishReason reason, const absl::Status& error);
  // Frees the request's KV and sets it up to read its tokens again (see the top comment);
  // re-adding the sequence is the caller's.
  void ReleaseKvForRebuild(Active& active);
  // ReleaseKvForRebuild, then the sequence added again.
  absl::Status RebuildKv(Active& active);
  // Takes the request out of running_ until a running request finishes (see the top comment).
  void Preempt(Active* active);
  // Admits preempted requests, then queued ones, up to max_running; new requests wait while a
  // preempted one does.
  void Admit();
  void TakeCancellations();

  model::Decoder& decoder_;
  const BatchSchedulerOptions options_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Active>> queue_;
  std::set<uint64_t> cancelled_;
  bool stopping_ = false;
  bool accepting_ = true;
  uint64_t next_id_ = 1;
  size_t running_count_ = 0;
  size_t preempted_count_ = 0;
  SchedulerStats stats_;  // its counters; running and waiting come from the two counts above

  // Scheduler thread only:
  std::vector<std::unique_ptr<Active>> running_;
  std::deque<std::unique_ptr<Active>> preempted_;  // oldest first
  int64_t finished_ = 0;  // requests that finished holding KV (room freed), for preempted_
  std::thread thread_;
};

}  // namespace ferry::scheduler
