#include "services/cli/attention_demo.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "attention_reference.h"
#include "decode_problem.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/status.h"

namespace ferry::cli {
namespace {

using kernels::reference::DecodeProblem;
using Clock = std::chrono::steady_clock;

double MillisecondsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

}  // namespace

absl::Status RunAttentionDemo(const AttentionDemoOptions& options) {
  if (options.num_workers < 1) return absl::InvalidArgumentError("--workers must be >= 1");
  kernels::reference::DecodeProblemShape shape;
  shape.seq_lens = options.seq_lens;
  shape.num_q_heads = options.num_q_heads;
  shape.num_kv_heads = options.num_kv_heads;
  shape.head_dim = options.head_dim;
  shape.block_size = options.block_size;
  shape.dtype = DType::kBFloat16;
  DecodeProblem problem = kernels::reference::MakeRandomDecodeProblem(shape, options.seed);
  const int num_seqs = problem.num_seqs();
  const int64_t num_states = int64_t{num_seqs} * options.num_q_heads;
  const int64_t state_floats = num_states * options.head_dim;

  kernels::ThreadPool pool(options.threads);
  std::printf("ferry attention demo: %d sequences (", num_seqs);
  for (int s = 0; s < num_seqs; ++s) std::printf("%s%d", s ? " " : "", options.seq_lens[s]);
  std::printf(" tokens), Hq=%d Hkv=%d d=%d bf16 KV, block %d, %d workers x %d threads (%s)\n",
              options.num_q_heads, options.num_kv_heads, options.head_dim, options.block_size,
              options.num_workers, pool.num_threads(), kernels::CpuKernelIsa());

  // Each simulated worker holds one contiguous position range of every sequence.
  std::vector<float> parts_o(options.num_workers * state_floats);
  std::vector<float> parts_lse(options.num_workers * num_states);
  problem.kv_begin.resize(num_seqs);
  problem.kv_end.resize(num_seqs);
  for (int w = 0; w < options.num_workers; ++w) {
    for (int s = 0; s < num_seqs; ++s) {
      const int64_t len = options.seq_lens[s];
      problem.kv_begin[s] = static_cast<int32_t>(len * w / options.num_workers);
      problem.kv_end[s] = static_cast<int32_t>(len * (w + 1) / options.num_workers);
    }
    problem.Poison();
    const auto start = Clock::now();
    FERRY_RETURN_IF_ERROR(kernels::DecodeAttentionCpu(problem.Args(), pool));
    const double ms = MillisecondsSince(start);
    std::printf("  worker %d: %7.2f ms, %6.2f GB/s of KV\n", w, ms,
                problem.kv_bytes_read() / ms / 1e6);
    std::copy(problem.state_o.begin(), problem.state_o.end(), parts_o.begin() + w * state_floats);
    std::copy(problem.state_lse.begin(), problem.state_lse.end(),
              parts_lse.begin() + w * num_states);
  }

  std::vector<float> merged_o(state_floats), merged_lse(num_states);
  auto start = Clock::now();
  FERRY_RETURN_IF_ERROR(kernels::MergeStatesCpu(parts_o.data(), parts_lse.data(),
                                                options.num_workers, num_states,
                                                options.head_dim, merged_o.data(),
                                                merged_lse.data(), &pool));
  std::printf("  merge of %d partial states per head: %.3f ms\n", options.num_workers,
              MillisecondsSince(start));

  problem.kv_begin.clear();
  problem.kv_end.clear();
  problem.Poison();
  start = Clock::now();
  FERRY_RETURN_IF_ERROR(kernels::DecodeAttentionCpu(problem.Args(), pool));
  const double whole_ms = MillisecondsSince(start);
  std::printf("  one worker, whole KV: %.2f ms, %.2f GB/s\n", whole_ms,
              problem.kv_bytes_read() / whole_ms / 1e6);

  start = Clock::now();
  const auto reference = kernels::reference::DecodeAttentionReference(problem.Args());
  std::printf("  float64 reference: %.1f ms\n", MillisecondsSince(start));
  const double error = kernels::reference::RelativeError(
      std::vector<double>(merged_o.begin(), merged_o.end()), reference.o);
  const double lse_error = kernels::reference::RelativeError(
      std::vector<double>(merged_lse.begin(), merged_lse.end()), reference.lse);
  constexpr double kTolerance = 1e-5;  // float32 accumulation over bf16 inputs the reference reads
  std::printf("  merged vs float64 reference: relative error o %.2e, lse %.2e (tolerance %.0e)\n",
              error, lse_error, kTolerance);
  if (!(error < kTolerance && lse_error < kTolerance)) {
    return absl::InternalError(absl::StrCat("merged attention differs from the reference: ",
                                            error, " / ", lse_error));
  }
  std::printf("ok\n");
  return absl::OkStatus();
}

}  // namespace ferry::cli
