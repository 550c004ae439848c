// The CUDA decoder backend on tiny random checkpoints (the CPU decoder_test's variants: GQA, qkv
// bias, llama3 RoPE with q/k/v/o biases and tied embeddings, Mistral), against the float64
// reference (tests/common/decoder_reference.h) and against the CPU backend. Skips without a CUDA
// device. Every check draws fresh random checkpoints and tokens; device scratch and KV pools
// start as NaN bytes (the backend poisons its scratch; these tests poison the pools), so an
// unwritten element shows up as NaN.
//
// Tolerances (relative error = max |diff| / max |ref| over the vocabulary):
//  * fp32 weights, fp32 KV: float32 arithmetic in a different order than the reference (cuBLASLt
//    GEMM tiling, warp-shuffle softmax sums, CUDA's expf within 2 ulp): errors of a few 1e-7
//    per op grow to ~1e-6 over two layers; bound 1e-4, 100x above that and 1e4x below a
//    real defect (a wrong position, head or mask moves logits by O(1)).
//  * bf16 weights and GEMM operands, bf16 KV (the production setting) on a bf16 checkpoint (so
//    the weights are exact): each GEMM operand and K/V entry is rounded once to 8 mantissa bits
//    (relative 2^-9 = 2e-3); over two layers the logits move by well under 1% of their range;
//    bound 2e-2.
//  * Batched vs one at a time, graph replay vs direct launches: the same kernels on the same
//    rows; graph replays are checked bit for bit against direct launches of the same batches.
#include "runtime/model/cuda_decoder.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda_device.h"
#include "gtest/gtest.h"
#include "runtime/kv/cuda_kv_pool.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/cuda_attention.h"
#include "runtime/model/generate.h"
#include "tests/common/decoder_reference.h"
#include "tests/common/tiny_models.h"

namespace ferry::model {
namespace {

using ref::ReferenceLogits;
using ref::RelError;

class CudaDecoderTest : public ::testing::TestWithParam<test::DecoderVariant> {
 protected:
  void SetUp() override {
    FERRY_SKIP_WITHOUT_CUDA_DEVICE();
    seed_ = std::random_device{}();
    rng_.seed(seed_);
  }

  // A fresh random checkpoint: fp32 values (exactness checks) or bf16 (production numerics).
  std::unique_ptr<Model> MakeModel(DType dtype) {
    auto model = test::MakeTinyDecoderModel("cuda_decoder", GetParam(), dtype, rng_());
    EXPECT_TRUE(model.ok()) << model.status();
    return model.ok() ? std::move(*model) : nullptr;
  }

