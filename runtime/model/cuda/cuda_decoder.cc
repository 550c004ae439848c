// The CUDA backend of the decoder (contract: runtime/model/cuda_decoder.h).
#include "runtime/model/cuda_decoder.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/decoder_ops.h"
#include "ferry/status.h"
#include "runtime/common/cuda_util.h"
#include "runtime/common/log.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/cuda/lt_gemm.h"
#include "runtime/model/dense_ops.h"

namespace ferry::model {
namespace {

constexpr size_t kAlign = 256;  // cuBLASLt's default pointer alignment
constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;
constexpr int64_t kConvertChunk = int64_t{16} << 20;  // floats staged per weight conversion

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Slices one allocation into 256-byte-aligned pieces: a sizing pass (base == nullptr) then a
// placing pass over the real allocation.
class Carver {
 public:
  explicit Carver(uint8_t* base) : base_(base) {}
  template <typename T>
  T* Take(size_t count) {
    T* at = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + used_);
    used_ += AlignUp(count * sizeof(T));
    return at;
  }
  size_t used() const { return used_; }

 private:
  uint8_t* base_;
  size_t used_ = 0;
};

// One row per sequence: the step shape whose attention launches depend on the row count alone
// (attention_step.h), so a graph captured for that count replays it.
bool IsDecodeStep(const DecoderStep& step) {
  if (step.rows.size() != step.last_rows.size()) return false;
  std::vector<kv::SequenceId> seqs;
  seqs.reserve(step.rows.size());
  for (const StepRow& row : step.rows) seqs.push_back(row.seq);
  std::sort(seqs.begin(), seqs.end());
  return std::adjacent_find(seqs.begin(), seqs.end()) == seqs.end();
}

class CudaBackend : public DecoderBackend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const Model& model,
                                                             AttentionStep& attention,
                                                             const CudaDecoderOptions& options);
  ~CudaBackend() override;

  absl::Status Forward(const DecoderStep& step, std::vector<float>* logits,
                       std::vector<int32_t>* greedy) override;

 private:
  struct LayerPointers {
    const float* input_norm = nullptr;
    const void* wqkv = nullptr;
    const float* bqkv = nullptr;
    const void* wo = nullptr;
    const float* bo = nullptr;
    const float* post_norm = nullptr;
    const void* w_gate_up = nullptr;
    const void* w_down = nullptr;
  };
  // Device scratch and the step's inputs (int32 tokens, positions, last rows: one block, so one
  // copy uploads them; pinned twin on the host).
  struct Scratch {
    int32_t* tokens = nullptr;
    int32_t* positions = nullptr;
    int32_t* last_rows = nullptr;
    float* cos_sin = nullptr;
    float* x = nullptr;
    void* h = nullptr;
    float* qkv = nullptr;
    float* q = nullptr;
    float* k = nullptr;
    float* v = nullptr;
    float* attn = nullptr;
    void* attn_act = nullptr;  // attn in the GEMM operand type (bf16); attn itself for fp32
    float* gate_up = nullptr;
    void* act = nullptr;
    void* last_h = nullptr;
    float* logits = nullptr;
    int32_t* greedy = nullptr;
  };

  CudaBackend(const Model& model, AttentionStep& attention, const CudaDecoderOptions& options)
      : model_(model), attention_(attention), options_(options) {}

  absl::Status Init();
  absl::Status UploadWeights();
  absl::Status Put(const std::vector<float>& host, void* device, DType dtype, float* staging);
  // Enqueues the whole step on stream_, attention on the device: no host synchronisation.
  absl::Status EnqueueStep(int rows, int chunks);
  // The step with attention on the host, pipelined over micro-batches (decoder.h): each range's
  // q/k/v go to the host as soon as they exist and its attention starts while the GPU runs the
  // other ranges' dense work.
  absl::Status RunHostAttentionStep(const DecoderStep& step);
  // A step's pieces, on rows [range.first, + range.count): the embedding and RoPE angles; a
  // layer's dense work before attention (norm, QKV, RoPE: x to q, k, v) and after it (o
  // projection, residual, norm, MLP: attn to x); the final norm and LM head of the chunks.
  absl::Status EnqueueInputs(int rows);
  absl::Status EnqueueDenseIn(int layer, RowRange range);
  absl::Status EnqueueDenseOut(int layer, RowRange range);
  absl::Status EnqueueHead(int chunks);
  // Host attention of one range: q/k/v to pinned host memory, then StartAttend; FinishAttend,
  // then the output back to the device.
  absl::Status StartHostAttention(int layer, RowRange range);
  // host_qkv_ cut into q, k, v and out for max_rows rows each; row r of a tensor at r * width.
  struct HostStaging {
    float *q, *k, *v, *out;
    int64_t q_out, kv_out;  // widths: q and out rows, k and v rows
  };
  HostStaging host_staging() const;
  absl::Status FinishHostAttention(int layer, RowRange range);
  absl::Status RunGraph(int rows, int chunks, bool* ran);
  // act-dtype rows: `p` advanced by `elements` elements of act_dtype_.
  void* ActAt(void* p, int64_t elements) const {
    return static_cast<uint8_t*>(p) + elements * static_cast<int64_t>(DTypeSize(act_dtype_));
  }

  const Model& model_;
  AttentionStep& attention_;
  CudaDecoderOptions options_;
  DType act_dtype_ = DType::kBFloat16;
  bool device_attention_ = false;
  cudaStream_t stream_ = nullptr;
  bool own_stream_ = false;
  std::unique_ptr<cuda::LtGemm> gemm_;

  DeviceBuffer weights_;
  std::vector<LayerPointers> layers_;
  const void* embed_ = nullptr;
  const float* final_norm_ = nullptr;
  const void* lm_head_ = nullptr;
  const float* inv_freq_ = nullptr;

  DeviceBuffer scratch_buffer_;
  Scratch s_;
  PinnedBuffer host_inputs_;  // tokens, positions, last rows as in the device block
  size_t input_bytes_ = 0;
  cudaEvent_t inputs_copied_ = nullptr;
  bool inputs_pending_ = false;
  PinnedBuffer host_logits_;
  PinnedBuffer host_greedy_;
  PinnedBuffer host_qkv_;  // host attention: q, k, v then out
  cudaEvent_t qkv_on_host_ = nullptr;  // host attention: a range's q/k/v copies are done

  std::unordered_map<int, cudaGraphExec_t> graphs_;  // by row count (decode steps)
  std::unordered_map<int, int> decode_shapes_seen_;
};

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const Model& model, AttentionStep& attention, const CudaDecoderOptions& options) {
  if (options.weight_dtype != DType::kBFloat16 && options.weight_dtype != DType::kFloat32) {
    return absl::InvalidArgumentError("cuda decoder: weight dtype must be bf16 or fp32");
  }
  if (options.max_rows <= 0 || options.max_chunks <= 0) {
    return absl::InvalidArgumentError("cuda decoder: max_rows and max_chunks must be > 0");
  }
  if (options.micro_batches < 1) {
    return absl::InvalidArgumentError("cuda decoder: micro_batches must be at least 1");
  }
  if (options.micro_batches > 1 && attention.device_stream() != nullptr) {
    return absl::InvalidArgumentError(
        "cuda decoder: micro-batches overlap dense work with attention off the GPU (workers or "
        "the host); attention on the same GPU takes the whole step (micro_batches 1)");
  }
  const ModelConfig& c = model.config;
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError("cuda decoder: head_dim must be even");
  }
  std::unique_ptr<CudaBackend> backend(new CudaBackend(model, attention, options));
  FERRY_RETURN_IF_ERROR(backend->Init());
  return backend;
}

