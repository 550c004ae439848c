#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_cat.h"
#include "decode_attention_span.h"
#include "ferry/kernels/attention_state.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/kernels/lean_schedule.h"
#include "ferry/status.h"

namespace ferry::kernels {
namespace {

using cpu_internal::AttendSpanFn;
using cpu_internal::KvSpan;

bool CpuSupports(cpu_internal::AttendSpanFn fn) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (fn == cpu_internal::avx512::AttendSpan) {  // compiled with -mavx512f/bw/vl (CMakeLists)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }
  if (fn == cpu_internal::avx2::AttendSpan) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
#endif
  return fn == cpu_internal::baseline::AttendSpan;
}

AttendSpanFn PickAttendSpan() {
  for (AttendSpanFn fn : {cpu_internal::avx512::AttendSpan, cpu_internal::avx2::AttendSpan}) {
    if (CpuSupports(fn)) return fn;
  }
  return cpu_internal::baseline::AttendSpan;
}

// The best set this CPU runs, unless SetCpuKernelIsa picked another.
std::atomic<AttendSpanFn>& SelectedAttendSpan() {
  static std::atomic<AttendSpanFn> fn{PickAttendSpan()};
  return fn;
}

AttendSpanFn AttendSpanForThisCpu() {
  return SelectedAttendSpan().load(std::memory_order_relaxed);
}

int64_t RangeBegin(const DecodeAttentionArgs& args, int s) {
  return args.kv_begin != nullptr ? args.kv_begin[s] : 0;
}
int64_t RangeEnd(const DecodeAttentionArgs& args, int s) {
  return args.kv_end != nullptr ? args.kv_end[s] : args.seq_lens[s];
}

void WriteOutput(const DecodeAttentionArgs& args, int64_t first_row, int rows, const float* o) {
  if (args.out == nullptr) return;
  const int d = args.kv.head_dim;
  const int64_t offset = first_row * d;
  const int64_t n = int64_t{rows} * d;
  switch (args.kv.dtype) {
    case DType::kFloat32:
      std::copy(o, o + n, static_cast<float*>(args.out) + offset);
      break;
    case DType::kBFloat16: {
      uint16_t* out = static_cast<uint16_t*>(args.out) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = FloatToBFloat16Bits(o[i]);
      break;
    }
    case DType::kFloat16: {
      uint16_t* out = static_cast<uint16_t*>(args.out) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = FloatToFloat16Bits(o[i]);
      break;
    }
  }
}

// The partial state a worker computed for a (sequence, KV head) it shares with other workers.
struct SplitHeadPartial {
  int64_t head = -1;  // flat (sequence * num_kv_heads + kv head)
  std::vector<float> o;
  std::vector<float> lse;
};

}  // namespace

const char* CpuKernelIsa() {
  const AttendSpanFn fn = AttendSpanForThisCpu();
  if (fn == cpu_internal::avx512::AttendSpan) return "avx512";
  if (fn == cpu_internal::avx2::AttendSpan) return "avx2";
  return "baseline";
}

bool SetCpuKernelIsa(std::string_view isa) {
  AttendSpanFn fn = nullptr;
  if (isa == "avx512") fn = cpu_internal::avx512::AttendSpan;
  if (isa == "avx2") fn = cpu_internal::avx2::AttendSpan;
  if (isa == "baseline") fn = cpu_internal::baseline::AttendSpan;
  if (isa == "best") fn = PickAttendSpan();
  if (fn == nullptr || !CpuSupports(fn)) return false;
  SelectedAttendSpan().store(fn, std::memory_order_relaxed);
  return true;
}

absl::Status ValidateDecodeAttentionArgs(const DecodeAttentionArgs& args) {
  const PagedKvView& kv = args.kv;
  if (args.num_seqs < 0) return absl::InvalidArgumentError("num_seqs must be >= 0");
  if (kv.num_kv_heads <= 0) return absl::InvalidArgumentError("kv.num_kv_heads must be > 0");
  if (args.num_q_heads <= 0 || args.num_q_heads % kv.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_q_heads (", args.num_q_heads, ") must be a positive multiple of ",
                     "kv.num_kv_heads (", kv.num_kv_heads, ")"));
  }
  if (!IsSupportedHeadDim(kv.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv.head_dim ", kv.head_dim, " is not supported (64, 128 or 256)"));
  }
  if (kv.block_size <= 0) return absl::InvalidArgumentError("kv.block_size must be > 0");
  if (kv.num_blocks < 0) return absl::InvalidArgumentError("kv.num_blocks must be >= 0");
  if (kv.dtype != DType::kFloat32 && kv.dtype != DType::kFloat16 &&
      kv.dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError("kv.dtype is not fp32, fp16 or bf16");
  }
  if (!(std::isfinite(args.softmax_scale) && args.softmax_scale > 0)) {
    return absl::InvalidArgumentError("softmax_scale must be finite and > 0");
  }
  if (args.num_seqs == 0) return absl::OkStatus();
  if (args.q == nullptr) return absl::InvalidArgumentError("q is null");
  if (args.state_o == nullptr || args.state_lse == nullptr) {
    return absl::InvalidArgumentError("state_o and state_lse must be set");
  }
  if (args.block_table_indptr == nullptr || args.seq_lens == nullptr) {
    return absl::InvalidArgumentError("block_table_indptr and seq_lens must be set");
  }
  if ((args.kv_begin == nullptr) != (args.kv_end == nullptr)) {
    return absl::InvalidArgumentError("kv_begin and kv_end must both be set or both be null");
  }
  if (args.block_table_indptr[0] != 0) {
    return absl::InvalidArgumentError("block_table_indptr[0] must be 0");
  }
  bool any_positions = false;
  for (int s = 0; s < args.num_seqs; ++s) {
    const int64_t first = args.block_table_indptr[s];
    const int64_t last = args.block_table_indptr[s + 1];
    if (last < first) {
      return absl::InvalidArgumentError(
          absl::StrCat("block_table_indptr decreases at sequence ", s));
    }
    const int64_t seq_len = args.seq_lens[s];
    if (seq_len < 0 || seq_len > (last - first) * kv.block_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("seq_lens[", s, "] = ", seq_len, " does not fit its ", last - first,
                       " blocks of ", kv.block_size));
    }
    const int64_t begin = RangeBegin(args, s);
    const int64_t end = RangeEnd(args, s);
    if (begin < 0 || end < begin || end > seq_len) {
      return absl::InvalidArgumentError(absl::StrCat("kv range of sequence ", s, " [", begin,
                                                     ", ", end, ") is not within [0, ",
                                                     seq_len, ")"));
    }
    any_positions |= end > begin;
    if (args.block_table == nullptr && last > first) {
      return absl::InvalidArgumentError("block_table is null");
    }
    // Only the blocks the range reads must exist.
    for (int64_t b = first + (end > begin ? begin / kv.block_size : 0);
         end > begin && b <= first + (end - 1) / kv.block_size; ++b) {
      if (args.block_table[b] < 0 || args.block_table[b] >= kv.num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat("block_table[", b, "] = ", args.block_table[b], " (sequence ", s,
                         ") is outside the pool of ", kv.num_blocks, " blocks"));
      }
    }
  }
  if (any_positions && (kv.k_pool == nullptr || kv.v_pool == nullptr)) {
    return absl::InvalidArgumentError("kv.k_pool and kv.v_pool must be set");
  }
  return absl::OkStatus();
}

