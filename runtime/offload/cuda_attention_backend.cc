#include "runtime/offload/cuda_attention_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <span>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "ferry/kernels/lean_attention.h"
#include "ferry/kernels/prefill_attention.h"
#include "ferry/status.h"
#include "runtime/common/cuda_util.h"
#include "runtime/kv/cuda_kv_pool.h"

namespace ferry::offload {
namespace {

constexpr int kMaxDevices = 64;

// Pieces of one scratch buffer, each 256-byte aligned.
struct Layout {
  size_t total = 0;
  size_t Add(size_t bytes) {
    const size_t at = total;
    total += (bytes + 255) / 256 * 256;
    return at;
  }
};

// Grows `buffer` to at least `bytes` (contents dropped); a quarter more, so requests growing
// slowly do not reallocate every time.
template <typename BufferType>
absl::Status Grow(BufferType& buffer, size_t bytes, const char* what, bool* grown = nullptr) {
  if (grown != nullptr) *grown = false;
  if (buffer.bytes() >= bytes) return absl::OkStatus();
  buffer = BufferType();  // free the old one first: device memory may be tight
  FERRY_ASSIGN_OR_RETURN(buffer, BufferType::Allocate(bytes + bytes / 4, what));
  if (grown != nullptr) *grown = true;
  return absl::OkStatus();
}

class CudaAttentionBackend : public AttentionBackend {
 public:
  CudaAttentionBackend(const CudaBackendOptions& options, std::unique_ptr<kv::CudaKvPool> pool,
                       cudaStream_t stream)
      : options_(options), pool_(std::move(pool)), stream_(stream) {}
  ~CudaAttentionBackend() override {
    if (stream_ == nullptr) return;
    // Calls end with their stream idle; this only matters after a call that failed mid-way.
    Wait("shutdown").IgnoreError();
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return absl::StrCat("cuda:", options_.device); }
  kv::KvCache& cache() override { return pool_->cache(); }

  absl::Status WriteKv(int layer, absl::Span<const kv::KvAppendRun> runs, const uint8_t* k,
                       const uint8_t* v) override {
    FERRY_RETURN_IF_ERROR(UseCudaDevice(options_.device));
    const kv::KvCacheConfig& config = pool_->cache().config();
    int64_t rows = 0;
    for (const kv::KvAppendRun& run : runs) rows += run.count;
    if (rows == 0) return absl::OkStatus();
    const size_t bytes =
        static_cast<size_t>(rows) * config.num_kv_heads * config.head_dim * DTypeSize(config.dtype);
    Layout layout;
    const size_t k_at = layout.Add(bytes);
    const size_t v_at = layout.Add(bytes);
    FERRY_RETURN_IF_ERROR(Grow(scratch_, layout.total, "worker scratch"));
    uint8_t* base = scratch_.get<uint8_t>();
    FERRY_RETURN_IF_ERROR(CopyIn(base + k_at, k, bytes));
    FERRY_RETURN_IF_ERROR(CopyIn(base + v_at, v, bytes));
    FERRY_RETURN_IF_ERROR(pool_->StageStep(std::span(runs.data(), runs.size()), stream_));
    FERRY_RETURN_IF_ERROR(pool_->Append(layer, base + k_at, base + v_at, config.dtype, stream_));
    return Wait("append");
  }

