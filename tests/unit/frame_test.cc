// The frame header codec and the worker service without a network (UCX-free paths).
#include "runtime/offload/frame.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/offload/worker_service.h"

namespace ferry::offload {
namespace {

TEST(FrameTest, HeaderRoundTripsAndIsLittleEndianAtFixedOffsets) {
  FrameHeader header;
  header.type = static_cast<uint16_t>(FrameType::kAttend);
  header.request_id = 0x0102030405060708ull;
  header.layer = 3;
  header.dtype = 3;
  header.flags = kFlagWithKv;
  header.shape[0] = 5;
  header.shape[3] = -1;
  header.payload_bytes = 10;
  std::vector<uint8_t> frame(kFrameHeaderBytes + 10, 0);
  EncodeFrameHeader(header, frame.data());
  EXPECT_EQ(frame[0], 'F');
  EXPECT_EQ(frame[3], 'Y');
  EXPECT_EQ(frame[8], 0x08);  // request id, low byte first
  EXPECT_EQ(frame[28], 5);
  auto decoded = DecodeFrameHeader(frame.data(), frame.size());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->request_id, header.request_id);
  EXPECT_EQ(decoded->layer, 3);
  EXPECT_EQ(decoded->shape[3], -1);
  EXPECT_EQ(decoded->flags, kFlagWithKv);
  // One byte short or long: the length no longer adds up.
  EXPECT_FALSE(DecodeFrameHeader(frame.data(), frame.size() - 1).ok());
  frame.push_back(0);
  EXPECT_FALSE(DecodeFrameHeader(frame.data(), frame.size()).ok());
}

TEST(FrameTest, ErrorReplyCarriesCodeMessageAndRequestId) {
  transport::BufferPool pool;
  FrameHeader request;
  request.type = static_cast<uint16_t>(FrameType::kPrefill);
  request.request_id = 99;
  transport::Buffer reply = MakeErrorReply(&request, absl::NotFoundError("unknown sequence 4"), pool);
  auto header = DecodeFrameHeader(reply.data(), reply.size());
  ASSERT_TRUE(header.ok());
  EXPECT_TRUE(header->is_reply());
  EXPECT_EQ(header->request_type(), FrameType::kPrefill);
  EXPECT_EQ(header->request_id, 99u);
  absl::Status status = ReplyStatus(*header, reply.data() + kFrameHeaderBytes);
  EXPECT_EQ(status, absl::NotFoundError("unknown sequence 4"));
}

TEST(WorkerServiceTest, RefusesWorkBeforeConfigureAndShapeChangesWhileHoldingSequences) {
  transport::BufferPool pool;
  WorkerServiceOptions options;
  options.kv_capacity_bytes = 1 << 20;
  options.num_threads = 1;
  WorkerService service(options, pool);
  auto call = [&](FrameType type, std::vector<int32_t> shape, std::vector<uint8_t> payload,
                  uint8_t dtype = 3) {
    FrameHeader header;
    header.type = static_cast<uint16_t>(type);
    header.dtype = dtype;
    for (size_t i = 0; i < shape.size(); ++i) header.shape[i] = shape[i];
    header.payload_bytes = payload.size();
    FrameWriter writer(header, pool);
    writer.Bytes(payload.data(), payload.size());
    transport::Buffer frame = writer.Finish();
    transport::Buffer reply = service.Handle(frame.data(), frame.size());
    auto decoded = DecodeFrameHeader(reply.data(), reply.size());
    EXPECT_TRUE(decoded.ok());
    return ReplyStatus(*decoded, reply.data() + kFrameHeaderBytes);
  };
  std::vector<uint8_t> open(16, 0);
  open[0] = 1;
  EXPECT_EQ(call(FrameType::kOpenSequence, {1}, open).code(),
            absl::StatusCode::kFailedPrecondition);
  std::vector<uint8_t> plan(16, 0);
  EXPECT_TRUE(call(FrameType::kConfigure, {2, 2, 64, 16}, plan).ok());
  EXPECT_EQ(call(FrameType::kConfigure, {2, 2, 96, 16}, plan).code(),
            absl::StatusCode::kInvalidArgument);  // head dim not served
  EXPECT_TRUE(call(FrameType::kOpenSequence, {1}, open).ok());
  EXPECT_EQ(call(FrameType::kOpenSequence, {1}, open).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(call(FrameType::kConfigure, {2, 2, 64, 16}, plan).ok());  // same: fine
  EXPECT_EQ(call(FrameType::kConfigure, {4, 2, 64, 16}, plan).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(service.cache()->num_sequences(), 1u);
  // A sequence with no positions yet attends to the identity state (o = 0, lse = -inf).
  std::vector<uint8_t> attend(16 + 2 * 64 * 4, 0);
  attend[0] = 1;
  EXPECT_TRUE(call(FrameType::kAttend, {1, 2, 64}, attend).ok());
  EXPECT_GT(service.errors_answered(), 0);
}

TEST(WorkerServiceTest, HeadGroupSequencesHoldAValidatedRangeOfTheModelsKvHeads) {
  transport::BufferPool pool;
  WorkerServiceOptions options;
  options.kv_capacity_bytes = 1 << 20;
  options.num_threads = 1;
  WorkerService service(options, pool);
  auto call = [&](FrameType type, std::vector<int32_t> shape, std::vector<uint8_t> payload) {
    FrameHeader header;
    header.type = static_cast<uint16_t>(type);
    header.dtype = 3;
    for (size_t i = 0; i < shape.size(); ++i) header.shape[i] = shape[i];
    header.payload_bytes = payload.size();
    FrameWriter writer(header, pool);
    writer.Bytes(payload.data(), payload.size());
    transport::Buffer frame = writer.Finish();
    transport::Buffer reply = service.Handle(frame.data(), frame.size());
    auto decoded = DecodeFrameHeader(reply.data(), reply.size());
    EXPECT_TRUE(decoded.ok());
    return ReplyStatus(*decoded, reply.data() + kFrameHeaderBytes);
  };
  auto plan = [](int32_t model_kv_heads) {
    std::vector<uint8_t> payload(16, 0);
    std::memcpy(payload.data() + 12, &model_kv_heads, 4);
    return payload;
  };
  // Each sequence holds 2 of the model's 8 kv heads; 3 is not a multiple of 2.
  EXPECT_EQ(call(FrameType::kConfigure, {2, 2, 64, 16}, plan(3)).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(call(FrameType::kConfigure, {2, 2, 64, 16}, plan(8)).ok());
  std::vector<uint8_t> open(16, 0);
  for (int32_t first_head : {6, 0, 4}) {
    open[0] = static_cast<uint8_t>(first_head + 1);
    EXPECT_TRUE(call(FrameType::kOpenSequence, {1, first_head}, open).ok()) << first_head;
  }
  for (int32_t first_head : {-2, 1, 8, 7}) {
    open[0] = 100;
    EXPECT_EQ(call(FrameType::kOpenSequence, {1, first_head}, open).code(),
              absl::StatusCode::kInvalidArgument)
        << first_head;
  }
  EXPECT_EQ(service.cache()->num_sequences(), 3u);
  // A group's q heads: 4 q heads over its 2 kv heads.
  std::vector<uint8_t> attend(16 + 4 * 64 * 4, 0);
  attend[0] = 7;
  EXPECT_TRUE(call(FrameType::kAttend, {1, 4, 64}, attend).ok());
  // The same shape with another model width while sequences are held is refused.
  EXPECT_EQ(call(FrameType::kConfigure, {2, 2, 64, 16}, plan(4)).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(WorkerServiceTest, TruncateUndoesAppendsSoAStepCanBeRetried) {
  transport::BufferPool pool;
  WorkerServiceOptions options;
  options.kv_capacity_bytes = 1 << 20;
  options.num_threads = 1;
  WorkerService service(options, pool);
  auto call = [&](FrameType type, int layer, std::vector<int32_t> shape,
                  const std::vector<uint8_t>& payload) {
    FrameHeader header;
    header.type = static_cast<uint16_t>(type);
    header.layer = layer;
    header.dtype = static_cast<uint8_t>(DType::kFloat32);
    for (size_t i = 0; i < shape.size(); ++i) header.shape[i] = shape[i];
    header.payload_bytes = payload.size();
    FrameWriter writer(header, pool);
    writer.Bytes(payload.data(), payload.size());
    transport::Buffer frame = writer.Finish();
    transport::Buffer reply = service.Handle(frame.data(), frame.size());
    auto decoded = DecodeFrameHeader(reply.data(), reply.size());
    EXPECT_TRUE(decoded.ok());
    int64_t value = -1;
    if (decoded->status == 0 && decoded->payload_bytes == 8) {
      std::memcpy(&value, reply.data() + kFrameHeaderBytes, 8);
    }
    return std::make_pair(ReplyStatus(*decoded, reply.data() + kFrameHeaderBytes), value);
  };
  auto entry = [](uint64_t sequence, int64_t position) {
    std::vector<uint8_t> bytes(16);
    std::memcpy(bytes.data(), &sequence, 8);
    std::memcpy(bytes.data() + 8, &position, 8);
    return bytes;
  };
  auto append = [&](int layer, int64_t position) {  // one position of sequence 1, fp32 zeros
    std::vector<uint8_t> payload = entry(1, position);
    payload.resize(16 + 2 * 2 * 64 * 4, 0);
    return call(FrameType::kAppendKv, layer, {1, 2, 64}, payload).first;
  };
  ASSERT_TRUE(call(FrameType::kConfigure, 0, {2, 2, 64, 16}, std::vector<uint8_t>(16, 0)).first.ok());
  ASSERT_TRUE(call(FrameType::kOpenSequence, 0, {1}, entry(1, 0)).first.ok());
  const int64_t free_blocks = service.cache()->free_blocks();
  for (int64_t p = 0; p < 17; ++p) {  // both layers hold 17 positions: 2 blocks of 16
    ASSERT_TRUE(append(0, p).ok());
    ASSERT_TRUE(append(1, p).ok());
  }
  ASSERT_TRUE(append(0, 17).ok());  // a step that failed after layer 0
  EXPECT_EQ(append(0, 17).code(), absl::StatusCode::kInvalidArgument);  // a retry as it stands
  auto [status, freed] = call(FrameType::kTruncate, 0, {1}, entry(1, 16));
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(freed, 1);  // back to 16 positions: one block
  EXPECT_EQ(service.cache()->free_blocks(), free_blocks - 1);
  for (int64_t p = 16; p < 18; ++p) {  // the retried step, and the next
    EXPECT_TRUE(append(0, p).ok());
    EXPECT_TRUE(append(1, p).ok());
  }
  EXPECT_EQ(call(FrameType::kTruncate, 0, {1}, entry(2, 0)).first.code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(call(FrameType::kTruncate, 0, {1}, entry(1, -1)).first.code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(call(FrameType::kTruncate, 0, {2}, entry(1, 0)).first.code(),
            absl::StatusCode::kInvalidArgument);  // the length does not add up
}

}  // namespace
}  // namespace ferry::offload
