// ferry: the command-line client. Flags are parsed here and nowhere else.
#include <chrono>
#include <cstdio>
#include <iostream>

#include "CLI/CLI.hpp"
#include "services/cli/attention_demo.h"
#include "services/cli/cluster_commands.h"
#include "services/cli/generate_remote.h"
#include "services/cli/model_commands.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

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

  CLI::App* model = app.add_subcommand("model", "model checkpoints");
  model->require_subcommand(1);
  ferry::cli::MakeTinyFlags tiny;
  CLI::App* make_tiny = model->add_subcommand(
      "make-tiny", "write a small deterministic random checkpoint in Hugging Face layout");
  make_tiny->add_option("--out", tiny.options.out_dir, "output folder")->required();
  make_tiny->add_option("--arch", tiny.arch, "llama, mistral or qwen2")
      ->check(CLI::IsMember({"llama", "mistral", "qwen2"}));
  make_tiny->add_option("--layers", tiny.options.num_layers)->check(CLI::Range(1, 256));
  make_tiny->add_option("--hidden", tiny.options.hidden_size)->check(CLI::Range(2, 65536));
  make_tiny->add_option("--intermediate", tiny.options.intermediate_size, "0: 2 * hidden")
      ->check(CLI::Range(0, 262144));
  make_tiny->add_option("--heads", tiny.options.num_heads)->check(CLI::Range(1, 1024));
  make_tiny->add_option("--kv-heads", tiny.options.num_kv_heads)->check(CLI::Range(1, 1024));
  make_tiny->add_option("--head-dim", tiny.options.head_dim, "0: hidden / heads")
      ->check(CLI::Range(0, 1024));
  make_tiny->add_option("--vocab", tiny.options.vocab_size)->check(CLI::Range(4, 1 << 22));
  make_tiny->add_option("--seed", tiny.options.seed);
  make_tiny->add_option("--dtype", tiny.dtype, "bf16, fp16 or fp32")
      ->check(CLI::IsMember({"bf16", "fp16", "fp32"}));
  make_tiny->add_option("--max-positions", tiny.options.max_positions)
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  make_tiny->add_flag("--tie-embeddings", tiny.options.tie_word_embeddings);
  make_tiny->add_flag("--attention-bias", tiny.options.attention_bias, "llama: q/k/v/o biases");
  make_tiny->add_option("--rope", tiny.rope, "default or llama3")
      ->check(CLI::IsMember({"default", "llama3"}));
  make_tiny->add_option("--rope-theta", tiny.options.rope_theta);
  make_tiny->add_option("--config-form", tiny.config_form, "transformers key form: 4 or 5")
      ->check(CLI::IsMember({4, 5}));
  make_tiny->add_option("--attention", tiny.attention,
                        "softmax, or linear (a per-sequence recurrent state instead of KV)")
      ->check(CLI::IsMember({"softmax", "linear"}));
  make_tiny->add_option("--feature-map", tiny.feature_map,
                        "linear attention's feature map: 1+x, elu+1 or identity")
      ->check(CLI::IsMember({"1+x", "elu+1", "identity"}));
  make_tiny->add_flag("--unnormalized", tiny.unnormalized,
                      "linear attention without its denominator (needed by identity)");

  ferry::cli::GenerateLocalOptions gen;
  CLI::App* generate = app.add_subcommand("generate", "generate tokens");
  bool local = false;
  ferry::cli::GenerateRemoteOptions remote;
  auto* local_opt = generate->add_flag("--local", local, "in-process generation (needs --model)");
  auto* coordinator_opt =
      generate->add_option("--coordinator", remote.coordinator, "coordinator host:port");
  local_opt->excludes(coordinator_opt);
  generate->add_option("--model", gen.model_dir, "Hugging Face model folder (with --local)");
  generate->add_option("--concurrency", remote.concurrency, "concurrent streams")
      ->check(CLI::Range(1, 4096));
  generate->add_option("--requests", remote.requests, "jobs to submit (a load test when > 1)")
      ->check(CLI::Range(1, 1 << 20));
  generate->add_option("--timeout", remote.timeout_s, "deadline of each job, seconds")
      ->check(CLI::Range(1, 86400));
  auto* prompt_opt = generate->add_option("--prompt", gen.prompt, "prompt text (needs tokenizer.json)");
  auto* ids_opt = generate->add_option("--prompt-ids", gen.prompt_ids, "prompt token ids")
                      ->delimiter(',');
  prompt_opt->excludes(ids_opt);
  generate->add_option("--max-tokens", gen.max_tokens, "new tokens")->check(CLI::Range(0, 1 << 24));
  generate->add_option("--temperature", gen.temperature, "0: greedy")->check(CLI::Range(0.0, 100.0));
  generate->add_option("--top-p", gen.top_p)->check(CLI::Range(0.0, 1.0));
  generate->add_option("--top-k", gen.top_k, "0: off")->check(CLI::Range(0, 1 << 24));
  generate->add_option("--seed", gen.seed);
  generate->add_flag("--ignore-eos", gen.ignore_eos);
  generate->add_option("--stop-ids", gen.stop_ids, "token ids that end generation")
      ->delimiter(',');
  generate->add_flag("--json", gen.json, "JSON lines on stdout");
  generate->add_flag("--strict", gen.strict, "refuse checkpoints with unused tensors");
  generate->add_option("--threads", gen.threads, "attention threads")->check(CLI::Range(1, 1024));
  generate->add_option("--kv-dtype", gen.kv_dtype,
                       "in-process KV cache dtype (default: fp32 on the CPU, bf16 on CUDA)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  generate->add_option("--device", gen.device, "where --local runs the model: cpu, cuda or cuda:N")
      ->capture_default_str();
  generate->add_option("--weight-dtype", gen.weight_dtype,
                       "weights on CUDA: bf16, or fp32 for exact comparisons (the CPU is fp32)")
      ->check(CLI::IsMember({"bf16", "fp32"}))
      ->capture_default_str();
  generate->add_option("--dump-logits", gen.dump_logits,
                       "write the logits that chose the last token to this JSON file");

  CLI::App* cluster = app.add_subcommand("cluster", "inspect and change the cluster");
  cluster->require_subcommand(1);
  std::string coordinator = "127.0.0.1:50051";
  int timeout_ms = 5000;
  cluster->add_option("--coordinator", coordinator, "coordinator gRPC address host:port")
      ->capture_default_str();
  cluster->add_option("--timeout-ms", timeout_ms, "deadline of each call")
      ->check(CLI::Range(1, 600000));
  CLI::App* cluster_status = cluster->add_subcommand("status", "table of workers");
  CLI::App* drain = cluster->add_subcommand("drain", "drain a worker: its KV moves, it leaves");
  std::string drain_id;
  drain->add_option("id", drain_id, "worker id")->required();
  // Let `ferry cluster status --coordinator=X` pass the parent's options after the subcommand.
  cluster_status->fallthrough();
  drain->fallthrough();

  CLI11_PARSE(app, argc, argv);

  // Logs go to stderr so that stdout carries only tokens (or JSON lines).
  spdlog::set_default_logger(spdlog::stderr_color_mt("ferry"));

  absl::Status status;
  const std::chrono::milliseconds timeout(timeout_ms);
  if (cluster_status->parsed()) {
    auto workers = ferry::cli::ListWorkers(coordinator, timeout);
    status = workers.status();
    if (workers.ok()) ferry::cli::PrintWorkerTable(*workers, std::cout);
  } else if (drain->parsed()) {
    auto state = ferry::cli::DrainWorker(coordinator, drain_id, timeout);
    status = state.status();
    if (state.ok()) {
      std::printf("worker %s: %s\n", drain_id.c_str(), ferry::v1::WorkerState_Name(*state).c_str());
    }
  } else if (attention->parsed()) {
    status = ferry::cli::RunAttentionDemo(attention_options);
  } else if (make_tiny->parsed()) {
    status = ferry::cli::RunMakeTiny(tiny);
  } else if (generate->parsed()) {
    if (local) {
      status = gen.model_dir.empty() ? absl::InvalidArgumentError("--local needs --model")
                                     : ferry::cli::RunGenerateLocal(gen);
    } else {
      status = ferry::cli::RunGenerateRemote(gen, remote);
    }
  }
  if (!status.ok()) {
    std::fprintf(stderr, "ferry: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