  absl::Status Attend(int layer, const kernels::DecodeAttentionArgs& args,
                      const kernels::CpuDecodeOptions& /*plan*/) override {
    FERRY_RETURN_IF_ERROR(UseCudaDevice(options_.device));
    const kv::KvCacheConfig& config = pool_->cache().config();
    const int n = args.num_seqs;
    const size_t states = static_cast<size_t>(n) * args.num_q_heads;
    const size_t table_entries = static_cast<size_t>(args.block_table_indptr[n]);
    const bool ranged = args.kv_begin != nullptr;
    // Host tables, packed into one pinned staging buffer and copied with one transfer.
    Layout tables;
    const size_t indptr_at = tables.Add(sizeof(int32_t) * (n + 1));
    const size_t table_at = tables.Add(sizeof(int32_t) * std::max<size_t>(table_entries, 1));
    const size_t lens_at = tables.Add(sizeof(int32_t) * n);
    const size_t begin_at = tables.Add(ranged ? sizeof(int32_t) * n : 0);
    const size_t end_at = tables.Add(ranged ? sizeof(int32_t) * n : 0);
    const size_t error_at = tables.Add(sizeof(int32_t));  // read back, not sent
    Layout device = tables;
    const size_t q_at = device.Add(states * config.head_dim * sizeof(float));
    const size_t o_at = device.Add(states * config.head_dim * sizeof(float));
    const size_t lse_at = device.Add(states * sizeof(float));
    FERRY_RETURN_IF_ERROR(Grow(staging_, tables.total, "worker staging"));
    FERRY_RETURN_IF_ERROR(Grow(scratch_, device.total, "worker scratch"));
    FERRY_RETURN_IF_ERROR(GrowWorkspace(n, args.num_q_heads));
    uint8_t* host = staging_.get<uint8_t>();
    uint8_t* base = scratch_.get<uint8_t>();
    std::memcpy(host + indptr_at, args.block_table_indptr, sizeof(int32_t) * (n + 1));
    std::memcpy(host + table_at, args.block_table, sizeof(int32_t) * table_entries);
    std::memcpy(host + lens_at, args.seq_lens, sizeof(int32_t) * n);
    if (ranged) {
      std::memcpy(host + begin_at, args.kv_begin, sizeof(int32_t) * n);
      std::memcpy(host + end_at, args.kv_end, sizeof(int32_t) * n);
    }
    FERRY_RETURN_IF_ERROR(CopyIn(base, host, error_at));
    FERRY_RETURN_IF_ERROR(CopyIn(base + q_at, args.q, states * config.head_dim * sizeof(float)));
    kernels::DecodeAttentionArgs on_device = args;
    on_device.q = reinterpret_cast<const float*>(base + q_at);
    on_device.kv = pool_->LayerView(layer);
    on_device.block_table_indptr = reinterpret_cast<const int32_t*>(base + indptr_at);
    on_device.block_table = reinterpret_cast<const int32_t*>(base + table_at);
    on_device.seq_lens = reinterpret_cast<const int32_t*>(base + lens_at);
    on_device.kv_begin = ranged ? reinterpret_cast<const int32_t*>(base + begin_at) : nullptr;
    on_device.kv_end = ranged ? reinterpret_cast<const int32_t*>(base + end_at) : nullptr;
    on_device.state_o = reinterpret_cast<float*>(base + o_at);
    on_device.state_lse = reinterpret_cast<float*>(base + lse_at);
    on_device.out = nullptr;
    FERRY_RETURN_IF_ERROR(CudaStatus(
        kernels::LeanDecode(on_device, workspace_.get(), workspace_.bytes(), stream_),
        absl::StrCat(name(), ": LeanDecode")));
    FERRY_RETURN_IF_ERROR(CopyOut(args.state_o, on_device.state_o,
                                  states * config.head_dim * sizeof(float)));
    FERRY_RETURN_IF_ERROR(CopyOut(args.state_lse, on_device.state_lse, states * sizeof(float)));
    // The kernel's error word is the first int32 of its workspace (lean_attention.h).
    FERRY_RETURN_IF_ERROR(CopyOut(host + error_at, workspace_.get(), sizeof(int32_t)));
    FERRY_RETURN_IF_ERROR(Wait("attend"));
    return CheckErrorWord(reinterpret_cast<int32_t*>(host + error_at), workspace_.get(),
                          "LeanDecode");
  }

