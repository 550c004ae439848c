// The CPU decoder against a float64 reference written here (full recompute, plain loops), and
// against itself: prefill-then-decode equals a full prefill, batched decode equals one sequence
// at a time, mixed prefill/decode batches, an aborted step leaves no trace; for softmax and for
// linear attention (whose float64 reference is kernels/reference's quadratic form). fp32
// weights (make-tiny --dtype=fp32) and an fp32 KV cache, so the only differences are fp32
// rounding: relative error (max |diff| / max |ref| over the vocabulary) under 1e-5.
#include "runtime/model/decoder.h"

#include <cmath>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "linear_attention_reference.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/dense_ops.h"
#include "runtime/model/tiny_checkpoint.h"

namespace ferry::model {
namespace {

// float64 forward over one whole sequence; returns the last position's logits.
std::vector<double> ReferenceLogits(const Model& m, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = m.config;
  const int H = c.hidden_size, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const int I = c.intermediate_size, qo = nh * hd, ko = nkv * hd, T = static_cast<int>(tokens.size());
  const auto inv = RopeInvFreq(c.rope, hd);
  auto norm = [&](const std::vector<double>& x, const std::vector<float>& w) {
    std::vector<double> y(x.size());
    for (int t = 0; t < static_cast<int>(x.size()) / H; ++t) {
      double ss = 0;
      for (int i = 0; i < H; ++i) ss += x[t * H + i] * x[t * H + i];
      const double s = 1.0 / std::sqrt(ss / H + c.rms_norm_eps);
      for (int i = 0; i < H; ++i) y[t * H + i] = w[i] * x[t * H + i] * s;
    }
    return y;
  };
  // y (T, out) = x (T, in) W^T (+b), W rows starting at row0 of a stacked matrix.
  auto linear = [&](const std::vector<double>& x, int in, const std::vector<float>& w, int row0,
                    int out, const std::vector<float>* b, int b0) {
    std::vector<double> y(static_cast<size_t>(T) * out);
    for (int t = 0; t < T; ++t) {
      for (int o = 0; o < out; ++o) {
        double acc = b && !b->empty() ? (*b)[b0 + o] : 0.0;
        for (int i = 0; i < in; ++i) acc += x[t * in + i] * w[(int64_t{row0} + o) * in + i];
        y[t * out + o] = acc;
      }
    }
    return y;
  };
  auto rope = [&](std::vector<double>& x, int heads) {
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < heads; ++h) {
        for (int i = 0; i < hd / 2; ++i) {
          const double angle = static_cast<double>(static_cast<float>(t) * inv[i]);
          double& a = x[(t * heads + h) * hd + i];
          double& b = x[(t * heads + h) * hd + i + hd / 2];
          const double a0 = a, b0 = b;
          a = a0 * std::cos(angle) - b0 * std::sin(angle);
          b = b0 * std::cos(angle) + a0 * std::sin(angle);
        }
      }
    }
  };
  std::vector<double> x(static_cast<size_t>(T) * H);
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < H; ++i) x[t * H + i] = m.embed[int64_t{tokens[t]} * H + i];
  }
  for (const LayerWeights& w : m.layers) {
    auto h = norm(x, w.input_norm);
    auto q = linear(h, H, w.wqkv, 0, qo, &w.bqkv, 0);
    auto k = linear(h, H, w.wqkv, qo, ko, &w.bqkv, qo);
    auto v = linear(h, H, w.wqkv, qo + ko, ko, &w.bqkv, qo + ko);
    rope(q, nh);
    rope(k, nkv);
    std::vector<double> attn(static_cast<size_t>(T) * qo);
    if (c.attention_kind == AttentionKind::kLinear) {
      kernels::LinearAttentionConfig lc;
      lc.num_seqs = 1;
      lc.num_q_heads = nh;
      lc.num_kv_heads = nkv;
      lc.head_dim = hd;
      lc.feature_map = c.linear_feature_map;
      lc.normalize = c.linear_normalize;
      const int32_t cu_seqlens[2] = {0, T};
      attn = kernels::reference::LinearAttentionReference(lc, cu_seqlens, q.data(), k.data(),
                                                          v.data());
    }
    for (int t = 0; t < T && c.attention_kind == AttentionKind::kSoftmax; ++t) {
      for (int hq = 0; hq < nh; ++hq) {
        const int hk = hq / (nh / nkv);
        std::vector<double> s(t + 1);
        double mx = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          double dot = 0;
          for (int i = 0; i < hd; ++i) dot += q[(t * nh + hq) * hd + i] * k[(j * nkv + hk) * hd + i];
          s[j] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        for (auto& e : s) l += (e = std::exp(e - mx));
        for (int i = 0; i < hd; ++i) {
          double acc = 0;
          for (int j = 0; j <= t; ++j) acc += s[j] * v[(j * nkv + hk) * hd + i];
          attn[(t * nh + hq) * hd + i] = acc / l;
        }
      }
    }
    auto o = linear(attn, qo, w.wo, 0, H, &w.bo, 0);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = norm(x, w.post_norm);
    auto g = linear(h, H, w.w_gate_up, 0, I, nullptr, 0);
    auto u = linear(h, H, w.w_gate_up, I, I, nullptr, 0);
    std::vector<double> act(g.size());
    for (size_t i = 0; i < g.size(); ++i) act[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    auto d = linear(act, I, w.w_down, 0, H, nullptr, 0);
    for (size_t i = 0; i < x.size(); ++i) x[i] += d[i];
  }
  std::vector<double> last(x.end() - H, x.end());
  double ss = 0;
  for (double e : last) ss += e * e;
  const double s = 1.0 / std::sqrt(ss / H + c.rms_norm_eps);
  std::vector<double> logits(c.vocab_size);
  const float* head = m.lm_head_data();
  for (int vtok = 0; vtok < c.vocab_size; ++vtok) {
    double acc = 0;
    for (int i = 0; i < H; ++i) acc += m.final_norm[i] * last[i] * s * head[int64_t{vtok} * H + i];
    logits[vtok] = acc;
  }
  return logits;
}