  std::unique_ptr<CudaAttention> MakeAttention(const Model& model, DType kv_dtype) {
    CudaAttentionOptions a;
    a.num_heads = model.config.num_heads;
    a.kv.num_layers = model.config.num_layers;
    a.kv.num_kv_heads = model.config.num_kv_heads;
    a.kv.head_dim = model.config.head_dim;
    a.kv.dtype = kv_dtype;
    a.kv.block_size = 16;
    a.kv.capacity_bytes = 128 * kv::KvBlockBytes(a.kv);
    a.max_step_rows = 256;
    a.max_step_seqs = 16;
    auto attention = CudaAttention::Create(a);
    EXPECT_TRUE(attention.ok()) << attention.status();
    if (!attention.ok()) return nullptr;
    kv::CudaKvPool& pool = (*attention)->pool();
    EXPECT_EQ(cudaMemset(pool.cache().k_pool(0), 0xff,
                         pool.cache().total_blocks() * kv::KvBlockBytes(a.kv)),
              cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // before the step's non-blocking stream
    return std::move(*attention);
  }

  std::unique_ptr<InProcessAttention> MakeCpuAttention(const Model& model) {
    auto attention = InProcessAttention::Create(test::FloatKvAttentionOptions(model.config, 128));
    EXPECT_TRUE(attention.ok()) << attention.status();
    return std::move(*attention);
  }

  std::unique_ptr<Decoder> MakeDecoder(const Model& model, AttentionStep& attention,
                                       DType weights, bool graphs = true, int max_rows = 256,
                                       int micro_batches = 1) {
    CudaDecoderOptions o;
    o.micro_batches = micro_batches;
    o.weight_dtype = weights;
    o.max_rows = max_rows;
    o.max_chunks = 16;
    o.cuda_graphs = graphs;
    auto decoder = CreateCudaDecoder(model, attention, o);
    EXPECT_TRUE(decoder.ok()) << decoder.status();
    return decoder.ok() ? std::move(*decoder) : nullptr;
  }

  std::vector<int32_t> RandomTokens(int n, int vocab) {
    std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = dist(rng_);
    return t;
  }

  // Prefill of 60 tokens, then decode to 70, each step's logits against the reference.
  void CheckAgainstReference(const Model& model, AttentionStep& attention, Decoder& decoder,
                             double bound) {
    auto tokens = RandomTokens(70, model.config.vocab_size);
    const int prefill = 60;
    ASSERT_TRUE(attention.AddSequence(7).ok());
    std::vector<float> logits;
    SeqChunk chunk{7, 0, std::span<const int32_t>(tokens.data(), prefill)};
    ASSERT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());
    double worst = RelError(logits.data(), ReferenceLogits(model, {tokens.begin(),
                                                                   tokens.begin() + prefill}));
    for (int p = prefill; p < 70; ++p) {
      chunk = SeqChunk{7, p, std::span<const int32_t>(&tokens[p], 1)};
      ASSERT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());
      worst = std::max(worst, RelError(logits.data(),
                                       ReferenceLogits(model, {tokens.begin(),
                                                               tokens.begin() + p + 1})));
    }
    EXPECT_LT(worst, bound) << "seed " << seed_;
    std::printf("[ info ] %s: worst relative logit error %.3e (bound %.0e)\n", GetParam().name,
                worst, bound);
    ASSERT_TRUE(attention.FreeSequence(7).ok());
  }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

TEST_P(CudaDecoderTest, Fp32LogitsMatchFloat64Reference) {
  auto model = MakeModel(DType::kFloat32);
  ASSERT_NE(model, nullptr);
  auto attention = MakeAttention(*model, DType::kFloat32);
  ASSERT_NE(attention, nullptr);
  auto decoder = MakeDecoder(*model, *attention, DType::kFloat32);
  ASSERT_NE(decoder, nullptr);
  CheckAgainstReference(*model, *attention, *decoder, 1e-4);
}

TEST_P(CudaDecoderTest, Bf16LogitsMatchFloat64Reference) {
  auto model = MakeModel(DType::kBFloat16);
  ASSERT_NE(model, nullptr);
  auto attention = MakeAttention(*model, DType::kBFloat16);
  ASSERT_NE(attention, nullptr);
  auto decoder = MakeDecoder(*model, *attention, DType::kBFloat16);
  ASSERT_NE(decoder, nullptr);
  std::printf("[ info ] decode attention: %s, prefill attention: %s\n",
              attention->uses_lean_decode() ? "LeanDecode" : "PagedPrefillAttention",
              attention->uses_prefill_tensor_cores() ? "PrefillAttention"
                                                     : "PagedPrefillAttention");
  CheckAgainstReference(*model, *attention, *decoder, 2e-2);
}

// The CUDA dense layers with attention on the host (the path a CUDA coordinator takes with
// workers): q/k/v cross to the host each layer.
TEST_P(CudaDecoderTest, HostAttentionStepMatchesFloat64Reference) {
  auto model = MakeModel(DType::kFloat32);
  ASSERT_NE(model, nullptr);
  auto attention = MakeCpuAttention(*model);
  auto decoder = MakeDecoder(*model, *attention, DType::kFloat32);
  ASSERT_NE(decoder, nullptr);
  CheckAgainstReference(*model, *attention, *decoder, 1e-4);
}

// Micro-batch pipelining over a host attention step (what a CUDA coordinator with workers runs):
// the same mixed steps (prefills, then decodes of every sequence) with 1, 2 and 3 micro-batches
// give the same logits (fp32: GEMMs over fewer rows may round differently, so within 1e-5), and
// attention on the GPU refuses micro-batches.
TEST_P(CudaDecoderTest, MicroBatchesOverHostAttentionGiveTheLogitsOfOneBatch) {
  auto model = MakeModel(DType::kFloat32);
  ASSERT_NE(model, nullptr);
  const int vocab = model->config.vocab_size;
  const std::vector<int> prompt_lens = {5, 1, 30, 2, 9};
  std::vector<std::vector<int32_t>> seqs;
  for (int n : prompt_lens) seqs.push_back(RandomTokens(n + 3, vocab));
  std::vector<std::vector<float>> final_logits;
  for (int micro_batches : {1, 2, 3}) {
    SCOPED_TRACE(micro_batches);
    auto attention = MakeCpuAttention(*model);
    auto decoder = MakeDecoder(*model, *attention, DType::kFloat32, /*graphs=*/true,
                               /*max_rows=*/256, micro_batches);
    ASSERT_NE(decoder, nullptr);
    for (size_t s = 0; s < seqs.size(); ++s) ASSERT_TRUE(attention->AddSequence(s).ok());
    std::vector<SeqChunk> chunks;
    for (size_t s = 0; s < seqs.size(); ++s) {
      chunks.push_back({s, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])});
    }
    std::vector<float> logits;
    ASSERT_TRUE(decoder->Forward(chunks, &logits).ok());
    for (int step = 0; step < 3; ++step) {
      chunks.clear();
      for (size_t s = 0; s < seqs.size(); ++s) {
        const int position = prompt_lens[s] + step;
        chunks.push_back({s, position, std::span<const int32_t>(&seqs[s][position], 1)});
      }
      ASSERT_TRUE(decoder->Forward(chunks, &logits).ok());
    }
    for (float x : logits) ASSERT_FALSE(std::isnan(x));
    final_logits.push_back(logits);
  }
  for (size_t i = 1; i < final_logits.size(); ++i) {
    EXPECT_LT(RelError(final_logits[i].data(), final_logits[0].data(),
                       static_cast<int>(seqs.size()) * vocab),
              1e-5)
        << "micro-batches " << i + 1 << ", seed " << seed_;
  }
  auto on_gpu = MakeAttention(*model, DType::kFloat32);
  ASSERT_NE(on_gpu, nullptr);
  CudaDecoderOptions o;
  o.weight_dtype = DType::kFloat32;
  o.micro_batches = 2;
  EXPECT_EQ(CreateCudaDecoder(*model, *on_gpu, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(CudaDecoderTest, GreedyTokensEqualTheCpuBackendForFp32Weights) {
  auto model = MakeModel(DType::kFloat32);
  ASSERT_NE(model, nullptr);
  auto cuda_attention = MakeAttention(*model, DType::kFloat32);
  ASSERT_NE(cuda_attention, nullptr);
  auto cuda = MakeDecoder(*model, *cuda_attention, DType::kFloat32);
  ASSERT_NE(cuda, nullptr);
  auto cpu_attention = MakeCpuAttention(*model);
  Decoder cpu(*model, *cpu_attention);
  for (int prompt_len : {3, 21, 61}) {
    const auto prompt = RandomTokens(prompt_len, model->config.vocab_size);
    GenerateOptions options;
    options.max_tokens = 64;
    options.ignore_eos = true;
    auto on_cpu = Generate(cpu, 1, prompt, options);
    auto on_cuda = Generate(*cuda, 1, prompt, options);
    ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
    ASSERT_TRUE(on_cuda.ok()) << on_cuda.status();
    EXPECT_EQ(on_cpu->tokens, on_cuda->tokens) << "prompt of " << prompt_len << ", seed " << seed_;
  }
}

// A batch whose sequences sit at different positions, a prefill joining mid-batch, then many
// decode steps of the same size (captured into a graph on the second, replayed after): every
// sequence's logits equal running it alone, and the graph run equals direct launches bit for
// bit. fp32 weights and KV: batched vs alone within the fp32 bound; bf16: the same bound as the
// reference check (different GEMM shapes may round differently).
TEST_P(CudaDecoderTest, BatchedDecodeWithGraphsEqualsOneAtATime) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(std::string(DTypeName(dtype)));
    auto model = MakeModel(dtype);
    ASSERT_NE(model, nullptr);
    const int vocab = model->config.vocab_size;
    const std::vector<int> prompt_lens = {3, 17, 33, 64};
    std::vector<std::vector<int32_t>> seqs;
    const int decode_steps = 6;
    for (int n : prompt_lens) seqs.push_back(RandomTokens(n + decode_steps + 1, vocab));

    // Runs the batched schedule; returns each sequence's last logits and the greedy ids of the
    // last step.
    auto run_batched = [&](bool graphs, std::vector<std::vector<float>>* last,
                           std::vector<int32_t>* greedy) {
      auto attention = MakeAttention(*model, dtype);
      ASSERT_NE(attention, nullptr);
      auto decoder = MakeDecoder(*model, *attention, dtype, graphs);
      ASSERT_NE(decoder, nullptr);
      for (size_t s = 0; s < seqs.size(); ++s) ASSERT_TRUE(attention->AddSequence(100 + s).ok());
      std::vector<SeqChunk> chunks;
      std::vector<float> logits;
      for (size_t s = 0; s < seqs.size(); ++s) {
        if (s == 2) continue;
        chunks.push_back({100 + s, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])});
      }
      ASSERT_TRUE(decoder->Forward(chunks, &logits).ok());
      last->assign(seqs.size(), {});
      for (int step = 0; step < decode_steps; ++step) {
        chunks.clear();
        for (size_t s = 0; s < seqs.size(); ++s) {
          if (s == 2 && step == 0) {
            chunks.push_back({102, 0, std::span<const int32_t>(seqs[2].data(), prompt_lens[2] + 1)});
            continue;
          }
          const int position = prompt_lens[s] + step;
          chunks.push_back({100 + s, position, std::span<const int32_t>(&seqs[s][position], 1)});
        }
        if (step + 1 == decode_steps) {
          ASSERT_TRUE(decoder->ForwardGreedy(chunks, greedy).ok());
          break;
        }
        ASSERT_TRUE(decoder->Forward(chunks, &logits).ok());
        if (step + 2 == decode_steps) {
          for (size_t s = 0; s < seqs.size(); ++s) {
            (*last)[s].assign(logits.begin() + s * vocab, logits.begin() + (s + 1) * vocab);
          }
        }
      }
    };
    std::vector<std::vector<float>> with_graphs, without_graphs;
    std::vector<int32_t> greedy_graphs, greedy_direct;
    run_batched(true, &with_graphs, &greedy_graphs);
    run_batched(false, &without_graphs, &greedy_direct);
    ASSERT_EQ(with_graphs.size(), seqs.size());
    EXPECT_EQ(greedy_graphs, greedy_direct);
    for (size_t s = 0; s < seqs.size(); ++s) {
      ASSERT_EQ(with_graphs[s].size(), static_cast<size_t>(vocab));
      EXPECT_EQ(std::memcmp(with_graphs[s].data(), without_graphs[s].data(), vocab * 4), 0)
          << "graph replay differs from direct launches, sequence " << s;
    }
    // Alone: prompt, then decode to the same final position (prompt_len + decode_steps - 2).
    for (size_t s = 0; s < seqs.size(); ++s) {
      auto attention = MakeAttention(*model, dtype);
      ASSERT_NE(attention, nullptr);
      auto decoder = MakeDecoder(*model, *attention, dtype);
      ASSERT_NE(decoder, nullptr);
      ASSERT_TRUE(attention->AddSequence(5).ok());
      std::vector<float> logits;
      SeqChunk chunk{5, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])};
      ASSERT_TRUE(decoder->Forward({&chunk, 1}, &logits).ok());
      for (int p = prompt_lens[s]; p < prompt_lens[s] + decode_steps - 1; ++p) {
        chunk = SeqChunk{5, p, std::span<const int32_t>(&seqs[s][p], 1)};
        ASSERT_TRUE(decoder->Forward({&chunk, 1}, &logits).ok());
      }
      const double bound = dtype == DType::kFloat32 ? 1e-4 : 2e-2;
      EXPECT_LT(RelError(with_graphs[s].data(), logits.data(), vocab), bound)
          << "sequence " << s << ", seed " << seed_;
    }
  }
}

