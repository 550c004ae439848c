#include "runtime/offload/worker_server.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "ferry/status.h"
#include "runtime/common/log.h"

namespace ferry::offload {

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Start(
    const WorkerServerOptions& options) {
  std::unique_ptr<WorkerServer> server(new WorkerServer(options));
  FERRY_ASSIGN_OR_RETURN(server->node_, transport::UcxNode::Create(options.node));
  server->service_ = std::make_unique<WorkerService>(options.service, server->node_->buffers());
  WorkerServer* raw = server.get();
  server->service_->SetForwarder(
      [raw](const std::string& host, int port, transport::Buffer frame) {
        return raw->Forward(host, port, std::move(frame));
      });
  server->node_->SetRequestHandler(
      [raw](transport::PeerId peer, uint64_t call_id, absl::StatusOr<transport::Buffer> message) {
        {
          std::lock_guard<std::mutex> lock(raw->mutex_);
          if (raw->stopping_) return;
          raw->queue_.push_back(Request{peer, call_id, std::move(message)});
        }
        raw->ready_.notify_one();
      });
  server->thread_ = std::thread([raw] { raw->Serve(); });
  FERRY_ASSIGN_OR_RETURN(server->port_, server->node_->Listen(options.host, options.port));
  FERRY_LOG_INFO("{}: serving on {}:{}", options.node.name, options.host, server->port_);
  return server;
}

WorkerServer::~WorkerServer() { Stop(); }

void WorkerServer::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  ready_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (node_ != nullptr) node_->Shutdown();
}

void WorkerServer::Serve() {
  transport::BufferPool& pool = node_->buffers();
  while (true) {
    Request request;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      request = std::move(queue_.front());
      queue_.pop_front();
    }
    transport::Buffer reply;
    if (!request.message.ok()) {
      reply = MakeErrorReply(nullptr, request.message.status(), pool);
    } else {
      if (options_.attend_delay > absl::ZeroDuration() &&
          request.message->size() >= kFrameHeaderBytes &&
          (request.message->data()[6] | (request.message->data()[7] << 8)) ==
              static_cast<int>(FrameType::kAttend)) {
        absl::SleepFor(options_.attend_delay);
      }
      reply = service_->Handle(request.message->data(), request.message->size());
      pool.Release(std::move(*request.message));
      kv_used_bytes_.store(service_->used_bytes());
      sequences_held_.store(static_cast<int32_t>(service_->sequences_held()));
    }
    absl::Status sent = node_->Reply(request.peer, request.call_id, std::move(reply));
    if (!sent.ok()) FERRY_LOG_DEBUG("{}: reply not sent: {}", options_.node.name, sent.ToString());
  }
}

absl::StatusOr<transport::Buffer> WorkerServer::Forward(const std::string& host, int port,
                                                        transport::Buffer frame) {
  const std::string key = absl::StrCat(host, ":", port);
  auto it = forward_peers_.find(key);
  if (it != forward_peers_.end() && !node_->PeerStatus(it->second).ok()) {
    node_->Disconnect(it->second);
    forward_peers_.erase(it);
    it = forward_peers_.end();
  }
  if (it == forward_peers_.end()) {
    FERRY_ASSIGN_OR_RETURN(transport::PeerId peer, node_->Connect(host, port));
    it = forward_peers_.emplace(key, peer).first;
  }
  std::future<transport::CallResult> reply = node_->Call(it->second, std::move(frame));
  return node_->Await(reply);
}

}  // namespace ferry::offload
