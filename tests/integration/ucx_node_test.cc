// UcxNode over real UCX on 127.0.0.1, once per transport: tcp, and shared memory with PEER error
// handling (UCX_MM_ERROR_HANDLING=y). Each case checks which transport the endpoint really uses.
#include "runtime/transport/ucx_node.h"
#include "runtime/transport/ucx_status.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace ferry::transport {
namespace {

struct TransportCase {
  const char* name;
  const char* tls;
  const char* expect;  // a substring of ucp_ep_print_info's lanes
  const char* rndv_scheme;  // UcxNodeOptions::rendezvous_scheme; nullptr: the default
  // Active messages over shared memory, rendezvous data over tcp: eager_limit_shared_memory
  // applies (else eager_limit).
  bool split_rendezvous;
};
void PrintTo(const TransportCase& c, std::ostream* os) { *os << c.name; }

class UcxNodeTest : public ::testing::TestWithParam<TransportCase> {
 protected:
  void SetUp() override {
    setenv("UCX_MM_ERROR_HANDLING", "y", 1);
  }
  UcxNodeOptions Options(const char* name) {
    UcxNodeOptions options;
    options.name = name;
    options.tls = GetParam().tls;
    options.keepalive_interval = absl::Seconds(1);  // short, but above this VM's scheduling stalls
    options.connection_managers = "tcp";
    options.call_timeout = absl::Seconds(2);
    options.eager_limit_shared_memory = eager_limit_shared_memory_;
    options.eager_limit = eager_limit_;
    if (GetParam().rndv_scheme != nullptr) options.rendezvous_scheme = GetParam().rndv_scheme;
    return options;
  }
  size_t eager_limit_shared_memory_ = UcxNodeOptions().eager_limit_shared_memory;
  size_t eager_limit_ = UcxNodeOptions().eager_limit;
  // A server that echoes every request back with its first byte incremented (or never answers
  // when `silent`).
  std::unique_ptr<UcxNode> StartServer(int* port, bool silent = false) {
    auto server = UcxNode::Create(Options("server"));
    EXPECT_TRUE(server.ok()) << server.status();
    UcxNode* raw = server->get();
    raw->SetRequestHandler([raw, silent](PeerId peer, uint64_t call_id,
                                         absl::StatusOr<Buffer> message) {
      if (silent || !message.ok()) return;
      if (message->size() > 0) message->data()[0]++;
      ASSERT_TRUE(raw->Reply(peer, call_id, std::move(*message)).ok());
    });
    auto bound = raw->Listen("127.0.0.1", 0);
    EXPECT_TRUE(bound.ok()) << bound.status();
    *port = *bound;
    return std::move(*server);
  }
  // StartServer, then a client connected to it: server_, client_ and peer_.
  void StartAndConnect(bool silent = false) {
    int port = 0;
    server_ = StartServer(&port, silent);
    auto client = UcxNode::Create(Options("client"));
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    auto peer = client_->Connect("127.0.0.1", port);
    ASSERT_TRUE(peer.ok()) << peer.status();
    peer_ = *peer;
  }
  std::unique_ptr<UcxNode> server_, client_;
  PeerId peer_ = 0;
};

TEST_P(UcxNodeTest, EchoSmallAndLargeSizesOnTheExpectedTransport) {
  ASSERT_NO_FATAL_FAILURE(StartAndConnect());
  for (size_t size : {size_t{1}, size_t{64}, size_t{8192}, size_t{1} << 20, size_t{24} << 20}) {
    Buffer message(size);
    for (size_t i = 0; i < size; ++i) message.data()[i] = static_cast<uint8_t>(i * 7 + 3);
    auto future = client_->Call(peer_, std::move(message));
    CallResult reply = client_->Await(future);
    ASSERT_TRUE(reply.ok()) << size << ": " << reply.status();
    ASSERT_EQ(reply->size(), size);
    EXPECT_EQ(reply->data()[0], static_cast<uint8_t>(4));
    for (size_t i = 1; i < size; i += 4093) {
      ASSERT_EQ(reply->data()[i], static_cast<uint8_t>(i * 7 + 3)) << i;
    }
  }
  auto info = client_->DescribePeer(peer_);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_NE(info->find(GetParam().expect), std::string::npos) << *info;
  if (getenv("FERRY_TEST_VERBOSE")) printf("%s\n", info->c_str());
  // Buffers come back to the pool and are reused.
  EXPECT_GT(client_->buffers().hits(), 0u);
}

// Both sides pick the eager limit that fits their endpoint's lanes, and a message of the limit goes
// eagerly, one byte more by rendezvous, each arriving intact (both ways: the echo comes back the
// same way).
TEST_P(UcxNodeTest, EagerLimitFollowsTheEndpointsLanes) {
  eager_limit_shared_memory_ = (size_t{3} << 20) + 5;  // odd sizes: no alignment luck
  eager_limit_ = (size_t{128} << 10) + 3;
  const size_t expected = GetParam().split_rendezvous ? eager_limit_shared_memory_ : eager_limit_;
  ASSERT_NO_FATAL_FAILURE(StartAndConnect());
  auto limit = client_->EagerLimit(peer_);
  ASSERT_TRUE(limit.ok()) << limit.status();
  EXPECT_EQ(*limit, expected) << *client_->DescribePeer(peer_);
  EXPECT_EQ(client_->EagerLimit(peer_ + 100).status().code(), absl::StatusCode::kNotFound);

  for (size_t size : {expected, expected + 1}) {
    const bool eager = size <= expected;
    const UcxNodeStats server_before = server_->stats(), client_before = client_->stats();
    std::vector<uint8_t> pattern(size);
    for (size_t i = 0; i < size; ++i) pattern[i] = static_cast<uint8_t>((i * 131 + size) >> 3);
    Buffer message(size);
    std::memcpy(message.data(), pattern.data(), size);
    auto future = client_->Call(peer_, std::move(message));
    CallResult reply = client_->Await(future);
    ASSERT_TRUE(reply.ok()) << size << ": " << reply.status();
    ASSERT_EQ(reply->size(), size);
    pattern[0]++;  // the echo server's mark
    EXPECT_EQ(std::memcmp(reply->data(), pattern.data(), size), 0) << size;
    const UcxNodeStats server_after = server_->stats(), client_after = client_->stats();
    EXPECT_EQ(server_after.eager_received - server_before.eager_received, eager ? 1u : 0u);
    EXPECT_EQ(server_after.rendezvous_received - server_before.rendezvous_received,
              eager ? 0u : 1u);
    EXPECT_EQ(client_after.eager_received - client_before.eager_received, eager ? 1u : 0u);
    EXPECT_EQ(client_after.rendezvous_received - client_before.rendezvous_received,
              eager ? 0u : 1u);
  }
}

TEST_P(UcxNodeTest, ManyConcurrentCallsAllAnswered) {
  ASSERT_NO_FATAL_FAILURE(StartAndConnect());
  std::vector<ReplyFuture> futures;
  for (int i = 0; i < 200; ++i) {
    Buffer message(16 + i * 1000);
    message.data()[0] = static_cast<uint8_t>(i);
    futures.push_back(client_->Call(peer_, std::move(message)));
  }
  for (int i = 0; i < 200; ++i) {
    CallResult reply = client_->Await(futures[i]);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->size(), size_t(16 + i * 1000));
    EXPECT_EQ(reply->data()[0], static_cast<uint8_t>(i + 1));
  }
}

