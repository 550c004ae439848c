#include "runtime/transport/ucx_node.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <ucp/api/ucp.h>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "runtime/common/log.h"
#include "runtime/transport/ucx_status.h"

namespace ferry::transport {
namespace {

constexpr unsigned kAmRequest = 11;
constexpr unsigned kAmReply = 12;
constexpr unsigned kAmPing = 13;  // answered by the transport itself: the connect handshake

using Clock = std::chrono::steady_clock;

Clock::time_point DeadlineAfter(absl::Duration d) {
  return Clock::now() + std::chrono::nanoseconds(absl::ToInt64Nanoseconds(d));
}

absl::StatusOr<sockaddr_in> ResolveIpv4(const std::string& host, int port) {
  if (port < 0 || port > 65535) return absl::InvalidArgumentError(absl::StrCat("bad port ", port));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (host.empty() || host == "0.0.0.0") {
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    return addr;
  }
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  addrinfo* result = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &result) != 0 || result == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve host '", host, "'"));
  }
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(result->ai_addr)->sin_addr;
  freeaddrinfo(result);
  return addr;
}

}  // namespace

class UcxNode::Impl {
 public:
  Impl(UcxNode* node) : node_(node), options_(node->options_) {}
  ~Impl() { Stop(); }

  absl::Status Init();
  void Stop();

  // Runs fn on the progress thread; waits at most `bound` for it to finish.
  absl::Status RunOnThread(std::function<absl::Status()> fn,
                           absl::Duration bound = absl::Seconds(5));
  void Post(std::function<void()> fn);

  absl::StatusOr<int> Listen(const std::string& host, int port);
  absl::StatusOr<PeerId> Connect(const std::string& host, int port);
  std::future<CallResult> Call(PeerId peer, Buffer message, absl::Duration timeout,
                               unsigned am_id = kAmRequest);
  absl::Status Reply(PeerId peer, uint64_t call_id, Buffer message);
  absl::StatusOr<std::string> DescribePeer(PeerId peer);
  void Disconnect(PeerId peer);
  absl::Status PeerStatus(PeerId peer);

  RequestHandler handler_;

 private:
  struct Peer {
    ucp_ep_h ep = nullptr;
    std::string name;
    absl::Status error;  // set once the endpoint failed
  };
  struct PendingCall {
    PeerId peer;
    Clock::time_point deadline;
    std::promise<CallResult> promise;
  };
  struct SendOp {
    Impl* impl;
    uint64_t call_id;
    bool is_request;
    PeerId peer;
    Buffer data;
  };
  struct RecvOp {
    Impl* impl;
    uint64_t call_id;
    bool is_request;
    PeerId peer;
    Buffer data;
  };

  void Loop();
  void RunCommands();
  void CheckDeadlines();
  void FailCall(uint64_t call_id, absl::Status status);
  void FailPeer(PeerId peer, absl::Status status);
  void ClosePeerEndpoint(Peer& peer);
  absl::Status SendAm(PeerId peer, unsigned am_id, uint64_t call_id, Buffer data, bool request);
  PeerId AddPeer(ucp_ep_h ep, std::string name);
  absl::StatusOr<ucp_ep_h> CreateEndpoint(ucp_ep_params_t& params);
  void Deliver(bool is_request, PeerId peer, uint64_t call_id, absl::StatusOr<Buffer> data);