CudaBackend::~CudaBackend() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (auto& [rows, exec] : graphs_) cudaGraphExecDestroy(exec);
  if (inputs_copied_ != nullptr) cudaEventDestroy(inputs_copied_);
  if (qkv_on_host_ != nullptr) cudaEventDestroy(qkv_on_host_);
  if (own_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaBackend::Init() {
  const ModelConfig& c = model_.config;
  FERRY_RETURN_IF_ERROR(UseCudaDevice(options_.device));
  act_dtype_ = options_.weight_dtype;
  if (void* stream = attention_.device_stream(); stream != nullptr) {
    int stream_device = -1;
    FERRY_RETURN_IF_ERROR(CudaStatus(
        cudaStreamGetDevice(static_cast<cudaStream_t>(stream), &stream_device),
        "cudaStreamGetDevice"));
    if (stream_device != options_.device) {
      return absl::InvalidArgumentError(absl::StrCat("cuda decoder: device ", options_.device,
                                                     " but the attention step is on device ",
                                                     stream_device));
    }
    stream_ = static_cast<cudaStream_t>(stream);
    device_attention_ = true;
  } else {
    FERRY_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                     "cudaStreamCreate"));
    own_stream_ = true;
  }
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&inputs_copied_,
                                                            cudaEventDisableTiming),
                                   "cudaEventCreate"));
  FERRY_ASSIGN_OR_RETURN(gemm_, cuda::LtGemm::Create(kGemmWorkspaceBytes));
  FERRY_RETURN_IF_ERROR(UploadWeights());

  // Scratch for max_rows rows and max_chunks chunks.
  const size_t rows = static_cast<size_t>(options_.max_rows);
  const size_t chunks = static_cast<size_t>(options_.max_chunks);
  const size_t hidden = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
  const size_t q_out = c.num_heads * hd, kv_out = c.num_kv_heads * hd;
  const size_t act_size = DTypeSize(act_dtype_);
  auto carve = [&](Carver& k) {
    Scratch p;
    p.tokens = k.Take<int32_t>(rows);
    p.positions = k.Take<int32_t>(rows);
    p.last_rows = k.Take<int32_t>(chunks);
    p.cos_sin = k.Take<float>(rows * hd);
    p.x = k.Take<float>(rows * hidden);
    p.h = k.Take<uint8_t>(rows * hidden * act_size);
    p.qkv = k.Take<float>(rows * (q_out + 2 * kv_out));
    p.q = k.Take<float>(rows * q_out);
    p.k = k.Take<float>(rows * kv_out);
    p.v = k.Take<float>(rows * kv_out);
    p.attn = k.Take<float>(rows * q_out);
    p.attn_act = act_dtype_ == DType::kFloat32
                     ? static_cast<void*>(p.attn)
                     : static_cast<void*>(k.Take<uint8_t>(rows * q_out * act_size));
    p.gate_up = k.Take<float>(rows * 2 * inter);
    p.act = k.Take<uint8_t>(rows * inter * act_size);
    p.last_h = k.Take<uint8_t>(chunks * hidden * act_size);
    p.logits = k.Take<float>(chunks * c.vocab_size);
    p.greedy = k.Take<int32_t>(chunks);
    return p;
  };
  Carver sizing(nullptr);
  carve(sizing);
  FERRY_ASSIGN_OR_RETURN(scratch_buffer_, DeviceBuffer::Allocate(sizing.used(), "decoder scratch"));
  // NaN bytes: an element a step fails to write reads as NaN, never as a stale plausible value.
  // (On the legacy stream, which stream_ does not wait for: synchronised below.)
  FERRY_RETURN_IF_ERROR(CudaStatus(
      cudaMemset(scratch_buffer_.get(), 0xff, scratch_buffer_.bytes()), "cudaMemset"));
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "decoder set-up"));
  Carver placing(scratch_buffer_.get<uint8_t>());
  s_ = carve(placing);
  input_bytes_ = reinterpret_cast<uint8_t*>(s_.cos_sin) - reinterpret_cast<uint8_t*>(s_.tokens);
  FERRY_ASSIGN_OR_RETURN(host_inputs_, PinnedBuffer::Allocate(input_bytes_, "decoder inputs"));
  FERRY_ASSIGN_OR_RETURN(host_logits_,
                         PinnedBuffer::Allocate(chunks * c.vocab_size * sizeof(float), "logits"));
  FERRY_ASSIGN_OR_RETURN(host_greedy_, PinnedBuffer::Allocate(chunks * sizeof(int32_t), "tokens"));
  if (!device_attention_) {
    FERRY_ASSIGN_OR_RETURN(host_qkv_, PinnedBuffer::Allocate(
                                          rows * (2 * q_out + 2 * kv_out) * sizeof(float),
                                          "host attention staging"));
    FERRY_RETURN_IF_ERROR(CudaStatus(
        cudaEventCreateWithFlags(&qkv_on_host_, cudaEventDisableTiming), "cudaEventCreate"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Put(const std::vector<float>& host, void* device, DType dtype,
                              float* staging) {
  const int64_t n = static_cast<int64_t>(host.size());
  if (dtype == DType::kFloat32) {
    return CudaStatus(cudaMemcpy(device, host.data(), n * sizeof(float), cudaMemcpyHostToDevice),
                      "weight upload");
  }
  // bf16: float32 chunks through a staging buffer, rounded on the device.
  for (int64_t done = 0; done < n; done += kConvertChunk) {
    const int64_t count = std::min(kConvertChunk, n - done);
    FERRY_RETURN_IF_ERROR(CudaStatus(cudaMemcpy(staging, host.data() + done,
                                                count * sizeof(float), cudaMemcpyHostToDevice),
                                     "weight upload"));
    FERRY_RETURN_IF_ERROR(CudaStatus(
        kernels::ConvertFloat(staging, count, static_cast<uint8_t*>(device) + done * 2, dtype,
                              nullptr),
        "weight conversion"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadWeights() {
  const ModelConfig& c = model_.config;
  const size_t w = DTypeSize(act_dtype_);
  // One allocation for everything; norms, biases and inv_freq stay float32.
  auto carve = [&](Carver& k, std::vector<LayerPointers>* layers) {
    layers->assign(c.num_layers, LayerPointers{});
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerWeights& src = model_.layers[l];
      LayerPointers& p = (*layers)[l];
      p.input_norm = k.Take<float>(src.input_norm.size());
      p.wqkv = k.Take<uint8_t>(src.wqkv.size() * w);
      p.bqkv = src.bqkv.empty() ? nullptr : k.Take<float>(src.bqkv.size());
      p.wo = k.Take<uint8_t>(src.wo.size() * w);
      p.bo = src.bo.empty() ? nullptr : k.Take<float>(src.bo.size());
      p.post_norm = k.Take<float>(src.post_norm.size());
      p.w_gate_up = k.Take<uint8_t>(src.w_gate_up.size() * w);
      p.w_down = k.Take<uint8_t>(src.w_down.size() * w);
    }
    embed_ = k.Take<uint8_t>(model_.embed.size() * w);
    final_norm_ = k.Take<float>(model_.final_norm.size());
    lm_head_ = model_.lm_head.empty() ? embed_ : k.Take<uint8_t>(model_.lm_head.size() * w);
    inv_freq_ = k.Take<float>(c.head_dim / 2);
  };
  Carver sizing(nullptr);
  carve(sizing, &layers_);
  FERRY_ASSIGN_OR_RETURN(weights_, DeviceBuffer::Allocate(sizing.used(), "the model weights"));
  Carver placing(weights_.get<uint8_t>());
  carve(placing, &layers_);

  DeviceBuffer staging;
  if (act_dtype_ != DType::kFloat32) {
    FERRY_ASSIGN_OR_RETURN(staging, DeviceBuffer::Allocate(kConvertChunk * sizeof(float),
                                                           "weight conversion staging"));
  }
  float* stage = staging.get<float>();
  auto put_matrix = [&](const std::vector<float>& host, const void* device) {
    return Put(host, const_cast<void*>(device), act_dtype_, stage);
  };
  auto put_f32 = [&](const std::vector<float>& host, const float* device) {
    return Put(host, const_cast<float*>(device), DType::kFloat32, stage);
  };
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& src = model_.layers[l];
    const LayerPointers& p = layers_[l];
    FERRY_RETURN_IF_ERROR(put_f32(src.input_norm, p.input_norm));
    FERRY_RETURN_IF_ERROR(put_matrix(src.wqkv, p.wqkv));
    if (p.bqkv != nullptr) FERRY_RETURN_IF_ERROR(put_f32(src.bqkv, p.bqkv));
    FERRY_RETURN_IF_ERROR(put_matrix(src.wo, p.wo));
    if (p.bo != nullptr) FERRY_RETURN_IF_ERROR(put_f32(src.bo, p.bo));
    FERRY_RETURN_IF_ERROR(put_f32(src.post_norm, p.post_norm));
    FERRY_RETURN_IF_ERROR(put_matrix(src.w_gate_up, p.w_gate_up));
    FERRY_RETURN_IF_ERROR(put_matrix(src.w_down, p.w_down));
  }
  FERRY_RETURN_IF_ERROR(put_matrix(model_.embed, embed_));
  FERRY_RETURN_IF_ERROR(put_f32(model_.final_norm, final_norm_));
  if (!model_.lm_head.empty()) FERRY_RETURN_IF_ERROR(put_matrix(model_.lm_head, lm_head_));
  // The same inv_freq as the CPU backend (dense_ops.h), so the angles agree bit for bit.
  FERRY_RETURN_IF_ERROR(put_f32(RopeInvFreq(c.rope, c.head_dim), inv_freq_));
  // Copies and conversions ran on the legacy stream; the step's stream must see them done.
  return CudaStatus(cudaDeviceSynchronize(), "weight upload");
}

CudaBackend::HostStaging CudaBackend::host_staging() const {
  const ModelConfig& c = model_.config;
  HostStaging h;
  h.q_out = int64_t{c.num_heads} * c.head_dim;
  h.kv_out = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t rows = options_.max_rows;
  h.q = host_qkv_.get<float>();
  h.k = h.q + rows * h.q_out;
  h.v = h.k + rows * h.kv_out;
  h.out = h.v + rows * h.kv_out;
  return h;
}

absl::Status CudaBackend::StartHostAttention(int layer, RowRange range) {
  const auto [q, k, v, out, q_out, kv_out] = host_staging();
  const int64_t r0 = range.first, n = range.count;
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(q + r0 * q_out, s_.q + r0 * q_out,
                                                   n * q_out * 4, cudaMemcpyDeviceToHost, stream_),
                                   "q to host"));
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(k + r0 * kv_out, s_.k + r0 * kv_out,
                                                   n * kv_out * 4, cudaMemcpyDeviceToHost, stream_),
                                   "k to host"));
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(v + r0 * kv_out, s_.v + r0 * kv_out,
                                                   n * kv_out * 4, cudaMemcpyDeviceToHost, stream_),
                                   "v to host"));
  // Only this range's copies (and what the stream ran before them) are waited for; work enqueued
  // later keeps the GPU busy while the attention runs.
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(qkv_on_host_, stream_), "cudaEventRecord"));
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(qkv_on_host_), "q/k/v to host"));
  return attention_.StartAttend(layer, r0, n, q + r0 * q_out, k + r0 * kv_out, v + r0 * kv_out,
                                out + r0 * q_out);
}

