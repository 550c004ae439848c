// The frame header codec and the worker service without a network (UCX-free paths).
#include "runtime/offload/frame.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/kv/state_cache.h"
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

// The worker service driven frame by frame, as WorkerServer would.
class WorkerServiceTest : public ::testing::Test {
 protected:
  WorkerServiceTest() : service_(Options(), pool_) {}

  static WorkerServiceOptions Options() {
    WorkerServiceOptions options;
    options.kv_capacity_bytes = 1 << 20;
    options.num_threads = 1;
    return options;
  }

  struct Reply {
    absl::Status status;
    FrameHeader header;
    transport::Buffer frame;
    const uint8_t* payload() const { return frame.data() + kFrameHeaderBytes; }
  };
  // One request frame through Handle; the reply decoded.
  Reply Call(FrameType type, std::vector<int32_t> shape, const std::vector<uint8_t>& payload,
             int layer = 0, uint8_t flags = 0, DType dtype = DType::kFloat32) {
    FrameHeader header;
    header.type = static_cast<uint16_t>(type);
    header.layer = layer;
    header.flags = flags;
    header.dtype = static_cast<uint8_t>(dtype);
    for (size_t i = 0; i < shape.size(); ++i) header.shape[i] = shape[i];
    header.payload_bytes = payload.size();
    FrameWriter writer(header, pool_);
    writer.Bytes(payload.data(), payload.size());
    transport::Buffer frame = writer.Finish();
    Reply reply;
    reply.frame = service_.Handle(frame.data(), frame.size());
    auto decoded = DecodeFrameHeader(reply.frame.data(), reply.frame.size());
    EXPECT_TRUE(decoded.ok());
    if (!decoded.ok()) return {decoded.status(), {}, {}};
    reply.header = *decoded;
    reply.status = ReplyStatus(reply.header, reply.payload());
    return reply;
  }

  // A table entry {u64 sequence, i64 position}.
  static std::vector<uint8_t> Entry(uint64_t sequence, int64_t position) {
    std::vector<uint8_t> bytes(16);
    std::memcpy(bytes.data(), &sequence, 8);
    std::memcpy(bytes.data() + 8, &position, 8);
    return bytes;
  }

  transport::BufferPool pool_;
  WorkerService service_;
};

