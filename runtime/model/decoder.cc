#include "runtime/model/decoder.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "runtime/model/dense_ops.h"
#include "runtime/model/sampler.h"

namespace ferry::model {
namespace {

// float32 on the CPU: OpenBLAS GEMMs over every row of the step, dense_ops.h for the rest.
class CpuBackend : public DecoderBackend {
 public:
  CpuBackend(const Model& model, AttentionStep& attention)
      : model_(model),
        attention_(attention),
        inv_freq_(RopeInvFreq(model.config.rope, model.config.head_dim)) {}

  absl::Status Forward(const DecoderStep& step, std::vector<float>* logits,
                       std::vector<int32_t>* greedy) override;

 private:
  const Model& model_;
  AttentionStep& attention_;
  std::vector<float> inv_freq_;
  // Scratch, reused across calls.
  std::vector<float> x_, h_, qkv_, q_, k_, v_, attn_, gate_up_, act_, cos_sin_, last_, logits_;
};

absl::Status CpuBackend::Forward(const DecoderStep& step, std::vector<float>* logits,
                                 std::vector<int32_t>* greedy) {
  const ModelConfig& c = model_.config;
  const int hidden = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
  const int q_out = c.num_heads * hd, kv_out = c.num_kv_heads * hd;
  const int qkv_out = q_out + 2 * kv_out;
  const int64_t n = static_cast<int64_t>(step.rows.size());
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

  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = model_.layers[l];
    RmsNorm(x_.data(), w.input_norm.data(), n, hidden, c.rms_norm_eps, h_.data());
    Linear(h_.data(), n, hidden, w.wqkv.data(), qkv_out, w.bqkv.empty() ? nullptr : w.bqkv.data(),
           qkv_.data());
    for (int64_t i = 0; i < n; ++i) {
      const float* row = &qkv_[i * qkv_out];
      float* q = &q_[i * q_out];
      float* k = &k_[i * kv_out];
      std::memcpy(q, row, q_out * sizeof(float));
      std::memcpy(k, row + q_out, kv_out * sizeof(float));
      std::memcpy(&v_[i * kv_out], row + q_out + kv_out, kv_out * sizeof(float));
      ApplyRope(q, c.num_heads, hd, &cos_sin_[i * hd]);
      ApplyRope(k, c.num_kv_heads, hd, &cos_sin_[i * hd]);
    }
    FERRY_RETURN_IF_ERROR(attention_.Attend(l, q_.data(), k_.data(), v_.data(), attn_.data()));
    Linear(attn_.data(), n, q_out, w.wo.data(), hidden, w.bo.empty() ? nullptr : w.bo.data(),
           x_.data(), /*accumulate=*/true);
    RmsNorm(x_.data(), w.post_norm.data(), n, hidden, c.rms_norm_eps, h_.data());
    Linear(h_.data(), n, hidden, w.w_gate_up.data(), 2 * inter, nullptr, gate_up_.data());
    SwiGlu(gate_up_.data(), n, inter, act_.data());
    Linear(act_.data(), n, inter, w.w_down.data(), hidden, nullptr, x_.data(), /*accumulate=*/true);
  }
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

Decoder::Decoder(const Model& model, AttentionStep& attention)
    : Decoder(model, attention, std::make_unique<CpuBackend>(model, attention)) {}

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
  FERRY_RETURN_IF_ERROR(PrepareStep(chunks));
  return backend_->Forward({tokens_, rows_, last_rows_}, logits, nullptr);
}

absl::Status Decoder::ForwardGreedy(std::span<const SeqChunk> chunks,
                                    std::vector<int32_t>* tokens) {
  FERRY_RETURN_IF_ERROR(PrepareStep(chunks));
  return backend_->Forward({tokens_, rows_, last_rows_}, nullptr, tokens);
}

}  // namespace ferry::model