absl::Status CudaBackend::FinishHostAttention(int layer, RowRange range) {
  const HostStaging h = host_staging();
  const int64_t r0 = range.first, q_out = h.q_out;
  FERRY_RETURN_IF_ERROR(attention_.FinishAttend(layer, r0));
  const float* out = h.out;
  return CudaStatus(cudaMemcpyAsync(s_.attn + r0 * q_out, out + r0 * q_out,
                                    range.count * q_out * 4, cudaMemcpyHostToDevice, stream_),
                    "attention output to device");
}

absl::Status CudaBackend::EnqueueInputs(int rows) {
  const ModelConfig& c = model_.config;
  FERRY_RETURN_IF_ERROR(CudaStatus(kernels::EmbeddingGather(s_.tokens, rows, embed_, act_dtype_,
                                                            c.vocab_size, c.hidden_size, s_.x,
                                                            stream_),
                                   "EmbeddingGather"));
  return CudaStatus(kernels::RopeCosSin(s_.positions, rows, inv_freq_, c.head_dim, s_.cos_sin,
                                        stream_),
                    "RopeCosSin");
}

absl::Status CudaBackend::EnqueueDenseIn(int layer, RowRange range) {
  const ModelConfig& c = model_.config;
  const int hidden = c.hidden_size, hd = c.head_dim;
  const int q_out = c.num_heads * hd, kv_out = c.num_kv_heads * hd;
  const int qkv_out = q_out + 2 * kv_out;
  const LayerPointers& w = layers_[layer];
  const int64_t r0 = range.first;
  const int n = static_cast<int>(range.count);
  void* h = ActAt(s_.h, r0 * hidden);
  float* qkv = s_.qkv + r0 * qkv_out;
  FERRY_RETURN_IF_ERROR(CudaStatus(kernels::RmsNorm(s_.x + r0 * hidden, nullptr, n, hidden,
                                                    w.input_norm, c.rms_norm_eps, h, act_dtype_,
                                                    stream_),
                                   "RmsNorm"));
  FERRY_RETURN_IF_ERROR(gemm_->Linear(h, n, hidden, w.wqkv, qkv_out, act_dtype_, qkv, false,
                                      stream_));
  return CudaStatus(kernels::RopeSplitQkv(qkv, w.bqkv, s_.cos_sin + r0 * hd, n, c.num_heads,
                                          c.num_kv_heads, hd, s_.q + r0 * q_out,
                                          s_.k + r0 * kv_out, s_.v + r0 * kv_out, stream_),
                    "RopeSplitQkv");
}