double RelError(const float* got, const std::vector<double>& want) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i])) return INFINITY;
    max_diff = std::max(max_diff, std::abs(got[i] - want[i]));
    max_ref = std::max(max_ref, std::abs(want[i]));
  }
  return max_diff / max_ref;
}

double RelError(const float* got, const float* want, int n) {
  return RelError(got, std::vector<double>(want, want + n));
}

struct Variant {
  const char* name;
  Architecture arch;
  bool llama3;
  bool bias;
  bool tied;
  AttentionKind attention = AttentionKind::kSoftmax;
  kernels::LinearFeatureMap feature_map = kernels::LinearFeatureMap::kOnePlusXMaxNorm;
};

class DecoderTest : public ::testing::TestWithParam<Variant> {
 protected:
  void SetUp() override {
    const Variant& v = GetParam();
    TinyCheckpointOptions o;
    o.out_dir = ::testing::TempDir() + "/ferry_decoder_" + v.name + "_" + std::to_string(getpid());
    std::filesystem::remove_all(o.out_dir);
    o.arch = v.arch;
    o.num_layers = 2;
    o.hidden_size = 128;
    o.num_heads = 4;
    o.num_kv_heads = 2;
    o.head_dim = 64;  // q_out 256 != hidden: non-square projections
    o.vocab_size = 200;
    o.dtype = DType::kFloat32;
    o.rope_llama3 = v.llama3;
    o.max_positions = 256;  // llama3: original 64, so the prompts cross the scaled band
    o.attention_bias = v.bias;
    o.tie_word_embeddings = v.tied;
    o.attention_kind = v.attention;
    o.linear_feature_map = v.feature_map;
    o.seed = std::random_device{}();
    ASSERT_TRUE(WriteTinyCheckpoint(o).ok());
    auto model = LoadModel(o.out_dir);
    std::filesystem::remove_all(o.out_dir);  // loaded: the files are no longer needed
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    rng_.seed(o.seed);
  }

