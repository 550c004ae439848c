// Cluster membership over real gRPC on loopback: registration in any start order, heartbeats,
// drain, death after missed heartbeats, re-registration, bad requests, and the CLI's table.
#include <grpcpp/grpcpp.h>

#include <sstream>
#include <thread>

#include "gtest/gtest.h"
#include "services/cli/cluster_commands.h"
#include "services/coordinator/cluster_service.h"
#include "services/worker/coordinator_link.h"
#include "test_ports.h"

namespace ferry {
namespace {

using namespace std::chrono_literals;

using testing::UnusedTcpPort;

class CoordinatorServer {
 public:
  CoordinatorServer(int port, coordinator::WorkerRegistry::Options options)
      : registry_(std::move(options)), service_(&registry_, Model()) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:" + std::to_string(port),
                             grpc::InsecureServerCredentials());
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
  }
  ~CoordinatorServer() { server_->Shutdown(std::chrono::system_clock::now() + 1s); }

  static ferry::v1::ModelShape Model() {
    ferry::v1::ModelShape model;
    model.set_num_layers(4);
    model.set_num_kv_heads(2);
    model.set_head_dim(64);
    model.set_kv_dtype("bf16");
    model.set_block_size(64);
    return model;
  }
  coordinator::WorkerRegistry& registry() { return registry_; }
  bool started() const { return server_ != nullptr; }

 private:
  coordinator::WorkerRegistry registry_;
  coordinator::ClusterServiceImpl service_;
  std::unique_ptr<grpc::Server> server_;
};

coordinator::WorkerRegistry::Options FastOptions() {
  coordinator::WorkerRegistry::Options options;
  options.heartbeat_interval = 50ms;
  options.dead_after = 400ms;
  return options;
}

worker::CoordinatorLinkOptions LinkOptions(int port, const std::string& data_address) {
  worker::CoordinatorLinkOptions options;
  options.coordinator_address = "127.0.0.1:" + std::to_string(port);
  options.registration.set_data_address(data_address);
  options.registration.set_device(ferry::v1::DEVICE_KIND_CPU);
  options.registration.set_device_name("test cpu");
  options.registration.set_kv_capacity_bytes(int64_t{1} << 30);
  options.rpc_timeout = 300ms;
  options.initial_backoff = 20ms;
  options.max_backoff = 100ms;
  options.load = [] { return worker::WorkerLoad{12345, 3, 17}; };
  return options;
}

TEST(ClusterServiceTest, WorkerStartedFirstRegistersOnceTheCoordinatorComesUp) {
  const int port = UnusedTcpPort();
  worker::CoordinatorLink link(LinkOptions(port, "127.0.0.1:7001"));
  link.Start();
  std::this_thread::sleep_for(200ms);  // several refused attempts
  EXPECT_EQ(link.registrations(), 0);
  CoordinatorServer server(port, FastOptions());
  ASSERT_TRUE(server.started());
  auto registered = link.WaitRegistered(5s);
  ASSERT_TRUE(registered.ok()) << registered.status();
  EXPECT_EQ(registered->model().num_layers(), 4);
  EXPECT_EQ(registered->heartbeat_interval_ms(), 50);

  // The first heartbeat carries the load (bounded wait: 5 s).
  for (int i = 0; i < 250 && server.registry().List()[0].sequences_held != 3; ++i) {
    std::this_thread::sleep_for(20ms);
  }
  const auto workers = server.registry().List();
  ASSERT_EQ(workers.size(), 1u);
  EXPECT_EQ(workers[0].worker_id, registered->worker_id());
  EXPECT_EQ(workers[0].state, coordinator::WorkerState::kReady);
  EXPECT_EQ(workers[0].kv_used_bytes, 12345);
  EXPECT_EQ(workers[0].sequences_held, 3);
  EXPECT_EQ(workers[0].sequences_opened, 17);
}