  static void OnConnRequest(ucp_conn_request_h request, void* arg);
  static void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);
  static ucs_status_t OnAmRequest(void* arg, const void* header, size_t header_length,
                                  void* data, size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t OnAmReply(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t OnAmPing(void* arg, const void* header, size_t header_length, void* data,
                               size_t length, const ucp_am_recv_param_t* param);
  ucs_status_t OnAm(bool is_request, const void* header, size_t header_length, void* data,
                    size_t length, const ucp_am_recv_param_t* param);
  static void OnSendDone(void* request, ucs_status_t status, void* user_data);
  static void OnRecvDone(void* request, ucs_status_t status, size_t length, void* user_data);

  UcxNode* node_;
  const UcxNodeOptions& options_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_listener_h listener_ = nullptr;
  int worker_fd_ = -1;
  int wake_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  bool stopped_ = false;

  std::mutex commands_mutex_;
  std::deque<std::function<void()>> commands_;

  // Progress-thread state.
  std::unordered_map<PeerId, Peer> peers_;
  std::unordered_map<ucp_ep_h, PeerId> peer_of_ep_;
  std::unordered_map<uint64_t, PendingCall> calls_;
  std::atomic<PeerId> next_peer_{1};
  std::atomic<uint64_t> next_call_{1};
  Clock::time_point next_deadline_check_{};
  int64_t inflight_ops_ = 0;  // sends and rendezvous receives UCX still owns
};

absl::Status UcxNode::Impl::Init() {
  ucp_config_t* config = nullptr;
  FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read"));
  absl::Status status = absl::OkStatus();
  const std::string keepalive =
      absl::StrCat(absl::ToInt64Microseconds(options_.keepalive_interval), "us");
  status.Update(UcsToStatus(ucp_config_modify(config, "KEEPALIVE_INTERVAL", keepalive.c_str()),
                            "ucp_config_modify KEEPALIVE_INTERVAL"));
  if (!options_.connection_managers.empty()) {
    status.Update(UcsToStatus(ucp_config_modify(config, "SOCKADDR_TLS_PRIORITY",
                                                options_.connection_managers.c_str()),
                              "ucp_config_modify SOCKADDR_TLS_PRIORITY"));
  }
  if (!options_.tls.empty()) {
    status.Update(UcsToStatus(ucp_config_modify(config, "TLS", options_.tls.c_str()),
                              "ucp_config_modify TLS"));
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED |
                      UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  params.name = options_.name.c_str();
  if (status.ok()) {
    status = UcsToStatus(ucp_init(&params, config, &context_), "ucp_init");
  }
  ucp_config_release(config);
  FERRY_RETURN_IF_ERROR(status);

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  // Only the progress thread touches the worker.
  worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;
  FERRY_RETURN_IF_ERROR(
      UcsToStatus(ucp_worker_create(context_, &worker_params, &worker_), "ucp_worker_create"));
  if (ucp_worker_get_efd(worker_, &worker_fd_) != UCS_OK) {
    worker_fd_ = -1;  // no wakeup support on these transports: poll with short sleeps instead
    FERRY_LOG_WARN("{}: no ucp wakeup fd; polling", options_.name);
  }
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return absl::InternalError("eventfd failed");

  for (auto [id, cb] : {std::pair{kAmRequest, &Impl::OnAmRequest},
                        std::pair{kAmReply, &Impl::OnAmReply}, std::pair{kAmPing, &Impl::OnAmPing}}) {
    ucp_am_handler_param_t handler{};
    handler.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                         UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    handler.id = id;
    handler.cb = cb;
    handler.arg = this;
    handler.flags = UCP_AM_FLAG_WHOLE_MSG;
    FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_worker_set_am_recv_handler(worker_, &handler),
                                      "ucp_worker_set_am_recv_handler"));
  }
  thread_ = std::thread([this] { Loop(); });
  return absl::OkStatus();
}

void UcxNode::Impl::Stop() {
  if (stopped_) return;
  stopped_ = true;
  stopping_ = true;
  if (thread_.joinable()) {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
    thread_.join();
  }
  if (listener_ != nullptr) ucp_listener_destroy(listener_);
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
  if (wake_fd_ >= 0) close(wake_fd_);
  listener_ = nullptr;
  worker_ = nullptr;
  context_ = nullptr;
  wake_fd_ = -1;
}

void UcxNode::Impl::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(commands_mutex_);
    commands_.push_back(std::move(fn));
  }
  // The progress thread itself (a handler replying) runs the queue on its next turn anyway.
  if (std::this_thread::get_id() == thread_.get_id()) return;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
}