TEST_P(UcxNodeTest, SilentPeerTimesOutWithinTheBound) {
  ASSERT_NO_FATAL_FAILURE(StartAndConnect(/*silent=*/true));
  const absl::Time start = absl::Now();
  auto future = client_->Call(peer_, Buffer(32), absl::Milliseconds(500));
  CallResult reply = client_->Await(future, absl::Milliseconds(500));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kDeadlineExceeded) << reply.status();
  // 500 ms bound; the slack absorbs scheduling stalls on a loaded machine.
  EXPECT_LT(took, absl::Milliseconds(2000));
}

TEST_P(UcxNodeTest, NobodyListeningFailsWithinTheBound) {
  int port = 0;
  { auto gone = StartServer(&port); }  // a port that was just closed
  auto client = UcxNode::Create(Options("client"));
  ASSERT_TRUE(client.ok());
  const absl::Time start = absl::Now();
  auto peer = (*client)->Connect("127.0.0.1", port);
  EXPECT_FALSE(peer.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST_P(UcxNodeTest, ShutdownWithOutstandingCallsCancelsThem) {
  ASSERT_NO_FATAL_FAILURE(StartAndConnect(/*silent=*/true));
  std::vector<ReplyFuture> futures;
  for (int i = 0; i < 10; ++i) futures.push_back(client_->Call(peer_, Buffer(1 << 16)));
  const absl::Time start = absl::Now();
  client_->Shutdown();
  server_->Shutdown();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  for (auto& future : futures) {
    ASSERT_TRUE(future.ready());  // Shutdown completes every call
    CallResult reply = client_->Await(future);
    EXPECT_EQ(reply.status().code(), absl::StatusCode::kCancelled) << reply.status();
    // A reply is taken once.
    EXPECT_FALSE(future.valid());
    EXPECT_EQ(client_->Await(future).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// Queue mode, as WorkerServer serves: a server thread takes requests with NextRequest (driving
// progress itself) and replies from that thread, while several client threads each drive their
// own calls at once, small and rendezvous-sized.
TEST_P(UcxNodeTest, QueueModeServerThreadAndConcurrentCallersAllAnswered) {
  auto server = UcxNode::Create(Options("server"));
  ASSERT_TRUE(server.ok()) << server.status();
  UcxNode* raw = server->get();
  auto port = raw->Listen("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  std::atomic<bool> stop{false};
  std::atomic<int> served{0};
  std::thread serving([&] {
    while (!stop) {
      auto request = raw->NextRequest(absl::Milliseconds(50));
      if (!request.ok()) continue;
      ASSERT_TRUE(request->status.ok()) << request->status;
      if (request->message.size() > 0) request->message.data()[0]++;
      ASSERT_TRUE(raw->Reply(request->peer, request->call_id, std::move(request->message)).ok());
      ++served;
    }
  });
  auto client = UcxNode::Create(Options("client"));
  ASSERT_TRUE(client.ok());
  auto peer = (*client)->Connect("127.0.0.1", *port);
  ASSERT_TRUE(peer.ok()) << peer.status();
  constexpr int kThreads = 4, kCalls = 40;
  std::vector<std::thread> callers;
  std::atomic<int> answered{0};
  for (int t = 0; t < kThreads; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        // Every tenth call is 1 MiB: past eager_limit (rendezvous), but eager in the
        // shm_put_rendezvous case (eager_limit_shared_memory).
        const size_t size = i % 10 == 9 ? (size_t{1} << 20) + t : 16 + 977 * i + t;
        Buffer message(size);
        message.data()[0] = static_cast<uint8_t>(i + t);
        message.data()[size - 1] = static_cast<uint8_t>(size * 13);
        auto future = (*client)->Call(*peer, std::move(message));
        CallResult reply = (*client)->Await(future);
        ASSERT_TRUE(reply.ok()) << reply.status();
        ASSERT_EQ(reply->size(), size);
        EXPECT_EQ(reply->data()[0], static_cast<uint8_t>(i + t + 1));
        EXPECT_EQ(reply->data()[size - 1], static_cast<uint8_t>(size * 13));
        (*client)->buffers().Release(std::move(*reply));
        ++answered;
      }
    });
  }
  for (std::thread& caller : callers) caller.join();
  EXPECT_EQ(answered.load(), kThreads * kCalls);
  EXPECT_EQ(served.load(), kThreads * kCalls);
  stop = true;
  serving.join();
  // With nothing queued, NextRequest waits out its bound; after shutdown it is Cancelled at once.
  const absl::Time start = absl::Now();
  EXPECT_EQ(raw->NextRequest(absl::Milliseconds(100)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(100));
  raw->Shutdown();
  EXPECT_EQ(raw->NextRequest(absl::Seconds(5)).status().code(), absl::StatusCode::kCancelled);
}

TEST_P(UcxNodeTest, NextRequestRefusesWhileAHandlerServes) {
  int port = 0;
  auto server = StartServer(&port);
  EXPECT_EQ(server->NextRequest(absl::Milliseconds(10)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(UcsToStatusTest, MapsEveryNamedCode) {
  EXPECT_EQ(UcsToStatus(UCS_OK, "x").code(), absl::StatusCode::kOk);
  EXPECT_EQ(UcsToStatus(UCS_ERR_NO_MEMORY, "x").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(UcsToStatus(UCS_ERR_TIMED_OUT, "x").code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(UcsToStatus(UCS_ERR_ENDPOINT_TIMEOUT, "x").code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(UcsToStatus(UCS_ERR_UNREACHABLE, "x").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(UcsToStatus(UCS_ERR_CONNECTION_RESET, "x").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(UcsToStatus(UCS_ERR_CANCELED, "x").code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(UcsToStatus(UCS_ERR_INVALID_PARAM, "x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UcsToStatus(UCS_ERR_UNSUPPORTED, "x").code(), absl::StatusCode::kUnimplemented);
  const absl::Status other = UcsToStatus(UCS_ERR_IO_ERROR, "ucp_thing");
  EXPECT_EQ(other.code(), absl::StatusCode::kInternal);
  EXPECT_NE(other.message().find("ucp_thing"), absl::string_view::npos);
}

INSTANTIATE_TEST_SUITE_P(Loopback, UcxNodeTest,
                         ::testing::Values(
                             // The default scheme: rendezvous data as active messages.
                             TransportCase{"tcp", "tcp", "tcp/lo", nullptr, false},
                             TransportCase{"shm", "sm,tcp", "memory", nullptr, false},
                             // UCX's own: tcp put_zcopy, also under shared-memory active messages.
                             TransportCase{"tcp_put_rendezvous", "tcp", "tcp/lo", "auto", false},
                             TransportCase{"shm_put_rendezvous", "sm,tcp", "memory", "auto",
                                           true}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ferry::transport
