#include "runtime/model/decoder.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "runtime/model/dense_ops.h"
#include "runtime/model/sampler.h"

namespace ferry::model {
namespace {

// float32 on the CPU: OpenBLAS GEMMs over every row of the step, dense_ops.h for the rest, with
// micro-batch pipelining (decoder.h).
class CpuBackend : public DecoderBackend {
 public:
  CpuBackend(const Model& model, AttentionStep& attention, DecoderOptions options)
      : model_(model),
        attention_(attention),
        options_(options),
        inv_freq_(RopeInvFreq(model.config.rope, model.config.head_dim)) {}

  absl::Status Forward(const DecoderStep& step, std::vector<float>* logits,
                       std::vector<int32_t>* greedy) override;

 private:
  // A layer's dense work on a range of rows: before attention (norm, QKV, RoPE: x_ to q_, k_,
  // v_) and after it (o projection, residual, norm, MLP: attn_ to x_).
  void DenseIn(int layer, RowRange range);
  void DenseOut(int layer, RowRange range);
  absl::Status StartAttend(int layer, RowRange range);
  absl::Status RunLayers(const DecoderStep& step);

  const Model& model_;
  AttentionStep& attention_;
  const DecoderOptions options_;
  std::vector<float> inv_freq_;
  // Scratch, reused across calls.
  std::vector<float> x_, h_, qkv_, q_, k_, v_, attn_, gate_up_, act_, cos_sin_, last_, logits_;
};

void CpuBackend::DenseIn(int layer, RowRange range) {
  const ModelConfig& c = model_.config;
  const int hidden = c.hidden_size, hd = c.head_dim;
  const int q_out = c.num_heads * hd, kv_out = c.num_kv_heads * hd;
  const int qkv_out = q_out + 2 * kv_out;
  const LayerWeights& w = model_.layers[layer];
  const int64_t r0 = range.first, n = range.count;
  RmsNorm(&x_[r0 * hidden], w.input_norm.data(), n, hidden, c.rms_norm_eps, &h_[r0 * hidden]);
  Linear(&h_[r0 * hidden], n, hidden, w.wqkv.data(), qkv_out,
         w.bqkv.empty() ? nullptr : w.bqkv.data(), &qkv_[r0 * qkv_out]);
  for (int64_t i = r0; i < r0 + n; ++i) {
    const float* row = &qkv_[i * qkv_out];
    float* q = &q_[i * q_out];
    float* k = &k_[i * kv_out];
    std::memcpy(q, row, q_out * sizeof(float));
    std::memcpy(k, row + q_out, kv_out * sizeof(float));
    std::memcpy(&v_[i * kv_out], row + q_out + kv_out, kv_out * sizeof(float));
    ApplyRope(q, c.num_heads, hd, &cos_sin_[i * hd]);
    ApplyRope(k, c.num_kv_heads, hd, &cos_sin_[i * hd]);
  }
}

absl::Status CpuBackend::StartAttend(int layer, RowRange range) {
  const ModelConfig& c = model_.config;
  const int64_t q_out = int64_t{c.num_heads} * c.head_dim;
  const int64_t kv_out = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t r0 = range.first;
  return attention_.StartAttend(layer, r0, range.count, &q_[r0 * q_out], &k_[r0 * kv_out],
                                &v_[r0 * kv_out], &attn_[r0 * q_out]);
}

void CpuBackend::DenseOut(int layer, RowRange range) {
  const ModelConfig& c = model_.config;
  const int hidden = c.hidden_size, inter = c.intermediate_size;
  const int q_out = c.num_heads * c.head_dim;
  const LayerWeights& w = model_.layers[layer];
  const int64_t r0 = range.first, n = range.count;
  Linear(&attn_[r0 * q_out], n, q_out, w.wo.data(), hidden, w.bo.empty() ? nullptr : w.bo.data(),
         &x_[r0 * hidden], /*accumulate=*/true);
  RmsNorm(&x_[r0 * hidden], w.post_norm.data(), n, hidden, c.rms_norm_eps, &h_[r0 * hidden]);
  Linear(&h_[r0 * hidden], n, hidden, w.w_gate_up.data(), 2 * inter, nullptr,
         &gate_up_[r0 * 2 * inter]);
  SwiGlu(&gate_up_[r0 * 2 * inter], n, inter, &act_[r0 * inter]);
  Linear(&act_[r0 * inter], n, inter, w.w_down.data(), hidden, nullptr, &x_[r0 * hidden],
         /*accumulate=*/true);
}

absl::Status CpuBackend::RunLayers(const DecoderStep& step) {
  const int num_layers = model_.config.num_layers;
  const std::vector<RowRange> batches = SplitMicroBatches(step.last_rows, options_.micro_batches);
  for (const RowRange& batch : batches) {
    DenseIn(0, batch);
    FERRY_RETURN_IF_ERROR(StartAttend(0, batch));
  }
  for (int l = 0; l < num_layers; ++l) {
    for (const RowRange& batch : batches) {
      FERRY_RETURN_IF_ERROR(attention_.FinishAttend(l, batch.first));
      DenseOut(l, batch);
      if (l + 1 < num_layers) {
        DenseIn(l + 1, batch);
        FERRY_RETURN_IF_ERROR(StartAttend(l + 1, batch));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Forward(const DecoderStep& step, std::vector<float>* logits,
                                 std::vector<int32_t>* greedy) {
  const ModelConfig& c = model_.config;
  const int hidden = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
  const int q_out = c.num_heads * hd, kv_out = c.num_kv_heads * hd;
  const int qkv_out = q_out + 2 * kv_out;
  const int64_t n = static_cast<int64_t>(step.rows.size());
  if (options_.micro_batches < 1) {
    return absl::InvalidArgumentError("decoder: micro_batches must be at least 1");
  }
  FERRY_RETURN_IF_ERROR(attention_.BeginStep(step.rows));

  x_.resize(n * hidden);
  h_.resize(n * hidden);
  qkv_.resize(n * qkv_out);
  q_.resize(n * q_out);
  k_.resize(n * kv_out);
  v_.resize(n * kv_out);
  attn_.resize(n * q_out);
  gate_up_.resize(n * 2 * inter);
  act_.resize(n * inter);
  cos_sin_.resize(n * hd);

  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(&x_[r * hidden], &model_.embed[int64_t{step.tokens[r]} * hidden],
                hidden * sizeof(float));
    RopeCosSin(inv_freq_, step.rows[r].position, &cos_sin_[r * hd]);
  }
  FERRY_RETURN_IF_ERROR(RunLayers(step));
  FERRY_RETURN_IF_ERROR(attention_.EndStep());

  // Only each chunk's last row goes through the final norm and the LM head.
  const int64_t num_chunks = static_cast<int64_t>(step.last_rows.size());
  last_.resize(num_chunks * hidden);
  for (int64_t i = 0; i < num_chunks; ++i) {
    RmsNorm(&x_[int64_t{step.last_rows[i]} * hidden], model_.final_norm.data(), 1, hidden,
            c.rms_norm_eps, &last_[i * hidden]);
  }
  std::vector<float>* out = logits != nullptr ? logits : &logits_;
  out->resize(num_chunks * c.vocab_size);
  Linear(last_.data(), num_chunks, hidden, model_.lm_head_data(), c.vocab_size, nullptr,
         out->data());
  if (greedy != nullptr) {
    Sampler argmax(SamplingParams{});  // temperature 0: the greedy rule
    greedy->resize(num_chunks);
    for (int64_t i = 0; i < num_chunks; ++i) {
      (*greedy)[i] = argmax.Sample({out->data() + i * c.vocab_size,
                                    static_cast<size_t>(c.vocab_size)});
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<RowRange> SplitMicroBatches(std::span<const int32_t> last_rows, int micro_batches) {
  const int64_t num_chunks = static_cast<int64_t>(last_rows.size());
  const int64_t rows = num_chunks == 0 ? 0 : int64_t{last_rows.back()} + 1;
  const int64_t batches = std::min<int64_t>(std::max(1, micro_batches), num_chunks);
  std::vector<RowRange> ranges;
  int64_t start = 0;
  for (int64_t i = 0; i < num_chunks; ++i) {
    const int64_t end = int64_t{last_rows[i]} + 1;
    const int64_t cut = static_cast<int64_t>(ranges.size()) + 1;  // the cut this could be
    const int64_t chunks_after = num_chunks - i - 1;
    if (cut < batches && end * batches >= rows * cut && chunks_after >= batches - cut) {
      ranges.push_back({start, end - start});
      start = end;
    }
  }
  ranges.push_back({start, rows - start});
  return ranges;
}

Decoder::Decoder(const Model& model, AttentionStep& attention, DecoderOptions options)
    : Decoder(model, attention, std::make_unique<CpuBackend>(model, attention, options)) {}

Decoder::Decoder(const Model& model, AttentionStep& attention,
                 std::unique_ptr<DecoderBackend> backend)
    : model_(model), attention_(attention), backend_(std::move(backend)) {}

Decoder::~Decoder() = default;

absl::Status Decoder::PrepareStep(std::span<const SeqChunk> chunks) {
  const ModelConfig& c = model_.config;
  rows_.clear();
  tokens_.clear();
  last_rows_.clear();
  for (const SeqChunk& chunk : chunks) {
    if (chunk.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("decoder: empty chunk for sequence ", chunk.seq));
    }
    for (size_t i = 0; i < chunk.tokens.size(); ++i) {
      const int32_t token = chunk.tokens[i];
      if (token < 0 || token >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("decoder: token id ", token,
                                                       " is outside the vocabulary [0, ",
                                                       c.vocab_size, ")"));
      }
      const int64_t position = chunk.start_position + static_cast<int64_t>(i);
      if (position >= c.max_position_embeddings) {
        return absl::OutOfRangeError(absl::StrCat("decoder: position ", position,
                                                  " is beyond max_position_embeddings ",
                                                  c.max_position_embeddings));
      }
      // Mistral's sliding window masks keys older than the window; Ferry attends over the whole
      // sequence, so it refuses positions where the two would differ.
      if (c.sliding_window > 0 && position >= c.sliding_window) {
        return absl::UnimplementedError(absl::StrCat("decoder: position ", position,
                                                     " is beyond the sliding window (",
                                                     c.sliding_window, "), which Ferry does not "
                                                     "implement"));
      }
      rows_.push_back(StepRow{chunk.seq, position});
      tokens_.push_back(token);
    }
    last_rows_.push_back(static_cast<int32_t>(rows_.size() - 1));
  }
  return absl::OkStatus();
}

absl::Status Decoder::Forward(std::span<const SeqChunk> chunks, std::vector<float>* logits) {
  return RunStep(chunks, logits, nullptr);
}

absl::Status Decoder::ForwardGreedy(std::span<const SeqChunk> chunks,
                                    std::vector<int32_t>* tokens) {
  return RunStep(chunks, nullptr, tokens);
}

absl::Status Decoder::RunStep(std::span<const SeqChunk> chunks, std::vector<float>* logits,
                              std::vector<int32_t>* greedy) {
  failed_sequences_.clear();
  FERRY_RETURN_IF_ERROR(PrepareStep(chunks));
  absl::Status status = backend_->Forward({tokens_, rows_, last_rows_}, logits, greedy);
  // Whatever part of the step ran is undone (attention_step.h), so the step can be retried.
  if (!status.ok()) failed_sequences_ = attention_.AbortStep();
  return status;
}

}  // namespace ferry::model
