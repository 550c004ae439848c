// The CLI's model commands end to end: make-tiny, then generate --local with --json (JSON lines
// only on stdout), both flag forms, seeds, a text prompt through tokenizer.json, and errors.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace {

struct CliRun {
  int exit_code;
  std::string out;
};

// stdout only, or stdout and stderr together.
CliRun RunFerry(const std::string& args, bool with_stderr = false) {
  const std::string cmd = std::string(FERRY_BIN) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* pipe = popen(cmd.c_str(), "r");
  CliRun run{-1, ""};
  if (pipe == nullptr) return run;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) run.out.append(buf, n);
  const int status = pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

std::vector<nlohmann::json> JsonLines(const std::string& out) {
  std::vector<nlohmann::json> lines;
  size_t start = 0;
  while (start < out.size()) {
    size_t end = out.find('\n', start);
    if (end == std::string::npos) end = out.size();
    lines.push_back(nlohmann::json::parse(out.substr(start, end - start)));  // throws if not JSON
    start = end + 1;
  }
  return lines;
}

class CliModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // One folder per process: ctest -j runs this suite's cases as parallel processes.
    dir_ = ::testing::TempDir() + "/ferry_cli_tiny_" + std::to_string(getpid());
    std::filesystem::remove_all(dir_);
    ASSERT_EQ(RunFerry("model make-tiny --out=" + dir_ +
                       " --layers 1 --hidden=128 --heads 2 --kv-heads=1 --vocab=300 --seed=5")
                  .exit_code,
              0);
  }
  static void TearDownTestSuite() { std::filesystem::remove_all(dir_); }
  static std::string dir_;
};
std::string CliModelTest::dir_;

TEST_F(CliModelTest, JsonLinesAndFinalLine) {
  const CliRun run = RunFerry("generate --local --model=" + dir_ +
                           " --prompt-ids=1,2,3 --max-tokens 6 --ignore-eos --json");
  ASSERT_EQ(run.exit_code, 0);
  const auto lines = JsonLines(run.out);
  ASSERT_EQ(lines.size(), 7u);
  std::vector<int> tokens;
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(lines[i]["index"], i);
    tokens.push_back(lines[i]["token_id"]);
  }
  EXPECT_EQ(lines[6]["token_ids"].get<std::vector<int>>(), tokens);
  EXPECT_EQ(lines[6]["finish_reason"], "length");
  EXPECT_GT(lines[6]["tokens_per_s"].get<double>(), 0);
}

TEST_F(CliModelTest, SeedsReproduceAndFlagFormsAgree) {
  const std::string common = " --prompt-ids=1,2,3 --max-tokens=8 --ignore-eos --json";
  const CliRun a = RunFerry("generate --local --model " + dir_ + common +
                         " --temperature 0.9 --top-p 0.95 --top-k 50 --seed 3");
  const CliRun b = RunFerry("generate --local --model=" + dir_ + common +
                         " --temperature=0.9 --top-p=0.95 --top-k=50 --seed=3");
  ASSERT_EQ(a.exit_code, 0);
  ASSERT_EQ(b.exit_code, 0);
  EXPECT_EQ(JsonLines(a.out).back()["token_ids"], JsonLines(b.out).back()["token_ids"]);
}

TEST_F(CliModelTest, TextPromptThroughTokenizerJson) {
  // A minimal byte-level tokenizer: "h" and "i" only.
  const std::string tok_dir = dir_ + "_tok";
  std::filesystem::remove_all(tok_dir);
  std::filesystem::copy(dir_, tok_dir);
  std::ofstream(tok_dir + "/tokenizer.json")
      << R"({"model": {"type": "BPE", "vocab": {"h": 104, "i": 105}, "merges": []}})";
  const CliRun run = RunFerry("generate --local --model=" + tok_dir +
                           " --prompt=hi --max-tokens=2 --ignore-eos --json");
  ASSERT_EQ(run.exit_code, 0);
  EXPECT_EQ(JsonLines(run.out).back()["prompt_tokens"], 2);
}

TEST_F(CliModelTest, ClearErrors) {
  EXPECT_EQ(RunFerry("generate --local --model=/nonexistent --prompt-ids=1").exit_code, 1);
  EXPECT_NE(RunFerry("generate --local --model=" + dir_ + " --prompt-ids=1 --prompt=x").exit_code,
            0);
  EXPECT_EQ(RunFerry("generate --local --model=" + dir_ + " --prompt-ids=999").exit_code, 1);
  EXPECT_EQ(RunFerry("generate --local --model=" + dir_ + " --prompt=hi").exit_code, 1);  // no tokenizer
}

// Without CUDA in the build, without a device, or with no such device: one line that says so.
TEST_F(CliModelTest, MissingCudaDeviceIsAClearError) {
  const CliRun run = RunFerry(
      "generate --local --model=" + dir_ + " --prompt-ids=1 --max-tokens=1 --device=cuda:99",
      /*with_stderr=*/true);
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE(run.out.find("CUDA"), std::string::npos) << run.out;
  const CliRun bad = RunFerry("generate --local --model=" + dir_ + " --prompt-ids=1 --device=gpu",
                              /*with_stderr=*/true);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.out.find("--device must be cpu, cuda or cuda:N"), std::string::npos) << bad.out;
}

}  // namespace
