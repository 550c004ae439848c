// CUDA decode throughput of the in-process decoder at Llama-3.2-1B shapes (16 layers, hidden
// 2048, intermediate 8192, 32 heads over 8 KV heads of 64, vocab 128256, tied embeddings, llama3
// RoPE), random bf16 weights, bf16 KV in 64-position blocks, attention on the same GPU.
//
// For each context and batch: `batch` sequences whose KV holds `context` positions of random
// bf16 values (written straight into the pool: a prefill of 64 x 8k tokens would only cost
// time), then decode steps of one token per sequence, each step ForwardGreedy (arg max on the
// device, ids to the host, the next step feeds them back) and timed on the host clock from the
// call to its return: everything a serving loop pays per step. Reported: the median step, tokens
// per second (batch / step), and the fraction of the roofline, where the roofline is the bytes a
// step must read (every weight once, bf16; the K and V of every sequence's context) over the HBM
// read bandwidth measured in this run. Variants per row: CUDA graphs on (the default: a decode
// shape is captured on its second step and replayed), graphs off (every kernel launched from
// the host), and graphs on with the full logits copied to the host (Forward, for samplers).
// For the breakdown: the step's GEMMs alone (TimeGemmsMs).
//
// Usage: cuda_decode_bench [--batches=1,16,64] [--contexts=2048,8192] [--steps=24]
//                          [--csv=FILE]
// Prints a table; --csv writes one line per (context, batch) for bench/model_decode/report.py.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/common/device_memory.h"
#include "runtime/common/cuda_util.h"
#include "runtime/kv/cuda_kv_pool.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/cuda_attention.h"
#include "runtime/model/cuda_decoder.h"
#include "runtime/model/cuda/lt_gemm.h"

namespace {

using namespace ferry;
using namespace ferry::model;

void Die(const absl::Status& status, const char* what) {
  if (status.ok()) return;
  std::fprintf(stderr, "cuda_decode_bench: %s: %s\n", what, status.ToString().c_str());
  std::exit(1);
}

std::vector<int> ParseList(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::stoi(item));
  return out;
}

ModelConfig Llama32_1B() {
  ModelConfig c;
  c.arch = Architecture::kLlama;
  c.hidden_size = 2048;
  c.intermediate_size = 8192;
  c.num_layers = 16;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 64;
  c.vocab_size = 128256;
  c.max_position_embeddings = 131072;
  c.rms_norm_eps = 1e-5;
  c.rope.type = RopeType::kLlama3;
  c.rope.theta = 500000.0;
  c.rope.factor = 32.0;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_position_embeddings = 8192;
  c.tie_word_embeddings = true;
  return c;
}

// Random weights of about N(0, 0.02^2) (uniform, same variance): a block of random values tiled
// over every matrix at a moving offset (drawing 1.2e9 fresh numbers would only cost time; the
// values do not change the work). Norm weights 1.
std::unique_ptr<Model> RandomModel(const ModelConfig& c) {
  std::vector<float> block(size_t{1} << 22);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(-0.0346f, 0.0346f);
  for (float& x : block) x = uniform(rng);
  size_t offset = 0;
  auto random = [&](size_t n) {
    std::vector<float> v(n);
    for (size_t done = 0; done < n;) {
      const size_t from = (offset += 977) % block.size();
      const size_t count = std::min(n - done, block.size() - from);
      std::memcpy(v.data() + done, block.data() + from, count * sizeof(float));
      done += count;
    }
    return v;
  };
  auto model = std::make_unique<Model>();
  model->config = c;
  const size_t hidden = c.hidden_size, inter = c.intermediate_size, hd = c.head_dim;
  const size_t qkv_out = (c.num_heads + 2 * c.num_kv_heads) * hd;
  for (int l = 0; l < c.num_layers; ++l) {
    LayerWeights w;
    w.input_norm.assign(hidden, 1.0f);
    w.wqkv = random(qkv_out * hidden);
    w.wo = random(hidden * c.num_heads * hd);
    w.post_norm.assign(hidden, 1.0f);
    w.w_gate_up = random(2 * inter * hidden);
    w.w_down = random(hidden * inter);
    model->layers.push_back(std::move(w));
  }
  model->embed = random(size_t(c.vocab_size) * hidden);
  model->final_norm.assign(hidden, 1.0f);
  return model;
}