  std::unique_ptr<AttentionStep> MakeAttention() {
    InProcessAttentionOptions a;
    a.num_heads = model_->config.num_heads;
    a.kv.num_layers = model_->config.num_layers;
    a.kv.num_kv_heads = model_->config.num_kv_heads;
    a.kv.head_dim = model_->config.head_dim;
    a.kv.dtype = DType::kFloat32;
    a.kv.block_size = 16;
    a.kv.capacity_bytes = 128 * kv::KvBlockBytes(a.kv);
    a.num_threads = 2;
    auto attention = CreateInProcessAttention(model_->config, a);
    EXPECT_TRUE(attention.ok()) << attention.status();
    return std::move(*attention);
  }

  std::vector<int32_t> RandomTokens(int n) {
    std::uniform_int_distribution<int32_t> dist(0, model_->config.vocab_size - 1);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = dist(rng_);
    return t;
  }

  std::unique_ptr<Model> model_;
  std::mt19937 rng_;
};

TEST_P(DecoderTest, LogitsMatchFloat64Reference) {
  auto attention = MakeAttention();
  Decoder decoder(*model_, *attention);
  auto tokens = RandomTokens(70);  // past the llama3 original context (64) and several blocks
  const int prefill = 60;
  ASSERT_TRUE(attention->AddSequence(7).ok());
  std::vector<float> logits;
  SeqChunk chunk{7, 0, std::span<const int32_t>(tokens.data(), prefill)};
  ASSERT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());
  auto want = ReferenceLogits(*model_, std::vector<int32_t>(tokens.begin(), tokens.begin() + prefill));
  EXPECT_LT(RelError(logits.data(), want), 1e-5);
  for (int p = prefill; p < 70; ++p) {
    chunk = SeqChunk{7, p, std::span<const int32_t>(&tokens[p], 1)};
    ASSERT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());
    want = ReferenceLogits(*model_, std::vector<int32_t>(tokens.begin(), tokens.begin() + p + 1));
    EXPECT_LT(RelError(logits.data(), want), 1e-5) << "position " << p;
  }
}

TEST_P(DecoderTest, PrefillThenDecodeEqualsFullPrefill) {
  auto tokens = RandomTokens(41);
  auto a = MakeAttention(), b = MakeAttention();
  Decoder da(*model_, *a), db(*model_, *b);
  ASSERT_TRUE(a->AddSequence(1).ok());
  ASSERT_TRUE(b->AddSequence(1).ok());
  std::vector<float> la, lb;
  SeqChunk chunk{1, 0, std::span<const int32_t>(tokens.data(), 30)};
  ASSERT_TRUE(da.Forward({&chunk, 1}, &la).ok());
  for (int p = 30; p < 41; ++p) {
    chunk = SeqChunk{1, p, std::span<const int32_t>(&tokens[p], 1)};
    ASSERT_TRUE(da.Forward({&chunk, 1}, &la).ok());
  }
  chunk = SeqChunk{1, 0, tokens};
  ASSERT_TRUE(db.Forward({&chunk, 1}, &lb).ok());
  EXPECT_LT(RelError(la.data(), lb.data(), model_->config.vocab_size), 1e-5);
}