absl::Status UcxNode::Impl::RunOnThread(std::function<absl::Status()> fn, absl::Duration bound) {
  if (stopping_) return absl::CancelledError(absl::StrCat(options_.name, ": shut down"));
  // fn may reference the caller's locals: once the caller gave up waiting, fn must not run, and
  // the caller must not leave while fn runs. The mutex gives both (fn bodies are short).
  struct Sync {
    std::mutex mutex;
    bool abandoned = false;
    std::promise<absl::Status> done;
  };
  auto sync = std::make_shared<Sync>();
  std::future<absl::Status> result = sync->done.get_future();
  Post([fn = std::move(fn), sync] {
    std::lock_guard<std::mutex> lock(sync->mutex);
    if (!sync->abandoned) sync->done.set_value(fn());
  });
  if (result.wait_for(std::chrono::nanoseconds(absl::ToInt64Nanoseconds(bound))) !=
      std::future_status::ready) {
    std::lock_guard<std::mutex> lock(sync->mutex);
    if (result.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
      sync->abandoned = true;
      return absl::DeadlineExceededError(absl::StrCat(options_.name, ": progress thread busy"));
    }
  }
  return result.get();
}

void UcxNode::Impl::RunCommands() {
  std::deque<std::function<void()>> batch;
  {
    std::lock_guard<std::mutex> lock(commands_mutex_);
    batch.swap(commands_);
  }
  for (auto& fn : batch) fn();
}

void UcxNode::Impl::Loop() {
  auto last_activity = Clock::now();
  const auto busy_poll = std::chrono::nanoseconds(absl::ToInt64Nanoseconds(options_.busy_poll));
  while (!stopping_) {
    bool active = false;
    {
      std::lock_guard<std::mutex> lock(commands_mutex_);
      active = !commands_.empty();
    }
    if (active) RunCommands();
    while (ucp_worker_progress(worker_) != 0) active = true;
    const auto now = Clock::now();
    if (now >= next_deadline_check_) {
      CheckDeadlines();
      next_deadline_check_ = now + std::chrono::milliseconds(1);
    }
    if (active) {
      last_activity = now;
      continue;
    }
    if (now - last_activity < busy_poll) continue;
    // Idle: sleep until UCX or a command wakes us, or the next deadline check (10 ms at most).
    if (worker_fd_ >= 0) {
      const ucs_status_t armed = ucp_worker_arm(worker_);
      if (armed == UCS_ERR_BUSY) continue;  // events arrived meanwhile: progress again
    }
    pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {worker_fd_, POLLIN, 0}};
    const int timeout_ms = calls_.empty() ? 10 : 1;
    poll(fds, worker_fd_ >= 0 ? 2 : 1, worker_fd_ >= 0 ? timeout_ms : 1);
    if (fds[0].revents & POLLIN) {
      uint64_t count;
      [[maybe_unused]] ssize_t n = read(wake_fd_, &count, sizeof(count));
    }
    last_activity = Clock::now();  // spin again briefly after a wake-up
  }

  // Shutdown: fail what is outstanding, then close endpoints with a bounded wait.
  RunCommands();
  for (auto& [id, call] : calls_) {
    call.promise.set_value(absl::CancelledError(absl::StrCat(options_.name, ": shutting down")));
  }
  calls_.clear();
  // Error callbacks fired by the closes below find no peer and do nothing (no second close).
  peer_of_ep_.clear();
  std::vector<void*> closing;
  for (auto& [id, peer] : peers_) {
    if (peer.ep == nullptr) continue;
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* request = ucp_ep_close_nbx(peer.ep, &param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) closing.push_back(request);
    peer.ep = nullptr;
  }
  const auto deadline = Clock::now() + std::chrono::seconds(1);
  while (Clock::now() < deadline) {
    ucp_worker_progress(worker_);
    bool all_done = inflight_ops_ == 0;
    for (void* request : closing) {
      if (request != nullptr && ucp_request_check_status(request) == UCS_INPROGRESS) {
        all_done = false;
      }
    }
    if (all_done) break;
  }
  for (void* request : closing) {
    if (ucp_request_check_status(request) != UCS_INPROGRESS) ucp_request_free(request);
  }
  peers_.clear();
  peer_of_ep_.clear();
}