absl::Status DecodeAttentionCpu(const DecodeAttentionArgs& args, ThreadPool& pool,
                                const CpuDecodeOptions& options) {
  FERRY_RETURN_IF_ERROR(ValidateDecodeAttentionArgs(args));
  if (options.kv_tile_size <= 0) return absl::InvalidArgumentError("kv_tile_size must be > 0");
  if (args.num_seqs == 0) return absl::OkStatus();

  const int d = args.kv.head_dim;
  const int num_kv_heads = args.kv.num_kv_heads;
  const int group = args.num_q_heads / num_kv_heads;

  // Tiles of every sequence's heads before it: the flat stream-K order.
  std::vector<int64_t> seq_first_tile(args.num_seqs + 1, 0);
  for (int s = 0; s < args.num_seqs; ++s) {
    seq_first_tile[s + 1] = seq_first_tile[s] + num_kv_heads * NumKvTiles(RangeBegin(args, s),
                                                                           RangeEnd(args, s),
                                                                           options.kv_tile_size);
  }
  const int64_t total_tiles = seq_first_tile[args.num_seqs];
  const int64_t num_workers =
      std::max<int64_t>(1, std::min<int64_t>(total_tiles, options.num_workers > 0
                                                               ? options.num_workers
                                                               : pool.num_threads()));

  const AttendSpanFn attend = AttendSpanForThisCpu();
  std::vector<std::vector<SplitHeadPartial>> split_partials(num_workers);

  pool.ParallelFor(num_workers, [&](int64_t worker) {
    const int64_t tile_begin = FirstTileOfWorker(total_tiles, num_workers, worker);
    const int64_t tile_end = FirstTileOfWorker(total_tiles, num_workers, worker + 1);
    if (tile_begin == tile_end) return;
    std::vector<float> scratch(cpu_internal::AttendSpanScratchFloats(d, group));
    std::vector<float> q_scaled(int64_t{group} * d);
    std::vector<float> o(int64_t{group} * d);
    std::vector<float> lse(group);

    int s = static_cast<int>(std::upper_bound(seq_first_tile.begin(), seq_first_tile.end(),
                                              tile_begin) -
                             seq_first_tile.begin()) - 1;
    for (int64_t tile = tile_begin; tile < tile_end;) {
      while (seq_first_tile[s + 1] <= tile) ++s;  // skips sequences with empty ranges
      const int64_t begin = RangeBegin(args, s);
      const int64_t end = RangeEnd(args, s);
      const int64_t tiles_per_head = NumKvTiles(begin, end, options.kv_tile_size);
      const int64_t offset = tile - seq_first_tile[s];
      const int kv_head = static_cast<int>(offset / tiles_per_head);
      const int64_t first_in_head = offset % tiles_per_head;
      const int64_t last_in_head = std::min(tiles_per_head, first_in_head + (tile_end - tile));

      const KvSpan span{args.kv.k_pool,
                        args.kv.v_pool,
                        args.kv.dtype,
                        num_kv_heads,
                        args.kv.block_size,
                        d,
                        kv_head,
                        args.block_table + args.block_table_indptr[s],
                        begin + first_in_head * options.kv_tile_size,
                        std::min(end, begin + last_in_head * options.kv_tile_size)};
      const int64_t first_q_row = int64_t{s} * args.num_q_heads + int64_t{kv_head} * group;
      const float* q = args.q + first_q_row * d;
      for (int64_t i = 0; i < int64_t{group} * d; ++i) q_scaled[i] = q[i] * args.softmax_scale;
      attend(span, q_scaled.data(), group, o.data(), lse.data(), scratch.data());

      if (first_in_head == 0 && last_in_head == tiles_per_head) {
        std::copy(o.begin(), o.end(), args.state_o + first_q_row * d);
        std::copy(lse.begin(), lse.end(), args.state_lse + first_q_row);
        WriteOutput(args, first_q_row, group, o.data());
      } else {
        split_partials[worker].push_back(
            {int64_t{s} * num_kv_heads + kv_head, o, lse});
      }
      tile += last_in_head - first_in_head;
    }
  });

  // Heads with an empty range were never scheduled: they get the identity.
  for (int s = 0; s < args.num_seqs; ++s) {
    if (RangeEnd(args, s) > RangeBegin(args, s)) continue;
    const int64_t first_q_row = int64_t{s} * args.num_q_heads;
    for (int h = 0; h < args.num_q_heads; ++h) {
      SetEmptyState(args.state_o + (first_q_row + h) * d, args.state_lse + first_q_row + h, d);
    }
    const std::vector<float> zeros(int64_t{args.num_q_heads} * d, 0.0f);
    WriteOutput(args, first_q_row, args.num_q_heads, zeros.data());
  }

  // Split heads: their partials sit in consecutive workers; merge them in worker order.
  std::vector<float> merged_o(int64_t{group} * d);
  std::vector<float> merged_lse(group);
  int64_t current_head = -1;
  auto flush = [&] {
    if (current_head < 0) return;
    const int64_t first_q_row = current_head * group;  // == s * num_q_heads + kv_head * group
    std::copy(merged_o.begin(), merged_o.end(), args.state_o + first_q_row * d);
    std::copy(merged_lse.begin(), merged_lse.end(), args.state_lse + first_q_row);
    WriteOutput(args, first_q_row, group, merged_o.data());
  };
  for (const std::vector<SplitHeadPartial>& partials : split_partials) {
    for (const SplitHeadPartial& partial : partials) {
      if (partial.head != current_head) {
        flush();
        current_head = partial.head;
        for (int h = 0; h < group; ++h) SetEmptyState(&merged_o[h * d], &merged_lse[h], d);
      }
      for (int h = 0; h < group; ++h) {
        MergeStateInPlace(&merged_o[h * d], &merged_lse[h], &partial.o[h * d], partial.lse[h], d);
      }
    }
  }
  flush();
  return absl::OkStatus();
}

