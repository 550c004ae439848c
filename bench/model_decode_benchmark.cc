// CPU decode throughput of the in-process decoder: one decode step of a batch of sequences that
// each hold `context` positions, on a make-tiny checkpoint written at start-up (8 layers, hidden
// 1024, 16 heads of 64 over 4 KV heads, intermediate 2816, vocab 32000: about 150M parameters).
// Reports tokens/s (items) and the weight bytes streamed per step (fp32, once per step whatever
// the batch size, which is why batching pays on the CPU too).
#include <filesystem>
#include <memory>

#include "benchmark/benchmark.h"
#include "runtime/model/decoder.h"
#include "runtime/model/tiny_checkpoint.h"

namespace {

using namespace ferry::model;

const Model& SharedModel() {
  static std::unique_ptr<Model> model = [] {
    TinyCheckpointOptions o;
    o.out_dir = (std::filesystem::temp_directory_path() / "ferry_bench_model").string();
    o.num_layers = 8;
    o.hidden_size = 1024;
    o.num_heads = 16;
    o.num_kv_heads = 4;
    o.intermediate_size = 2816;
    o.vocab_size = 32000;
    o.seed = 1;
    if (!std::filesystem::exists(o.out_dir + "/model.safetensors")) {
      if (!WriteTinyCheckpoint(o).ok()) std::abort();
    }
    auto loaded = LoadModel(o.out_dir);
    if (!loaded.ok()) std::abort();
    return std::move(*loaded);
  }();
  return *model;
}

void BM_DecodeStep(benchmark::State& state) {
  const Model& model = SharedModel();
  const ModelConfig& c = model.config;
  const int batch = static_cast<int>(state.range(0));
  const int context = static_cast<int>(state.range(1));
  InProcessAttentionOptions a;
  a.num_heads = c.num_heads;
  a.kv.num_layers = c.num_layers;
  a.kv.num_kv_heads = c.num_kv_heads;
  a.kv.head_dim = c.head_dim;
  a.kv.dtype = ferry::DType::kBFloat16;
  a.kv.block_size = 64;
  a.kv.capacity_bytes =
      int64_t{batch} * ((context + 64 + 63) / 64 + 1) * ferry::kv::KvBlockBytes(a.kv);
  a.num_threads = 0;
  auto attention = InProcessAttention::Create(a);
  if (!attention.ok()) {
    state.SkipWithError(std::string(attention.status().message()).c_str());
    return;
  }
  Decoder decoder(model, **attention);
  // Fill the KV cache with a prefill of `context` tokens per sequence.
  std::vector<int32_t> prompt(context, 5);
  std::vector<float> logits;
  for (int s = 0; s < batch; ++s) {
    (void)(*attention)->AddSequence(s);
    SeqChunk chunk{static_cast<ferry::kv::SequenceId>(s), 0, prompt};
    if (!decoder.Forward({&chunk, 1}, &logits).ok()) std::abort();
  }
  std::vector<int32_t> token(batch, 7);
  std::vector<SeqChunk> chunks(batch);
  int64_t position = context;
  for (auto _ : state) {
    for (int s = 0; s < batch; ++s) {
      chunks[s] = SeqChunk{static_cast<ferry::kv::SequenceId>(s), position, {&token[s], 1}};
    }
    if (!decoder.Forward(chunks, &logits).ok()) {
      state.SkipWithError("forward failed");
      return;
    }
    ++position;  // Iterations(8) stays well inside the 64 positions reserved past the context
  }
  state.SetItemsProcessed(state.iterations() * batch);
}
BENCHMARK(BM_DecodeStep)
    ->ArgsProduct({{1, 16, 64}, {256}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(8);

}  // namespace

BENCHMARK_MAIN();
