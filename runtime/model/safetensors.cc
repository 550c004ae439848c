#include "runtime/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "nlohmann/json.hpp"

namespace ferry::model {
namespace {

using Json = nlohmann::json;

struct DTypeEntry {
  const char* name;
  TensorDType dtype;
  int size;
};
constexpr DTypeEntry kDTypes[] = {
    {"F64", TensorDType::kF64, 8},      {"F32", TensorDType::kF32, 4},
    {"F16", TensorDType::kF16, 2},      {"BF16", TensorDType::kBF16, 2},
    {"I64", TensorDType::kI64, 8},      {"I32", TensorDType::kI32, 4},
    {"I16", TensorDType::kI16, 2},      {"I8", TensorDType::kI8, 1},
    {"U8", TensorDType::kU8, 1},        {"BOOL", TensorDType::kBool, 1},
    {"F8_E4M3", TensorDType::kF8E4M3, 1}, {"F8_E5M2", TensorDType::kF8E5M2, 1},
};

absl::Status HeaderError(std::string_view label, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(label), ": bad safetensors header: ", std::string(what)));
}

bool IsUnsignedInt(const Json& v) {
  return v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0);
}

}  // namespace

int TensorDTypeSize(TensorDType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e.size;
  }
  return 0;
}

std::string_view TensorDTypeName(TensorDType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

int64_t TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(const uint8_t* file,
                                                               uint64_t file_size,
                                                               std::string_view label) {
  if (file_size < 8) return HeaderError(label, "file shorter than the 8-byte length prefix");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file[i];
  if (header_len > kMaxHeaderBytes) {
    return HeaderError(label, absl::StrCat("header length ", header_len, " exceeds the limit"));
  }
  if (header_len > file_size - 8) {
    return HeaderError(label, absl::StrCat("header length ", header_len,
                                           " runs past the end of the file (", file_size,
                                           " bytes): truncated file?"));
  }
  const uint64_t data_size = file_size - 8 - header_len;
  const char* text = reinterpret_cast<const char*>(file + 8);
  Json j = Json::parse(text, text + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return HeaderError(label, "header is not valid JSON");
  if (!j.is_object()) return HeaderError(label, "header is not a JSON object");

  std::vector<TensorInfo> tensors;
  tensors.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return HeaderError(label, "__metadata__ is not an object");
      continue;
    }
    const std::string& name = it.key();
    const Json& entry = it.value();
    auto bad = [&](std::string_view what) {
      return HeaderError(label, absl::StrCat("tensor \"", name, "\": ", std::string(what)));
    };
    if (!entry.is_object()) return bad("entry is not an object");
    TensorInfo info;
    info.name = name;

    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) return bad("dtype missing");
    const std::string dtype_name = dtype_it->get<std::string>();
    int elem_size = 0;
    for (const auto& e : kDTypes) {
      if (dtype_name == e.name) {
        info.dtype = e.dtype;
        elem_size = e.size;
      }
    }
    if (elem_size == 0) return bad(absl::StrCat("unknown dtype \"", dtype_name, "\""));

    auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) return bad("shape missing");
    if (shape_it->size() > 8) return bad("shape has more than 8 dimensions");
    // Element count with overflow checks: every product stays below 2^62.
    uint64_t count = 1;
    for (const Json& d : *shape_it) {
      if (!IsUnsignedInt(d)) return bad("shape holds a non-integer or negative dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 62) || (dim != 0 && count > (uint64_t{1} << 62) / dim)) {
        return bad("shape overflows");
      }
      count *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }

    auto off_it = entry.find("data_offsets");
    if (off_it == entry.end() || !off_it->is_array() || off_it->size() != 2 ||
        !IsUnsignedInt((*off_it)[0]) || !IsUnsignedInt((*off_it)[1])) {
      return bad("data_offsets is not a pair of non-negative integers");
    }
    info.begin = (*off_it)[0].get<uint64_t>();
    info.end = (*off_it)[1].get<uint64_t>();
    if (info.end < info.begin) return bad("data_offsets end before they begin");
    if (info.end > data_size) {
      return bad(absl::StrCat("data_offsets [", info.begin, ", ", info.end,
                              ") run past the data section (", data_size, " bytes)"));
    }
    if (info.end - info.begin != count * elem_size) {
      return bad(absl::StrCat("holds ", info.end - info.begin, " bytes but its shape and dtype need ",
                              count * elem_size));
    }
    tensors.push_back(std::move(info));
  }

  // Disjointness: sort by offset; each non-empty range must start at or after the previous end.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t prev_end = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : by_offset) {
    if (t->begin == t->end) continue;  // empty tensors take no bytes
    if (prev != nullptr && t->begin < prev_end) {
      return HeaderError(label, absl::StrCat("tensors \"", prev->name, "\" and \"", t->name,
                                             "\" overlap"));
    }
    prev_end = t->end;
    prev = t;
  }
  std::sort(tensors.begin(), tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  return tensors;
}

absl::StatusOr<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", std::strerror(err)));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot map ", path, ": ", std::strerror(err)));
    }
    data = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file alive
  return std::unique_ptr<MappedFile>(new MappedFile(path, data, size));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto file = std::make_unique<SafetensorsFile>();
  FERRY_ASSIGN_OR_RETURN(file->file_, MappedFile::Open(path));
  FERRY_ASSIGN_OR_RETURN(file->tensors_, ParseSafetensorsHeader(file->file_->data(),
                                                                file->file_->size(), path));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file->file_->data()[i];
  file->data_section_ = file->file_->data() + 8 + header_len;
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_[file->tensors_[i].name] = i;
  return file;
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  Json header = Json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    const uint64_t bytes = t.bytes.size();
    header[t.name] = {{"dtype", std::string(TensorDTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : tensors) {
    out.write(reinterpret_cast<const char*>(t.bytes.data()),
              static_cast<std::streamsize>(t.bytes.size()));
  }
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("error writing ", path));
  return absl::OkStatus();
}

}  // namespace ferry::model