void UcxNode::Impl::CheckDeadlines() {
  if (calls_.empty()) return;
  const auto now = Clock::now();
  std::vector<uint64_t> expired;
  for (auto& [id, call] : calls_) {
    if (call.deadline <= now) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    FailCall(id, absl::DeadlineExceededError(
                     absl::StrCat(options_.name, ": no reply to call ", id, " in time")));
  }
}

void UcxNode::Impl::FailCall(uint64_t call_id, absl::Status status) {
  auto it = calls_.find(call_id);
  if (it == calls_.end()) return;
  it->second.promise.set_value(std::move(status));
  calls_.erase(it);
}

void UcxNode::Impl::FailPeer(PeerId peer_id, absl::Status status) {
  std::vector<uint64_t> failed;
  for (auto& [id, call] : calls_) {
    if (call.peer == peer_id) failed.push_back(id);
  }
  for (uint64_t id : failed) FailCall(id, status);
}

void UcxNode::Impl::ClosePeerEndpoint(Peer& peer) {
  if (peer.ep == nullptr) return;
  peer_of_ep_.erase(peer.ep);
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* request = ucp_ep_close_nbx(peer.ep, &param);
  // A forced close completes without the peer; free the request whenever it finishes.
  if (request != nullptr && !UCS_PTR_IS_ERR(request)) ucp_request_free(request);
  peer.ep = nullptr;
}

PeerId UcxNode::Impl::AddPeer(ucp_ep_h ep, std::string name) {
  const PeerId id = next_peer_++;
  peers_[id] = Peer{ep, std::move(name), absl::OkStatus()};
  peer_of_ep_[ep] = id;
  return id;
}

absl::StatusOr<ucp_ep_h> UcxNode::Impl::CreateEndpoint(ucp_ep_params_t& params) {
  params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &Impl::OnEndpointError;
  params.err_handler.arg = this;
  ucp_ep_h ep = nullptr;
  FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_ep_create(worker_, &params, &ep), "ucp_ep_create"));
  return ep;
}

void UcxNode::Impl::OnConnRequest(ucp_conn_request_h request, void* arg) {
  Impl* self = static_cast<Impl*>(arg);
  if (self->stopping_) {
    ucp_listener_reject(self->listener_, request);
    return;
  }
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
  params.conn_request = request;
  absl::StatusOr<ucp_ep_h> ep = self->CreateEndpoint(params);
  if (!ep.ok()) {
    FERRY_LOG_ERROR("{}: accepting a connection failed: {}", self->options_.name,
                    ep.status().ToString());
    return;
  }
  const PeerId id = self->AddPeer(*ep, "accepted");
  FERRY_LOG_DEBUG("{}: accepted peer {}", self->options_.name, id);
}

void UcxNode::Impl::OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  Impl* self = static_cast<Impl*>(arg);
  auto it = self->peer_of_ep_.find(ep);
  if (it == self->peer_of_ep_.end()) return;
  const PeerId id = it->second;
  Peer& peer = self->peers_[id];
  peer.error = UcsToStatus(status, absl::StrCat(self->options_.name, ": peer ", id, " (",
                                                peer.name, ") failed"));
  // A peer error is decided here, so it is logged here (once). A client going away is routine
  // for a server; a server going away is not, for its clients.
  if (peer.name == "accepted") {
    FERRY_LOG_INFO("{}", peer.error.ToString());
  } else {
    FERRY_LOG_WARN("{}", peer.error.ToString());
  }
  self->FailPeer(id, peer.error);
  // The endpoint is unusable; close it outside the callback.
  self->peer_of_ep_.erase(it);
  self->Post([self, ep] {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* request = ucp_ep_close_nbx(ep, &param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) ucp_request_free(request);
  });
  peer.ep = nullptr;
}

ucs_status_t UcxNode::Impl::OnAmRequest(void* arg, const void* header, size_t header_length,
                                        void* data, size_t length,
                                        const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->OnAm(true, header, header_length, data, length, param);
}

