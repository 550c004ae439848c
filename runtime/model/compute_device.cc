// ParseComputeDevice (cuda_decoder.h): built with or without CUDA, so every main parses
// --device the same way and reports a missing backend itself.
#include <charconv>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/model/cuda_decoder.h"

namespace ferry::model {

absl::StatusOr<int> ParseComputeDevice(std::string_view spec) {
  if (spec == "cpu") return -1;
  if (spec == "cuda") return 0;
  constexpr std::string_view kPrefix = "cuda:";
  if (spec.substr(0, kPrefix.size()) == kPrefix) {
    const std::string_view number = spec.substr(kPrefix.size());
    int device = -1;
    const auto [end, error] = std::from_chars(number.data(), number.data() + number.size(), device);
    if (error == std::errc() && end == number.data() + number.size() && !number.empty() &&
        device >= 0) {
      return device;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("--device must be cpu, cuda or cuda:N, not '",
                                                 std::string(spec), "'"));
}

}  // namespace ferry::model