TEST_P(CudaDecoderTest, ForwardGreedyIsTheArgmaxOfForward) {
  auto model = MakeModel(DType::kBFloat16);
  ASSERT_NE(model, nullptr);
  auto a1 = MakeAttention(*model, DType::kBFloat16);
  auto a2 = MakeAttention(*model, DType::kBFloat16);
  ASSERT_TRUE(a1 != nullptr && a2 != nullptr);
  auto d1 = MakeDecoder(*model, *a1, DType::kBFloat16);
  auto d2 = MakeDecoder(*model, *a2, DType::kBFloat16);
  ASSERT_TRUE(d1 != nullptr && d2 != nullptr);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SeqChunk> chunks;
  for (int s = 0; s < 3; ++s) prompts.push_back(RandomTokens(5 + 9 * s, model->config.vocab_size));
  for (int s = 0; s < 3; ++s) {
    ASSERT_TRUE(a1->AddSequence(s).ok());
    ASSERT_TRUE(a2->AddSequence(s).ok());
    chunks.push_back({static_cast<kv::SequenceId>(s), 0, prompts[s]});
  }
  std::vector<float> logits;
  std::vector<int32_t> greedy;
  ASSERT_TRUE(d1->Forward(chunks, &logits).ok());
  ASSERT_TRUE(d2->ForwardGreedy(chunks, &greedy).ok());
  ASSERT_EQ(greedy.size(), 3u);
  const int vocab = model->config.vocab_size;
  for (int s = 0; s < 3; ++s) {
    Sampler argmax(SamplingParams{});
    EXPECT_EQ(greedy[s], argmax.Sample({logits.data() + s * vocab, static_cast<size_t>(vocab)}));
  }
}