// Bytes a decode step must read from device memory, weights part: every matrix once in bf16 (the
// tied LM head reads the embedding table), norms in float32. The embedding gather reads a few
// rows only and is left out.
double WeightBytes(const Model& m) {
  double elems = 0, norm_elems = 0;
  for (const LayerWeights& w : m.layers) {
    elems += w.wqkv.size() + w.wo.size() + w.w_gate_up.size() + w.w_down.size();
    norm_elems += w.input_norm.size() + w.post_norm.size();
  }
  elems += m.embed.size();  // the LM head
  return 2 * elems + 4 * (norm_elems + m.final_norm.size());
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Timing {
  double median_ms = 0;  // host clock, call to return
  double min_ms = 0;
};

// `steps` decode steps of the whole batch after `warmup` untimed ones; greedy ids fed back.
Timing TimeSteps(Decoder& decoder, int batch, int64_t* position, std::vector<int32_t>* tokens,
                 int warmup, int steps, bool logits_to_host) {
  std::vector<SeqChunk> chunks(batch);
  std::vector<int32_t> next;
  std::vector<float> logits;
  std::vector<double> ms;
  for (int i = 0; i < warmup + steps; ++i) {
    for (int s = 0; s < batch; ++s) {
      chunks[s] = SeqChunk{static_cast<kv::SequenceId>(s), *position, {&(*tokens)[s], 1}};
    }
    const auto start = std::chrono::steady_clock::now();
    if (logits_to_host) {
      Die(decoder.Forward(chunks, &logits), "Forward");
    } else {
      Die(decoder.ForwardGreedy(chunks, &next), "ForwardGreedy");
    }
    const double elapsed =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count();
    if (i >= warmup) ms.push_back(elapsed);
    if (!logits_to_host) *tokens = next;
    ++*position;
  }
  return {Median(ms), *std::min_element(ms.begin(), ms.end())};
}

// The dense GEMMs of one decode step alone (16 layers' QKV, O, gate_up and down projections and
// the LM head, bf16 operands, float32 outputs, through the same cuBLASLt wrapper as the decoder,
// on separate weight buffers of the model's sizes so that L2 holds none of them): the share of a
// step that is weight streaming, and the bandwidth the GEMMs reach at this batch. Median of 10
// back-to-back passes timed with events.
double TimeGemmsMs(const ModelConfig& c, int batch, cuda::LtGemm& gemm) {
  struct Shape {
    int in, out;
  };
  std::vector<Shape> shapes;
  const int q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  for (int l = 0; l < c.num_layers; ++l) {
    shapes.push_back({c.hidden_size, q_out + 2 * kv_out});
    shapes.push_back({q_out, c.hidden_size});
    shapes.push_back({c.hidden_size, 2 * c.intermediate_size});
    shapes.push_back({c.intermediate_size, c.hidden_size});
  }
  shapes.push_back({c.hidden_size, c.vocab_size});
  std::vector<DeviceBuffer> weights;
  for (const Shape& s : shapes) {
    auto w = DeviceBuffer::Allocate(size_t(s.in) * s.out * 2, "gemm probe");
    Die(w.status(), "gemm probe");
    if (!bench::FillRandomBf16(w->get(), int64_t{s.in} * s.out, s.out)) std::exit(1);
    weights.push_back(std::move(*w));
  }
  auto x = DeviceBuffer::Allocate(size_t(batch) * c.intermediate_size * 2, "gemm probe");
  auto y = DeviceBuffer::Allocate(size_t(batch) * c.vocab_size * 4, "gemm probe");
  Die(x.status(), "gemm probe");
  Die(y.status(), "gemm probe");
  if (!bench::FillRandomBf16(x->get(), int64_t{batch} * c.intermediate_size, 5)) std::exit(1);
  auto pass = [&] {
    for (size_t i = 0; i < shapes.size(); ++i) {
      Die(gemm.Linear(x->get(), batch, shapes[i].in, weights[i].get(), shapes[i].out,
                      DType::kBFloat16, y->get<float>(), false, nullptr),
          "gemm probe");
    }
  };
  pass();  // plans and clocks
  std::vector<cudaEvent_t> events(11);
  for (cudaEvent_t& e : events) cudaEventCreate(&e);
  cudaEventRecord(events[0]);
  for (int i = 0; i < 10; ++i) {
    pass();
    cudaEventRecord(events[i + 1]);
  }
  Die(CudaStatus(cudaEventSynchronize(events[10]), "gemm probe"), "gemm probe");
  std::vector<double> ms(10);
  for (int i = 0; i < 10; ++i) {
    float m = 0;
    cudaEventElapsedTime(&m, events[i], events[i + 1]);
    ms[i] = m;
  }
  for (cudaEvent_t& e : events) cudaEventDestroy(e);
  return Median(ms);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> batches = {1, 16, 64};
  std::vector<int> contexts = {2048, 8192};
  int steps = 24;
  std::string csv_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* name) -> const char* {
      const size_t n = std::strlen(name);
      return arg.compare(0, n, name) == 0 ? argv[i] + n : nullptr;
    };
    if (const char* v = value("--batches=")) batches = ParseList(v);
    else if (const char* v = value("--contexts=")) contexts = ParseList(v);
    else if (const char* v = value("--steps=")) steps = std::atoi(v);
    else if (const char* v = value("--csv=")) csv_path = v;
    else {
      std::fprintf(stderr, "usage: %s [--batches=1,16,64] [--contexts=2048,8192] [--steps=N] "
                   "[--csv=FILE]\n", argv[0]);
      return 2;
    }
  }
  Die(UseCudaDevice(0), "device");
  const double read_gbps = bench::MeasureHbmReadBandwidth(int64_t{4} << 30, 20);
  if (read_gbps <= 0) Die(absl::InternalError("read bandwidth measurement failed"), "bandwidth");
  std::printf("HBM read bandwidth (streaming read of 4 GiB, median of 20): %.0f GB/s\n",
              read_gbps);

  const ModelConfig config = Llama32_1B();
  auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Model> model = RandomModel(config);
  const double weight_bytes = WeightBytes(*model);
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int max_context = *std::max_element(contexts.begin(), contexts.end());
  const int warmup = 3;  // direct, captured, replayed

  CudaAttentionOptions a;
  a.num_heads = config.num_heads;
  a.kv = {config.num_layers, config.num_kv_heads, config.head_dim, DType::kBFloat16, 64, 0};
  const int64_t positions_per_seq = max_context + warmup + 2 * steps + 64;
  a.kv.capacity_bytes =
      int64_t{max_batch} * ((positions_per_seq + 63) / 64) * kv::KvBlockBytes(a.kv);
  a.max_step_rows = max_batch;
  a.max_step_seqs = max_batch;
  auto attention = CudaAttention::Create(a);
  Die(attention.status(), "attention");
  kv::CudaKvPool& pool = (*attention)->pool();
  const int64_t pool_elems = pool.cache().total_blocks() * kv::KvBlockBytes(a.kv) / 2;
  if (!bench::FillRandomBf16(pool.cache().k_pool(0), pool_elems, 11)) {
    Die(absl::InternalError("fill failed"), "kv fill");
  }
  CudaDecoderOptions o;
  o.max_rows = max_batch;
  o.max_chunks = max_batch;
  auto graphs = CreateCudaDecoder(*model, **attention, o);
  Die(graphs.status(), "decoder");
  o.cuda_graphs = false;
  auto direct = CreateCudaDecoder(*model, **attention, o);
  Die(direct.status(), "decoder");
  std::printf("set-up (random model, upload twice, %.1f GB KV pool): %.1f s; LeanDecode: %s\n",
              pool.cache().total_blocks() * kv::KvBlockBytes(a.kv) / 1e9,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              (*attention)->uses_lean_decode() ? "yes" : "no");

  std::ofstream csv;
  if (!csv_path.empty()) {
    csv.open(csv_path);
    csv << "context,batch,step_ms,min_ms,gemm_ms,tok_s,direct_ms,logits_ms,weight_gb,kv_gb,"
           "read_gbps,roofline_ms,roofline_fraction\n";
  }
  // The GEMMs alone per batch size (on their own weight copies, freed before the decode runs).
  std::vector<double> gemm_ms(batches.size());
  {
    auto gemm = cuda::LtGemm::Create(size_t{32} << 20);
    Die(gemm.status(), "gemm probe");
    for (size_t i = 0; i < batches.size(); ++i) {
      gemm_ms[i] = TimeGemmsMs(config, batches[i], **gemm);
    }
  }
  std::printf("\n| context | batch | step ms (graphs) | tok/s | GEMMs alone ms | no graphs ms "
              "| + logits to host ms | bytes/step GB | roofline ms | fraction of roofline |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  const double kv_bytes_per_position =
      2.0 * config.num_layers * config.num_kv_heads * config.head_dim * 2;
  std::mt19937 rng(3);
  for (int context : contexts) {
    for (int batch : batches) {
      for (int s = 0; s < batch; ++s) {
        Die((*attention)->AddSequence(s), "add");
        Die(pool.cache().Reserve(s, positions_per_seq), "reserve");
        Die(pool.cache().SetLength(s, context), "length");
      }
      std::vector<int32_t> tokens(batch);
      for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % config.vocab_size);
      int64_t position = context;
      const Timing fast = TimeSteps(**graphs, batch, &position, &tokens, warmup, steps, false);
      // Each timed step reads its sequences' KV up to and including its own new position.
      const double mean_context = context + warmup + (steps - 1) / 2.0 + 1;
      const Timing slow = TimeSteps(**direct, batch, &position, &tokens, 1, steps / 2, false);
      const Timing with_logits = TimeSteps(**graphs, batch, &position, &tokens, 1, steps / 2, true);
      const double gemms = gemm_ms[std::find(batches.begin(), batches.end(), batch) -
                                   batches.begin()];
      for (int s = 0; s < batch; ++s) Die((*attention)->FreeSequence(s), "free");

      const double kv_bytes = batch * mean_context * kv_bytes_per_position;
      const double bytes = weight_bytes + kv_bytes;
      const double roofline_ms = bytes / (read_gbps * 1e9) * 1e3;
      const double tok_s = batch / (fast.median_ms * 1e-3);
      std::printf("| %d | %d | %.3f | %.0f | %.3f | %.3f | %.3f | %.2f | %.3f | %.2f |\n",
                  context, batch, fast.median_ms, tok_s, gemms, slow.median_ms,
                  with_logits.median_ms, bytes / 1e9, roofline_ms, roofline_ms / fast.median_ms);
      std::fflush(stdout);
      if (csv.is_open()) {
        csv << context << ',' << batch << ',' << fast.median_ms << ',' << fast.min_ms << ','
            << gemms << ',' << tok_s << ',' << slow.median_ms << ',' << with_logits.median_ms << ','
            << weight_bytes / 1e9 << ',' << kv_bytes / 1e9 << ',' << read_gbps << ','
            << roofline_ms << ',' << roofline_ms / fast.median_ms << '\n';
      }
    }
  }
  return 0;
}