ucs_status_t UcxNode::Impl::OnAmReply(void* arg, const void* header, size_t header_length,
                                      void* data, size_t length,
                                      const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->OnAm(false, header, header_length, data, length, param);
}

ucs_status_t UcxNode::Impl::OnAmPing(void* arg, const void* header, size_t header_length,
                                     void* /*data*/, size_t /*length*/,
                                     const ucp_am_recv_param_t* param) {
  Impl* self = static_cast<Impl*>(arg);
  if (header_length != sizeof(uint64_t) ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) {
    return UCS_OK;
  }
  auto it = self->peer_of_ep_.find(param->reply_ep);
  if (it == self->peer_of_ep_.end()) return UCS_OK;
  uint64_t call_id;
  std::memcpy(&call_id, header, sizeof(call_id));
  self->SendAm(it->second, kAmReply, call_id, Buffer(0), false).IgnoreError();
  return UCS_OK;
}

ucs_status_t UcxNode::Impl::OnAm(bool is_request, const void* header, size_t header_length,
                                 void* data, size_t length, const ucp_am_recv_param_t* param) {
  if (header_length != sizeof(uint64_t)) {
    FERRY_LOG_WARN("{}: dropping a message with a {}-byte transport header", options_.name,
                   header_length);
    return UCS_OK;
  }
  uint64_t call_id;
  std::memcpy(&call_id, header, sizeof(call_id));
  PeerId peer = 0;
  if (is_request) {
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0 || param->reply_ep == nullptr) {
      FERRY_LOG_WARN("{}: dropping a request without a reply endpoint", options_.name);
      return UCS_OK;
    }
    auto it = peer_of_ep_.find(param->reply_ep);
    if (it == peer_of_ep_.end()) return UCS_OK;  // endpoint already failed
    peer = it->second;
  } else if (calls_.count(call_id) == 0) {
    return UCS_OK;  // a late reply to a call that already timed out
  }
  if (length > options_.max_message_bytes) {
    Deliver(is_request, peer, call_id,
            absl::ResourceExhaustedError(absl::StrCat("message of ", length,
                                                      " bytes exceeds the limit of ",
                                                      options_.max_message_bytes)));
    return UCS_OK;  // not receiving a rendezvous payload drops it
  }
  Buffer buffer = node_->buffers_.Acquire(length);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
    if (length > 0) std::memcpy(buffer.data(), data, length);
    Deliver(is_request, peer, call_id, std::move(buffer));
    return UCS_OK;
  }
  // Rendezvous: UCX pulls the payload straight into our buffer.
  auto* op = new RecvOp{this, call_id, is_request, peer, std::move(buffer)};
  ucp_request_param_t recv_param{};
  recv_param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  recv_param.cb.recv_am = &Impl::OnRecvDone;
  recv_param.user_data = op;
  void* request = ucp_am_recv_data_nbx(worker_, data, op->data.data(), length, &recv_param);
  if (request == nullptr) {
    OnRecvDone(nullptr, UCS_OK, length, op);
  } else if (UCS_PTR_IS_ERR(request)) {
    OnRecvDone(nullptr, UCS_PTR_STATUS(request), 0, op);
  } else {
    ++inflight_ops_;
  }
  return UCS_OK;
}

void UcxNode::Impl::OnRecvDone(void* request, ucs_status_t status, size_t /*length*/,
                               void* user_data) {
  std::unique_ptr<RecvOp> op(static_cast<RecvOp*>(user_data));
  Impl* self = op->impl;
  if (request != nullptr) {
    --self->inflight_ops_;
    ucp_request_free(request);
  }
  if (status != UCS_OK) {
    self->node_->buffers_.Release(std::move(op->data));
    self->Deliver(op->is_request, op->peer, op->call_id,
                  UcsToStatus(status, absl::StrCat(self->options_.name, ": rendezvous receive")));
    return;
  }
  self->Deliver(op->is_request, op->peer, op->call_id, std::move(op->data));
}