TEST_P(CudaDecoderTest, RejectsBadStepsAndLeavesNoTrace) {
  auto model = MakeModel(DType::kBFloat16);
  ASSERT_NE(model, nullptr);
  auto attention = MakeAttention(*model, DType::kBFloat16);
  ASSERT_NE(attention, nullptr);
  auto decoder = MakeDecoder(*model, *attention, DType::kBFloat16, /*graphs=*/true,
                             /*max_rows=*/64);
  ASSERT_NE(decoder, nullptr);
  ASSERT_TRUE(attention->AddSequence(1).ok());
  std::vector<float> logits;
  const int32_t bad = model->config.vocab_size;
  SeqChunk chunk{1, 0, std::span<const int32_t>(&bad, 1)};
  EXPECT_EQ(decoder->Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  const int32_t ok = 3;
  chunk = SeqChunk{1, 5, std::span<const int32_t>(&ok, 1)};  // the sequence holds 0 positions
  EXPECT_EQ(decoder->Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  chunk = SeqChunk{2, 0, std::span<const int32_t>(&ok, 1)};  // unknown sequence
  EXPECT_EQ(decoder->Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kNotFound);
  const std::vector<int32_t> too_long(65, 1);  // max_rows is 64
  chunk = SeqChunk{1, 0, too_long};
  EXPECT_EQ(decoder->Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  chunk = SeqChunk{1, 0, std::span<const int32_t>(&ok, 1)};
  EXPECT_TRUE(decoder->Forward({&chunk, 1}, &logits).ok());  // failures left no trace
  EXPECT_EQ(*attention->Length(1), 1);
  for (float x : logits) ASSERT_FALSE(std::isnan(x));

  CudaDecoderOptions missing;
  missing.device = 1000;
  EXPECT_EQ(CreateCudaDecoder(*model, *attention, missing).status().code(),
            absl::StatusCode::kFailedPrecondition);
  CudaAttentionOptions a;
  a.num_heads = 4;
  a.kv = {2, 2, 64, DType::kBFloat16, 16, int64_t{1} << 20};
  a.device = 1000;
  EXPECT_EQ(CreateCudaAttention(a).status().code(), absl::StatusCode::kFailedPrecondition);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, CudaDecoderTest,
    ::testing::ValuesIn(test::DecoderVariants()),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ferry::model