TEST_P(DecoderTest, BatchedDecodeEqualsOneAtATime) {
  const std::vector<int> prompt_lens = {3, 17, 33, 64};
  const int vocab = model_->config.vocab_size;
  std::vector<std::vector<int32_t>> seqs;
  for (int n : prompt_lens) seqs.push_back(RandomTokens(n + 5));
  // Batched: a mixed first step (all prefills), then 5 decode steps of the whole batch, with one
  // sequence's prefill joining in the middle of the batch at the second step.
  auto batched = MakeAttention();
  Decoder db(*model_, *batched);
  std::vector<float> batch_logits;
  for (size_t s = 0; s < seqs.size(); ++s) ASSERT_TRUE(batched->AddSequence(100 + s).ok());
  std::vector<SeqChunk> chunks;
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (s == 2) continue;
    chunks.push_back({100 + s, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])});
  }
  ASSERT_TRUE(db.Forward(chunks, &batch_logits).ok());
  std::vector<std::vector<float>> last(seqs.size());
  for (int step = 0; step < 5; ++step) {
    chunks.clear();
    for (size_t s = 0; s < seqs.size(); ++s) {
      if (s == 2 && step == 0) {
        chunks.push_back({102, 0, std::span<const int32_t>(seqs[2].data(), prompt_lens[2] + 1)});
        continue;
      }
      const int position = prompt_lens[s] + step;
      chunks.push_back({100 + s, position, std::span<const int32_t>(&seqs[s][position], 1)});
    }
    ASSERT_TRUE(db.Forward(chunks, &batch_logits).ok());
    for (size_t s = 0; s < seqs.size(); ++s) {
      last[s].assign(batch_logits.begin() + s * vocab, batch_logits.begin() + (s + 1) * vocab);
    }
  }
  // One at a time, each on its own cache, final positions prompt_len + 4.
  for (size_t s = 0; s < seqs.size(); ++s) {
    auto alone = MakeAttention();
    Decoder d(*model_, *alone);
    ASSERT_TRUE(alone->AddSequence(5).ok());
    std::vector<float> logits;
    SeqChunk chunk{5, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])};
    ASSERT_TRUE(d.Forward({&chunk, 1}, &logits).ok());
    for (int p = prompt_lens[s]; p < prompt_lens[s] + 5; ++p) {
      chunk = SeqChunk{5, p, std::span<const int32_t>(&seqs[s][p], 1)};
      ASSERT_TRUE(d.Forward({&chunk, 1}, &logits).ok());
    }
    EXPECT_LT(RelError(last[s].data(), logits.data(), vocab), 1e-5) << "sequence " << s;
  }
}