TEST(ClusterServiceTest, DrainReachesTheWorkerAndTheTableShowsIt) {
  const int port = UnusedTcpPort();
  CoordinatorServer server(port, FastOptions());
  worker::CoordinatorLink link(LinkOptions(port, "127.0.0.1:7002"));
  link.Start();
  auto registered = link.WaitRegistered(5s);
  ASSERT_TRUE(registered.ok()) << registered.status();
  const std::string address = "127.0.0.1:" + std::to_string(port);

  auto state = cli::DrainWorker(address, registered->worker_id(), 2s);
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(*state, ferry::v1::WORKER_STATE_DRAINING);
  for (int i = 0; i < 100 && !link.drain_requested(); ++i) std::this_thread::sleep_for(20ms);
  EXPECT_TRUE(link.drain_requested());

  auto listed = cli::ListWorkers(address, 2s);
  ASSERT_TRUE(listed.ok()) << listed.status();
  std::ostringstream table;
  cli::PrintWorkerTable(*listed, table);
  EXPECT_NE(table.str().find(registered->worker_id()), std::string::npos) << table.str();
  EXPECT_NE(table.str().find("DRAINING"), std::string::npos) << table.str();
  EXPECT_NE(table.str().find("127.0.0.1:7002"), std::string::npos) << table.str();
  EXPECT_NE(table.str().find("OPENED"), std::string::npos) << table.str();
  // The link's load: 3 sequences held, 17 opened since the worker started.
  EXPECT_NE(table.str().find("     3       17 "), std::string::npos) << table.str();

  EXPECT_EQ(cli::DrainWorker(address, "no-such-worker", 2s).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ClusterServiceTest, SilentWorkerIsDeclaredDeadAndComesBackByRegisteringAgain) {
  const int port = UnusedTcpPort();
  CoordinatorServer server(port, FastOptions());
  std::string id;
  {
    worker::CoordinatorLink link(LinkOptions(port, "127.0.0.1:7003"));
    link.Start();
    auto registered = link.WaitRegistered(5s);
    ASSERT_TRUE(registered.ok()) << registered.status();
    id = registered->worker_id();
  }  // the link stops: no more heartbeats
  std::this_thread::sleep_for(600ms);
  auto workers = server.registry().List();
  ASSERT_EQ(workers.size(), 1u);
  EXPECT_EQ(workers[0].state, coordinator::WorkerState::kDead);
  EXPECT_EQ(workers[0].kv_used_bytes, 0) << "a dead worker's KV is gone";
  EXPECT_EQ(workers[0].sequences_held, 0);
  EXPECT_EQ(workers[0].sequences_opened, 17);
  EXPECT_TRUE(server.registry().ReadyWorkers().empty());

  // The same worker restarts with its id: it is READY again.
  worker::CoordinatorLinkOptions options = LinkOptions(port, "127.0.0.1:7003");
  options.registration.set_worker_id(id);
  worker::CoordinatorLink restarted(options);
  restarted.Start();
  auto again = restarted.WaitRegistered(5s);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->worker_id(), id);
  EXPECT_EQ(server.registry().ReadyWorkers().size(), 1u);
}

TEST(ClusterServiceTest, BadRegistrationsAreRejectedAndOthersKeepWorking) {
  const int port = UnusedTcpPort();
  CoordinatorServer server(port, FastOptions());
  auto stub = ferry::v1::ClusterService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  auto register_worker = [&](const ferry::v1::RegisterWorkerRequest& request) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 2s);
    ferry::v1::RegisterWorkerResponse response;
    return stub->RegisterWorker(&context, request, &response).error_code();
  };
  ferry::v1::RegisterWorkerRequest good = LinkOptions(port, "10.0.0.1:9000").registration;
  ferry::v1::RegisterWorkerRequest bad = good;
  bad.set_data_address("no-port");
  EXPECT_EQ(register_worker(bad), grpc::StatusCode::INVALID_ARGUMENT);
  bad = good;
  bad.set_data_address(std::string(300, 'a') + ":1");
  EXPECT_EQ(register_worker(bad), grpc::StatusCode::INVALID_ARGUMENT);
  bad = good;
  bad.set_kv_capacity_bytes(0);
  EXPECT_EQ(register_worker(bad), grpc::StatusCode::INVALID_ARGUMENT);
  bad = good;
  bad.set_device(ferry::v1::DEVICE_KIND_UNSPECIFIED);
  EXPECT_EQ(register_worker(bad), grpc::StatusCode::INVALID_ARGUMENT);
  bad = good;
  bad.set_worker_id(std::string(200, 'x'));
  EXPECT_EQ(register_worker(bad), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(register_worker(good), grpc::StatusCode::OK);
  EXPECT_EQ(server.registry().List().size(), 1u);
}

}  // namespace
}  // namespace ferry
