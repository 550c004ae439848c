// safetensors files: strict header parsing and memory-mapped access.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data section; offsets are relative to the data section's start.
// ParseSafetensorsHeader checks, before anything large is allocated: N within the file and below
// kMaxHeaderBytes; valid JSON; every entry well formed; a known dtype; end - begin equal to the
// element count times the element size (no overflow); every range inside the data section; ranges
// pairwise disjoint. Errors are INVALID_ARGUMENT and name the file and the tensor.
// MappedFile maps a whole file read-only (MAP_PRIVATE) and unmaps it on destruction.
// Threads: parsing is pure; a SafetensorsFile is immutable after Open and may be read from any
// thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::model {

enum class TensorDType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3,
                         kF8E5M2 };

int TensorDTypeSize(TensorDType dtype);
std::string_view TensorDTypeName(TensorDType dtype);

struct TensorInfo {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;
  int64_t num_elements() const;
};

// 100 MB, safetensors' own limit.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Parses and validates a header. `file` is the whole file (or at least its first 8 + N bytes when
// file_size says how long the whole file is); `label` names it in errors. Returns the tensors
// sorted by name.
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(const uint8_t* file,
                                                               uint64_t file_size,
                                                               std::string_view label);

class MappedFile {
 public:
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, uint64_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  uint64_t size_;
};

// One mapped, validated safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(std::string_view name) const;
  // The tensor's bytes inside the mapping (valid while this object lives).
  const uint8_t* Data(const TensorInfo& info) const { return data_section_ + info.begin; }
  const std::string& path() const { return file_->path(); }

 private:
  std::unique_ptr<MappedFile> file_;
  const uint8_t* data_section_ = nullptr;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

// Writes a safetensors file from named tensors (for the tiny-checkpoint writer and tests).
// Offsets are assigned in the given order; the header is padded with spaces to a multiple of 8.
struct TensorToWrite {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

}  // namespace ferry::model