  absl::Status Prefill(int layer, const std::vector<int32_t>& blocks, int64_t held,
                       int64_t causal_offset, int tokens, int num_q_heads, float softmax_scale,
                       const float* q, float* state_o, float* state_lse,
                       const kernels::CpuDecodeOptions& /*plan*/) override {
    FERRY_RETURN_IF_ERROR(UseCudaDevice(options_.device));
    const kv::KvCacheConfig& config = pool_->cache().config();
    if (held > INT32_MAX || blocks.size() > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(name(), ": prefill over ", held,
                                                     " positions exceeds 2^31"));
    }
    // Offsets past either end mean the same as the end (every held position, or none): clamped
    // so they fit the kernel's int32.
    const int32_t offset = static_cast<int32_t>(
        std::clamp<int64_t>(causal_offset, -int64_t{tokens} - 1, held));
    const size_t states = static_cast<size_t>(tokens) * num_q_heads;
    Layout tables;
    const size_t q_indptr_at = tables.Add(2 * sizeof(int32_t));
    const size_t table_indptr_at = tables.Add(2 * sizeof(int32_t));
    const size_t kv_len_at = tables.Add(sizeof(int32_t));
    const size_t offset_at = tables.Add(sizeof(int32_t));
    const size_t error_at = tables.Add(sizeof(int32_t));
    const size_t table_at = tables.Add(sizeof(int32_t) * std::max<size_t>(blocks.size(), 1));
    Layout device = tables;
    const size_t q_at = device.Add(states * config.head_dim * sizeof(float));
    const size_t o_at = device.Add(states * config.head_dim * sizeof(float));
    const size_t lse_at = device.Add(states * sizeof(float));
    FERRY_RETURN_IF_ERROR(Grow(staging_, tables.total, "worker staging"));
    FERRY_RETURN_IF_ERROR(Grow(scratch_, device.total, "worker scratch"));
    uint8_t* host = staging_.get<uint8_t>();
    uint8_t* base = scratch_.get<uint8_t>();
    auto put = [&](size_t at, int32_t a, int32_t b) {
      std::memcpy(host + at, &a, sizeof(a));
      std::memcpy(host + at + sizeof(a), &b, sizeof(b));
    };
    put(q_indptr_at, 0, tokens);
    put(table_indptr_at, 0, static_cast<int32_t>(blocks.size()));
    put(kv_len_at, static_cast<int32_t>(held), 0);
    put(offset_at, offset, 0);
    put(error_at, 0, 0);
    std::memcpy(host + table_at, blocks.data(), sizeof(int32_t) * blocks.size());
    FERRY_RETURN_IF_ERROR(CopyIn(base, host, tables.total));
    FERRY_RETURN_IF_ERROR(CopyIn(base + q_at, q, states * config.head_dim * sizeof(float)));
    kernels::PrefillAttentionArgs args;
    args.num_seqs = 1;
    args.num_q_heads = num_q_heads;
    args.max_q_len = tokens;
    args.q = reinterpret_cast<const float*>(base + q_at);
    args.kv = pool_->LayerView(layer);
    args.q_indptr = reinterpret_cast<const int32_t*>(base + q_indptr_at);
    args.block_table_indptr = reinterpret_cast<const int32_t*>(base + table_indptr_at);
    args.block_table = reinterpret_cast<const int32_t*>(base + table_at);
    args.kv_lens = reinterpret_cast<const int32_t*>(base + kv_len_at);
    args.causal_offset = reinterpret_cast<const int32_t*>(base + offset_at);
    args.softmax_scale = softmax_scale;
    args.state_o = reinterpret_cast<float*>(base + o_at);
    args.state_lse = reinterpret_cast<float*>(base + lse_at);
    args.error_word = reinterpret_cast<int32_t*>(base + error_at);
    FERRY_RETURN_IF_ERROR(CudaStatus(kernels::PrefillAttention(args, stream_),
                                     absl::StrCat(name(), ": PrefillAttention")));
    FERRY_RETURN_IF_ERROR(CopyOut(state_o, args.state_o, states * config.head_dim * sizeof(float)));
    FERRY_RETURN_IF_ERROR(CopyOut(state_lse, args.state_lse, states * sizeof(float)));
    FERRY_RETURN_IF_ERROR(CopyOut(host + error_at, args.error_word, sizeof(int32_t)));
    FERRY_RETURN_IF_ERROR(Wait("prefill"));
    return CheckErrorWord(reinterpret_cast<int32_t*>(host + error_at), nullptr,
                          "PrefillAttention");
  }

  absl::Status ExportBlocks(absl::Span<const int32_t> blocks, uint8_t* image) override {
    return CopyBlocks(blocks, image, /*to_host=*/true);
  }

  absl::Status ImportBlocks(absl::Span<const int32_t> blocks, const uint8_t* image) override {
    return CopyBlocks(blocks, const_cast<uint8_t*>(image), /*to_host=*/false);
  }

 private:
  // One block of one layer's K or V pool is BlockPoolBytes contiguous bytes (kv_cache.h), so an
  // image moves with one copy per (block, layer, K or V), all queued, then one wait.
  absl::Status CopyBlocks(absl::Span<const int32_t> blocks, uint8_t* image, bool to_host) {
    FERRY_RETURN_IF_ERROR(UseCudaDevice(options_.device));
    kv::KvCache& cache = pool_->cache();
    const size_t bytes = static_cast<size_t>(cache.BlockPoolBytes());
    for (int32_t block : blocks) {
      for (int layer = 0; layer < cache.config().num_layers; ++layer) {
        for (bool is_v : {false, true}) {
          uint8_t* pool =
              static_cast<uint8_t*>(is_v ? cache.v_pool(layer) : cache.k_pool(layer)) +
              static_cast<size_t>(block) * bytes;
          FERRY_RETURN_IF_ERROR(to_host ? CopyOut(image, pool, bytes) : CopyIn(pool, image, bytes));
          image += bytes;
        }
      }
    }
    return Wait(to_host ? "export" : "import");
  }