absl::Status CudaBackend::EnqueueDenseOut(int layer, RowRange range) {
  const ModelConfig& c = model_.config;
  const int hidden = c.hidden_size, inter = c.intermediate_size;
  const int q_out = c.num_heads * c.head_dim;
  const DType act = act_dtype_;
  const LayerPointers& w = layers_[layer];
  const int64_t r0 = range.first;
  const int n = static_cast<int>(range.count);
  float* x = s_.x + r0 * hidden;
  void* attn_act = ActAt(s_.attn_act, r0 * q_out);
  if (act != DType::kFloat32) {
    FERRY_RETURN_IF_ERROR(CudaStatus(kernels::ConvertFloat(s_.attn + r0 * q_out,
                                                           int64_t{n} * q_out, attn_act, act,
                                                           stream_),
                                     "ConvertFloat"));
  }
  FERRY_RETURN_IF_ERROR(gemm_->Linear(attn_act, n, q_out, w.wo, hidden, act, x, true, stream_));
  if (w.bo != nullptr) {
    FERRY_RETURN_IF_ERROR(CudaStatus(kernels::AddBias(x, n, hidden, w.bo, stream_), "AddBias"));
  }
  void* h = ActAt(s_.h, r0 * hidden);
  FERRY_RETURN_IF_ERROR(CudaStatus(kernels::RmsNorm(x, nullptr, n, hidden, w.post_norm,
                                                    c.rms_norm_eps, h, act, stream_),
                                   "RmsNorm"));
  float* gate_up = s_.gate_up + r0 * 2 * inter;
  void* mlp = ActAt(s_.act, r0 * inter);
  FERRY_RETURN_IF_ERROR(
      gemm_->Linear(h, n, hidden, w.w_gate_up, 2 * inter, act, gate_up, false, stream_));
  FERRY_RETURN_IF_ERROR(
      CudaStatus(kernels::SwiGlu(gate_up, n, inter, mlp, act, stream_), "SwiGlu"));
  return gemm_->Linear(mlp, n, inter, w.w_down, hidden, act, x, true, stream_);
}

