// libFuzzer target: the safetensors header parser must reject any byte string cleanly (no
// crash, no out-of-bounds read, no huge allocation) and accept only headers whose tensors it
// can vouch for. Built only with a compiler that has -fsanitize=fuzzer (clang).
#include <cstddef>
#include <cstdint>

#include "runtime/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto tensors = ferry::model::ParseSafetensorsHeader(data, size, "fuzz");
  if (tensors.ok()) {
    // Accepted tensors must lie inside the input.
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
    for (const auto& t : *tensors) {
      if (8 + header_len + t.end > size) __builtin_trap();
    }
  }
  return 0;
}