void UcxNode::Impl::Deliver(bool is_request, PeerId peer, uint64_t call_id,
                            absl::StatusOr<Buffer> data) {
  if (is_request) {
    if (handler_) {
      handler_(peer, call_id, std::move(data));
    } else if (data.ok()) {
      node_->buffers_.Release(std::move(*data));
    }
    return;
  }
  auto it = calls_.find(call_id);
  if (it == calls_.end()) {
    if (data.ok()) node_->buffers_.Release(std::move(*data));
    return;
  }
  it->second.promise.set_value(std::move(data));
  calls_.erase(it);
}

absl::Status UcxNode::Impl::SendAm(PeerId peer_id, unsigned am_id, uint64_t call_id, Buffer data,
                                   bool request) {
  auto it = peers_.find(peer_id);
  if (it == peers_.end()) {
    node_->buffers_.Release(std::move(data));
    return absl::NotFoundError(absl::StrCat(options_.name, ": unknown peer ", peer_id));
  }
  if (!it->second.error.ok() || it->second.ep == nullptr) {
    node_->buffers_.Release(std::move(data));
    return it->second.error.ok() ? absl::UnavailableError(absl::StrCat(
                                       options_.name, ": peer ", peer_id, " disconnected"))
                                 : it->second.error;
  }
  auto* op = new SendOp{this, call_id, request, peer_id, std::move(data)};
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.cb.send = &Impl::OnSendDone;
  param.user_data = op;
  // REPLY: the receiver learns which endpoint to answer on.
  param.flags = UCP_AM_SEND_FLAG_REPLY |
                (op->data.size() <= options_.eager_limit ? UCP_AM_SEND_FLAG_EAGER
                                                         : UCP_AM_SEND_FLAG_RNDV);
  // The header is copied by UCX before ucp_am_send_nbx returns; the data stays with op.
  void* status_ptr = ucp_am_send_nbx(it->second.ep, am_id, &op->call_id, sizeof(op->call_id),
                                     op->data.data(), op->data.size(), &param);
  if (status_ptr == nullptr) {
    node_->buffers_.Release(std::move(op->data));
    delete op;
    return absl::OkStatus();
  }
  if (UCS_PTR_IS_ERR(status_ptr)) {
    node_->buffers_.Release(std::move(op->data));
    delete op;
    return UcsToStatus(UCS_PTR_STATUS(status_ptr),
                       absl::StrCat(options_.name, ": send to peer ", peer_id));
  }
  ++inflight_ops_;
  return absl::OkStatus();
}

void UcxNode::Impl::OnSendDone(void* request, ucs_status_t status, void* user_data) {
  std::unique_ptr<SendOp> op(static_cast<SendOp*>(user_data));
  Impl* self = op->impl;
  --self->inflight_ops_;
  ucp_request_free(request);
  self->node_->buffers_.Release(std::move(op->data));
  if (status != UCS_OK && op->is_request) {
    self->FailCall(op->call_id, UcsToStatus(status, absl::StrCat(self->options_.name,
                                                                 ": send to peer ", op->peer)));
  }
}

absl::StatusOr<int> UcxNode::Impl::Listen(const std::string& host, int port) {
  FERRY_ASSIGN_OR_RETURN(sockaddr_in addr, ResolveIpv4(host, port));
  int bound_port = 0;
  FERRY_RETURN_IF_ERROR(RunOnThread([&]() -> absl::Status {
    if (listener_ != nullptr) return absl::FailedPreconditionError("already listening");
    ucp_listener_params_t params{};
    params.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    params.sockaddr.addrlen = sizeof(addr);
    params.conn_handler.cb = &Impl::OnConnRequest;
    params.conn_handler.arg = this;
    FERRY_RETURN_IF_ERROR(UcsToStatus(
        ucp_listener_create(worker_, &params, &listener_),
        absl::StrCat(options_.name, ": listen on ", host, ":", port)));
    ucp_listener_attr_t attr{};
    attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    FERRY_RETURN_IF_ERROR(UcsToStatus(ucp_listener_query(listener_, &attr), "ucp_listener_query"));
    bound_port = ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port);
    return absl::OkStatus();
  }));
  return bound_port;
}