absl::Status MergeStatesCpu(const float* parts_o, const float* parts_lse, int num_parts,
                            int64_t num_states, int head_dim, float* out_o, float* out_lse,
                            ThreadPool* pool) {
  if (num_parts < 0 || num_states < 0 || head_dim <= 0) {
    return absl::InvalidArgumentError("num_parts, num_states and head_dim must be >= 0, > 0");
  }
  if (num_states == 0) return absl::OkStatus();
  if (out_o == nullptr || out_lse == nullptr ||
      (num_parts > 0 && (parts_o == nullptr || parts_lse == nullptr))) {
    return absl::InvalidArgumentError("merge inputs and outputs must be set");
  }
  constexpr int64_t kStatesPerTask = 256;
  auto merge_range = [&](int64_t task) {
    const int64_t last = std::min(num_states, (task + 1) * kStatesPerTask);
    for (int64_t state = task * kStatesPerTask; state < last; ++state) {
      MergeStatesAt(parts_o, parts_lse, num_parts, num_states, head_dim, state, out_o, out_lse);
    }
  };
  const int64_t num_tasks = CeilDiv(num_states, kStatesPerTask);
  if (pool != nullptr) {
    pool->ParallelFor(num_tasks, merge_range);
  } else {
    for (int64_t task = 0; task < num_tasks; ++task) merge_range(task);
  }
  return absl::OkStatus();
}

}  // namespace ferry::kernels