absl::Status CudaBackend::EnqueueHead(int chunks) {
  const ModelConfig& c = model_.config;
  // Only each chunk's last row goes through the final norm and the LM head.
  FERRY_RETURN_IF_ERROR(CudaStatus(kernels::RmsNorm(s_.x, s_.last_rows, chunks, c.hidden_size,
                                                    final_norm_, c.rms_norm_eps, s_.last_h,
                                                    act_dtype_, stream_),
                                   "RmsNorm"));
  FERRY_RETURN_IF_ERROR(gemm_->Linear(s_.last_h, chunks, c.hidden_size, lm_head_, c.vocab_size,
                                      act_dtype_, s_.logits, false, stream_));
  return CudaStatus(kernels::ArgmaxRows(s_.logits, chunks, c.vocab_size, s_.greedy, stream_),
                    "ArgmaxRows");
}

absl::Status CudaBackend::EnqueueStep(int rows, int chunks) {
  const RowRange all{0, rows};
  FERRY_RETURN_IF_ERROR(EnqueueInputs(rows));
  for (int l = 0; l < model_.config.num_layers; ++l) {
    FERRY_RETURN_IF_ERROR(EnqueueDenseIn(l, all));
    FERRY_RETURN_IF_ERROR(attention_.StartAttend(l, 0, rows, s_.q, s_.k, s_.v, s_.attn));
    FERRY_RETURN_IF_ERROR(attention_.FinishAttend(l, 0));
    FERRY_RETURN_IF_ERROR(EnqueueDenseOut(l, all));
  }
  return EnqueueHead(chunks);
}