absl::StatusOr<PeerId> UcxNode::Impl::Connect(const std::string& host, int port) {
  FERRY_ASSIGN_OR_RETURN(sockaddr_in addr, ResolveIpv4(host, port));
  PeerId id = 0;
  FERRY_RETURN_IF_ERROR(RunOnThread([&]() -> absl::Status {
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
    params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    params.sockaddr.addrlen = sizeof(addr);
    FERRY_ASSIGN_OR_RETURN(ucp_ep_h ep, CreateEndpoint(params));
    id = AddPeer(ep, absl::StrCat(host, ":", port));
    return absl::OkStatus();
  }));
  // Handshake: one small message, answered by the peer's transport, completes UCX's wire-up
  // before any real traffic. (UCX 1.13 asserts when larger AM sends queued during wire-up are
  // replayed onto shared-memory lanes; a small first message avoids that and also makes an
  // unreachable peer an error here.)
  std::future<CallResult> ping = Call(id, Buffer(0), options_.call_timeout, kAmPing);
  if (ping.wait_for(std::chrono::nanoseconds(
          absl::ToInt64Nanoseconds(options_.call_timeout + absl::Seconds(1)))) !=
      std::future_status::ready) {
    Disconnect(id);
    return absl::DeadlineExceededError(absl::StrCat(options_.name, ": connect to ", host, ":",
                                                    port, " timed out"));
  }
  CallResult reply = ping.get();
  if (!reply.ok()) {
    Disconnect(id);
    return absl::Status(reply.status().code(),
                        absl::StrCat("connect to ", host, ":", port, ": ",
                                     reply.status().message()));
  }
  node_->buffers_.Release(std::move(*reply));
  return id;
}

std::future<CallResult> UcxNode::Impl::Call(PeerId peer, Buffer message, absl::Duration timeout,
                                            unsigned am_id) {
  if (timeout <= absl::ZeroDuration()) timeout = options_.call_timeout;
  std::promise<CallResult> promise;
  std::future<CallResult> future = promise.get_future();
  if (stopping_) {
    promise.set_value(absl::CancelledError(absl::StrCat(options_.name, ": shut down")));
    return future;
  }
  const uint64_t call_id = next_call_++;
  const auto deadline = DeadlineAfter(timeout);
  auto shared_message = std::make_shared<Buffer>(std::move(message));
  auto shared_promise = std::make_shared<std::promise<CallResult>>(std::move(promise));
  Post([this, peer, call_id, deadline, shared_message, shared_promise, am_id] {
    calls_.emplace(call_id, PendingCall{peer, deadline, std::move(*shared_promise)});
    absl::Status sent = SendAm(peer, am_id, call_id, std::move(*shared_message), true);
    if (!sent.ok()) FailCall(call_id, std::move(sent));
  });
  return future;
}

absl::Status UcxNode::Impl::Reply(PeerId peer, uint64_t call_id, Buffer message) {
  if (stopping_) return absl::CancelledError(absl::StrCat(options_.name, ": shut down"));
  auto shared_message = std::make_shared<Buffer>(std::move(message));
  Post([this, peer, call_id, shared_message] {
    absl::Status sent = SendAm(peer, kAmReply, call_id, std::move(*shared_message), false);
    if (!sent.ok()) FERRY_LOG_DEBUG("{}: reply dropped: {}", options_.name, sent.ToString());
  });
  return absl::OkStatus();
}

absl::StatusOr<std::string> UcxNode::Impl::DescribePeer(PeerId peer_id) {
  std::string text;
  FERRY_RETURN_IF_ERROR(RunOnThread([&]() -> absl::Status {
    auto it = peers_.find(peer_id);
    if (it == peers_.end() || it->second.ep == nullptr) {
      return absl::NotFoundError(absl::StrCat("no endpoint for peer ", peer_id));
    }
    char* buffer = nullptr;
    size_t size = 0;
    FILE* stream = open_memstream(&buffer, &size);
    if (stream == nullptr) return absl::InternalError("open_memstream failed");
    ucp_ep_print_info(it->second.ep, stream);
    fclose(stream);
    text.assign(buffer, size);
    free(buffer);
    return absl::OkStatus();
  }));
  return text;
}