  absl::Status CopyIn(void* device, const void* host, size_t bytes) {
    return CudaStatus(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_),
                      absl::StrCat(name(), ": copy to the device"));
  }
  absl::Status CopyOut(void* host, const void* device, size_t bytes) {
    return CudaStatus(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_),
                      absl::StrCat(name(), ": copy from the device"));
  }

  // LeanDecode's workspace for batches of n sequences of num_q_heads heads: zero-filled when
  // (re)allocated, after which every launch leaves it zeroed (lean_attention.h).
  absl::Status GrowWorkspace(int n, int num_q_heads) {
    const kv::KvCacheConfig& config = pool_->cache().config();
    cudaError_t error = cudaSuccess;
    const size_t bytes = kernels::LeanDecodeWorkspaceSize(
        n, num_q_heads, config.num_kv_heads, config.head_dim, config.dtype, options_.device,
        &error);
    FERRY_RETURN_IF_ERROR(CudaStatus(error, absl::StrCat(name(), ": LeanDecode workspace")));
    bool grown = false;
    FERRY_RETURN_IF_ERROR(Grow(workspace_, bytes, "LeanDecode workspace", &grown));
    if (!grown) return absl::OkStatus();
    return CudaStatus(cudaMemsetAsync(workspace_.get(), 0, workspace_.bytes(), stream_),
                      absl::StrCat(name(), ": workspace reset"));
  }

  // A kernel's error word, read back after the wait; the word is cleared for the next launch.
  absl::Status CheckErrorWord(const int32_t* word, void* device_word, const char* kernel) {
    if (*word == 0) return absl::OkStatus();
    const int32_t bits = *word;
    if (device_word != nullptr) {
      FERRY_RETURN_IF_ERROR(
          CudaStatus(cudaMemsetAsync(device_word, 0, sizeof(int32_t), stream_), "error reset"));
      FERRY_RETURN_IF_ERROR(Wait("error reset"));
    }
    return absl::InternalError(absl::StrCat(
        name(), ": ", kernel, " reported", (bits & kernels::kLeanErrorBadRange) ? " a bad range" : "",
        (bits & kernels::kLeanErrorBadBlock) ? " a block outside the pool" : ""));
  }

  // Waits for the stream with a bound (a poll: cudaStreamSynchronize cannot time out). Spins
  // briefly (short kernels), then sleeps in short steps.
  absl::Status Wait(const char* what) {
    const absl::Time deadline = absl::Now() + kDeviceTimeout;
    for (int polls = 0;; ++polls) {
      const cudaError_t status = cudaStreamQuery(stream_);
      if (status == cudaSuccess) return absl::OkStatus();
      if (status != cudaErrorNotReady) return CudaStatus(status, absl::StrCat(name(), ": ", what));
      if (absl::Now() > deadline) {
        return absl::DeadlineExceededError(absl::StrCat(name(), ": ", what, " did not finish in ",
                                                        absl::FormatDuration(kDeviceTimeout)));
      }
      if (polls < 200) {
        std::this_thread::yield();
      } else {
        absl::SleepFor(absl::Microseconds(20));
      }
    }
  }

  CudaBackendOptions options_;
  std::unique_ptr<kv::CudaKvPool> pool_;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer scratch_;    // per-call inputs and outputs on the device
  DeviceBuffer workspace_;  // LeanDecode's
  PinnedBuffer staging_;    // small host tables
};

void* AllocatePinned(size_t bytes, void* context) {
  const int device = static_cast<int>(reinterpret_cast<intptr_t>(context));
  void* data = nullptr;
  if (cudaSetDevice(device) != cudaSuccess ||
      cudaHostAlloc(&data, bytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();  // not sticky; the pool falls back to the heap
    return nullptr;
  }
  return data;
}

void ReleasePinned(void* data, void* /*context*/) { cudaFreeHost(data); }

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaAttentionBackend(
    const kv::KvCacheConfig& config, const CudaBackendOptions& options) {
  FERRY_RETURN_IF_ERROR(UseCudaDevice(options.device));
  kv::CudaKvPoolOptions pool_options;
  pool_options.cache = config;
  pool_options.device = options.device;
  pool_options.max_step_rows = std::max(options.max_batch, options.max_prefill_tokens);
  pool_options.max_step_runs = options.max_batch;
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kv::CudaKvPool> pool, kv::CudaKvPool::Create(pool_options));
  cudaStream_t stream = nullptr;
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                   "cudaStreamCreate"));
  return std::unique_ptr<AttentionBackend>(
      new CudaAttentionBackend(options, std::move(pool), stream));
}

const transport::BufferAllocator* PinnedFrameAllocator(int device) {
  static transport::BufferAllocator allocators[kMaxDevices];
  static std::once_flag once;
  std::call_once(once, [] {
    for (int d = 0; d < kMaxDevices; ++d) {
      allocators[d] = {&AllocatePinned, &ReleasePinned,
                       reinterpret_cast<void*>(static_cast<intptr_t>(d))};
    }
  });
  if (device < 0 || device >= kMaxDevices) return nullptr;
  return &allocators[device];
}

}  // namespace ferry::offload