TEST_F(WorkerServiceTest, RefusesWorkBeforeConfigureAndShapeChangesWhileHoldingSequences) {
  auto call = [&](FrameType type, std::vector<int32_t> shape, std::vector<uint8_t> payload) {
    return Call(type, shape, payload, 0, 0, DType::kBFloat16).status;
  };
  std::vector<uint8_t> open(16, 0);
  open[0] = 1;
  EXPECT_EQ(call(FrameType::kOpenSequence, {1}, open).code(),
            absl::StatusCode::kFailedPrecondition);
  std::vector<uint8_t> plan(24, 0);
  EXPECT_TRUE(call(FrameType::kConfigure, {2, 2, 64, 16}, plan).ok());
  EXPECT_EQ(call(FrameType::kConfigure, {2, 2, 96, 16}, plan).code(),
            absl::StatusCode::kInvalidArgument);  // head dim not served
  EXPECT_TRUE(call(FrameType::kOpenSequence, {1}, open).ok());
  EXPECT_EQ(call(FrameType::kOpenSequence, {1}, open).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(call(FrameType::kConfigure, {2, 2, 64, 16}, plan).ok());  // same: fine
  EXPECT_EQ(call(FrameType::kConfigure, {4, 2, 64, 16}, plan).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(service_.cache()->num_sequences(), 1u);
  // A sequence with no positions yet attends to the identity state (o = 0, lse = -inf).
  std::vector<uint8_t> attend(16 + 2 * 64 * 4, 0);
  attend[0] = 1;
  EXPECT_TRUE(call(FrameType::kAttend, {1, 2, 64}, attend).ok());
  EXPECT_GT(service_.errors_answered(), 0);
}

TEST_F(WorkerServiceTest, HeadGroupSequencesHoldAValidatedRangeOfTheModelsKvHeads) {
  auto call = [&](FrameType type, std::vector<int32_t> shape, std::vector<uint8_t> payload) {
    return Call(type, shape, payload, 0, 0, DType::kBFloat16).status;
  };
  auto plan = [](int32_t model_kv_heads) {
    std::vector<uint8_t> payload(24, 0);
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
  EXPECT_EQ(service_.cache()->num_sequences(), 3u);
  // A group's q heads: 4 q heads over its 2 kv heads.
  std::vector<uint8_t> attend(16 + 4 * 64 * 4, 0);
  attend[0] = 7;
  EXPECT_TRUE(call(FrameType::kAttend, {1, 4, 64}, attend).ok());
  // The same shape with another model width while sequences are held is refused.
  EXPECT_EQ(call(FrameType::kConfigure, {2, 2, 64, 16}, plan(4)).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(WorkerServiceTest, TruncateUndoesAppendsSoAStepCanBeRetried) {
  // The reply's status, and its i64 payload where it has one (blocks freed).
  auto call = [&](FrameType type, int layer, std::vector<int32_t> shape,
                  const std::vector<uint8_t>& payload) {
    const Reply reply = Call(type, shape, payload, layer);
    int64_t value = -1;
    if (reply.status.ok() && reply.header.payload_bytes == 8) {
      std::memcpy(&value, reply.payload(), 8);
    }
    return std::make_pair(reply.status, value);
  };
  auto entry = &WorkerServiceTest::Entry;
  auto append = [&](int layer, int64_t position) {  // one position of sequence 1, fp32 zeros
    std::vector<uint8_t> payload = entry(1, position);
    payload.resize(16 + 2 * 2 * 64 * 4, 0);
    return call(FrameType::kAppendKv, layer, {1, 2, 64}, payload).first;
  };
  const std::vector<uint8_t> plan(24, 0);
  ASSERT_TRUE(call(FrameType::kConfigure, 0, {2, 2, 64, 16}, plan).first.ok());
  ASSERT_TRUE(call(FrameType::kOpenSequence, 0, {1}, entry(1, 0)).first.ok());
  const int64_t free_blocks = service_.cache()->free_blocks();
  for (int64_t p = 0; p < 17; ++p) {  // both layers hold 17 positions: 2 blocks of 16
    ASSERT_TRUE(append(0, p).ok());
    ASSERT_TRUE(append(1, p).ok());
  }
  ASSERT_TRUE(append(0, 17).ok());  // a step that failed after layer 0
  EXPECT_EQ(append(0, 17).code(), absl::StatusCode::kInvalidArgument);  // a retry as it stands
  auto [status, freed] = call(FrameType::kTruncate, 0, {1}, entry(1, 16));
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(freed, 1);  // back to 16 positions: one block
  EXPECT_EQ(service_.cache()->free_blocks(), free_blocks - 1);
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

TEST_F(WorkerServiceTest, LinearAttentionSequencesHoldStatesThatOneStepCanUndo) {
  constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 4, kDim = 64;
  // The reply's status; with `o`, the attention output it carries.
  auto call = [&](FrameType type, int layer, uint8_t flags, std::vector<int32_t> shape,
                  const std::vector<uint8_t>& payload, std::vector<float>* o = nullptr) {
    const Reply reply = Call(type, shape, payload, layer, flags);
    if (o != nullptr && reply.status.ok()) {
      o->resize(reply.header.shape[0] * kQHeads * kDim);
      std::memcpy(o->data(), reply.payload(), o->size() * 4);
    }
    return reply.status;
  };
  auto entry = &WorkerServiceTest::Entry;
  // Attend of sequence 1 at `position`: q and the new k, v of one token.
  auto attend = [&](int layer, int64_t position, float value, uint8_t flags,
                    std::vector<float>* o = nullptr) {
    std::vector<uint8_t> payload = entry(1, position);
    std::vector<float> tensors(kQHeads * kDim + 2 * kKvHeads * kDim);
    for (size_t i = 0; i < tensors.size(); ++i) tensors[i] = value * (1 + (i % 7) * 0.1f);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(tensors.data());
    payload.insert(payload.end(), bytes, bytes + tensors.size() * 4);
    return call(FrameType::kAttend, layer, flags, {1, kQHeads, kDim}, payload, o);
  };
  const uint8_t kLinear = kFlagWithKv | kFlagLinearState;
  // Configure: linear (kind 1), feature map 1+x (1), normalised; 2 q heads per kv head.
  std::vector<uint8_t> plan(24, 0);
  const int32_t kind = 1 | 1 << 8 | 1 << 16, group = kQHeads / kKvHeads;
  std::memcpy(plan.data() + 16, &kind, 4);
  std::memcpy(plan.data() + 20, &group, 4);
  ASSERT_TRUE(call(FrameType::kConfigure, 0, 0, {kLayers, kKvHeads, kDim, 16}, plan).ok());
  ASSERT_NE(service_.states(), nullptr);
  EXPECT_EQ(service_.cache(), nullptr);
  EXPECT_EQ(call(FrameType::kOpenSequence, 0, 0, {1}, entry(1, 5)).code(),
            absl::StatusCode::kInvalidArgument);  // a state starts at position 0
  ASSERT_TRUE(call(FrameType::kOpenSequence, 0, 0, {1}, entry(1, 0)).ok());
  EXPECT_EQ(service_.used_bytes(), kv::StateSlotBytes(service_.states()->config()));
  std::vector<float> first, again;
  for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(attend(layer, 0, 0.5f, kLinear).ok());
  ASSERT_TRUE(attend(0, 1, 1.0f, kLinear, &first).ok());  // a step that fails after layer 0
  // Wrong kind, no new K/V, a position out of order, or AppendKv: refused, nothing changes.
  EXPECT_EQ(attend(1, 1, 1.0f, kFlagWithKv).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(attend(1, 1, 1.0f, kFlagLinearState).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(attend(1, 2, 1.0f, kLinear).code(), absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> append = entry(1, 1);
  append.resize(16 + 2 * kKvHeads * kDim * 4, 0);
  EXPECT_EQ(call(FrameType::kAppendKv, 1, 0, {1, kKvHeads, kDim}, append).code(),
            absl::StatusCode::kInvalidArgument);
  // Undo the failed step: layer 0 goes back to its backup; a retry gives the same output.
  ASSERT_TRUE(call(FrameType::kTruncate, 0, 0, {1}, entry(1, 1)).ok());
  ASSERT_TRUE(attend(0, 1, 1.0f, kLinear, &again).ok());
  EXPECT_EQ(first, again);
  ASSERT_TRUE(attend(1, 1, 1.0f, kLinear).ok());
  // Only one update can be undone.
  EXPECT_EQ(call(FrameType::kTruncate, 0, 0, {1}, entry(1, 0)).code(),
            absl::StatusCode::kFailedPrecondition);
  std::vector<uint8_t> id = entry(1, 0);
  id.resize(8);
  ASSERT_TRUE(call(FrameType::kFreeSequence, 0, 0, {1}, id).ok());
  EXPECT_EQ(service_.used_bytes(), 0);
  // A softmax request to a linear worker, and a linear configure with a bad feature map.
  std::vector<uint8_t> bad = plan;
  bad[17] = 9;
  EXPECT_EQ(call(FrameType::kConfigure, 0, 0, {kLayers, kKvHeads, kDim, 16}, bad).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::offload
