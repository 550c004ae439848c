#include "tests/common/hf_golden.h"

#include <cstdlib>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace ferry::model::test {

std::string ParityDataDir() {
  const char* env = std::getenv("FERRY_TEST_DATA_DIR");
  return env != nullptr ? env : FERRY_PARITY_DATA_DIR;
}

absl::StatusOr<std::vector<GoldenModel>> LoadGolden(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("missing ", path));
  const nlohmann::json golden = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (golden.is_discarded() || !golden.contains("models")) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a golden file"));
  }
  std::vector<GoldenModel> models;
  try {
    for (const auto& [name, entry] : golden["models"].items()) {
      GoldenModel& model = models.emplace_back();
      model.name = name;
      for (const auto& rec : entry.at("prompts")) {
        GoldenPrompt& prompt = model.prompts.emplace_back();
        prompt.prompt_ids = rec.at("prompt_ids").get<std::vector<int32_t>>();
        prompt.token_ids = rec.at("token_ids").get<std::vector<int32_t>>();
        prompt.last_logits = rec.at("last_logits").get<std::vector<double>>();
        prompt.min_top2_margin = rec.at("min_top2_margin").get<double>();
      }
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  return models;
}

}  // namespace ferry::model::test