TEST_P(DecoderTest, MicroBatchesGiveTheLogitsOfOneBatch) {
  const std::vector<int> prompt_lens = {5, 1, 30, 2, 9};
  const int vocab = model_->config.vocab_size;
  std::vector<std::vector<int32_t>> seqs;
  for (int n : prompt_lens) seqs.push_back(RandomTokens(n + 3));
  // The same mixed steps (prefills, then decodes of every sequence) with 1, 2 and 3 micro-batches.
  std::vector<std::vector<float>> final_logits;
  for (int micro_batches : {1, 2, 3}) {
    auto attention = MakeAttention();
    Decoder decoder(*model_, *attention, DecoderOptions{micro_batches});
    for (size_t s = 0; s < seqs.size(); ++s) ASSERT_TRUE(attention->AddSequence(s).ok());
    std::vector<SeqChunk> chunks;
    for (size_t s = 0; s < seqs.size(); ++s) {
      chunks.push_back({s, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])});
    }
    std::vector<float> logits;
    ASSERT_TRUE(decoder.Forward(chunks, &logits).ok());
    for (int step = 0; step < 3; ++step) {
      chunks.clear();
      for (size_t s = 0; s < seqs.size(); ++s) {
        const int position = prompt_lens[s] + step;
        chunks.push_back({s, position, std::span<const int32_t>(&seqs[s][position], 1)});
      }
      ASSERT_TRUE(decoder.Forward(chunks, &logits).ok()) << micro_batches;
    }
    final_logits.push_back(logits);
  }
  for (size_t i = 1; i < final_logits.size(); ++i) {
    EXPECT_LT(RelError(final_logits[i].data(), final_logits[0].data(),
                       static_cast<int>(seqs.size()) * vocab),
              1e-6)
        << "micro-batches " << i + 1;
  }
  auto attention = MakeAttention();
  EXPECT_EQ(Decoder(*model_, *attention, DecoderOptions{0}).Forward({}, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(DecoderTest, AnAbortedStepLeavesNoTrace) {
  const std::vector<int32_t> tokens = RandomTokens(12);
  auto clean = MakeAttention(), aborted = MakeAttention();
  Decoder clean_decoder(*model_, *clean), aborted_decoder(*model_, *aborted);
  std::vector<float> clean_logits, aborted_logits;
  for (auto [attention, decoder, logits] :
       {std::make_tuple(clean.get(), &clean_decoder, &clean_logits),
        std::make_tuple(aborted.get(), &aborted_decoder, &aborted_logits)}) {
    ASSERT_TRUE(attention->AddSequence(3).ok());
    SeqChunk chunk{3, 0, std::span<const int32_t>(tokens.data(), 10)};
    ASSERT_TRUE(decoder->Forward({&chunk, 1}, logits).ok());
  }
  // A step of position 10 that wrote layer 0's KV (or advanced its state) with made-up values,
  // then failed: aborted, it must leave the sequence as it was.
  const ModelConfig& c = model_->config;
  std::vector<float> q(c.num_heads * c.head_dim, 0.5f), kv(c.num_kv_heads * c.head_dim, 3.0f);
  std::vector<float> out(q.size());
  const StepRow row{3, 10};
  ASSERT_TRUE(aborted->BeginStep({&row, 1}).ok());
  ASSERT_TRUE(aborted->StartAttend(0, 0, 1, q.data(), kv.data(), kv.data(), out.data()).ok());
  ASSERT_TRUE(aborted->FinishAttend(0, 0).ok());
  EXPECT_TRUE(aborted->AbortStep().empty());
  EXPECT_EQ(*aborted->Length(3), 10);
  for (auto [decoder, logits] : {std::make_pair(&clean_decoder, &clean_logits),
                                 std::make_pair(&aborted_decoder, &aborted_logits)}) {
    for (int p = 10; p < 12; ++p) {
      SeqChunk chunk{3, p, std::span<const int32_t>(&tokens[p], 1)};
      ASSERT_TRUE(decoder->Forward({&chunk, 1}, logits).ok());
    }
  }
  EXPECT_EQ(clean_logits, aborted_logits);
}

TEST_P(DecoderTest, RejectsBadSteps) {
  auto attention = MakeAttention();
  Decoder decoder(*model_, *attention);
  ASSERT_TRUE(attention->AddSequence(1).ok());
  std::vector<float> logits;
  const int32_t bad = model_->config.vocab_size;
  SeqChunk chunk{1, 0, std::span<const int32_t>(&bad, 1)};
  EXPECT_EQ(decoder.Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  const int32_t ok = 3;
  chunk = SeqChunk{1, 5, std::span<const int32_t>(&ok, 1)};  // the sequence holds 0 positions
  EXPECT_EQ(decoder.Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  chunk = SeqChunk{2, 0, std::span<const int32_t>(&ok, 1)};  // unknown sequence
  EXPECT_EQ(decoder.Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kNotFound);
  chunk = SeqChunk{1, 0, std::span<const int32_t>(&ok, 1)};
  EXPECT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());  // failures left no trace
}

INSTANTIATE_TEST_SUITE_P(
    Variants, DecoderTest,
    ::testing::Values(Variant{"llama_gqa", Architecture::kLlama, false, false, false},
                      Variant{"qwen2_bias", Architecture::kQwen2, false, false, false},
                      Variant{"llama3_bias_tied", Architecture::kLlama, true, true, true},
                      Variant{"mistral", Architecture::kMistral, false, false, false},
                      Variant{"llama_linear_1_plus_x", Architecture::kLlama, false, false, false,
                              AttentionKind::kLinear},
                      Variant{"qwen2_linear_elu", Architecture::kQwen2, false, false, false,
                              AttentionKind::kLinear, kernels::LinearFeatureMap::kEluPlusOne}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ferry::model
