// The Hugging Face parity goldens (tests/data/parity/golden.json, tests/data/hf_written/
// hf_written_golden.json; written by tests/parity/hf_parity.py with transformers, never by
// Ferry), read for the CPU (tests/unit/hf_parity_test) and CUDA (tests/gpu/hf_parity_cuda_test)
// parity tests.
//
// ParityDataDir: FERRY_TEST_DATA_DIR when set (a bundle run elsewhere), else the source tree's
//   tests/data.
// LoadGolden: every model of a golden file, in the file's order, each with its prompts:
//   prompt token ids, transformers' greedy tokens, its float64 logits at the last position, and
//   the smallest top-2 margin along the greedy path. NOT_FOUND for a missing file,
//   INVALID_ARGUMENT for one that does not parse or lacks a field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::model::test {

struct GoldenPrompt {
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> token_ids;
  std::vector<double> last_logits;
  double min_top2_margin = 0;
};

struct GoldenModel {
  std::string name;  // the checkpoint's folder beside the golden file
  std::vector<GoldenPrompt> prompts;
};

std::string ParityDataDir();

absl::StatusOr<std::vector<GoldenModel>> LoadGolden(const std::string& path);

}  // namespace ferry::model::test
