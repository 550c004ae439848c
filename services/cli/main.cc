// ferry: the command-line client. Flags are parsed here and nowhere else.
#include <cstdio>

#include "CLI/CLI.hpp"
#include "attention_demo.h"

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

  CLI11_PARSE(app, argc, argv);

  if (attention->parsed()) {
    const absl::Status status = ferry::cli::RunAttentionDemo(attention_options);
    if (!status.ok()) {
      std::fprintf(stderr, "ferry: %s\n", status.ToString().c_str());
      return 1;
    }
  }
  return 0;
}