absl::Status CudaBackend::RunHostAttentionStep(const DecoderStep& step) {
  const int num_layers = model_.config.num_layers;
  const std::vector<RowRange> batches = SplitMicroBatches(step.last_rows, options_.micro_batches);
  FERRY_RETURN_IF_ERROR(EnqueueInputs(static_cast<int>(step.rows.size())));
  for (const RowRange& batch : batches) {
    FERRY_RETURN_IF_ERROR(EnqueueDenseIn(0, batch));
    FERRY_RETURN_IF_ERROR(StartHostAttention(0, batch));
  }
  for (int l = 0; l < num_layers; ++l) {
    for (const RowRange& batch : batches) {
      FERRY_RETURN_IF_ERROR(FinishHostAttention(l, batch));
      FERRY_RETURN_IF_ERROR(EnqueueDenseOut(l, batch));
      if (l + 1 < num_layers) {
        FERRY_RETURN_IF_ERROR(EnqueueDenseIn(l + 1, batch));
        FERRY_RETURN_IF_ERROR(StartHostAttention(l + 1, batch));
      }
    }
  }
  return EnqueueHead(static_cast<int>(step.last_rows.size()));
}

// Replays (or, on a decode shape's second occurrence, captures) the step as a CUDA graph.
// *ran is false when no graph applies: the caller enqueues the step directly.
absl::Status CudaBackend::RunGraph(int rows, int chunks, bool* ran) {
  *ran = false;
  auto it = graphs_.find(rows);
  if (it == graphs_.end()) {
    // The first occurrence runs directly: it makes every lazy plan (cuBLASLt heuristics, kernel
    // attributes) outside a capture.
    if (++decode_shapes_seen_[rows] < 2) return absl::OkStatus();
    FERRY_RETURN_IF_ERROR(CudaStatus(
        cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "graph capture"));
    const absl::Status enqueued = EnqueueStep(rows, chunks);
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    cudaGraphExec_t exec = nullptr;
    cudaError_t instantiated = cudaErrorUnknown;
    if (enqueued.ok() && ended == cudaSuccess) {
      instantiated = cudaGraphInstantiate(&exec, graph, 0);
    }
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (!enqueued.ok()) return enqueued;
    if (ended != cudaSuccess || instantiated != cudaSuccess) {
      // Not fatal: this shape runs without a graph from now on.
      cudaGetLastError();
      FERRY_LOG_WARN("cuda decoder: no CUDA graph for {} rows ({}); running without one", rows,
                     cudaGetErrorString(ended != cudaSuccess ? ended : instantiated));
      decode_shapes_seen_[rows] = -(1 << 30);
      return absl::OkStatus();
    }
    it = graphs_.emplace(rows, exec).first;
  }
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaGraphLaunch(it->second, stream_), "cudaGraphLaunch"));
  *ran = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::Forward(const DecoderStep& step, std::vector<float>* logits,
                                  std::vector<int32_t>* greedy) {
  const ModelConfig& c = model_.config;
  const int rows = static_cast<int>(step.rows.size());
  const int chunks = static_cast<int>(step.last_rows.size());
  if (rows > options_.max_rows || chunks > options_.max_chunks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda decoder: a step of ", rows, " rows in ", chunks, " chunks exceeds max_rows ",
        options_.max_rows, " / max_chunks ", options_.max_chunks));
  }
  FERRY_RETURN_IF_ERROR(UseCudaDevice(options_.device));
  // The pinned inputs are rewritten only once the previous upload has left them.
  if (inputs_pending_) {
    FERRY_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(inputs_copied_), "decoder inputs"));
  }
  auto* host = host_inputs_.get<int32_t>();
  const size_t positions_at = s_.positions - s_.tokens;
  const size_t last_rows_at = s_.last_rows - s_.tokens;
  for (int r = 0; r < rows; ++r) {
    host[r] = step.tokens[r];
    host[positions_at + r] = static_cast<int32_t>(step.rows[r].position);
  }
  std::memcpy(host + last_rows_at, step.last_rows.data(), chunks * sizeof(int32_t));
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(s_.tokens, host, input_bytes_,
                                                   cudaMemcpyHostToDevice, stream_),
                                   "decoder inputs"));
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(inputs_copied_, stream_), "cudaEventRecord"));
  inputs_pending_ = true;

  FERRY_RETURN_IF_ERROR(attention_.BeginStep(step.rows));
  bool ran = false;
  if (options_.cuda_graphs && device_attention_ && IsDecodeStep(step)) {
    FERRY_RETURN_IF_ERROR(RunGraph(rows, chunks, &ran));
  }
  if (!device_attention_) {
    FERRY_RETURN_IF_ERROR(RunHostAttentionStep(step));
  } else if (!ran) {
    FERRY_RETURN_IF_ERROR(EnqueueStep(rows, chunks));
  }
  FERRY_RETURN_IF_ERROR(attention_.EndStep());

  if (logits != nullptr) {
    FERRY_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(host_logits_.get(), s_.logits, size_t(chunks) * c.vocab_size * 4,
                        cudaMemcpyDeviceToHost, stream_),
        "logits to host"));
  }
  if (greedy != nullptr) {
    FERRY_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(host_greedy_.get(), s_.greedy, chunks * sizeof(int32_t),
                        cudaMemcpyDeviceToHost, stream_),
        "tokens to host"));
  }
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "decoder step"));
  if (logits != nullptr) {
    logits->assign(host_logits_.get<float>(),
                   host_logits_.get<float>() + size_t(chunks) * c.vocab_size);
  }
  if (greedy != nullptr) {
    greedy->assign(host_greedy_.get<int32_t>(), host_greedy_.get<int32_t>() + chunks);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> CreateCudaDecoder(const Model& model,
                                                           AttentionStep& attention,
                                                           const CudaDecoderOptions& options) {
  if (model.config.attention_kind != AttentionKind::kSoftmax) {
    return absl::UnimplementedError(
        "CUDA decoder: linear-attention models run on the CPU dense path (--device cpu)");
  }
  FERRY_ASSIGN_OR_RETURN(auto backend, CudaBackend::Create(model, attention, options));
  return std::make_unique<Decoder>(model, attention, std::move(backend));
}

}  // namespace ferry::model
