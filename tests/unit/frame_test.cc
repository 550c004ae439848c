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

}  // namespace
}  // namespace ferry::offload
