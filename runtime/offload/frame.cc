#include "runtime/offload/frame.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace ferry::offload {
namespace {

template <typename T>
void Put(uint8_t* out, size_t offset, T value) {
  std::memcpy(out + offset, &value, sizeof(T));
}

template <typename T>
T Get(const uint8_t* in, size_t offset) {
  T value;
  std::memcpy(&value, in + offset, sizeof(T));
  return value;
}

constexpr size_t kMaxErrorMessageBytes = 1024;

}  // namespace

void EncodeFrameHeader(const FrameHeader& header, uint8_t* out) {
  std::memset(out, 0, kFrameHeaderBytes);
  Put(out, 0, header.magic);
  Put(out, 4, header.version);
  Put(out, 6, header.type);
  Put(out, 8, header.request_id);
  Put(out, 16, header.status);
  Put(out, 20, header.layer);
  Put(out, 24, header.dtype);
  Put(out, 25, header.flags);
  for (int i = 0; i < 4; ++i) Put(out, 28 + 4 * i, header.shape[i]);
  Put(out, 44, header.payload_bytes);
}

absl::StatusOr<FrameHeader> DecodeFrameHeader(const uint8_t* data, size_t size) {
  if (size < kFrameHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame truncated: ", size, " bytes, the header alone is ", kFrameHeaderBytes));
  }
  FrameHeader header;
  header.magic = Get<uint32_t>(data, 0);
  header.version = Get<uint16_t>(data, 4);
  header.type = Get<uint16_t>(data, 6);
  header.request_id = Get<uint64_t>(data, 8);
  header.status = Get<int32_t>(data, 16);
  header.layer = Get<int32_t>(data, 20);
  header.dtype = Get<uint8_t>(data, 24);
  header.flags = Get<uint8_t>(data, 25);
  for (int i = 0; i < 4; ++i) header.shape[i] = Get<int32_t>(data, 28 + 4 * i);
  header.payload_bytes = Get<uint64_t>(data, 44);
  if (header.magic != kFrameMagic) {
    return absl::InvalidArgumentError(absl::StrCat("bad frame magic 0x", absl::Hex(header.magic)));
  }
  if (header.version != kFrameVersion) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported frame version ", header.version,
                                                   " (this side speaks ", kFrameVersion, ")"));
  }
  const uint16_t base = header.type & ~kReplyBit;
  // Type 0 with the reply bit is the error reply to a frame whose own type could not be read.
  const bool untyped_error = base == 0 && header.is_reply() && header.status != 0;
  if ((base == 0 && !untyped_error) || base > kMaxFrameType) {
    return absl::InvalidArgumentError(absl::StrCat("unknown frame type ", header.type));
  }
  if (Get<uint16_t>(data, 26) != 0 ||
      std::any_of(data + 52, data + kFrameHeaderBytes, [](uint8_t b) { return b != 0; })) {
    return absl::InvalidArgumentError("frame header: reserved bytes are not zero");
  }
  if (header.payload_bytes != size - kFrameHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame length mismatch: header says ",
                                                   header.payload_bytes, " payload bytes, ",
                                                   size - kFrameHeaderBytes, " arrived"));
  }
  return header;
}

absl::string_view FrameTypeName(uint16_t type) {
  switch (static_cast<FrameType>(type & ~kReplyBit)) {
    case FrameType::kConfigure: return "configure";
    case FrameType::kOpenSequence: return "open-sequence";
    case FrameType::kAppendKv: return "append-kv";
    case FrameType::kAttend: return "attend";
    case FrameType::kPrefill: return "prefill";
    case FrameType::kFreeSequence: return "free-sequence";
    case FrameType::kExportBlocks: return "export-blocks";
    case FrameType::kImportBlocks: return "import-blocks";
    case FrameType::kMigrate: return "migrate";
    case FrameType::kTruncate: return "truncate";
  }
  return "unknown";
}

FrameWriter::FrameWriter(const FrameHeader& header, transport::BufferPool& pool)
    : buffer_(pool.Acquire(kFrameHeaderBytes + header.payload_bytes)) {
  EncodeFrameHeader(header, buffer_.data());
}

void FrameWriter::Bytes(const void* data, size_t size) {
  uint8_t* out = Reserve(size);
  if (out != nullptr && size > 0) std::memcpy(out, data, size);
}

uint8_t* FrameWriter::Reserve(size_t size) {
  if (size > buffer_.size() - offset_) {
    overflow_ = true;
    return nullptr;
  }
  uint8_t* out = buffer_.data() + offset_;
  offset_ += size;
  return out;
}

transport::Buffer FrameWriter::Finish() {
  // A writer that over- or under-fills is a bug in the encoder, not bad input.
  if (overflow_ || offset_ != buffer_.size()) {
    std::fprintf(stderr, "frame writer: wrote %zu of %zu bytes%s\n", offset_, buffer_.size(),
                 overflow_ ? " (overflow)" : "");
    std::abort();
  }
  return std::move(buffer_);
}

transport::Buffer MakeErrorReply(const FrameHeader* request, const absl::Status& status,
                                 transport::BufferPool& pool) {
  const absl::string_view message =
      status.message().substr(0, std::min(status.message().size(), kMaxErrorMessageBytes));
  FrameHeader reply;
  reply.type = static_cast<uint16_t>((request != nullptr ? request->type : 0) | kReplyBit);
  reply.request_id = request != nullptr ? request->request_id : 0;
  reply.layer = request != nullptr ? request->layer : 0;
  reply.status = static_cast<int32_t>(status.code());
  reply.payload_bytes = message.size();
  FrameWriter writer(reply, pool);
  writer.Bytes(message.data(), message.size());
  return writer.Finish();
}

absl::Status ReplyStatus(const FrameHeader& header, const uint8_t* payload) {
  if (header.status == 0) return absl::OkStatus();
  const size_t size = std::min<uint64_t>(header.payload_bytes, kMaxErrorMessageBytes);
  std::string message(reinterpret_cast<const char*>(payload), size);
  if (header.status < 0 || header.status > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    return absl::InternalError(absl::StrCat("reply with unknown status ", header.status, ": ",
                                            message));
  }
  return absl::Status(static_cast<absl::StatusCode>(header.status), message);
}

}  // namespace ferry::offload