void UcxNode::Impl::Disconnect(PeerId peer_id) {
  RunOnThread([&]() -> absl::Status {
    auto it = peers_.find(peer_id);
    if (it == peers_.end()) return absl::OkStatus();
    FailPeer(peer_id, absl::CancelledError(absl::StrCat("peer ", peer_id, " disconnected")));
    ClosePeerEndpoint(it->second);
    peers_.erase(it);
    return absl::OkStatus();
  }).IgnoreError();
}

absl::Status UcxNode::Impl::PeerStatus(PeerId peer_id) {
  absl::Status result;
  FERRY_RETURN_IF_ERROR(RunOnThread([&]() -> absl::Status {
    auto it = peers_.find(peer_id);
    if (it == peers_.end()) return absl::NotFoundError(absl::StrCat("unknown peer ", peer_id));
    result = it->second.error;
    return absl::OkStatus();
  }));
  return result;
}

UcxNode::UcxNode(const UcxNodeOptions& options) : options_(options) {}

UcxNode::~UcxNode() { Shutdown(); }

absl::StatusOr<std::unique_ptr<UcxNode>> UcxNode::Create(const UcxNodeOptions& options) {
  std::unique_ptr<UcxNode> node(new UcxNode(options));
  node->impl_ = std::make_unique<Impl>(node.get());
  FERRY_RETURN_IF_ERROR(node->impl_->Init());
  return node;
}

void UcxNode::SetRequestHandler(RequestHandler handler) {
  impl_->RunOnThread([&]() -> absl::Status {
    impl_->handler_ = std::move(handler);
    return absl::OkStatus();
  }).IgnoreError();
}

absl::StatusOr<int> UcxNode::Listen(const std::string& host, int port) {
  return impl_->Listen(host, port);
}

absl::StatusOr<PeerId> UcxNode::Connect(const std::string& host, int port) {
  return impl_->Connect(host, port);
}

std::future<CallResult> UcxNode::Call(PeerId peer, Buffer message, absl::Duration timeout) {
  return impl_->Call(peer, std::move(message), timeout);
}

CallResult UcxNode::Await(std::future<CallResult>& future, absl::Duration timeout) {
  if (timeout <= absl::ZeroDuration()) timeout = options_.call_timeout;
  // The progress thread completes every call by its deadline; the slack covers a busy thread.
  const absl::Duration bound = timeout + absl::Seconds(1);
  // Spin briefly first: a reply within the busy-poll window costs no sleep and wake-up.
  const auto spin_until = Clock::now() + std::chrono::nanoseconds(
                                             absl::ToInt64Nanoseconds(options_.busy_poll));
  while (Clock::now() < spin_until) {
    if (future.wait_for(std::chrono::seconds(0)) == std::future_status::ready) return future.get();
    std::this_thread::yield();
  }
  if (future.wait_for(std::chrono::nanoseconds(absl::ToInt64Nanoseconds(bound))) !=
      std::future_status::ready) {
    return absl::DeadlineExceededError(absl::StrCat(options_.name, ": call not completed"));
  }
  return future.get();
}

absl::Status UcxNode::Reply(PeerId peer, uint64_t call_id, Buffer message) {
  return impl_->Reply(peer, call_id, std::move(message));
}

absl::StatusOr<std::string> UcxNode::DescribePeer(PeerId peer) { return impl_->DescribePeer(peer); }

void UcxNode::Disconnect(PeerId peer) { impl_->Disconnect(peer); }

absl::Status UcxNode::PeerStatus(PeerId peer) { return impl_->PeerStatus(peer); }

void UcxNode::Shutdown() {
  if (impl_) impl_->Stop();
}

}  // namespace ferry::transport
