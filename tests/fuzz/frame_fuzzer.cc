// libFuzzer target for the data plane's decoder: every input is one frame handed to a fresh
// WorkerService (configured, two sequences with some KV), as a worker receives it from the wire.
// Invariants checked: no crash or sanitizer report, and the answer is always a well-formed reply
// frame (an error reply for a bad input). Built with clang (-fsanitize=fuzzer,address) by
// build_frame_fuzzer.sh; run by run_frame_fuzzer.sh on the saved corpus (corpus/frame).
//
// FERRY_FUZZ_WRITE_SEEDS=<dir> writes one valid frame per operation to <dir> and exits: that is
// how the saved corpus was made.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "ferry/status.h"
#include "runtime/offload/frame.h"
#include "runtime/offload/worker_service.h"

namespace ferry::offload {
namespace {

constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 4, kHeadDim = 64, kBlockSize = 16;
constexpr size_t kRowBytes = size_t{kKvHeads} * kHeadDim * 2;  // bf16

transport::Buffer Make(FrameType type, int layer, uint8_t flags, std::vector<int32_t> shape,
                       const std::vector<uint8_t>& payload, transport::BufferPool& pool) {
  FrameHeader header;
  header.type = static_cast<uint16_t>(type);
  header.request_id = 7;
  header.layer = layer;
  header.dtype = static_cast<uint8_t>(DType::kBFloat16);
  header.flags = flags;
  for (size_t i = 0; i < shape.size(); ++i) header.shape[i] = shape[i];
  header.payload_bytes = payload.size();
  FrameWriter writer(header, pool);
  writer.Bytes(payload.data(), payload.size());
  return writer.Finish();
}

void Put64(std::vector<uint8_t>& out, uint64_t value) {
  out.insert(out.end(), reinterpret_cast<uint8_t*>(&value), reinterpret_cast<uint8_t*>(&value) + 8);
}
void Put32(std::vector<uint8_t>& out, uint32_t value) {
  out.insert(out.end(), reinterpret_cast<uint8_t*>(&value), reinterpret_cast<uint8_t*>(&value) + 4);
}
void PutRows(std::vector<uint8_t>& out, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) out.push_back(static_cast<uint8_t>(0x3c + (i % 3)));
}

// Valid frames for every operation against the state Prepare() sets up.
std::vector<std::pair<std::string, transport::Buffer>> Seeds(transport::BufferPool& pool) {
  std::vector<std::pair<std::string, transport::Buffer>> seeds;
  {
    std::vector<uint8_t> p;
    Put32(p, 0);
    Put32(p, 1);
    Put32(p, 32);
    Put32(p, 0);
    Put32(p, 0);
    Put32(p, 0);
    seeds.emplace_back("configure", Make(FrameType::kConfigure, 0, 0,
                                         {kLayers, kKvHeads, kHeadDim, kBlockSize}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 3);
    Put64(p, 0);
    seeds.emplace_back("open", Make(FrameType::kOpenSequence, 0, 0, {1}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 1);
    Put64(p, 20);
    PutRows(p, 2 * kRowBytes);
    seeds.emplace_back("append", Make(FrameType::kAppendKv, 0, 0, {1, kKvHeads, kHeadDim}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 1);
    Put64(p, 0);
    Put64(p, 2);
    Put64(p, 0);
    for (int i = 0; i < 2 * kQHeads * kHeadDim; ++i) Put32(p, 0x3f800000u);
    seeds.emplace_back("attend", Make(FrameType::kAttend, 1, 0, {2, kQHeads, kHeadDim}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 2);
    Put64(p, 5);
    for (int i = 0; i < 3 * kQHeads * kHeadDim; ++i) Put32(p, 0x3f000000u);
    PutRows(p, 2 * 3 * kRowBytes);
    seeds.emplace_back("prefill", Make(FrameType::kPrefill, 0, kFlagWithKv,
                                       {3, kQHeads, kHeadDim}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 2);
    seeds.emplace_back("free", Make(FrameType::kFreeSequence, 0, 0, {1}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 1);
    seeds.emplace_back("export", Make(FrameType::kExportBlocks, 0, 0, {}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 9);
    Put64(p, 0);
    Put32(p, kLayers);
    Put32(p, 1);
    Put32(p, 0);
    Put32(p, 0);
    Put64(p, 3);
    Put64(p, 2);
    PutRows(p, size_t{kLayers} * 2 * kBlockSize * kRowBytes);
    seeds.emplace_back("import", Make(FrameType::kImportBlocks, 0, 0,
                                      {kLayers, kKvHeads, kBlockSize, kHeadDim}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 1);
    Put32(p, 9);
    Put32(p, 9);
    for (char c : std::string("127.0.0.1")) p.push_back(static_cast<uint8_t>(c));
    seeds.emplace_back("migrate", Make(FrameType::kMigrate, 0, 0, {}, p, pool));
  }
  {
    std::vector<uint8_t> p;
    Put64(p, 1);
    Put64(p, 10);
    seeds.emplace_back("truncate", Make(FrameType::kTruncate, 0, 0, {1}, p, pool));
  }
  return seeds;
}

void Check(const transport::Buffer& reply) {
  absl::StatusOr<FrameHeader> header = DecodeFrameHeader(reply.data(), reply.size());
  FERRY_CHECK(header.ok());
  FERRY_CHECK(header->is_reply());
}

// A configured service holding sequence 1 (20 positions) and 2 (5 positions) on both layers.
std::unique_ptr<WorkerService> Prepare(transport::BufferPool& pool) {
  WorkerServiceOptions options;
  options.kv_capacity_bytes = 24 * int64_t{2} * kLayers * kBlockSize * kRowBytes;  // 24 blocks
  options.num_threads = 1;
  options.max_batch = 64;
  options.max_prefill_tokens = 64;
  options.max_q_heads = 64;
  options.max_layers = 8;
  auto service = std::make_unique<WorkerService>(options, pool);
  service->SetForwarder([](const std::string&, int, transport::Buffer) {
    return absl::StatusOr<transport::Buffer>(absl::UnavailableError("no network in the fuzzer"));
  });
  auto seeds = Seeds(pool);
  auto run = [&](const transport::Buffer& frame) {
    transport::Buffer reply = service->Handle(frame.data(), frame.size());
    absl::StatusOr<FrameHeader> header = DecodeFrameHeader(reply.data(), reply.size());
    FERRY_CHECK(header.ok() && header->status == 0);
  };
  run(seeds[0].second);  // configure
  std::vector<uint8_t> p;
  Put64(p, 1);
  Put64(p, 0);
  Put64(p, 2);
  Put64(p, 0);
  run(Make(FrameType::kOpenSequence, 0, 0, {2}, p, pool));
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int position = 0; position < 20; ++position) {
      std::vector<uint8_t> a;
      Put64(a, 1);
      Put64(a, position);
      if (position < 5) {
        Put64(a, 2);
        Put64(a, position);
      }
      const int n = position < 5 ? 2 : 1;
      PutRows(a, 2 * n * kRowBytes);
      run(Make(FrameType::kAppendKv, layer, 0, {n, kKvHeads, kHeadDim}, a, pool));
    }
  }
  return service;
}

}  // namespace
}  // namespace ferry::offload

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  const char* dir = std::getenv("FERRY_FUZZ_WRITE_SEEDS");
  if (dir == nullptr) return 0;
  ferry::transport::BufferPool pool;
  for (auto& [name, frame] : ferry::offload::Seeds(pool)) {
    const std::string path = std::string(dir) + "/" + name;
    FILE* file = std::fopen(path.c_str(), "wb");
    FERRY_CHECK(file != nullptr);
    std::fwrite(frame.data(), 1, frame.size(), file);
    std::fclose(file);
  }
  std::exit(0);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ferry::transport::BufferPool pool;
  std::unique_ptr<ferry::offload::WorkerService> service = ferry::offload::Prepare(pool);
  // The frame is copied into a pooled buffer, as the transport delivers it (aligned).
  ferry::transport::Buffer frame = ferry::transport::Buffer::CopyOf(data, size);
  ferry::transport::Buffer reply = service->Handle(frame.data(), frame.size());
  ferry::offload::Check(reply);
  pool.Release(std::move(reply));
  return 0;
}
