// The data plane's wire format: a fixed 64-byte little-endian header, then the payload.
//
// Header (byte offsets):
//    0 u32 magic 'FRRY' (0x59525246)    4 u16 version (1)      6 u16 type (FrameType; replies
//      have kReplyBit set)              8 u64 request id       16 i32 status (replies: an
//      absl::StatusCode; 0 in requests) 20 i32 layer           24 u8 dtype (DType; 0: none)
//   25 u8 flags (per type)             26 u16 reserved (0)     28 i32 shape[4]
//   44 u64 payload length (bytes after the header)             52..63 reserved (0)
// Batched operations carry a table first (per entry: u64 sequence id, i64 position), then the
// tensors, row-major, packed, in the order the operation lists (see worker_service.h). Tensors
// are little-endian floats (the partial states' o and lse are always float32, DESIGN.md) or the
// KV dtype. An error reply carries the status message as its payload.
//
// Decoding checks the header alone (magic, version, reserved bytes, known type, the payload length
// against the bytes received); the service then checks every field against its own state.
// Threads: plain functions on caller-owned memory.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "ferry/kernels/dtype.h"
#include "runtime/transport/buffer_pool.h"

namespace ferry::offload {

static_assert(std::endian::native == std::endian::little,
              "the wire format is little-endian and tensors are copied as bytes");

constexpr uint32_t kFrameMagic = 0x59525246;  // "FRRY" in memory order
constexpr uint16_t kFrameVersion = 1;
constexpr size_t kFrameHeaderBytes = 64;

enum class FrameType : uint16_t {
  kConfigure = 1,
  kOpenSequence = 2,
  kAppendKv = 3,
  kAttend = 4,
  kPrefill = 5,
  kFreeSequence = 6,
  kExportBlocks = 7,
  kImportBlocks = 8,
  kMigrate = 9,
  kTruncate = 10,
};
constexpr uint16_t kReplyBit = 0x8000;
constexpr uint16_t kMaxFrameType = 10;

// Flags of kAttend / kPrefill.
constexpr uint8_t kFlagWithKv = 1;  // K and V of the new positions follow q (append, then attend)
// The sequences hold linear-attention states, not KV (the worker must be configured so): the
// new K and V advance the state, and the reply's o is the attention output (lse 0).
constexpr uint8_t kFlagLinearState = 2;

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kFrameVersion;
  uint16_t type = 0;
  uint64_t request_id = 0;
  int32_t status = 0;
  int32_t layer = 0;
  uint8_t dtype = 0;
  uint8_t flags = 0;
  int32_t shape[4] = {0, 0, 0, 0};
  uint64_t payload_bytes = 0;

  bool is_reply() const { return (type & kReplyBit) != 0; }
  FrameType request_type() const { return static_cast<FrameType>(type & ~kReplyBit); }
};

void EncodeFrameHeader(const FrameHeader& header, uint8_t* out);

// Parses and checks the header of a frame of `size` bytes (header plus payload).
absl::StatusOr<FrameHeader> DecodeFrameHeader(const uint8_t* data, size_t size);

absl::string_view FrameTypeName(uint16_t type);

// Writes a frame into one pooled buffer: the header, then payload pieces in order. Finish()
// checks that exactly header.payload_bytes were written.
class FrameWriter {
 public:
  FrameWriter(const FrameHeader& header, transport::BufferPool& pool);
  void U64(uint64_t value) { Bytes(&value, sizeof(value)); }
  void I64(int64_t value) { Bytes(&value, sizeof(value)); }
  void I32(int32_t value) { Bytes(&value, sizeof(value)); }
  void F32(float value) { Bytes(&value, sizeof(value)); }
  void Bytes(const void* data, size_t size);
  // Room for `size` bytes to be filled in place (e.g. a kernel's output).
  uint8_t* Reserve(size_t size);
  transport::Buffer Finish();

 private:
  transport::Buffer buffer_;
  size_t offset_ = kFrameHeaderBytes;
  bool overflow_ = false;
};

// Reads a payload with bounds checks; every read past the end fails and sets !ok().
class PayloadReader {
 public:
  PayloadReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool U64(uint64_t* value) { return Copy(value, sizeof(*value)); }
  bool I64(int64_t* value) { return Copy(value, sizeof(*value)); }
  bool I32(int32_t* value) { return Copy(value, sizeof(*value)); }
  bool U32(uint32_t* value) { return Copy(value, sizeof(*value)); }
  bool F32(float* value) { return Copy(value, sizeof(*value)); }
  // Pointer to the next `size` bytes (unaligned), or nullptr past the end.
  const uint8_t* Take(size_t size) {
    if (size > size_ - offset_) {
      failed_ = true;
      return nullptr;
    }
    const uint8_t* p = data_ + offset_;
    offset_ += size;
    return p;
  }
  size_t remaining() const { return size_ - offset_; }
  bool ok() const { return !failed_; }

 private:
  bool Copy(void* out, size_t size) {
    const uint8_t* p = Take(size);
    if (p == nullptr) return false;
    std::memcpy(out, p, size);
    return true;
  }
  const uint8_t* data_;
  size_t size_;
  size_t offset_ = 0;
  bool failed_ = false;
};

// An error reply to `request` (or to an unparsable frame: request id 0, type 0 with the bit).
transport::Buffer MakeErrorReply(const FrameHeader* request, const absl::Status& status,
                                 transport::BufferPool& pool);

// The status an error reply carries (OK for a success reply).
absl::Status ReplyStatus(const FrameHeader& header, const uint8_t* payload);

}  // namespace ferry::offload
