// ferry-coordinator: the front door and the compute side. Loads the model, serves the gRPC API
// (GenerationService, ClusterService, grpc.health.v1), and runs the continuous-batching
// scheduler. Flags are parsed here and nowhere else.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "runtime/common/log.h"
#include "runtime/model/attention_step.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/cuda_attention.h"
#include "runtime/model/cuda_decoder.h"
#include "runtime/model/decoder.h"
#include "runtime/model/tokenizer.h"
#include "runtime/offload/offloaded_attention.h"
#include "runtime/scheduler/batch_scheduler.h"
#include "services/coordinator/cluster_service.h"
#include "services/coordinator/generation_service.h"
#include "services/coordinator/metrics.h"
#include "spdlog/sinks/stdout_color_sinks.h"

namespace {

struct Flags {
  std::string listen = "0.0.0.0:50051";
  std::string model_dir;
  std::string device = "cpu";
  std::string weight_dtype = "bf16";
  bool local_attention = false;
  int threads = 0;
  int64_t kv_capacity = int64_t{4} << 30;
  std::string kv_dtype = "bf16";
  int block_size = 64;
  int max_batch = 64;
  int prefill_chunk = 256;
  int step_tokens = 512;
  int heartbeat_ms = 500;
  int dead_after_ms = 2000;
  int kv_rebuilds = 2;
  std::string kv_full = "preempt";
  std::string metrics_listen;
  int shutdown_grace_s = 10;
  bool strict = false;
  std::string shard = "sequence";
  int head_groups = 0;
  int micro_batches = 1;
  int64_t shard_positions = 0;
  std::string ucx_tls;
  std::string ucx_cm = "tcp";
};

int Fail(const absl::Status& status) {
  FERRY_LOG_ERROR("coordinator: {}", status.ToString());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  CLI::App app{"ferry-coordinator: runs the dense layers and schedules generation jobs"};
  app.add_option("--listen", flags.listen, "gRPC address host:port")->capture_default_str();
  app.add_option("--model", flags.model_dir, "Hugging Face model folder")->required();
  app.add_option("--device", flags.device, "where the dense layers run: cpu, cuda or cuda:N")
      ->capture_default_str();
  app.add_option("--weight-dtype", flags.weight_dtype,
                 "weights on CUDA: bf16, or fp32 for exact comparisons (the CPU is fp32)")
      ->check(CLI::IsMember({"bf16", "fp32"}))
      ->capture_default_str();
  app.add_flag("--local-attention", flags.local_attention,
               "run attention in this process (the single-machine mode)");
  app.add_option("--threads", flags.threads, "attention threads for --local-attention (0: all)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--kv-capacity", flags.kv_capacity,
                 "KV bytes for --local-attention (device memory with --device cuda)")
      ->check(CLI::Range(int64_t{1} << 20, int64_t{1} << 50));
  app.add_option("--kv-dtype", flags.kv_dtype)->check(CLI::IsMember({"bf16", "fp16", "fp32"}));
  app.add_option("--block-size", flags.block_size, "KV positions per block")
      ->check(CLI::Range(1, 4096));
  app.add_option("--max-batch", flags.max_batch, "sequences decoded together")
      ->check(CLI::Range(1, 4096));
  app.add_option("--prefill-chunk", flags.prefill_chunk, "prompt tokens per sequence per step")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--step-tokens", flags.step_tokens, "rows per decoder step")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--heartbeat-ms", flags.heartbeat_ms)->check(CLI::Range(10, 600000));
  app.add_option("--dead-after-ms", flags.dead_after_ms)->check(CLI::Range(20, 3600000));
  app.add_option("--kv-rebuilds", flags.kv_rebuilds,
                 "times a request's KV is rebuilt from its tokens after the worker holding it "
                 "fails, before the request fails (0: it fails at once)")
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  app.add_option("--shutdown-grace-s", flags.shutdown_grace_s,
                 "on SIGTERM/SIGINT, seconds the accepted requests get to finish (new ones are "
                 "refused) before the rest are cancelled; a second signal ends the wait")
      ->check(CLI::Range(0, 3600))
      ->capture_default_str();
  app.add_option("--metrics-listen", flags.metrics_listen,
                 "host:port to serve Prometheus metrics on at /metrics (off when empty)");
  app.add_option("--kv-full", flags.kv_full,
                 "when a step finds the KV full, the newest request: preempt (waits until a "
                 "request finishes, then its KV is rebuilt from its tokens) or fail "
                 "(RESOURCE_EXHAUSTED)")
      ->check(CLI::IsMember({"preempt", "fail"}))
      ->capture_default_str();
  app.add_flag("--strict", flags.strict, "refuse checkpoints with unused tensors");
  app.add_option("--shard", flags.shard,
                 "KV placement on workers: sequence (whole sequences, position ranges with "
                 "--shard-positions) or heads (each sequence's KV-head groups on distinct workers)")
      ->check(CLI::IsMember({"sequence", "heads"}))
      ->capture_default_str();
  app.add_option("--head-groups", flags.head_groups,
                 "KV-head groups per sequence with --shard=heads (divides the model's KV heads; "
                 "0: one group per KV head)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--micro-batches", flags.micro_batches,
                 "split each step's batch so one part's dense layers run while another's "
                 "attention is on the workers")
      ->check(CLI::Range(1, 8))
      ->capture_default_str();
  app.add_option("--shard-positions", flags.shard_positions,
                 "open a new shard on another worker every N positions (0: one worker per "
                 "sequence)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  app.add_option("--ucx-tls", flags.ucx_tls, "UCX transports, e.g. tcp (default: UCX's)");
  app.add_option("--ucx-cm", flags.ucx_cm, "UCX connection managers: tcp, or rdmacm on RDMA hosts")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("coordinator"));

  // SIGINT and SIGTERM are taken by a waiting thread below, not by handlers.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  ferry::model::LoadOptions load_options;
  load_options.strict = flags.strict;
  load_options.show_progress = true;
  auto model = ferry::model::LoadModel(flags.model_dir, load_options);
  if (!model.ok()) return Fail(model.status());
  const ferry::model::ModelConfig& config = (*model)->config;
  std::unique_ptr<ferry::model::Tokenizer> tokenizer;
  if (auto loaded = ferry::model::Tokenizer::LoadFromDir(flags.model_dir); loaded.ok()) {
    tokenizer = std::move(*loaded);
  } else if (loaded.status().code() != absl::StatusCode::kNotFound) {
    return Fail(loaded.status());
  }

  ferry::DType kv_dtype = ferry::DType::kBFloat16;
  ferry::ParseDType(flags.kv_dtype, &kv_dtype);
  auto device = ferry::model::ParseComputeDevice(flags.device);
  if (!device.ok()) return Fail(device.status());
  // A step holds at most max_batch sequences and step_tokens rows (the scheduler's budget).
  const int step_rows = std::max(flags.step_tokens, flags.max_batch);

  ferry::coordinator::WorkerRegistry::Options registry_options;
  registry_options.heartbeat_interval = std::chrono::milliseconds(flags.heartbeat_ms);
  registry_options.dead_after = std::chrono::milliseconds(flags.dead_after_ms);
  ferry::coordinator::WorkerRegistry registry(registry_options);

  // Attention: in this process, or on the registered workers through UCX.
  std::unique_ptr<ferry::model::AttentionStep> attention;
  std::unique_ptr<ferry::offload::AttentionClient> attention_client;
  if (flags.local_attention && *device >= 0) {
    ferry::model::CudaAttentionOptions attention_options;
    attention_options.num_heads = config.num_heads;
    attention_options.kv = {config.num_layers, config.num_kv_heads, config.head_dim, kv_dtype,
                            flags.block_size, flags.kv_capacity};
    attention_options.device = *device;
    attention_options.max_step_rows = step_rows;
    attention_options.max_step_seqs = flags.max_batch;
    auto local = ferry::model::CreateCudaAttention(attention_options);
    if (!local.ok()) return Fail(local.status());
    attention = std::move(*local);
  } else if (flags.local_attention) {
    ferry::model::InProcessAttentionOptions attention_options;
    attention_options.num_heads = config.num_heads;
    attention_options.kv = {config.num_layers, config.num_kv_heads, config.head_dim, kv_dtype,
                            flags.block_size, flags.kv_capacity};
    attention_options.num_threads =
        flags.threads > 0 ? flags.threads : static_cast<int>(std::thread::hardware_concurrency());
    auto local = ferry::model::CreateInProcessAttention(config, attention_options);
    if (!local.ok()) return Fail(local.status());
    attention = std::move(*local);
  } else {
    ferry::transport::UcxNodeOptions node_options;
    node_options.name = "coordinator";
    node_options.tls = flags.ucx_tls;
    node_options.connection_managers = flags.ucx_cm;
    auto client = ferry::offload::AttentionClient::Create(node_options);
    if (!client.ok()) return Fail(client.status());
    attention_client = std::move(*client);
    ferry::offload::OffloadedAttentionOptions offload_options;
    offload_options.num_heads = config.num_heads;
    offload_options.shape.num_layers = config.num_layers;
    offload_options.shape.num_kv_heads = config.num_kv_heads;
    offload_options.shape.head_dim = config.head_dim;
    offload_options.shape.block_size = flags.block_size;
    offload_options.shape.dtype = kv_dtype;
    offload_options.shard_positions = flags.shard_positions;
    offload_options.shape.linear_attention =
        config.attention_kind == ferry::model::AttentionKind::kLinear;
    offload_options.shape.feature_map = config.linear_feature_map;
    offload_options.shape.linear_normalize = config.linear_normalize;
    offload_options.on_worker_speed = [&registry](const std::string& id, double bytes_per_second) {
      registry.RecordAttentionThroughput(id, bytes_per_second);
    };
    if (flags.shard == "heads") {
      offload_options.num_head_groups =
          flags.head_groups > 0 ? flags.head_groups : config.num_kv_heads;
    }
    auto directory = [&registry] {
      std::vector<ferry::offload::WorkerEndpoint> endpoints;
      for (const auto& worker : registry.List()) {
        if (worker.state == ferry::coordinator::WorkerState::kDead) continue;
        const size_t colon = worker.data_address.rfind(':');
        endpoints.push_back({worker.worker_id, worker.data_address.substr(0, colon),
                             std::atoi(worker.data_address.c_str() + colon + 1),
                             worker.state == ferry::coordinator::WorkerState::kReady});
      }
      return endpoints;
    };
    auto offloaded = ferry::offload::OffloadedAttention::Create(attention_client.get(), directory,
                                                                offload_options);
    if (!offloaded.ok()) return Fail(offloaded.status());
    attention = std::move(*offloaded);
  }
  // The dense layers: the CPU backend, or CUDA (with attention on the same GPU, or on the host /
  // the workers, q/k/v crossing to the host each layer).
  std::unique_ptr<ferry::model::Decoder> decoder;
  if (*device < 0) {
    ferry::model::DecoderOptions decoder_options;
    decoder_options.micro_batches = flags.micro_batches;
    decoder = std::make_unique<ferry::model::Decoder>(**model, *attention, decoder_options);
  } else {
    ferry::model::CudaDecoderOptions dense;
    dense.device = *device;
    ferry::ParseDType(flags.weight_dtype, &dense.weight_dtype);
    dense.max_rows = step_rows;
    dense.max_chunks = flags.max_batch;
    dense.micro_batches = flags.micro_batches;
    auto cuda = ferry::model::CreateCudaDecoder(**model, *attention, dense);
    if (!cuda.ok()) return Fail(cuda.status());
    decoder = std::move(*cuda);
  }

  ferry::scheduler::BatchSchedulerOptions scheduler_options;
  scheduler_options.max_running = flags.max_batch;
  scheduler_options.prefill_chunk_tokens = flags.prefill_chunk;
  scheduler_options.step_token_budget = step_rows;
  scheduler_options.eos_token_ids = config.eos_token_ids;
  scheduler_options.max_kv_rebuilds = flags.kv_rebuilds;
  scheduler_options.preempt_when_kv_full = flags.kv_full == "preempt";
  ferry::scheduler::BatchScheduler scheduler(*decoder, scheduler_options);

  ferry::v1::ModelShape shape;
  shape.set_num_layers(config.num_layers);
  shape.set_num_kv_heads(config.num_kv_heads);
  shape.set_head_dim(config.head_dim);
  shape.set_kv_dtype(std::string(ferry::DTypeName(kv_dtype)));
  shape.set_block_size(flags.block_size);
  ferry::coordinator::ClusterServiceImpl cluster_service(&registry, shape);
  ferry::coordinator::GenerationServiceImpl generation_service(&scheduler, tokenizer.get());

  std::unique_ptr<ferry::coordinator::MetricsServer> metrics;
  if (!flags.metrics_listen.empty()) {
    auto started = ferry::coordinator::MetricsServer::Start(flags.metrics_listen, [&] {
      return ferry::coordinator::MetricsText(scheduler.stats(), registry.List());
    });
    if (!started.ok()) return Fail(started.status());
    metrics = std::move(*started);
    FERRY_LOG_INFO("coordinator: metrics on http://{}/metrics (port {})", flags.metrics_listen,
                   metrics->port());
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  // Above the API's own limits (generation.proto: 4 MiB of prompt text, 2^20 prompt ids), so a
  // request over them gets INVALID_ARGUMENT naming the field; gRPC refuses anything larger.
  builder.SetMaxReceiveMessageSize(8 << 20);
  int bound_port = 0;
  builder.AddListeningPort(flags.listen, grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(&cluster_service);
  builder.RegisterService(&generation_service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    return Fail(absl::UnavailableError("cannot listen on " + flags.listen));
  }
  FERRY_LOG_INFO("coordinator: serving {} ({} layers on {}, {} attention) on {} (port {})",
                 flags.model_dir, config.num_layers, flags.device,
                 flags.local_attention ? "local" : "worker", flags.listen, bound_port);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  // Graceful: refuse new requests (and tell health checks), let the accepted ones finish within
  // the grace; a second signal cuts the wait short.
  scheduler.StopAccepting();
  server->GetHealthCheckService()->SetServingStatus(false);
  const auto busy = [&] { return scheduler.running() + scheduler.queued(); };
  if (busy() > 0 && flags.shutdown_grace_s > 0) {
    FERRY_LOG_INFO("coordinator: signal {}, refusing new requests; {} accepted ones get up to {} s",
                   signal_number, busy(), flags.shutdown_grace_s);
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(flags.shutdown_grace_s);
    const timespec poll{0, 100'000'000};
    while (busy() > 0 && std::chrono::steady_clock::now() < deadline) {
      if (sigtimedwait(&signals, nullptr, &poll) > 0) {
        FERRY_LOG_INFO("coordinator: a second signal, not waiting any longer");
        break;
      }
    }
  }
  FERRY_LOG_INFO("coordinator: shutting down ({} requests left to cancel)", busy());
  metrics.reset();
  scheduler.Stop();  // running requests end as cancelled, their streams close
  // The streams still open end at once (their jobs are finished or cancelled); the bound is for
  // the rest, such as an idle client connection, which would otherwise hold Shutdown to its end.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  FERRY_LOG_INFO("coordinator: stopped");
  return 0;
}
