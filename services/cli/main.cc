// ferry: the command-line client. Flags are parsed here and nowhere else.
#include <chrono>
#include <cstdio>
#include <iostream>

#include "CLI/CLI.hpp"
#include "services/cli/attention_demo.h"
#include "services/cli/cluster_commands.h"

int main(int argc, char** argv) {
  CLI::App app{"ferry: heterogeneous attention-offloading runtime"};
  app.require_subcommand(1);

  CLI::App* demo = app.add_subcommand("demo", "run a self-checking demo in this process");
  demo->require_subcommand(1);
  ferry::cli::AttentionDemoOptions attention_options;
  CLI::App* attention =
      demo->add_subcommand("attention", "ragged batch split over workers, merged and checked");
  attention->add_option("--seq-lens", attention_options.seq_lens, "tokens per sequence")
      ->delimiter(',');
  attention->add_option("--workers", attention_options.num_workers, "simulated workers")
      ->check(CLI::Range(1, 64));
  attention->add_option("--threads", attention_options.threads, "threads (0: all)")
      ->check(CLI::Range(0, 1024));
  attention->add_option("--q-heads", attention_options.num_q_heads)->check(CLI::Range(1, 256));
  attention->add_option("--kv-heads", attention_options.num_kv_heads)->check(CLI::Range(1, 256));
  attention->add_option("--head-dim", attention_options.head_dim)
      ->check(CLI::IsMember({64, 128, 256}));
  attention->add_option("--block-size", attention_options.block_size)
      ->check(CLI::Range(1, 4096));
  attention->add_option("--seed", attention_options.seed);

  CLI::App* cluster = app.add_subcommand("cluster", "inspect and change the cluster");
  cluster->require_subcommand(1);
  std::string coordinator = "127.0.0.1:50051";
  int timeout_ms = 5000;
  cluster->add_option("--coordinator", coordinator, "coordinator gRPC address host:port")
      ->capture_default_str();
  cluster->add_option("--timeout-ms", timeout_ms, "deadline of each call")
      ->check(CLI::Range(1, 600000));
  CLI::App* status = cluster->add_subcommand("status", "table of workers");
  CLI::App* drain = cluster->add_subcommand("drain", "drain a worker: its KV moves, it leaves");
  std::string drain_id;
  drain->add_option("id", drain_id, "worker id")->required();
  // Let `ferry cluster status --coordinator=X` pass the parent's options after the subcommand.
  status->fallthrough();
  drain->fallthrough();

  CLI11_PARSE(app, argc, argv);

  auto fail = [](const absl::Status& status) {
    std::fprintf(stderr, "ferry: %s\n", status.ToString().c_str());
    return 1;
  };
  const std::chrono::milliseconds timeout(timeout_ms);
  if (status->parsed()) {
    auto workers = ferry::cli::ListWorkers(coordinator, timeout);
    if (!workers.ok()) return fail(workers.status());
    ferry::cli::PrintWorkerTable(*workers, std::cout);
    return 0;
  }
  if (drain->parsed()) {
    auto state = ferry::cli::DrainWorker(coordinator, drain_id, timeout);
    if (!state.ok()) return fail(state.status());
    std::printf("worker %s: %s\n", drain_id.c_str(), ferry::v1::WorkerState_Name(*state).c_str());
    return 0;
  }

  if (attention->parsed()) {
    const absl::Status demo_status = ferry::cli::RunAttentionDemo(attention_options);
    if (!demo_status.ok()) return fail(demo_status);
  }
  return 0;
}
