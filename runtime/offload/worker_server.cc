#include "runtime/offload/worker_server.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "ferry/status.h"
#include "runtime/common/log.h"
#ifdef FERRY_WITH_CUDA_WORKER
#include "runtime/common/cuda_util.h"
#include "runtime/offload/cuda_attention_backend.h"
#endif

namespace ferry::offload {

absl::StatusOr<int> WorkerServer::ParseDevice(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  int number = -1;
  if (device.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(device.substr(5), &number) &&
      number >= 0) {
    return number;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("device '", device, "': expected cpu, cuda or cuda:N"));
}

std::vector<std::string> WorkerServer::AttentionDevices() {
  std::vector<std::string> devices = {"cpu"};
#ifdef FERRY_WITH_CUDA_WORKER
  for (int d = 0; d < CudaDeviceCount(); ++d) devices.push_back(absl::StrCat("cuda:", d));
#endif
  return devices;
}

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Start(
    const WorkerServerOptions& options) {
  FERRY_ASSIGN_OR_RETURN(const int cuda_device, ParseDevice(options.device));
  std::unique_ptr<WorkerServer> server(new WorkerServer(options));
  FERRY_ASSIGN_OR_RETURN(server->node_, transport::UcxNode::Create(options.node));
  WorkerServiceOptions service = options.service;
  if (cuda_device >= 0) {
#ifdef FERRY_WITH_CUDA_WORKER
    // Frames in pinned memory: copies to and from the GPU need no staging copy.
    server->node_->buffers().SetAllocator(PinnedFrameAllocator(cuda_device));
    CudaBackendOptions cuda;
    cuda.device = cuda_device;
    cuda.max_batch = service.max_batch;
    cuda.max_prefill_tokens = service.max_prefill_tokens;
    service.backend = [cuda](const kv::KvCacheConfig& config) {
      return CreateCudaAttentionBackend(config, cuda);
    };
    FERRY_LOG_INFO("{}: attention on cuda:{}; UCX {} CUDA memory, frames staged through pinned "
                   "host buffers", options.node.name, cuda_device,
                   server->node_->SupportsCudaMemory() ? "supports" : "has no");
#else
    return absl::UnimplementedError(
        absl::StrCat("device ", options.device, ": this build has no CUDA"));
#endif
  }
  server->service_ = std::make_unique<WorkerService>(service, server->node_->buffers());
  WorkerServer* raw = server.get();
  server->service_->SetForwarder(
      [raw](const std::string& host, int port, transport::Buffer frame) {
        return raw->Forward(host, port, std::move(frame));
      });
  server->thread_ = std::thread([raw] { raw->Serve(); });
  FERRY_ASSIGN_OR_RETURN(server->port_, server->node_->Listen(options.host, options.port));
  FERRY_LOG_INFO("{}: serving on {}:{}", options.node.name, options.host, server->port_);
  return server;
}

WorkerServer::~WorkerServer() { Stop(); }

void WorkerServer::Stop() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
  if (node_ != nullptr) node_->Shutdown();
}

void WorkerServer::Serve() {
  transport::BufferPool& pool = node_->buffers();
  while (!stopping_) {
    absl::StatusOr<transport::IncomingRequest> next = node_->NextRequest(kStopBound);
    if (!next.ok()) {
      if (next.status().code() == absl::StatusCode::kDeadlineExceeded) continue;
      if (next.status().code() == absl::StatusCode::kCancelled) return;  // node shut down
      FERRY_LOG_ERROR("{}: request loop: {}", options_.node.name, next.status().ToString());
      return;
    }
    transport::IncomingRequest& request = *next;
    transport::Buffer reply;
    if (!request.status.ok()) {
      reply = MakeErrorReply(nullptr, request.status, pool);
    } else {
      if (options_.attend_delay > absl::ZeroDuration() &&
          request.message.size() >= kFrameHeaderBytes &&
          (request.message.data()[6] | (request.message.data()[7] << 8)) ==
              static_cast<int>(FrameType::kAttend)) {
        absl::SleepFor(options_.attend_delay);
      }
      reply = service_->Handle(request.message.data(), request.message.size());
      pool.Release(std::move(request.message));
      kv_used_bytes_.store(service_->used_bytes());
      sequences_held_.store(static_cast<int32_t>(service_->sequences_held()));
      sequences_opened_.store(service_->sequences_opened());
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
  transport::ReplyFuture reply = node_->Call(it->second, std::move(frame));
  return node_->Await(reply);
}

}  // namespace ferry::offload
